"""Logging to one file per day in logs/ (``app_YYYYMMDD.log``), old days deleted.

Files are never renamed: at midnight the handler simply opens the new day's file by name,
because on Windows another process may hold yesterday's file open and a rename would fail.

A log file that cannot be written (logs/ is not a folder, read-only or full) never stops the app: the
handler says so once on stderr and sends the records there instead, until the next day's file opens.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TextIO

Clock = Callable[[], datetime]


class _StderrType:
    """The fallback "sys.stderr as it is when a record comes" (tests and consoles replace sys.stderr)."""


STDERR = _StderrType()

_TAG = "_i2v_app_handler"  # marks handlers we own, so a second setup replaces them
_LOG_NAME_RE = re.compile(r"^app_(\d{8})\.log$")
FILE_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-8s [%(threadName)s] %(name)s: %(message)s"
FILE_DATEFMT = "%Y-%m-%d %H:%M:%S"
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(message)s"
CONSOLE_DATEFMT = "%H:%M:%S"


def log_path_for(log_dir: Path, day: date) -> Path:
    """The log file of one day: ``log_dir / "app_YYYYMMDD.log"``."""
    return Path(log_dir) / f"app_{day:%Y%m%d}.log"


def prune_old_logs(log_dir: Path, today: date, retention_days: int) -> list[Path]:
    """Delete ``app_YYYYMMDD.log`` files dated more than ``retention_days`` before ``today``.

    Files another process holds open (Windows) are skipped and retried at the next prune.
    Returns the files deleted.
    """
    oldest_kept = today - timedelta(days=retention_days)
    deleted: list[Path] = []
    try:
        candidates = list(Path(log_dir).iterdir())
    except OSError:
        return deleted
    for path in candidates:
        match = _LOG_NAME_RE.match(path.name)
        if match is None:
            continue
        try:
            day = datetime.strptime(match.group(1), "%Y%m%d").date()
        except ValueError:
            continue
        if day >= oldest_kept:
            continue
        try:
            path.unlink()
        except OSError:  # PermissionError included: held open elsewhere
            continue
        deleted.append(path)
    return deleted


class DailyFileHandler(logging.FileHandler):
    """Writes to ``app_<today>.log``; on the first record of a new day, opens that day's file.

    If the file cannot be opened or written, it warns once on stderr and writes the records to
    ``fallback`` (a stream, e.g. sys.stderr; None drops them, where a console handler shows them
    already); the next day's file is tried again.
    """

    def __init__(self, log_dir: Path, retention_days: int, clock: Clock = datetime.now,
                 fallback: TextIO | None | _StderrType = STDERR):
        self.log_dir = Path(log_dir)
        self.retention_days = retention_days
        self._clock = clock
        self._day = clock().date()
        self._fallback = fallback
        self.failed = False  # True while the records go to the fallback
        super().__init__(log_path_for(self.log_dir, self._day), encoding="utf-8", delay=True)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.stream = self._open()
        except OSError as exc:
            self._fail(exc)
        prune_old_logs(self.log_dir, self._day, retention_days)

    @property
    def path(self) -> Path:
        """The file written now."""
        return Path(self.baseFilename)

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle() holds self.lock around emit, so the switch is thread-safe.
        try:
            today = self._clock().date()
            if today != self._day:
                self._switch_to(today)
            if not self.failed:
                try:
                    if self.stream is None:
                        self.stream = self._open()
                    self.stream.write(self.format(record) + self.terminator)
                    self.stream.flush()
                    return
                except OSError as exc:
                    self._fail(exc)
            stream = sys.stderr if self._fallback is STDERR else self._fallback
            if stream is not None:
                stream.write(self.format(record) + self.terminator)
                stream.flush()
        except Exception:
            self.handleError(record)

    def _fail(self, exc: OSError) -> None:
        """Stop writing the file (until the next day) and say so once, on stderr."""
        self.failed = True
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:  # the buffered lines cannot be written either
                pass
        reason = exc.strerror or str(exc)
        sys.stderr.write(f"[WARN] Cannot write the log file {self.path} ({reason}); logging to the console instead. / "
                         f"无法写入日志文件 {self.path}({reason}),日志改为输出到控制台。\n")
        sys.stderr.flush()

    def _switch_to(self, day: date) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None  # emit opens the new file by name
        self._day = day
        self.failed = False  # a new file: try again
        self.baseFilename = os.path.abspath(log_path_for(self.log_dir, day))
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)  # deleted while the app ran: make it again
        except OSError:
            pass  # opening the file fails too, and says why
        prune_old_logs(self.log_dir, day, self.retention_days)


def setup_logging(
    log_dir: Path,
    level: str = "INFO",
    retention_days: int = 14,
    *,
    console: bool = True,
    clock: Clock = datetime.now,
) -> Path | None:
    """Send the root logger to a daily file in ``log_dir`` (and INFO+ to stderr); returns the file,
    or None when it cannot be written (then the records go to stderr, after one warning there).

    Calling it again replaces the handlers it added before instead of adding more.
    ``clock`` exists for tests that simulate a change of date.
    """
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"Unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    if retention_days < 1:
        raise ValueError(f"retention_days must be at least 1, got {retention_days}")

    root = logging.getLogger()
    remove_logging()

    # With a console handler the records are on stderr already; without one, a file that fails sends them there.
    file_handler = DailyFileHandler(log_dir, retention_days, clock, fallback=None if console else STDERR)
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT, FILE_DATEFMT))
    handlers: list[logging.Handler] = [file_handler]
    if console:
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setLevel(max(numeric_level, logging.INFO))
        console_handler.setFormatter(logging.Formatter(CONSOLE_FORMAT, CONSOLE_DATEFMT))
        handlers.append(console_handler)
    for handler in handlers:
        setattr(handler, _TAG, True)
        root.addHandler(handler)
    root.setLevel(numeric_level)
    logging.captureWarnings(True)
    return None if file_handler.failed else file_handler.path


def remove_logging() -> None:
    """Remove and close the handlers ``setup_logging`` added, and stop capturing warnings."""
    logging.captureWarnings(False)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _TAG, False)]:
        root.removeHandler(handler)
        handler.close()
