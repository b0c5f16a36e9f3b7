"""The GPU worker: `python -m app worker --gpu N`, a Celery worker that runs the queue's jobs on one GPU for a
front end whose service.backend is celery (app.jobs.celery_backend; docs/scale-out.md).

Decisions:
- One worker per GPU, one job at a time (app.jobs.celery_app has the Celery settings). `--gpu N` sets
  CUDA_VISIBLE_DEVICES=N before torch is imported (app.cli does it first thing), so the worker sees only its GPU.
- The model loads once per worker process: Celery's prefork pool runs jobs in a child process, which starts
  loading the model when it starts (worker_process_init) in a background thread, so the pool does not take a
  long load for a failed start; a job that arrives meanwhile waits for it. A child that dies is replaced by a
  new one, which loads the model again.
- The worker needs no shared disk: each job writes into the process's private temp folder, the MP4 is sent
  back as base64 with its metadata (at most service.max_result_mb), and the folder is emptied after every job.
  The front end writes the video into its outputs folder and makes the exports there.
- Cancel is a Redis flag the worker reads at every step (Celery's revoke does not stop a running task); a
  cancelled job sends nothing back.
- The attempt counter (INCR at every start of the task) ends a job that has already stopped
  service.max_attempts worker processes, instead of letting it stop every worker it meets.
- Nothing reaches the network but the broker: the model is only ever read from disk (the hub is set offline),
  and no telemetry is sent.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.config import Settings
from app.errors import AppError, CancelledError
from app.jobs import celery_app as ca

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    """What the worker's main process hands to its pool processes (they are forked from it)."""

    settings: Settings
    name: str
    source: str  # the model: "tiny", a folder or a hub id
    gpu: int | None = None


@dataclass
class _Process:
    """A pool process's own state: its model, its private folder and its broker connection."""

    service: Any
    folder: Path
    redis: Any
    job: str | None = None
    started: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event)
    changed: threading.Event = field(default_factory=threading.Event)  # a beat is due now (a job started or ended)


_config: WorkerConfig | None = None
_process: _Process | None = None


def worker_name(name: str | None, gpu: int | None) -> str:
    """The worker's name in the queue: NAME@HOST (default gpuN@HOST, or cpu@HOST without --gpu)."""
    base = name or (f"gpu{gpu}" if gpu is not None else "cpu")
    return base if "@" in base else f"{base}@{socket.gethostname()}"


def run_worker(settings: Settings, *, source: str, name: str | None = None, gpu: int | None = None,
               loglevel: str = "INFO") -> int:
    """Check the broker (BrokerError naming its URL), then run the Celery worker until it is stopped (Ctrl+C or
    SIGTERM: it finishes the job it runs first). Returns the worker's exit code."""
    global _config
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model is read from disk only; nothing but the broker is reached
    ca.check_broker(settings.service.broker_url, who="worker")
    from celery import signals

    settings = one_gpu(settings)
    _config = WorkerConfig(settings=settings, name=worker_name(name, gpu), source=source, gpu=gpu)
    app = ca.make_celery(settings.service)
    register(app)
    signals.worker_process_init.connect(_init_process, weak=False)
    signals.worker_process_shutdown.connect(_shutdown_process, weak=False)
    # Imported once here, not in every pool process: a process that replaces a dead one starts sooner. Importing
    # torch does not start CUDA, so forking after it is safe; the model itself loads in each pool process.
    from app.engine import loader  # noqa: F401
    from app import service  # noqa: F401
    log.info("worker %s starts with the broker %s (model %s, GPU %s)", _config.name,
             ca.masked_url(settings.service.broker_url), source, "-" if gpu is None else gpu)
    argv = ["worker", f"--hostname={_config.name}", "--pool=prefork", "--concurrency=1", "--prefetch-multiplier=1",
            f"--queues={ca.QUEUE}", "--without-gossip", "--without-mingle", f"--loglevel={loglevel}"]
    code = app.worker_main(argv)
    return int(code or 0)


def one_gpu(settings: Settings) -> Settings:
    """The settings a worker runs with: one GPU per worker process (--gpu N), so a config's model.gpus (two GPUs
    on one video, the local backend's mode) is dropped with a log line."""
    if not settings.model.gpus:
        return settings
    log.info("worker ignores model.gpus=%s: one GPU per worker process", settings.model.gpus)
    return settings.model_copy(update={"model": settings.model.model_copy(update={"gpus": ""})})


def register(app: Any) -> Any:
    """The task on `app` (the worker's Celery app)."""

    @app.task(name=ca.TASK_NAME, bind=True)
    def generate(self: Any, job_id: str, params: dict, image_b64: str, source: dict | None = None) -> dict:
        return run_job(self, job_id, params, image_b64, source)

    return generate


# The pool process ------------------------------------------------------------------------------------

def _init_process(**_: Any) -> None:
    """worker_process_init: a private folder, a broker connection, and the model loading in the background."""
    global _process
    assert _config is not None
    from app.engine.loader import load_engine
    from app.service import GenerationService

    folder = Path(tempfile.mkdtemp(prefix="i2v-worker-"))
    settings = _config.settings.model_copy(
        update={"paths": _config.settings.paths.model_copy(update={"outputs": str(folder)})})
    source = _config.source
    service = GenerationService(settings, lambda: load_engine(settings, source=source))
    service.start_loading()
    _process = _Process(service=service, folder=folder, redis=ca.redis_client(settings.service.broker_url))
    threading.Thread(target=_heartbeat, args=(_process,), name="worker-heartbeat", daemon=True).start()
    log.info("worker %s process %d: loading the model %s", _config.name, os.getpid(), source)


def _shutdown_process(**_: Any) -> None:
    proc = _process
    if proc is None:
        return
    proc.stop.set()
    proc.changed.set()
    try:
        if _config is not None:
            proc.redis.delete(ca.worker_key(_config.name))
    except Exception:  # the broker is gone: the heartbeat expires on its own
        pass
    shutil.rmtree(proc.folder, ignore_errors=True)


def _heartbeat(proc: _Process) -> None:
    """Tell the front ends this worker is here, what it does and whether its model is ready: every HEARTBEAT_S
    seconds, and at once when the model is loaded or a job starts or ends."""
    assert _config is not None
    while not proc.stop.is_set():
        proc.changed.clear()
        status = proc.service.status()
        beat = {"name": _config.name, "pid": os.getpid(), "gpu": _config.gpu, "model": status.get("model"),
                "state": status["state"], "demo": status.get("demo", False), "job": proc.job, "since": proc.started,
                "message_en": status["message"].en, "message_zh": status["message"].zh,
                **{key: status[key] for key in ("gpu_name", "vram_total_gib", "vram_free_gib", "vram_used_by_app_gib")
                   if key in status}}
        try:
            proc.redis.set(ca.worker_key(_config.name), json.dumps(beat), ex=ca.HEARTBEAT_TTL_S)
        except Exception as exc:  # the broker is away: the next beat tries again
            log.debug("heartbeat not sent: %s", exc)
        if not proc.service.wait_until_loaded(0):
            proc.service.wait_until_loaded(ca.HEARTBEAT_S)
        else:
            proc.changed.wait(ca.HEARTBEAT_S)


# A job -------------------------------------------------------------------------------------------------

def _failed(en: str, zh: str) -> dict:
    return {"outcome": "failed", "en": en, "zh": zh}


def _cancelled() -> dict:
    exc = CancelledError()
    return {"outcome": "cancelled", "en": exc.en, "zh": exc.zh}


def run_job(task: Any, job_id: str, params: dict, image_b64: str, source: dict | None) -> dict:
    """One job on this process's model: {"outcome": "done", "video_b64", "metadata", "name", "warnings"}, or
    {"outcome": "failed" | "cancelled", "en", "zh"}."""
    assert _config is not None and _process is not None
    proc, name = _process, _config.name
    task_id = task.request.id
    service_settings = _config.settings.service
    attempt = proc.redis.incr(ca.attempts_key(task_id))
    proc.redis.expire(ca.attempts_key(task_id), ca.KEY_TTL_S)
    if attempt > service_settings.max_attempts:
        stopped = attempt - 1
        log.warning("job %s not run: it stopped %d worker processes", job_id, stopped)
        return _failed(
            f"This job stopped {stopped} workers (the worker process died while running it: out of memory, a "
            "crash, or it was killed), so it is not run again on its own. Retry it to run it once more.",
            f"此任务已导致 {stopped} 个 worker 停止(运行时 worker 进程退出:内存不足、崩溃或被终止),"
            "因此不再自动重新运行。可点击“重试”再运行一次。")
    if proc.redis.exists(ca.cancel_key(task_id)):
        return _cancelled()
    from app.jobqueue import PARAM_KEYS, progress_of

    cancel = threading.Event()
    errors = ca.broker_errors()

    def on_progress(p: Any) -> None:
        fraction, en, zh, eta = progress_of(p)
        try:
            if proc.redis.exists(ca.cancel_key(task_id)):
                cancel.set()
        except errors as exc:  # the broker is away: the job goes on without reporting, and checks again next step
            log.debug("cancel flag not read: %s", exc)
            return
        try:
            task.update_state(state="PROGRESS", meta={"fraction": fraction, "en": en, "zh": zh, "eta_s": eta,
                                                      "worker": name, "pid": os.getpid(), "attempt": attempt})
        except Exception as exc:  # progress is for show: the job goes on without it
            log.debug("progress not sent: %s", exc)

    proc.job = job_id
    proc.changed.set()
    log.info("job %s (task %s, attempt %d) started", job_id, task_id, attempt)
    try:
        from app.service import GenerationRequest

        image = _decode_image(image_b64) if image_b64 else None
        if source:
            _place_source(proc.folder, source)
        values = {key: params[key] for key in PARAM_KEYS if key in params and key != "exports"}
        values["video"] = values.get("video") or {}
        req = GenerationRequest(image=image, job_id=job_id, **values)
        result = proc.service.generate(req, on_progress=on_progress, cancel=cancel)
        data = result.video_path.read_bytes()
        limit = service_settings.max_result_mb * 1024 * 1024
        if len(data) > limit:
            size = len(data) / 1024 / 1024
            return _failed(
                f"The video is {size:.3g} MB, more than a worker may send back (service.max_result_mb = "
                f"{service_settings.max_result_mb:g}). Make it shorter or smaller, or raise service.max_result_mb "
                "on the workers.",
                f"视频大小为 {size:.3g} MB,超过 worker 可回传的上限(service.max_result_mb = "
                f"{service_settings.max_result_mb:g})。请缩短视频或降低分辨率,或在 worker 上调高 service.max_result_mb。")
        metadata = json.loads(result.metadata_path.read_text(encoding="utf-8"))
        metadata["worker"] = {"name": name, "pid": os.getpid(), "attempt": attempt}
        log.info("job %s done on %s (%d bytes)", job_id, name, len(data))
        return {"outcome": "done", "name": result.video_path.name, "metadata": metadata,
                "video_b64": base64.b64encode(data).decode("ascii"),
                "warnings": [[w.en, w.zh] for w in result.warnings]}
    except CancelledError:
        log.info("job %s cancelled", job_id)
        return _cancelled()
    except AppError as exc:  # the message names this worker: the front end's user cannot see its console
        log.warning("job %s failed: %s", job_id, exc.en)
        return _failed(f"{exc.en} (worker {name})", f"{exc.zh}(worker {name})")
    except Exception as exc:  # a bug or a broken GPU: the job fails with its cause, the worker goes on
        log.exception("job %s failed", job_id)
        return _failed(f"Unexpected error on the worker {name}: {type(exc).__name__}: {exc}",
                       f"worker {name} 出现意外错误:{type(exc).__name__}: {exc}")
    finally:
        proc.job = None
        proc.changed.set()
        _empty(proc.folder)


def _decode_image(data: str) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def _safe_name(value: Any) -> str:
    name = str(value)
    if not name or Path(name).name != name or "/" in name or "\\" in name or name.startswith("."):
        raise AppError(f"The front end sent an unusable file name {name!r}.", f"前端发送了无效的文件名 {name!r}。")
    return name


def _place_source(folder: Path, source: dict) -> None:
    """The video an extend continues, with its JSON and input image, where the service looks for it."""
    video = folder / _safe_name(source["name"])
    video.write_bytes(base64.b64decode(source["video_b64"]))
    video.with_suffix(".json").write_text(source.get("metadata_json") or "{}", encoding="utf-8")
    if source.get("input_name") and source.get("input_b64"):
        (folder / _safe_name(source["input_name"])).write_bytes(base64.b64decode(source["input_b64"]))


def _empty(folder: Path) -> None:
    """Remove everything a job left in the private folder."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for path in entries:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
