"""The celery backend: the front end's side of scale-out. Queued jobs go to GPU workers through Redis; their
progress comes back into the job store, and each finished video is handed to `collect`, which writes it into
this machine's outputs folder.

Decisions:
- The SQLite store stays the front end's record, as with the local backend: a job is "queued" while it waits
  in the broker (its place in the queue panel is its place in the broker's list) and "running" from the moment
  a worker reports it started, with that worker as its runner ("celery:NAME").
- One thread does all the talking to Redis, in rounds every `poll_s` seconds (POLL_S): it sends the new queued jobs,
  reads every sent job's state with one MGET, and mirrors progress, cancels and ends into the store. A second
  thread writes the finished videos (and runs their exports), so a long export never holds up the progress of
  the other jobs. Nothing the UI calls (cancel, status) waits on Redis.
- A job is sent once, whichever process sends it: the key i2v:task:JOB is set only if unset (SET NX) before
  the send, and names the Celery task that runs the job. A front end that restarts finds its sent jobs there;
  a broker that lost its data (Redis restarted without saving) has lost that key too, and the job is sent again.
- Cancel is the key i2v:cancel:TASK, which the worker checks at every step; the task of a job that is still
  waiting is revoked as well. A finished video whose job was cancelled meanwhile is dropped, not written.
- The broker's failures are never fatal after the start: the round fails, status() says since when the broker
  is unreachable, and the next round after it is back goes on where the last one stopped.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.config import Settings
from app.errors import AppError, CancelledError
from app.jobs import celery_app as ca
from app.jobs.store import Job, JobState, JobStore

log = logging.getLogger(__name__)

RUNNER_PREFIX = "celery:"
# Collect(job, result) writes the worker's video (result["video_b64"], result["metadata"]) into outputs/ and
# returns its file name; an AppError fails the job with its message.
Collect = Callable[[Job, dict], str]

# A round every POLL_S: a finished job is seen this soon (one MGET for all jobs; Redis answers in microseconds).
POLL_S = 0.05
RESEND_CHECK_S = 2.0  # how often the waiting jobs' task keys are checked (a broker that lost its data)
STATUS_REFRESH_S = 2.0  # how often the workers' heartbeats are read for status()
ACTIVE_LIMIT = 1000  # the most queued and running jobs one round looks at (the rest wait for a later round)


def is_celery_runner(runner: str | None) -> bool:
    return bool(runner) and str(runner).startswith(RUNNER_PREFIX)


@dataclass
class _Sent:
    task_id: str
    progress: tuple | None = None  # the last progress written into the store
    cancel_sent: bool = False


class SourceMissingError(AppError):
    """The video an extend continues is no longer in the outputs folder."""


class CeleryBackend:
    """Runs the store's queued jobs on Celery workers (see the module's docstring)."""

    def __init__(self, store: JobStore, settings: Settings, collect: Collect, *, poll_s: float = POLL_S,
                 on_change: Callable[[str], None] | None = None):
        self.store = store
        self.settings = settings
        self.url = settings.service.broker_url
        self._collect = collect
        self._poll_s = poll_s
        self._on_change = on_change or (lambda job_id: None)
        self._sent: dict[str, _Sent] = {}
        self._collecting: set[str] = set()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._collector: ThreadPoolExecutor | None = None
        self._redis: Any = None
        self._app: Any = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._down_since: float | None = None
        self._down_reason = ""
        self._workers: list[dict] = []
        self._workers_read = 0.0
        self._resend_checked = 0.0

    # Backend ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the broker (BrokerError naming its URL if it does not answer), then start the rounds."""
        if self._thread is not None:
            return
        self._redis = ca.check_broker(self.url, who="app")
        self._errors = ca.broker_errors()
        self._app = ca.make_celery(self.settings.service)
        self._collector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="celery-collect")
        self._read_workers()
        self._thread = threading.Thread(target=self._loop, name="celery-jobs", daemon=True)
        self._thread.start()
        log.info("celery backend started with the broker %s", ca.masked_url(self.url))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the rounds. Jobs keep running on the workers; a later start finds them again."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._collector is not None:
            self._collector.shutdown(wait=True)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """The store already says cancel; the next round tells the worker (or revokes the waiting task)."""
        self._wake.set()

    def status(self) -> dict[str, Any]:
        shown = ca.masked_url(self.url)
        if self._down_since is not None:
            since = datetime.fromtimestamp(self._down_since).strftime("%H:%M:%S")
            return {"ok": False,
                    "en": f"Queue: the job broker {shown} is unreachable since {since} ({self._down_reason}); "
                          "jobs go on when it is back.",
                    "zh": f"队列:自 {since} 起无法连接任务代理 {shown}({self._down_reason});"
                          "恢复连接后任务会继续。"}
        counts = self.store.counts()
        queued, running = counts[JobState.QUEUED], counts[JobState.RUNNING]
        workers = self._workers
        if not workers:
            return {"ok": True,
                    "en": f"Queue: {running} running, {queued} waiting; no GPU worker is connected to {shown} "
                          "(start one with: python -m app worker --gpu 0).",
                    "zh": f"队列:{running} 个运行中,{queued} 个等待中;没有 GPU worker 连接到 {shown}"
                          "(启动方式:python -m app worker --gpu 0)。"}
        names = ", ".join(sorted(w.get("name", "?") for w in workers))
        return {"ok": True,
                "en": f"Queue: {running} running, {queued} waiting; {len(workers)} GPU workers ({names}).",
                "zh": f"队列:{running} 个运行中,{queued} 个等待中;{len(workers)} 个 GPU worker({names})。",
                "workers": [dict(w) for w in workers]}

    def workers(self) -> list[dict]:
        """The connected workers' last heartbeats (name, pid, gpu, model, state, demo, job, messages, VRAM)."""
        return [dict(w) for w in self._workers]

    # The rounds ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._round()
            except self._errors as exc:
                self._broker_down(exc)
            except AppError as exc:  # the store is locked for long or unwritable: try again next round
                log.warning("celery backend: %s", exc.en)
            except Exception:  # keep the rounds going; the trace goes to the log
                log.exception("celery backend round failed")
            else:
                self._broker_back()
            self._wake.wait(self._poll_s)
            self._wake.clear()

    def _broker_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.time()
            log.warning("the job broker %s is unreachable: %s", ca.masked_url(self.url), exc)
        self._down_reason = str(exc) or type(exc).__name__

    def _broker_back(self) -> None:
        if self._down_since is not None:
            log.info("the job broker %s is reachable again", ca.masked_url(self.url))
            self._down_since = None
            self._down_reason = ""

    def _round(self) -> None:
        # The list has every queued and running job first; a job followed here that ended meanwhile (cancelled
        # while it waited) is read on its own in _poll.
        jobs = {job.id: job for job in self.store.list(limit=ACTIVE_LIMIT) if not job.finished}
        now = time.monotonic()
        if now - self._workers_read >= STATUS_REFRESH_S:
            self._read_workers()
        self._check_lost(jobs, now)
        for job in jobs.values():
            if job.id in self._sent or job.id in self._collecting:
                continue
            if job.state is JobState.QUEUED:
                self._send(job)
            elif job.state is JobState.RUNNING and is_celery_runner(job.runner):
                self._adopt(job)
        self._poll(jobs)

    def _read_workers(self) -> None:
        self._workers = ca.read_heartbeats(self._redis)
        self._workers_read = time.monotonic()

    def _check_lost(self, jobs: dict[str, Job], now: float) -> None:
        """A waiting job whose task key is gone was lost with the broker's data: it is sent again."""
        if now - self._resend_checked < RESEND_CHECK_S:
            return
        self._resend_checked = now
        waiting = [job_id for job_id, sent in self._sent.items()
                   if job_id in jobs and jobs[job_id].state is JobState.QUEUED]
        if not waiting:
            return
        pipe = self._redis.pipeline(transaction=False)
        for job_id in waiting:
            pipe.exists(ca.task_key(job_id))
        for job_id, exists in zip(waiting, pipe.execute()):
            if not exists:
                log.warning("job %s was lost by the broker; it is sent again", job_id)
                self._sent.pop(job_id, None)

    # Sending ---------------------------------------------------------------------------------------
    def _send(self, job: Job) -> None:
        task_id = ca.new_task_id(job.id)
        if not self._redis.set(ca.task_key(job.id), task_id, nx=True, ex=ca.KEY_TTL_S):
            existing = self._redis.get(ca.task_key(job.id))
            if existing is not None:  # sent before (by this app before a restart, or another process)
                self._sent[job.id] = _Sent(existing.decode() if isinstance(existing, bytes) else str(existing))
                return
            return  # the key expired between the two calls: the next round sends it
        try:
            args = self._task_args(job)
        except AppError as exc:
            self._redis.delete(ca.task_key(job.id))
            self.store.finish(job.id, JobState.FAILED, error_en=exc.en, error_zh=exc.zh)
            self._on_change(job.id)
            return
        try:
            self._app.send_task(ca.TASK_NAME, args=args, task_id=task_id, queue=ca.QUEUE)
        except BaseException:
            try:
                self._redis.delete(ca.task_key(job.id))
            except self._errors:
                pass  # the broker is gone: the key is checked again when it is back
            raise
        self._sent[job.id] = _Sent(task_id)
        log.info("job %s sent to the workers as task %s", job.id, task_id)

    def _task_args(self, job: Job) -> list:
        """(job id, request parameters, input image as base64 PNG, the video an extend continues or None).
        Exports are made here after the video is written, so they are not sent."""
        params = {k: v for k, v in job.params.items() if k != "exports"}
        image_b64 = ""
        if job.image:
            path = self.store.inputs_dir / job.image
            try:
                image_b64 = base64.b64encode(path.read_bytes()).decode("ascii")
            except OSError as exc:
                raise AppError(f"The job's input image {path} could not be read ({exc.strerror or exc}).",
                               f"无法读取任务的输入图片 {path}({exc.strerror or exc})。") from None
        return [job.id, params, image_b64, self._source(params.get("extend_from"))]

    def _source(self, name: Any) -> dict | None:
        """The video an extend continues, for a worker that has no access to this machine's outputs folder:
        the MP4, its JSON and its input image."""
        if not name:
            return None
        import json

        outputs = self.settings.path("outputs")
        video = outputs / str(name)
        try:
            data = video.read_bytes()
            meta_text = video.with_suffix(".json").read_text(encoding="utf-8")
        except OSError:
            raise SourceMissingError(f"{name} is not in the outputs folder any more, so it cannot be extended.",
                                     f"输出目录中已没有 {name},无法延长。") from None
        source = {"name": video.name, "video_b64": base64.b64encode(data).decode("ascii"), "metadata_json": meta_text}
        try:
            input_name = json.loads(meta_text).get("input_image")
        except ValueError:
            input_name = None
        if isinstance(input_name, str) and input_name and "/" not in input_name and "\\" not in input_name:
            try:
                source["input_name"] = input_name
                source["input_b64"] = base64.b64encode((outputs / input_name).read_bytes()).decode("ascii")
            except OSError:
                source.pop("input_name")
        return source

    def _adopt(self, job: Job) -> None:
        """A running job of an earlier start of this app: follow it again, or send it again if the broker
        lost it."""
        value = self._redis.get(ca.task_key(job.id))
        if value is None:
            if self.store.release(job.id, job.runner or "") is not None:
                log.warning("job %s was lost by the broker; it is queued again", job.id)
                self._on_change(job.id)
            return
        self._sent[job.id] = _Sent(value.decode() if isinstance(value, bytes) else str(value))

    # Following -------------------------------------------------------------------------------------
    def _poll(self, jobs: dict[str, Job]) -> None:
        sent = [(job_id, s) for job_id, s in self._sent.items()]
        if not sent:
            return
        backend = self._app.backend
        raw = backend.mget([backend.get_key_for_task(s.task_id) for _, s in sent])
        for (job_id, s), value in zip(sent, raw):
            job = jobs.get(job_id) or self.store.get(job_id)
            if job is None or (job.finished and job.state is not JobState.CANCELLED):
                self._sent.pop(job_id, None)  # removed from the queue, or ended by someone else
                continue
            if job.state is JobState.CANCELLED:  # cancelled while it waited: stop it wherever it is
                self._cancel_task(job_id, s, forget_job=True)
                continue
            meta = backend.decode(value) if value is not None else None
            self._follow(job, s, meta)

    def _cancel_task(self, job_id: str, s: _Sent, *, forget_job: bool) -> None:
        if not s.cancel_sent:
            self._redis.set(ca.cancel_key(s.task_id), "1", ex=ca.KEY_TTL_S)
            self._app.control.revoke(s.task_id)
            s.cancel_sent = True
            log.info("job %s: cancel sent to task %s", job_id, s.task_id)
        if forget_job:
            # The cancel flag stays (a worker that takes the task later stops at once); the job -> task key
            # goes, so a retry sends the job again as a new task.
            self._redis.delete(ca.task_key(job_id))
            self._sent.pop(job_id, None)

    def _follow(self, job: Job, s: _Sent, meta: dict | None) -> None:
        status = (meta or {}).get("status", "PENDING")
        info = (meta or {}).get("result")
        if status == "PENDING":
            if job.state is JobState.RUNNING and not self._redis.exists(ca.task_key(job.id)):
                if self.store.release(job.id, job.runner or "") is not None:  # the broker lost it: again
                    log.warning("job %s was lost by the broker; it is queued again", job.id)
                    self._sent.pop(job.id, None)
                    self._on_change(job.id)
            elif job.state is JobState.RUNNING and job.started_at and \
                    time.time() - job.started_at > self.settings.service.result_expires_s:
                self._end(job, s, JobState.FAILED,
                          "Its result expired in the broker before the app collected it (the app was away longer "
                          "than service.result_expires_s). Retry it to run it again.",
                          "结果在应用取回之前已在任务代理中过期(应用离线时间超过 service.result_expires_s)。"
                          "请重试以再次运行。")
            elif job.cancel_requested:
                self._cancel_task(job.id, s, forget_job=False)
            return
        if status in ("STARTED", "PROGRESS"):
            info = info if isinstance(info, dict) else {}
            job = self._claim(job, info)
            if job is None:
                return
            if status == "PROGRESS":
                progress = (round(float(info.get("fraction", 0.0)), 4), str(info.get("en", "")),
                            str(info.get("zh", "")), info.get("eta_s"))
                if progress != s.progress:
                    s.progress = progress
                    if self.store.set_progress(job.id, *progress):
                        job = self.store.get(job.id) or job
                    self._on_change(job.id)
            if job.cancel_requested:
                self._cancel_task(job.id, s, forget_job=False)
            return
        if status == "SUCCESS":
            result = info if isinstance(info, dict) else {}
            outcome = result.get("outcome")
            if outcome == "done":
                job = self._claim(job, result)
                if job is None:
                    return
                if job.cancel_requested:
                    self._end(job, s, JobState.CANCELLED, *_cancelled())
                    return
                self._sent.pop(job.id, None)
                if not self._redis.set(ca.collect_key(s.task_id), "1", nx=True, ex=ca.COLLECT_TTL_S):
                    return  # another front end on this queue writes it
                self._collecting.add(job.id)
                assert self._collector is not None
                self._collector.submit(self._write, job, s, result)
            elif outcome == "cancelled":
                self._end(job, s, JobState.CANCELLED, *_cancelled())
            else:
                self._end(job, s, JobState.FAILED, str(result.get("en") or "The worker failed without a reason."),
                          str(result.get("zh") or result.get("en") or "worker 失败,未说明原因。"))
            return
        if status == "REVOKED":
            self._end(job, s, JobState.CANCELLED, *_cancelled())
        elif status == "FAILURE":
            exc = info if isinstance(info, dict) else {}
            what = f"{exc.get('exc_type', 'Error')}: {exc.get('exc_message', '')}".rstrip(": ")
            self._end(job, s, JobState.FAILED, f"The worker failed: {what}", f"worker 运行失败:{what}")
        # RETRY and unknown states: wait for the next one

    def _claim(self, job: Job, info: dict) -> Job | None:
        """The job marked running by the worker named in `info`, if the store still has it queued."""
        if job.state is not JobState.QUEUED:
            return job
        worker = str(info.get("worker") or info.get("hostname") or "worker")
        claimed = self.store.claim(job.id, RUNNER_PREFIX + worker)
        if claimed is None:  # cancelled in the meantime
            fresh = self.store.get(job.id)
            if fresh is not None and fresh.state is JobState.CANCELLED:
                s = self._sent.get(job.id)
                if s is not None:
                    self._cancel_task(job.id, s, forget_job=True)
            return None
        self._on_change(job.id)
        return claimed

    def _end(self, job: Job, s: _Sent, state: JobState, en: str | None = None, zh: str | None = None,
             result: str | None = None) -> None:
        """Record the job's end, then drop what Redis keeps for its task."""
        self.store.finish(job.id, state, result=result, error_en=en, error_zh=zh)
        self._sent.pop(job.id, None)
        self._forget(job.id, s.task_id)
        self._on_change(job.id)
        log.info("job %s %s%s", job.id, state.value, f": {en}" if en and state is not JobState.DONE else "")

    def _forget(self, job_id: str, task_id: str) -> None:
        backend = self._app.backend
        self._redis.delete(ca.task_key(job_id), ca.attempts_key(task_id), ca.cancel_key(task_id),
                           ca.collect_key(task_id), backend.get_key_for_task(task_id))

    def _write(self, job: Job, s: _Sent, result: dict) -> None:
        """In the collector thread: write the video into outputs/, then end the job."""
        try:
            try:
                name = self._collect(job, result)
            except CancelledError as exc:
                self._finish_collected(job, s, JobState.CANCELLED, exc.en, exc.zh)
            except AppError as exc:
                log.warning("job %s: the video could not be written: %s", job.id, exc.en)
                self._finish_collected(job, s, JobState.FAILED, exc.en, exc.zh)
            except Exception as exc:  # the trace goes to the log
                log.exception("job %s: the video could not be written", job.id)
                self._finish_collected(job, s, JobState.FAILED, f"Unexpected error: {type(exc).__name__}: {exc}",
                                       f"意外错误:{type(exc).__name__}: {exc}")
            else:
                self._finish_collected(job, s, JobState.DONE, result=name)
        finally:
            self._collecting.discard(job.id)

    def _finish_collected(self, job: Job, s: _Sent, state: JobState, en: str | None = None, zh: str | None = None,
                          result: str | None = None) -> None:
        self.store.finish(job.id, state, result=result, error_en=en, error_zh=zh)
        self._on_change(job.id)
        log.info("job %s %s%s", job.id, state.value, f": {result}" if result else "")
        try:
            self._forget(job.id, s.task_id)
        except self._errors as exc:  # the keys expire on their own
            log.info("job %s: its keys stay in the broker until they expire (%s)", job.id, exc)


def _cancelled() -> tuple[str, str]:
    exc = CancelledError()
    return exc.en, exc.zh
