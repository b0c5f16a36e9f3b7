"""The local backend: one worker thread that runs the queued jobs, in order, on this machine's GPU.

A backend has start(), stop(), wake() (a job was queued), cancel(job_id) (stop a running job) and status().
The worker claims jobs from the store, so it also runs jobs that another process queued (`python -m app batch
--no-wait`): it polls the store every `poll_s` seconds, and wake() spares a job queued in this process that
wait. What a job does is the `run` function it is given (app.jobqueue runs GenerationService.generate).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Collection
from typing import Any, Protocol

from app.errors import AppError, CancelledError
from app.jobs.store import Job, JobState, JobStore
from app.video import pid_alive

log = logging.getLogger(__name__)

# report(fraction 0..1, English text, Chinese text, seconds left or None)
Report = Callable[[float, str, str, "float | None"], None]
RunJob = Callable[[Job, Report, threading.Event], str]


class Backend(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def wake(self) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def status(self) -> dict[str, Any]: ...


def runner_id() -> str:
    """This process as a job's runner: "host:pid"."""
    return f"{socket.gethostname()}:{os.getpid()}"


def local_runner_alive(runner: str, *, me: str | None = None) -> bool:
    """Whether the local runner "host:pid" still runs. `me` is the runner of the process asking: a job that
    names it is from an earlier process that had the same id (process ids are reused, in containers
    above all), since this one has not started its worker yet. A runner of another host, or not of the
    "host:pid" form (a Celery worker's, from before the backend was switched), cannot run against this
    machine's queue: it counts as gone."""
    host, _, pid = runner.rpartition(":")
    if runner == me or host != socket.gethostname() or not pid.isdigit():
        return False
    return pid_alive(int(pid))


class LocalWorker:
    """One daemon thread that claims queued jobs in order and runs them with `run(job, report, cancel)`,
    which returns the video's file name. report() stores progress and sets `cancel` when the store says a
    cancel was asked for. An AppError fails the job with its message, CancelledError cancels it, any other
    exception fails it with its type and text. With `only_ids`, only those jobs are taken."""

    def __init__(self, store: JobStore, run: RunJob, *, poll_s: float = 1.0, runner: str | None = None,
                 only_ids: Collection[str] | None = None, on_change: Callable[[str], None] | None = None):
        self.store = store
        self.runner = runner or runner_id()
        self._run = run
        self._poll_s = poll_s
        self._only_ids = None if only_ids is None else frozenset(only_ids)
        self._on_change = on_change or (lambda job_id: None)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()  # start() and stop() from different threads: the app's and the loader's
        self._current: tuple[str, threading.Event] | None = None
        self._last_error: AppError | None = None  # why the store could not be read, until it can again

    # Backend ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread, once; after stop() it is not started any more."""
        with self._start_lock:
            if self._thread is None and not self._stopping.is_set():
                thread = threading.Thread(target=self._loop, name="job-worker", daemon=True)
                thread.start()
                self._thread = thread

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a running one stops after its current step and goes back to the queue (the
        attempt is not counted: it was not the job that stopped the app)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            if self._current is not None:
                self._current[1].set()
        with self._start_lock:  # a start() running in another thread has finished: its thread is started
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            if self._current is not None and self._current[0] == job_id:
                self._current[1].set()

    def status(self) -> dict[str, Any]:
        try:
            counts = self.store.counts()
        except AppError as exc:  # a status bar must not fail: it says what is wrong instead
            self._last_error = exc
        if self._last_error is not None:
            return {"ok": False, "en": f"Queue: the local worker cannot read the queue. {self._last_error.en}",
                    "zh": f"队列:本机任务进程无法读取队列。{self._last_error.zh}"}
        queued, running = counts[JobState.QUEUED], counts[JobState.RUNNING]
        return {"ok": True, "en": f"Queue: {running} running, {queued} waiting (this GPU).",
                "zh": f"队列:{running} 个运行中,{queued} 个等待中(本机 GPU)。"}

    @property
    def current(self) -> str | None:
        """The id of the job this worker runs now."""
        with self._lock:
            return None if self._current is None else self._current[0]

    # The thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.store.claim_next(self.runner, self._only_ids)
                self._last_error = None
            except AppError as exc:  # the database is locked for long or unwritable: say so, try again
                if self._last_error is None:
                    log.warning("the job worker could not claim a job: %s", exc.en)
                self._last_error = exc
                job = None
            if job is None:
                self._wake.wait(self._poll_s)
                self._wake.clear()
                continue
            try:
                self._run_one(job)
            except Exception:  # the store failed while ending the job: it is recovered at the next start
                log.exception("job %s could not be recorded", job.id)

    def _run_one(self, job: Job) -> None:
        cancel = threading.Event()
        with self._lock:
            self._current = (job.id, cancel)
            if self._stopping.is_set():  # claimed while stop() ran: it goes straight back to the queue
                cancel.set()

        def report(fraction: float, en: str, zh: str, eta_s: float | None = None) -> None:
            try:
                if self.store.set_progress(job.id, fraction, en, zh, eta_s):
                    cancel.set()
            except AppError as exc:  # progress is only shown: a busy database must not fail the job
                log.debug("progress of job %s not stored: %s", job.id, exc.en)
            self._on_change(job.id)

        log.info("job %s started (attempt %d)", job.id, job.attempts)
        self._on_change(job.id)
        try:
            result = self._run(job, report, cancel)
        except CancelledError as exc:
            if self._stopping.is_set() and self.store.release(job.id, self.runner) is not None:
                log.info("job %s goes back to the queue: the app is stopping", job.id)
            else:
                self.store.finish(job.id, JobState.CANCELLED, error_en=exc.en, error_zh=exc.zh)
                log.info("job %s cancelled", job.id)
        except AppError as exc:
            self.store.finish(job.id, JobState.FAILED, error_en=exc.en, error_zh=exc.zh)
            log.warning("job %s failed: %s", job.id, exc.en)
        except Exception as exc:  # keep the worker alive; the trace goes to the log
            log.exception("job %s failed", job.id)
            self.store.finish(job.id, JobState.FAILED, error_en=f"Unexpected error: {type(exc).__name__}: {exc}",
                              error_zh=f"意外错误:{type(exc).__name__}: {exc}")
        else:
            self.store.finish(job.id, JobState.DONE, result=result)
            log.info("job %s done: %s", job.id, result)
        finally:
            with self._lock:
                self._current = None
            self._on_change(job.id)
