"""app/logging_setup.py: daily files by name, switch at midnight without renaming, retention,
no duplicate handlers. The root logger is restored after every test."""

from __future__ import annotations

import logging
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from app import logging_setup
from app.logging_setup import DailyFileHandler, remove_logging, setup_logging


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    remove_logging()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2025, 3, 9, 23, 59, 58))


def our_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, logging_setup._TAG, False)]


def flush() -> None:
    for handler in our_handlers():
        handler.flush()


def test_writes_utf8_file_named_by_day_with_full_format(tmp_path, clock):
    log_dir = tmp_path / "日志 logs"
    path = setup_logging(log_dir, clock=clock, console=False)

    assert path == log_dir / "app_20250309.log"
    logging.getLogger("app.test").info("生成完成 in %.1f s", 1.25)
    logging.getLogger("app.test").debug("hidden at INFO")
    flush()
    text = path.read_text(encoding="utf-8")
    assert "生成完成 in 1.2 s" in text
    assert " INFO " in text and "app.test" in text and "[MainThread]" in text
    assert text[:4].isdigit() and text[4] == "-"  # starts with the date
    assert "hidden at INFO" not in text


def test_console_shows_info_in_short_format_and_file_gets_debug(tmp_path, clock, capsys):
    path = setup_logging(tmp_path, level="DEBUG", clock=clock, console=True)
    log = logging.getLogger("app.console")
    log.debug("debug detail")
    log.info("server started")
    flush()

    err = capsys.readouterr().err
    assert "INFO server started" in err
    assert "debug detail" not in err
    assert "app.console" not in err  # short format
    text = path.read_text(encoding="utf-8")
    assert "debug detail" in text and "server started" in text


def test_date_change_opens_the_new_file_and_keeps_the_old_one(tmp_path, clock):
    first = setup_logging(tmp_path, clock=clock, console=False)
    log = logging.getLogger("app.midnight")
    log.info("before midnight")
    flush()
    old_inode = first.stat().st_ino

    clock.now += timedelta(seconds=5)  # 2025-03-10 00:00:03
    log.info("after midnight")
    flush()

    second = tmp_path / "app_20250310.log"
    [handler] = our_handlers()
    assert isinstance(handler, DailyFileHandler)
    assert handler.path == second
    assert first.stat().st_ino == old_inode  # same file, not renamed or recreated
    assert first.read_text(encoding="utf-8").count("\n") == 1
    assert "before midnight" in first.read_text(encoding="utf-8")
    assert "after midnight" not in first.read_text(encoding="utf-8")
    assert "after midnight" in second.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app_20250309.log", "app_20250310.log"]


def test_retention_on_setup_deletes_only_old_app_logs(tmp_path, clock):
    for name in ["app_20250101.log", "app_20250222.log",  # older than 14 days: deleted
                 "app_20250223.log", "app_20250308.log",  # within 14 days: kept
                 "app_notadate.log", "app_20251399.log", "other_20200101.log", "notes.txt"]:
        (tmp_path / name).write_text("x", encoding="utf-8")

    setup_logging(tmp_path, retention_days=14, clock=clock, console=False)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "app_20250223.log", "app_20250308.log", "app_20250309.log",
        "app_20251399.log", "app_notadate.log", "notes.txt", "other_20200101.log"]


def test_retention_runs_again_at_the_day_switch(tmp_path, clock):
    setup_logging(tmp_path, retention_days=2, clock=clock, console=False)
    (tmp_path / "app_20250307.log").write_text("x", encoding="utf-8")  # 2 days old: kept
    logging.getLogger("app").info("day one")
    assert (tmp_path / "app_20250307.log").exists()

    clock.now += timedelta(days=1)  # now 3 days old
    logging.getLogger("app").info("day two")

    assert not (tmp_path / "app_20250307.log").exists()
    assert (tmp_path / "app_20250309.log").exists()
    assert (tmp_path / "app_20250310.log").exists()


def test_file_held_open_elsewhere_is_skipped_not_fatal(tmp_path, clock, monkeypatch):
    held = tmp_path / "app_20240101.log"
    free = tmp_path / "app_20240102.log"
    held.write_text("x", encoding="utf-8")
    free.write_text("x", encoding="utf-8")
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == held.name:
            raise PermissionError(13, "The process cannot access the file", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    path = setup_logging(tmp_path, clock=clock, console=False)

    assert held.exists()
    assert not free.exists()
    assert path.exists()


def test_second_setup_replaces_handlers_instead_of_duplicating(tmp_path, clock):
    setup_logging(tmp_path, clock=clock, console=True)
    path = setup_logging(tmp_path, clock=clock, console=True)
    assert len(our_handlers()) == 2
    assert sum(isinstance(h, DailyFileHandler) for h in logging.getLogger().handlers) == 1

    logging.getLogger("app").warning("only once")
    flush()
    assert path.read_text(encoding="utf-8").count("only once") == 1

    setup_logging(tmp_path, clock=clock, console=False)
    assert len(our_handlers()) == 1


def test_python_warnings_go_to_the_log(tmp_path, clock):
    path = setup_logging(tmp_path, clock=clock, console=False)
    warnings.warn("torch_dtype is deprecated", DeprecationWarning, stacklevel=1)
    flush()
    text = path.read_text(encoding="utf-8")
    assert "py.warnings" in text and "torch_dtype is deprecated" in text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"level": "LOUD"}, "Unknown log level 'LOUD'"),
    ({"retention_days": 0}, "at least 1"),
])
def test_bad_settings_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        setup_logging(tmp_path, console=False, **kwargs)
    assert our_handlers() == []


def test_remove_logging_restores_root_logger(tmp_path, clock):
    before = list(logging.getLogger().handlers)
    setup_logging(tmp_path, clock=clock)
    remove_logging()
    assert logging.getLogger().handlers == before


@pytest.mark.parametrize("blocked", ["logs-is-a-file", "todays-file-is-a-folder"])
def test_an_unwritable_log_file_falls_back_to_stderr_with_one_warning(tmp_path, clock, capsys, blocked):
    # Made unwritable by what is in its place, not by permissions: root writes through those.
    log_dir = tmp_path / "logs"
    if blocked == "logs-is-a-file":
        log_dir.write_text("not a folder", encoding="utf-8")
    else:
        (log_dir / "app_20250309.log").mkdir(parents=True)
    path = setup_logging(log_dir, clock=clock, console=False)
    assert path is None
    log = logging.getLogger("app.fallback")
    log.info("first record")
    log.warning("second record")

    err = capsys.readouterr().err
    assert err.count("[WARN] Cannot write the log file") == 1
    assert str(log_dir / "app_20250309.log") in err and "无法写入日志文件" in err
    assert "INFO     [MainThread] app.fallback: first record" in err  # the file's format: the trace finds its thread
    assert "WARNING  [MainThread] app.fallback: second record" in err
    assert "Logging error" not in err and "Traceback" not in err


def test_a_log_file_that_fills_up_falls_back_once_and_the_next_day_writes_again(tmp_path, clock, capsys):
    path = setup_logging(tmp_path, clock=clock, console=False)
    [handler] = our_handlers()
    handler.stream.close()
    handler.stream = open("/dev/full", "w", encoding="utf-8")  # every write now fails with ENOSPC
    log = logging.getLogger("app.diskfull")
    log.info("lost to the full disk")
    log.info("still going")
    err = capsys.readouterr().err
    assert err.count("[WARN] Cannot write the log file") == 1 and "No space left on device" in err
    assert "app.diskfull: lost to the full disk" in err and "app.diskfull: still going" in err
    assert "Logging error" not in err

    clock.now += timedelta(days=1)  # space is back by the next day: its file is written again
    log.info("a new day")
    flush()
    assert "a new day" in (tmp_path / "app_20250310.log").read_text(encoding="utf-8")
    assert "a new day" not in capsys.readouterr().err
    assert path == tmp_path / "app_20250309.log"


def test_with_a_console_handler_a_failed_file_only_warns(tmp_path, clock, capsys):
    (tmp_path / "logs").write_text("not a folder", encoding="utf-8")
    assert setup_logging(tmp_path / "logs", clock=clock, console=True) is None
    logging.getLogger("app.console").info("shown once")
    err = capsys.readouterr().err
    assert err.count("[WARN] Cannot write the log file") == 1
    assert err.count("shown once") == 1  # by the console handler, not twice
