"""JobQueue: generation requests kept in a queue that survives restarts, run one at a time by a backend.

The UI, the CLI (`serve`, `batch`, `jobs`) and the Celery worker use this one class. It sits above
app.service: it checks a request with the service before anything is stored, keeps a copy of the input
image in the queue folder, and turns a stored job back into a GenerationRequest to run it.

Decisions:
- A request is checked (service.resolve) before it is stored, so a queued job never fails on bad input.
- The job's parameters are the request as the user gave it, not the resolved numbers: unset values take
  the defaults of the model that runs the job, as a direct run does.
- The input copy is the decoded, size-capped image, as PNG, named by its content: the same image queued with
  several seeds is kept once.
- A job's video names it ("job_id" in its JSON). A job that runs again after the app stopped first looks for
  that video: if the app stopped after the video was written but before the job was marked done, the
  video is the job's result and it is not made twice.
- The local backend starts taking jobs once the model is loaded; while it loads (or if it failed to),
  queued jobs wait instead of failing one after another.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from app.config import Settings
from app.errors import AppError, CancelledError, InputError
from app.jobs.local import LocalWorker, local_runner_alive, runner_id
from app.jobs.store import FINISHED, Job, JobState, JobStore, MissingInputCopyError, unknown_job
from app.service import GenerationRequest, GenerationResult, GenerationService, ModelState
from app.ui_strings import duration, text

log = logging.getLogger(__name__)

# The fields of a GenerationRequest that a job keeps (all but the image, which is a copy on disk).
PARAM_KEYS = ("prompt", "negative_prompt", "seed", "preset", "video", "segments", "segment_prompts", "crossfade",
              "exports", "extend_from")

WAIT_POLL_S = 0.25  # how often wait() looks at the store for changes made by another process
RUNNER_CHECK_S = 2.0  # how often wait() checks that the process running its job is still there


def progress_of(p: Any) -> tuple[float, str, str, float | None]:
    """(fraction of the whole run, English text, Chinese text, seconds left) of a service progress report:
    "Step 3/10 · about 5 s left", "Segment 2/3 · Step 3/10 · about 12 s left". Denoising is most of a run,
    so it spans 5-90 % of each segment, decoding the rest."""
    segment, segments = getattr(p, "segment", 1), getattr(p, "segments", 1)
    share = p.step / p.total if p.total else 0.0
    eta = None
    if p.stage == "denoise":
        within = 0.05 + 0.85 * share
        if p.eta_s is not None:
            per_step = p.elapsed_s / p.step if p.step else 0.0
            eta = p.eta_s + (segments - segment) * per_step * p.total  # the segments still to come, at this pace
    elif p.stage == "decode":
        within = 0.9 + 0.1 * share
    else:
        within = 0.0
    fraction = min(1.0, (segment - 1 + within) / max(segments, 1))
    texts = []
    for lang in ("en", "zh"):
        head = text("progress_segment", lang, k=segment, n=segments) + " · " if segments > 1 else ""
        if p.stage == "denoise":
            body = text("progress_denoise", lang, i=p.step, n=p.total, eta=duration(eta, lang) if eta is not None else "?")
        elif p.stage == "decode":
            body = text("progress_decode", lang, i=p.step, n=p.total)
        elif p.stage == "compile":
            body = text("progress_compile", lang)
        else:
            body = text("progress_encode", lang)
        texts.append(head + body)
    return fraction, texts[0], texts[1], eta


def _jsonable(value: Any) -> Any:
    """A request value as plain JSON (numpy numbers become Python numbers, tuples lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item"):  # a numpy scalar
        return value.item()
    return str(value)


def _with_label(exc: AppError, label: str) -> AppError:
    """`exc` with `label` (the file it is about) in front of its message."""
    labelled = copy.copy(exc)
    labelled.en, labelled.zh = f"{label}: {exc.en}", f"{label}:{exc.zh}"
    labelled.args = (labelled.en,)
    return labelled


class JobQueue:
    """The queue of generation jobs of one outputs folder, and the backend that runs them."""

    def __init__(self, service: GenerationService, settings: Settings, *, poll_s: float = 1.0):
        self.service = service
        self.settings = settings
        self.store = JobStore(settings.queue_database, max_attempts=settings.service.max_attempts)
        self.runner = runner_id()
        self._poll_s = poll_s
        self._changed = threading.Condition()
        self._version = 0
        self._started = False
        self._notes: dict[str, list[tuple[str, str]]] = {}  # a remote job's warnings, for generate()
        self.backend = self._make_backend()

    def _make_backend(self, only_ids: Collection[str] | None = None) -> Any:
        if self.settings.service.backend == "local":
            return LocalWorker(self.store, self._run, poll_s=self._poll_s, runner=self.runner, only_ids=only_ids,
                               on_change=self._notify)
        if self.settings.service.backend == "celery":  # every queued job goes to the workers: only_ids is moot
            from app.jobs.celery_backend import CeleryBackend

            return CeleryBackend(self.store, self.settings, self._collect, on_change=self._notify)
        raise AppError(f"service.backend {self.settings.service.backend!r} is not available in this installation.",
                       f"此安装不支持 service.backend {self.settings.service.backend!r}。")

    # Lifecycle -------------------------------------------------------------------------------------
    def start(self, *, only_ids: Collection[str] | None = None) -> list[Job]:
        """Put the jobs of a stopped run back in the queue (store.recover), then start the backend. With
        `only_ids` (`python -m app batch`) the local worker takes only those jobs. Returns the recovered jobs."""
        if only_ids is not None:
            self.backend = self._make_backend(only_ids)
        if self.remote:
            # A job a Celery worker runs is the backend's to follow again, not a run that stopped with this process.
            from app.jobs.celery_backend import is_celery_runner

            recovered = self.store.recover(
                lambda runner: is_celery_runner(runner) or local_runner_alive(runner, me=self.runner))
        else:
            recovered = self.store.recover(lambda runner: local_runner_alive(runner, me=self.runner))
        for job in recovered:
            log.info("job %s was running when the app stopped: now %s", job.id, job.state.value)
        if self.remote:
            self.backend.start()  # no model here; an unreachable broker is an error now (BrokerError naming its URL)
        else:
            threading.Thread(target=self._start_when_loaded, name="job-queue-start", daemon=True).start()
        self._started = True
        return recovered

    @property
    def remote(self) -> bool:
        """Whether the jobs run on Celery workers (service.backend: celery): then this process loads no model."""
        return self.settings.service.backend == "celery"

    def _start_when_loaded(self) -> None:
        self.service.wait_until_loaded()
        if self.service.state is ModelState.READY:
            self.backend.start()
        else:
            log.warning("queued jobs wait: the model is not loaded (%s)", self.service.state.value)

    def stop(self) -> None:
        """Stop the backend; a running local job goes back to the queue."""
        self.backend.stop()

    # Adding --------------------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest, owner: str = "") -> Job:
        """Check `req` and queue it. Bad input is refused with the service's message; nothing is stored."""
        return self.submit_many([req], owner)[0]

    def submit_many(self, reqs: Sequence[GenerationRequest], owner: str = "",
                    labels: Sequence[str] | None = None) -> list[Job]:
        """Check every request, then queue them all in this order. One bad request refuses them all, before
        anything is stored; its message starts with its label (the file it came from), if given."""
        images = self.check(reqs, labels)
        entries = [(self._params(req), image) for req, image in zip(reqs, images)]
        for attempt in (1, 2):
            stored = [(params, self._keep_input(image) if image is not None else "") for params, image in entries]
            try:
                jobs = self.store.add_many(stored, owner)
                break
            except MissingInputCopyError:  # a clear_finished removed a copy just written: write it again
                if attempt == 2:
                    raise
        self.backend.wake()
        self._notify("")
        return jobs

    def check(self, reqs: Sequence[GenerationRequest], labels: Sequence[str] | None = None) -> list[Any]:
        """Check every request as the service will (service.resolve), without storing anything. Returns each
        one's decoded input image (None for an extend). The first bad one raises its error, its message
        starting with its label, if given."""
        images = []
        for i, req in enumerate(reqs):
            try:
                image = self.service.resolve(req)[0]
            except AppError as exc:
                raise _with_label(exc, labels[i]) if labels else exc from None
            images.append(None if req.extend_from not in (None, "") else image)
        return images

    @staticmethod
    def _params(req: GenerationRequest) -> dict[str, Any]:
        params = {key: _jsonable(getattr(req, key)) for key in PARAM_KEYS}
        params["video"] = params["video"] or {}
        return params

    def _keep_input(self, image: Any) -> str:
        """The file name of `image`'s PNG copy in the queue's inputs folder (written if not there yet). The
        name is a hash of the pixels, so an image queued again is found without encoding it again."""
        digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
        digest.update(image.tobytes())
        name = digest.hexdigest()[:24] + ".png"
        target = self.store.inputs_dir / name
        if not target.is_file():
            data = io.BytesIO()
            image.save(data, format="PNG", compress_level=1)  # fast: the copy lives only as long as its job
            payload = data.getvalue()
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")  # hidden: not a copy yet
            try:
                temp.write_bytes(payload)
                os.replace(temp, target)
            except OSError as exc:
                temp.unlink(missing_ok=True)
                raise AppError(f"The input image could not be kept in the queue folder {target.parent} ({exc}).",
                               f"无法将输入图片保存到队列文件夹 {target.parent}({exc})。") from None
        return name

    # Running ---------------------------------------------------------------------------------------
    def request_from(self, job: Job) -> GenerationRequest:
        """The request a job stores, with its input copy as the image."""
        image = None
        if job.image:
            image = self.store.inputs_dir / job.image
            if not image.is_file():
                raise InputError(f"The input image of job {job.id} is no longer in the queue folder "
                                 f"{self.store.inputs_dir}; queue the image again.",
                                 f"任务 {job.id} 的输入图片已不在队列文件夹 {self.store.inputs_dir} 中;请重新加入该图片。")
        values = {key: job.params[key] for key in PARAM_KEYS if key in job.params}
        values["video"] = values.get("video") or {}
        return GenerationRequest(image=image, job_id=job.id, **values)

    def _run(self, job: Job, report: Callable[..., None], cancel: threading.Event) -> str:
        """The local worker's run: the video's file name."""
        if job.attempts > 1:
            made = self.video_of(job)
            if made is not None:
                log.info("job %s had made %s before the app stopped", job.id, made)
                return made
        req = self.request_from(job)

        def on_progress(p: Any) -> None:
            report(*progress_of(p))

        result = self.service.generate(req, on_progress=on_progress, cancel=cancel)
        return result.video_path.name

    def video_of(self, job: Job) -> str | None:
        """The file name of a finished video in outputs/ whose JSON names `job`, if there is one."""
        outputs = self.settings.path("outputs")
        try:
            candidates = [p for p in outputs.glob("video_*.json") if p.stat().st_mtime >= job.created_at - 1]
        except OSError:
            return None
        for path in sorted(candidates):
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("job_id") == job.id and path.with_suffix(".mp4").is_file():
                return path.with_suffix(".mp4").name
        return None

    def generate(self, req: GenerationRequest, *, on_progress: Callable[[Any], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """A blocking run, for callers that wait for their video (the UI's Generate, /generate). The local
        backend runs it directly on this process's service, as before the queue. The celery backend queues it
        and waits for it: on_progress then gets the job's record (a Job) at each change."""
        if not self.remote:
            return self.service.generate(req, on_progress=on_progress, cancel=cancel)
        job = self.wait(self.submit(req).id, on_progress=on_progress, cancel=cancel)
        if job.state is JobState.CANCELLED:
            raise CancelledError()
        if job.state is not JobState.DONE or not job.result:
            raise AppError(job.error_en or "The job failed.", job.error_zh or job.error_en or "任务失败。")
        from app.service import Message
        from app.video import read_metadata

        path = self.settings.path("outputs") / job.result
        meta = read_metadata(path)
        notes = self._notes.pop(job.id, None)
        warnings = [Message(en, zh) for en, zh in notes] if notes is not None else \
            [Message(w, w) for w in meta.get("warnings") or []]
        return GenerationResult(video_path=path, metadata_path=path.with_suffix(".json"), metadata=meta,
                                seed=meta.get("seed"), timings_s=meta.get("timings_s") or {},
                                peak_vram_gib=meta.get("peak_vram_gib"), warnings=warnings,
                                exports={kind: path.with_name(name) for kind, name in (meta.get("exports") or {}).items()})

    def _collect(self, job: Job, result: dict) -> str:
        """The celery backend's collect: the video a worker made (base64 MP4 + its metadata), written into
        outputs/ atomically (app.video.store_video), with the input image beside it and the exports made here.
        Returns the video's file name. A job whose video is there already (this app stopped after writing it)
        is not written twice."""
        made = self.video_of(job)
        if made is not None:
            return made
        import base64

        from app.service import outputs_error, parse_exports
        from app.video import store_video, update_metadata

        outputs = self.settings.path("outputs")
        metadata = dict(result.get("metadata") or {})
        metadata.pop("input_image", None)  # the worker's own copy; this app keeps its own below
        try:
            video = store_video(base64.b64decode(result["video_b64"]), outputs, metadata)
        except OSError as exc:
            raise outputs_error(exc, outputs) from None
        notes = [(str(en), str(zh)) for en, zh in result.get("warnings") or []]
        input_name = self._keep_input_beside(video.path, job, metadata)
        exports, export_notes = self.service.make_exports(video.path, parse_exports(job.params.get("exports")), None)
        notes += [(w.en, w.zh) for w in export_notes]
        try:
            update_metadata(video, {"input_image": input_name, "exports": {k: v.name for k, v in exports.items()},
                                    "warnings": [en for en, _ in notes]})
        except OSError as exc:  # the video and its JSON are complete; only these additions are missing
            log.warning("could not add the input image and exports to %s: %s", video.metadata_path.name, exc)
        self._notes[job.id] = notes
        return video.path.name

    def _keep_input_beside(self, video: Path, job: Job, metadata: dict) -> str | None:
        """The input image beside a worker's video, as the service keeps it beside its own: a copy of the job's
        input copy (the same decoded, size-capped image, already PNG), or for an extend the first segment's image
        kept beside the video it continues. Returns its file name, or None if it could not be kept."""
        source = self.store.inputs_dir / job.image if job.image else None
        if source is None and metadata.get("extended_from"):
            from app.video import read_metadata

            extended = self.settings.path("outputs") / str(metadata["extended_from"])
            name = read_metadata(extended).get("input_image")
            source = extended.with_name(name) if isinstance(name, str) and name else None
        if source is None:
            return None
        from app.video import copy_input_image

        return copy_input_image(source, video)

    # Reading and managing ----------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def list(self, limit: int = 200) -> list[Job]:
        return self.store.list(limit)

    def position(self, job_id: str) -> int | None:
        return self.store.position(job_id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, or stop a running one after its current step."""
        job = self.store.request_cancel(job_id)
        self.backend.cancel(job_id)
        self._notify(job_id)
        return job

    def retry(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again, at the end."""
        job = self.store.retry(job_id)
        self.backend.wake()
        self._notify(job_id)
        return job

    def clear_finished(self) -> int:
        removed = self.store.clear_finished()
        self._notify("")
        return removed

    def service_status(self) -> dict[str, Any]:
        """The model's state for the status bar, as service.status() gives it: this process's model, or with the
        celery backend the GPU workers' (from their heartbeats; this process loads none)."""
        if not self.remote:
            return self.service.status()
        from app.service import Message

        workers = self.backend.workers()
        ready = [w for w in workers if w.get("state") == "ready"]
        info: dict[str, Any] = {"demo": any(w.get("demo") for w in ready), "device": "celery", "low_vram": False,
                                "busy": any(w.get("job") for w in workers),
                                "model": ", ".join(sorted({str(w.get("model")) for w in ready}))}
        if ready:
            info.update(state="ready", message=Message(f"Model ready on {len(ready)} GPU workers.",
                                                       f"模型已在 {len(ready)} 个 GPU worker 上就绪。"))
            gpu = next((w for w in ready if w.get("gpu_name")), None)
            if gpu is not None:
                more = f" · {len(ready)} workers" if len(ready) > 1 else ""
                info.update({key: gpu[key] for key in ("vram_total_gib", "vram_free_gib", "vram_used_by_app_gib")},
                            gpu_name=f"{gpu['gpu_name']}{more}")
        elif workers and all(w.get("state") in ("missing", "error") for w in workers):
            first = workers[0]
            info.update(state=first["state"], message=Message(f"{first.get('name')}: {first.get('message_en')}",
                                                              f"{first.get('name')}:{first.get('message_zh')}"))
        elif workers:
            info.update(state="loading", message=Message("The GPU workers are loading the model…",
                                                         "GPU worker 正在加载模型…"))
        else:
            info.update(state="loading", message=Message(
                "No GPU worker is connected yet: jobs wait until one starts (python -m app worker --gpu 0).",
                "尚无 GPU worker 连接:任务会等待,直到有 worker 启动(python -m app worker --gpu 0)。"))
        return info

    def status(self) -> dict[str, Any]:
        """The backend's state for the status bar: dict(ok, en, zh)."""
        if self._started and self.service.state in (ModelState.MISSING, ModelState.ERROR):
            return {"ok": False, "en": "Queue: the jobs wait, the model is not loaded.",
                    "zh": "队列:模型未加载,任务等待中。"}
        return self.backend.status()

    # Waiting ---------------------------------------------------------------------------------------
    def _notify(self, job_id: str) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def wait(self, job_id: str, on_progress: Callable[[Job], None] | None = None,
             cancel: threading.Event | None = None) -> Job:
        """Block until the job ends and return it. on_progress(job) is called whenever it changes; a set
        `cancel` cancels the job (it ends as cancelled, or done if it was already writing its video).
        Changes made in this process wake it at once; those of another process are seen within WAIT_POLL_S.
        With the local backend, a job whose process is gone (an app killed while it ran one of this batch's
        jobs) is put back in the queue, so a worker here takes it instead of waiting for that app's restart."""
        last: Job | None = None
        cancel_sent = False
        next_check = time.monotonic() + RUNNER_CHECK_S
        while True:
            with self._changed:
                version = self._version
            job = self.store.get(job_id)
            if job is None:
                raise unknown_job(job_id)
            if job != last:
                last = job
                if on_progress is not None:
                    on_progress(job)
            if job.state in FINISHED:
                return job
            if cancel is not None and cancel.is_set() and not cancel_sent:
                self.cancel(job_id)
                cancel_sent = True
                continue
            if job.state is JobState.RUNNING and time.monotonic() >= next_check:
                next_check = time.monotonic() + RUNNER_CHECK_S
                if self.settings.service.backend == "local" and job.runner and not local_runner_alive(job.runner):
                    self.store.recover(local_runner_alive)  # this process's own runner counts as alive here
                    self.backend.wake()
                    continue
            with self._changed:
                self._changed.wait_for(lambda: self._version != version, timeout=WAIT_POLL_S)


__all__ = ["JobQueue", "Job", "JobState", "progress_of", "PARAM_KEYS"]
