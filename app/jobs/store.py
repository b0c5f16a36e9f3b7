"""The job queue's record: one SQLite table of jobs, shared by every process that uses the same file.

Decisions:
- stdlib sqlite3 in WAL mode: readers (the UI polling the list) never wait for the writer, and a write cut
  off by a killed process is rolled back on the next open, so the file is never left half-written.
  synchronous=NORMAL: in WAL mode a committed transaction survives a killed process; only a power cut may
  lose the last few commits (progress updates, mostly), and it still corrupts nothing.
- Every write is one short transaction opened with BEGIN IMMEDIATE, so it takes the write lock at once and a
  claim (read the first queued job, mark it running) is atomic across threads and processes; busy_timeout
  makes a second writer wait for the lock instead of failing.
- One connection per thread (and per process: a forked child opens its own), kept open: opening one per call
  would make WAL checkpoint and remove its files again and again.
- Jobs run in `seq` order; a retried job gets a new seq and goes to the end of the queue.
- The input images are copies in `inputs_dir`, beside the database. Several jobs may share one copy (the
  same image with several seeds), so a copy is removed only when no job names it any more. `add` checks,
  inside its transaction, that the copy is there, and `clear_finished` removes copies inside its own, so a
  copy is never removed under a job that is being added.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from app.errors import AppError, InputError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another one's lock; transactions here take milliseconds

_COLUMNS = ("id", "seq", "state", "params", "image", "owner", "created_at", "started_at", "finished_at",
            "attempts", "progress", "progress_en", "progress_zh", "eta_s", "result", "error_en", "error_zh",
            "runner", "cancel_requested")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        state TEXT NOT NULL,
        params TEXT NOT NULL,
        image TEXT NOT NULL,
        owner TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        progress REAL NOT NULL DEFAULT 0,
        progress_en TEXT NOT NULL DEFAULT '',
        progress_zh TEXT NOT NULL DEFAULT '',
        eta_s REAL,
        result TEXT,
        error_en TEXT,
        error_zh TEXT,
        runner TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq)",
)


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class Job:
    """One row of the queue, as it was when read."""

    id: str
    seq: int
    state: JobState
    params: dict
    image: str  # the file name of the input copy in JobStore.inputs_dir ("" for a job without one)
    owner: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    progress: float  # 0..1
    progress_en: str
    progress_zh: str
    eta_s: float | None
    result: str | None  # the video's file name in outputs/
    error_en: str | None
    error_zh: str | None
    runner: str | None  # "host:pid" of the local worker's process, or the Celery worker that runs it
    cancel_requested: bool

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class QueueError(AppError):
    """The queue's database could not be opened or written."""


class MissingInputCopyError(InputError):
    """A job's input copy is not in the queue's inputs folder."""


def unknown_job(job_id: str) -> InputError:
    return InputError(f"No job {job_id} in the queue.", f"队列中没有任务 {job_id}。")


def _row_to_job(row: sqlite3.Row) -> Job:
    values = dict(zip(_COLUMNS, row))
    values["state"] = JobState(values["state"])
    values["params"] = json.loads(values["params"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values)


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


class JobStore:
    """The jobs in one SQLite file. Safe to use from many threads and processes at once."""

    def __init__(self, path: Path, *, max_attempts: int = 2):
        self.path = Path(path)
        self.max_attempts = max_attempts
        self._local = threading.local()
        try:
            self.inputs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(exc) from None
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise QueueError(
                    f"The queue database {self.path} was made by a newer version of the app; update the app, or "
                    "set service.database to another file.",
                    f"队列数据库 {self.path} 由更新版本的程序创建;请更新程序,或将 service.database 设为其他文件。")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def inputs_dir(self) -> Path:
        """The folder of the jobs' input copies, beside the database."""
        return self.path.parent / "inputs"

    # Connections -----------------------------------------------------------------------------------
    def _error(self, exc: Exception) -> QueueError:
        return QueueError(f"The job queue's database {self.path} could not be used ({exc}). Check that its folder "
                          "is writable and the disk is not full; if the file is damaged, move it away (the queue "
                          "starts empty).",
                          f"无法使用任务队列数据库 {self.path}({exc})。请确认其所在文件夹可写且磁盘未满;"
                          "若该文件已损坏,请将其移走(队列将从空开始)。")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # isolation_level=None: no implicit transactions; each write opens its own with BEGIN IMMEDIATE.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # e.g. a network drive without shared memory: still correct, slower
                log.warning("the queue database %s runs in %s mode, not WAL", self.path, mode)
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection (another call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction that holds the write lock from its start."""
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the transaction is already gone (the failed statement ended it)
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from None
            raise

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    @staticmethod
    def _fetch(conn: sqlite3.Connection, job_id: str) -> Job | None:
        row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _row_to_job(row)

    def _fetch_known(self, conn: sqlite3.Connection, job_id: str) -> Job:
        job = self._fetch(conn, job_id)
        if job is None:
            raise unknown_job(job_id)
        return job

    # Adding and reading ------------------------------------------------------------------------------
    def add(self, params: dict, image: str, owner: str = "") -> Job:
        """Queue one job at the end."""
        return self.add_many([(params, image)], owner)[0]

    def add_many(self, entries: Sequence[tuple[dict, str]], owner: str = "") -> list[Job]:
        """Queue several jobs (params, input copy name) at the end, in this order, all or none."""
        texts = [json.dumps(params, ensure_ascii=False) for params, _ in entries]  # not JSON: refused before writing
        now = time.time()
        with self._write() as conn:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]
            ids = []
            for text, (_, image) in zip(texts, entries):
                if image and not (self.inputs_dir / image).is_file():
                    raise MissingInputCopyError(
                        f"The input copy {image} is not in the queue folder {self.inputs_dir}.",
                        f"队列文件夹 {self.inputs_dir} 中没有输入图片副本 {image}。")
                seq += 1
                job_id = uuid.uuid4().hex[:12]
                conn.execute("INSERT INTO jobs (id, seq, state, params, image, owner, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (job_id, seq, JobState.QUEUED.value, text, image,
                                                             owner, now))
                ids.append(job_id)
            return [self._fetch_known(conn, job_id) for job_id in ids]

    def get(self, job_id: str) -> Job | None:
        rows = self._read(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        return _row_to_job(rows[0]) if rows else None

    def list(self, limit: int = 200) -> list[Job]:
        """Up to `limit` jobs in queue order: every queued and running job first (the oldest if there are
        more), then the most recently added finished ones."""
        rows = self._read(
            f"SELECT {', '.join(_COLUMNS)} FROM (SELECT * FROM jobs ORDER BY state IN ('queued', 'running') DESC, "
            "CASE WHEN state IN ('queued', 'running') THEN seq ELSE -seq END LIMIT ?) ORDER BY seq", (limit,))
        return [_row_to_job(row) for row in rows]

    def position(self, job_id: str) -> int | None:
        """1-based place among the queued jobs (1: runs next); None if the job is not queued."""
        rows = self._read("SELECT (SELECT COUNT(*) FROM jobs q WHERE q.state = 'queued' AND q.seq <= j.seq) "
                          "FROM jobs j WHERE j.id = ? AND j.state = 'queued'", (job_id,))
        return rows[0][0] if rows else None

    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state."""
        found = dict(self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        return {state: int(found.get(state.value, 0)) for state in JobState}

    # Running ---------------------------------------------------------------------------------------
    def claim_next(self, runner: str, only_ids: Collection[str] | None = None) -> Job | None:
        """The first queued job (of `only_ids`, if given), marked running by `runner`; None if there is none.
        Atomic: two workers never get the same job."""
        where, args = "state = 'queued'", []
        if only_ids is not None:
            if not only_ids:
                return None
            where += f" AND id IN ({_placeholders(len(only_ids))})"
            args = list(only_ids)
        with self._write() as conn:
            row = conn.execute(f"SELECT id FROM jobs WHERE {where} ORDER BY seq LIMIT 1", args).fetchone()
            if row is None:
                return None
            self._start(conn, row[0], runner)
            return self._fetch_known(conn, row[0])

    def claim(self, job_id: str, runner: str) -> Job | None:
        """That job, marked running by `runner`, if it is queued; else None."""
        with self._write() as conn:
            job = self._fetch_known(conn, job_id)
            if job.state is not JobState.QUEUED:
                return None
            self._start(conn, job_id, runner)
            return self._fetch_known(conn, job_id)

    @staticmethod
    def _start(conn: sqlite3.Connection, job_id: str, runner: str) -> None:
        conn.execute("UPDATE jobs SET state = 'running', runner = ?, attempts = attempts + 1, started_at = ?, "
                     "finished_at = NULL, progress = 0, progress_en = '', progress_zh = '', eta_s = NULL, "
                     "cancel_requested = 0 WHERE id = ?", (runner, time.time(), job_id))

    def set_progress(self, job_id: str, fraction: float, en: str, zh: str, eta_s: float | None = None) -> bool:
        """Store a running job's progress. Returns True when its runner should stop: a cancel was asked for,
        or the job is no longer running (or no longer there)."""
        with self._write() as conn:
            conn.execute("UPDATE jobs SET progress = ?, progress_en = ?, progress_zh = ?, eta_s = ? "
                         "WHERE id = ? AND state = 'running'",
                         (min(1.0, max(0.0, float(fraction))), en, zh, eta_s, job_id))
            row = conn.execute("SELECT state, cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or row[0] != JobState.RUNNING.value or bool(row[1])

    def finish(self, job_id: str, state: JobState, *, result: str | None = None, error_en: str | None = None,
               error_zh: str | None = None) -> Job:
        """End a queued or running job as done, failed or cancelled; a job already finished is left as it is."""
        state = JobState(state)
        if state not in FINISHED:
            raise ValueError(f"finish() takes done, failed or cancelled, not {state.value}")
        with self._write() as conn:
            job = self._fetch_known(conn, job_id)
            if job.finished:
                return job
            progress = 1.0 if state is JobState.DONE else job.progress
            conn.execute("UPDATE jobs SET state = ?, finished_at = ?, result = ?, error_en = ?, error_zh = ?, "
                         "progress = ?, eta_s = NULL WHERE id = ?",
                         (state.value, time.time(), result, error_en, error_zh if error_zh is not None else error_en,
                          progress, job_id))
            return self._fetch_known(conn, job_id)

    def release(self, job_id: str, runner: str) -> Job | None:
        """Put a job that `runner` stopped on purpose (the app shutting down) back at its place in the queue,
        without counting the attempt. None if it is not running there any more."""
        with self._write() as conn:
            job = self._fetch(conn, job_id)
            if job is None or job.state is not JobState.RUNNING or job.runner != runner:
                return None
            if job.cancel_requested:
                self._cancelled(conn, job_id)
            else:
                conn.execute("UPDATE jobs SET state = 'queued', runner = NULL, started_at = NULL, progress = 0, "
                             "progress_en = '', progress_zh = '', eta_s = NULL, attempts = MAX(attempts - 1, 0) "
                             "WHERE id = ?", (job_id,))
            return self._fetch_known(conn, job_id)

    # Managing ----------------------------------------------------------------------------------------
    @staticmethod
    def _cancelled(conn: sqlite3.Connection, job_id: str) -> None:
        conn.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, eta_s = NULL, error_en = ?, error_zh = ? "
                     "WHERE id = ?", (time.time(), "Cancelled; no video was written.", "已取消,未写入视频。", job_id))

    def request_cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one is asked to stop (its runner sees
        cancel_requested at its next step and ends it as cancelled); a finished one is left as it is."""
        with self._write() as conn:
            job = self._fetch_known(conn, job_id)
            if job.state is JobState.QUEUED:
                self._cancelled(conn, job_id)
            elif job.state is JobState.RUNNING:
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                return job
            return self._fetch_known(conn, job_id)

    def retry(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again, at the end of the queue, with its attempts reset."""
        with self._write() as conn:
            job = self._fetch_known(conn, job_id)
            if job.state not in (JobState.FAILED, JobState.CANCELLED):
                raise InputError(f"Job {job_id} is {job.state.value}: only a failed or cancelled job can be run again.",
                                 f"任务 {job_id} 的状态为 {_STATE_ZH[job.state]}:只有失败或已取消的任务可以重新运行。")
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            conn.execute("UPDATE jobs SET state = 'queued', seq = ?, attempts = 0, started_at = NULL, "
                         "finished_at = NULL, progress = 0, progress_en = '', progress_zh = '', eta_s = NULL, "
                         "result = NULL, error_en = NULL, error_zh = NULL, runner = NULL, cancel_requested = 0 "
                         "WHERE id = ?", (seq, job_id))
            return self._fetch_known(conn, job_id)

    def clear_finished(self) -> int:
        """Remove the done, failed and cancelled jobs, and every input copy no job names any more. Returns
        how many jobs were removed."""
        with self._write() as conn:
            removed = conn.execute("DELETE FROM jobs WHERE state IN ('done', 'failed', 'cancelled')").rowcount
            kept = {row[0] for row in conn.execute("SELECT DISTINCT image FROM jobs")}
            try:
                copies = list(self.inputs_dir.iterdir())
            except OSError:
                copies = []
            for path in copies:
                # Hidden names are copies still being written (see app.jobqueue): never ours to remove.
                if path.name not in kept and not path.name.startswith(".") and path.is_file():
                    try:
                        path.unlink()
                    except OSError as exc:  # held open (Windows): the next clear removes it
                        log.info("could not remove the input copy %s: %s", path.name, exc)
        return removed

    def recover(self, is_alive: Callable[[str], bool]) -> list[Job]:
        """After a start: each running job whose runner is gone (is_alive(runner) is False) goes back to the
        queue at its place, its attempts kept; one that has used max_attempts is failed instead, and one whose
        cancel was asked for is cancelled. Returns the jobs changed."""
        changed = []
        with self._write() as conn:
            rows = conn.execute("SELECT id, runner, attempts, cancel_requested FROM jobs WHERE state = 'running' "
                                "ORDER BY seq").fetchall()
            for job_id, runner, attempts, cancel in rows:
                if runner and is_alive(runner):
                    continue
                if cancel:
                    self._cancelled(conn, job_id)
                elif attempts >= self.max_attempts:
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', finished_at = ?, eta_s = NULL, error_en = ?, error_zh = ? "
                        "WHERE id = ?",
                        (time.time(), f"The app stopped {attempts} times while running this job, so it is not run "
                                      "again on its own. Retry it to run it once more.",
                         f"运行此任务时程序已停止 {attempts} 次,因此不再自动重新运行。可点击“重试”再运行一次。", job_id))
                else:
                    conn.execute("UPDATE jobs SET state = 'queued', runner = NULL, started_at = NULL, progress = 0, "
                                 "progress_en = '', progress_zh = '', eta_s = NULL WHERE id = ?", (job_id,))
                changed.append(self._fetch_known(conn, job_id))
        for job in changed:
            log.info("job %s of a stopped run: now %s (attempts %d)", job.id, job.state.value, job.attempts)
        return changed


_STATE_ZH = {JobState.QUEUED: "排队中", JobState.RUNNING: "运行中", JobState.DONE: "已完成",
             JobState.FAILED: "失败", JobState.CANCELLED: "已取消"}


def state_text(state: JobState, lang: str = "en") -> str:
    """A state's name for people, in `lang`."""
    return _STATE_ZH[state] if lang.lower().startswith("zh") else state.value
