"""The web UI: a bilingual Gradio app around GenerationService, and the server that runs it.

`build_ui(service, settings)` makes the page; `run_server(...)` launches it with the safe
defaults (127.0.0.1, no share link, only outputs/ served, no analytics, no run history).
Nothing happens at import time: gradio is imported inside the functions, after
GRADIO_ANALYTICS_ENABLED is set. State is per browser session (gr.State, or keyed by the
session hash); the one shared object is the service, which runs one GPU job at a time.

Public API (gradio_client or MCP): `/generate` and `/cancel`, see docs/ui-and-api.md. Extend (continue a
finished video by one segment) is a private event of the page. With a job queue (app.jobqueue.JobQueue) the
page also has the queue panel and the batch, and the API `/submit_job`, `/job_status` and `/cancel_job`.
"""

import contextlib
import html
import importlib.util
import logging
import os
import tempfile
import threading
import time
import urllib.parse
from abc import ABCMeta
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.errors import AppError, CancelledError, InputError
from app.examples import example_files
from app.inputs import MAX_SEED
from app.jobs.store import Job, JobState, unknown_job
from app.service import GenerationRequest, GenerationResult, GenerationService, Message, portable
from app.ui_strings import STRINGS, duration, request_lang, text, translations
from app.video import read_metadata

if TYPE_CHECKING:
    import gradio as gr

    from app.jobqueue import JobQueue

log = logging.getLogger(__name__)

HISTORY_LIMIT = 24  # videos shown in the history gallery
STATUS_POLL_S = 2.0  # how often each open page refreshes the status bar
GPU_QUEUE = "gpu"  # concurrency group of every event that generates
GENERATE_FIRST_INPUTS = 9  # /generate's parameters up to seed; the ones after it may be left out
GENERATE_EVENTS = ("generate", "generate_in_page")  # the functions of /generate and of the Generate button
CANCEL_NOTE_S = 10  # seconds the "cancelled" note stays; errors stay until the user closes them
QUEUE_POLL_S = 1.0  # how often each open page refreshes the queue panel (unchanged tables are not sent)
QUEUE_FINISHED_SHOWN = 10  # finished jobs listed after the waiting and running ones, newest first
QUEUE_PROMPT_CHARS = 60  # a longer prompt is cut in the queue table (the whole one is its tooltip)
JOB_EVENTS = ("submit_job",)  # takes /generate's inputs, so the nine-value rule below applies to it too

CSS = """
#status-bar .i2v-status { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
#status-bar .pill { border-radius: 999px; padding: 3px 11px; font-size: 0.88em; white-space: nowrap;
  background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
#status-bar .pill.dot::before { content: ""; display: inline-block; width: 8px; height: 8px; border-radius: 50%;
  margin-right: 6px; vertical-align: 1px; background: #9aa3af; }
#status-bar .pill.ok::before { background: #22a06b; }
#status-bar .pill.wait::before, #status-bar .pill.busy::before { background: #e0a800; }
#status-bar .pill.bad { border-color: #d93f3f; color: #b42318; }
#status-bar .pill.bad::before { background: #d93f3f; }
#status-bar .pill.demo { background: #fff4d6; border-color: #e0a800; color: #7a5300; font-weight: 600; }
#status-bar .msg { flex-basis: 100%; font-size: 0.88em; opacity: 0.85; }
#generate-btn, #cancel-btn { min-height: 48px; font-size: 1.05em; }
#run-info { min-height: 5em; }
#crop-preview img { width: 100%; height: 100%; object-fit: contain; }
#queue-table table { width: 100%; border-collapse: collapse; font-size: 0.92em; }
#queue-table th, #queue-table td { padding: 5px 8px; border-bottom: 1px solid var(--border-color-primary);
  text-align: left; vertical-align: middle; }
#queue-table .bar { width: 120px; height: 8px; border-radius: 4px; background: var(--border-color-primary);
  overflow: hidden; display: inline-block; vertical-align: middle; margin-right: 6px; }
#queue-table .bar > span { display: block; height: 100%; background: #4f46e5; }
#queue-table .state { border-radius: 999px; padding: 1px 9px; white-space: nowrap;
  border: 1px solid var(--border-color-primary); }
#queue-table .state.running { border-color: #e0a800; }
#queue-table .state.done { border-color: #22a06b; }
#queue-table .state.failed { border-color: #d93f3f; color: #b42318; }
#queue-table .attempt, #queue-table .step { opacity: 0.8; font-size: 0.92em; }
#queue-table .error { color: #b42318; }
#queue-table button { border: 1px solid var(--border-color-primary); border-radius: 6px; padding: 2px 10px;
  background: var(--button-secondary-background-fill); cursor: pointer; }
#queue-table .empty { opacity: 0.8; padding: 8px 0; }
"""

# The queue table's buttons (one per row) send their action and job id to queue_action(). One listener on the
# component's root: the table is re-rendered inside it on every change.
QUEUE_TABLE_JS = """
element.addEventListener('click', (event) => {
  const button = event.target.closest('button[data-action]');
  if (button) trigger('click', {action: button.dataset.action, job: button.dataset.job});
});
"""


class CancelRegistry:
    """Cancel events of the running jobs, keyed by their owner (job_owner): /cancel stops only its caller's jobs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, set[threading.Event]] = {}

    def open(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events.setdefault(session, set()).add(event)
        return event

    def close(self, session: str, event: threading.Event) -> None:
        with self._lock:
            events = self._events.get(session)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[session]

    def cancel(self, session: str) -> int:
        """Set the cancel event of every job of `session`; returns how many were running."""
        with self._lock:
            events = list(self._events.get(session, ()))
        for event in events:
            event.set()
        return len(events)


MCP_CALLER = "mcp"  # the job owner of every MCP call, see job_owner()


def job_owner(request: Any) -> str:
    """Whose job a request starts, cancels or leaves: its Gradio session, so /cancel and a closed tab touch
    only their own run. Every MCP tool call counts as one caller: Gradio's MCP server is stateless and runs
    each call through one internal client (whose requests carry x-gradio-user: mcp), and it calls the
    unqueued /cancel with no session at all."""
    session = getattr(request, "session_hash", None)
    headers = getattr(request, "headers", None) or {}
    if session is None or headers.get("x-gradio-user") == "mcp":
        return MCP_CALLER
    return session


def api_docstring(settings: Settings) -> str:
    """The public generate's description (the API page and the MCP tool read it), with this config's limits.
    Gradio reads one line per parameter."""
    lim, dflt, demo = settings.limits, settings.defaults, settings.demo

    def span(name: str) -> str:
        lo, hi = lim.bounds(name)
        return f"{lo} to {hi}"

    def numbers(p: Any) -> str:
        return f"{p.resolution} px, {p.num_frames} frames, {p.fps} FPS, {p.steps} steps, guidance {p.guidance_scale}"

    return f"""Make a short MP4 video from one image and a prompt with I2VGen-XL.

    A number left out takes the server's default: {numbers(dflt)}; with the demo model (its output is noise)
    {numbers(demo)}.

    Args:
        image: the input image (PNG, JPEG, WebP...); the model uses its centre square crop.
        prompt: what should happen in the video, e.g. "waves roll onto the beach" (English works best).
        negative_prompt: what the video should not show; left out: the server's default, "" for none.
        resolution: output side in pixels, {span("resolution")}, a multiple of {lim.resolution_multiple}.
        num_frames: number of frames in the video, {span("num_frames")}.
        fps: frame rate, {span("fps")}; also conditions the motion.
        steps: denoising (inference) steps, {span("steps")}.
        guidance_scale: how closely the video follows the prompt, {span("guidance_scale")}.
        seed: random seed, 0 to {MAX_SEED}; -1 picks a new one each run; left out: {dflt.seed}.
        segments: 1 to {lim.max_segments}; more than 1 makes a longer video, each segment continuing from the last frame of the one before (segment k uses seed + k - 1); left out: 1.
        crossfade: frames blended where two segments meet, 0 to {lim.max_crossfade_frames} (fewer than num_frames); left out: 0.
        exports: also make these beside the MP4, a list or a comma-separated text of smooth2, smooth4, loop, gif, webm, frames; their file names are in the parameters' "exports".
    Returns:
        The MP4 video, a short summary (seed, time per stage, peak VRAM, file name) and all parameters.
    """


def submit_docstring(settings: Settings) -> str:
    """/submit_job's description: /generate's parameters, a job id and place in the queue back."""
    _, _, rest = api_docstring(settings).partition("\n\n")
    args, _, _ = rest.partition("    Returns:")
    return ("Queue a video like /generate does, and return at once: the job runs when its turn comes, also after "
            "a restart of the app. Follow it with /job_status, stop it with /cancel_job.\n\n"
            f"{args}    Returns:\n        The job's id and its place among the waiting jobs (1 runs next; 0: it "
            "has already started).\n    ")


# Rendering ---------------------------------------------------------------------------------------

def render_status(status: dict[str, Any], lang: str) -> str:
    """The status bar: model state, demo warning, GPU and VRAM, busy or idle (HTML)."""
    state = status["state"]
    kind = {"ready": "ok", "loading": "wait"}.get(state, "bad")
    label = text(f"state_{state}", lang) if f"state_{state}" in STRINGS else state
    if state == "ready":
        label += f" · {status['model']}"
    pills = [f'<span class="pill dot {kind}" data-state="{html.escape(state)}">{html.escape(label)}</span>']
    if status.get("demo"):
        pills.append(f'<span class="pill demo" data-demo="1">⚠ {html.escape(text("demo_badge", lang))}</span>')
    if status.get("gpu_name"):
        gpu = text("gpu_line", lang, name=status["gpu_name"], used=status["vram_used_by_app_gib"],
                   free=status["vram_free_gib"], total=status["vram_total_gib"])
        pills.append(f'<span class="pill gpu">{html.escape(gpu)}</span>')
    elif state == "ready":
        pills.append(f'<span class="pill">{html.escape(text("device_cpu", lang))}</span>')
    if status.get("low_vram"):
        pills.append(f'<span class="pill wait">{html.escape(text("low_vram_badge", lang))}</span>')
    busy = bool(status.get("busy"))
    activity = "busy" if busy else "idle"
    pills.append(f'<span class="pill dot {activity}">{html.escape(text(activity, lang))}</span>')
    queue = status.get("queue")  # the job queue's backend, when the page has one
    if queue:
        words = queue["zh"] if lang == "zh" else queue["en"]
        pills.append(f'<span class="pill queue{"" if queue.get("ok") else " bad"}">{html.escape(words)}</span>')
    message: Message | None = status.get("message")
    if state != "ready" and message is not None:
        pills.append(f'<div class="msg">{html.escape(message.text(lang))}</div>')
    notice: Message | None = status.get("notice")  # why compile is off here, and the fix
    if notice is not None:
        pills.append(f'<div class="msg" data-notice="1">{html.escape(notice.text(lang))}</div>')
    return f'<div class="i2v-status">{"".join(pills)}</div>'


def render_info(meta: dict[str, Any], video_name: str, lang: str, notes: list[str] | None = None) -> str:
    """The run info under the video: file, seed, size, time per stage, peak VRAM (Markdown)."""
    frames = int(meta.get("total_frames") or meta.get("num_frames") or 0)
    fps = int(meta.get("fps") or 0)
    lines = [
        f"**{text('info_file', lang)}:** `{video_name}`  ·  **{text('info_seed', lang)}:** `{meta.get('seed', '?')}`",
        text("info_video", lang, w=meta.get("width", "?"), h=meta.get("height", "?"), frames=frames, fps=fps,
             seconds=frames / fps if fps else 0.0),
    ]
    segments = meta.get("segments") or []
    if len(segments) > 1:
        lines.append(text("info_segments", lang, n=len(segments), c=int(meta.get("crossfade") or 0)))
    if meta.get("extended_from"):
        lines.append(text("info_extended", lang, name=html.escape(str(meta["extended_from"]))))
    if meta.get("exports"):
        names = " · ".join(f"`{html.escape(str(name))}`" for name in meta["exports"].values())
        lines.append(f"**{text('info_exports', lang)}:** {names}")
    timings = meta.get("timings_s") or {}
    stages = [f"{text('stage_' + k, lang)} {duration(float(timings[k]), lang)}"
              for k in ("encode", "denoise", "decode", "write", "total") if k in timings]
    if stages:
        lines.append(f"**{text('info_time', lang)}:** " + " · ".join(stages))
    peak = meta.get("peak_vram_gib")
    peak_text = f"{float(peak):.2f} GiB" if peak is not None else text("info_peak_cpu", lang)
    lines.append(f"**{text('info_peak', lang)}:** {peak_text}")
    if (meta.get("model") or {}).get("demo"):
        lines.append(f"⚠ **{text('demo_badge', lang)}**")
    lines += [f"⚠ {html.escape(note)}" for note in notes or []]
    return "\n\n".join(lines)


def _escape(message: str) -> str:
    """Gradio renders toasts as HTML: neutralise markup but keep quotes readable for API clients."""
    return html.escape(message, quote=False)


def user_error(exc: AppError, lang: str) -> Exception:
    """An AppError as the gr.Error the user sees: their language, no trace (HTML-escaped). An error
    stays on screen until closed (a user who looked away must still learn why nothing was made); the
    note that a cancel took effect goes away by itself."""
    import gradio as gr

    cancelled = isinstance(exc, CancelledError)
    return gr.Error(_escape(exc.message(lang)), title=text("cancelled_title" if cancelled else "error_title", lang),
                    duration=CANCEL_NOTE_S if cancelled else None, print_exception=False)


def unexpected_error(exc: Exception, lang: str, logs_dir: Path) -> Exception:
    """A failure nobody foresaw, as the same kind of error: its type and where the log is, never the trace."""
    kind = type(exc).__name__
    return user_error(AppError(*(text("unexpected", la, kind=kind, logs=logs_dir) for la in ("en", "zh"))), lang)


@contextlib.contextmanager
def errors_for_user(action: str, lang: str, logs_dir: Path) -> Iterator[None]:
    """Run a page or API action: an AppError becomes user_error, anything else unexpected_error; the trace goes to
    the log, never to the page or the caller."""
    try:
        yield
    except AppError as exc:
        log.info("%s refused (%s): %s", action, type(exc).__name__, exc.en)
        raise user_error(exc, lang) from None
    except Exception as exc:
        log.exception("%s failed", action)
        raise unexpected_error(exc, lang, logs_dir) from None


def _history_items(service: GenerationService) -> tuple[list[tuple[str, str]], list[str]]:
    """Gallery items (video, caption), newest first, and the paths in the same order."""
    items, paths = [], []
    for entry in service.history(HISTORY_LIMIT):
        prompt = str(entry.metadata.get("prompt") or "")
        caption = f"{entry.created:%m-%d %H:%M:%S} · {prompt[:48]}{'…' if len(prompt) > 48 else ''}"
        items.append((str(entry.path), caption))
        paths.append(str(entry.path))
    return items, paths


# The queue ---------------------------------------------------------------------------------------

def shown_attempt(job: Job) -> int:
    """Which run of the job this is (running or ended) or will be (waiting): a job put back in the queue after
    the app stopped during its run waits for its second attempt."""
    return job.attempts + (1 if job.state is JobState.QUEUED else 0)


def queue_positions(jobs: Sequence[Job]) -> dict[str, int]:
    """The 1-based places of the waiting jobs of a list in queue order (as JobStore.position counts them)."""
    waiting = [job for job in jobs if job.state is JobState.QUEUED]
    return {job.id: i for i, job in enumerate(waiting, start=1)}


def job_state_label(job: Job, lang: str) -> str:
    if job.state is JobState.RUNNING and job.cancel_requested:
        return text("job_cancelling", lang)
    return text(f"job_{job.state.value}", lang)


def job_text(job: Job, lang: str) -> str:
    """The job's step text in `lang` ('Step 3/10 · about 5 s left'), empty while it waits."""
    return job.progress_zh if lang == "zh" else job.progress_en


def job_error(job: Job, lang: str) -> str | None:
    return (job.error_zh or job.error_en) if lang == "zh" else job.error_en


def file_url(path: Path) -> str:
    """The page-relative URL Gradio serves a file of outputs/ at (run_server allows that folder only)."""
    return "gradio_api/file=" + urllib.parse.quote(str(path.resolve()))


def render_queue(jobs: Sequence[Job], lang: str, outputs: Path) -> str:
    """The queue table (HTML): the waiting and running jobs in queue order, then the last finished ones, newest
    first. Each row: place in the queue, id, prompt, state (and attempt), progress, time left, the video or the
    error, and its action (cancel a waiting or running job, retry a failed or cancelled one)."""
    active = [job for job in jobs if not job.finished]
    ended = sorted((job for job in jobs if job.finished), key=lambda job: (job.finished_at or 0, job.seq),
                   reverse=True)[:QUEUE_FINISHED_SHOWN]
    if not active and not ended:
        return f'<div class="empty">{html.escape(text("queue_empty", lang))}</div>'
    positions = queue_positions(jobs)
    heads = "".join(f"<th>{html.escape(text('queue_col_' + key, lang))}</th>"
                    for key in ("position", "job", "prompt", "state", "progress", "eta", "result"))
    rows = [_queue_row(job, positions.get(job.id), lang, outputs) for job in (*active, *ended)]
    return f'<table><thead><tr>{heads}<th></th></tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _queue_row(job: Job, position: int | None, lang: str, outputs: Path) -> str:
    esc = html.escape
    prompt = str(job.params.get("prompt") or "")
    short = prompt if len(prompt) <= QUEUE_PROMPT_CHARS else prompt[:QUEUE_PROMPT_CHARS - 1] + "…"
    state = f'<span class="state {job.state.value}">{esc(job_state_label(job, lang))}</span>'
    if shown_attempt(job) > 1:
        state += f' <span class="attempt">{esc(text("job_attempt", lang, n=shown_attempt(job)))}</span>'
    progress = eta = result = action = ""
    if job.state in (JobState.RUNNING, JobState.DONE):
        pct = round(100 * job.progress)
        step = job_text(job, lang) if job.state is JobState.RUNNING else ""
        progress = (f'<span class="bar"><span style="width: {pct}%"></span></span>{pct}%'
                    + (f' <span class="step">{esc(step)}</span>' if step else ""))
    if job.state is JobState.RUNNING and job.eta_s is not None:
        eta = esc(duration(job.eta_s, lang))
    if job.state is JobState.DONE and job.result:
        result = f'<a href="{esc(file_url(outputs / job.result))}" target="_blank">{esc(job.result)}</a>'
    elif job.state in (JobState.FAILED, JobState.CANCELLED):
        result = f'<span class="error">{esc(job_error(job, lang) or "")}</span>'
    if job.state is JobState.QUEUED or (job.state is JobState.RUNNING and not job.cancel_requested):
        action = f'<button data-action="cancel" data-job="{esc(job.id)}">{esc(text("job_cancel", lang))}</button>'
    elif job.state in (JobState.FAILED, JobState.CANCELLED):
        action = f'<button data-action="retry" data-job="{esc(job.id)}">{esc(text("job_retry", lang))}</button>'
    cells = [str(position or ""), f"<code>{esc(job.id)}</code>", f'<span title="{esc(prompt)}">{esc(short)}</span>',
             state, progress, eta, result, action]
    return (f'<tr data-job="{esc(job.id)}" data-state="{job.state.value}">'
            + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")


def _cancel_note(job: Job, lang: str) -> str:
    """What a cancel did to `job` (the job as it is after the cancel)."""
    if job.state is JobState.CANCELLED:
        return text("job_cancel_done", lang, id=job.id)
    if job.state is JobState.RUNNING:
        return text("job_cancel_running", lang, id=job.id)
    return text("job_cancel_ended", lang, id=job.id, state=job_state_label(job, lang))


def job_info(job: Job, position: int | None, lang: str) -> dict[str, Any]:
    """A job as /job_status and /cancel_job return it: plain JSON, texts in `lang`."""
    return {"id": job.id, "state": job.state.value, "position": position, "progress": round(job.progress, 4),
            "text": job_text(job, lang) if job.state is JobState.RUNNING else "",
            "eta_s": None if job.eta_s is None else round(job.eta_s, 1),
            "attempts": job.attempts, "cancel_requested": job.cancel_requested,
            "prompt": job.params.get("prompt"), "video": job.result, "error": job_error(job, lang)}


def _both(key: str, **values: Any) -> InputError:
    """The UI string `key` as a bilingual InputError."""
    return InputError(text(key, "en", **values), text(key, "zh", **values))


def parse_seeds(value: str | None) -> list[int]:
    """'1, 2 3' -> [1, 2, 3]; empty: []. Whole numbers only; their range is the service's to check."""
    seeds = []
    for part in (value or "").replace(",", " ").replace("\uff0c", " ").split():  # also the full-width comma
        try:
            seeds.append(int(part))
        except ValueError:
            raise _both("batch_bad_seed", value=part) from None
    return seeds


def batch_requests(files: Sequence[Any] | None, prompts: str | None, seeds: str | None,
                   base: GenerationRequest) -> list[tuple[str, GenerationRequest]]:
    """The batch's jobs, (the image's file name, its request), in upload order and, per image, seed order.
    `base` holds the page's settings; its prompt and seed are used where the batch gives none. Only the
    batch's own shape is checked here (images given, prompt lines, seeds are numbers): see queue_batch."""
    paths = [Path(str(getattr(f, "path", f))) for f in files or []]
    if not paths:
        raise _both("batch_no_images")
    lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()] or [base.prompt]
    if len(lines) not in (1, len(paths)):
        raise _both("batch_prompt_lines", lines=len(lines), images=len(paths))
    per_image = lines * len(paths) if len(lines) == 1 else lines
    seed_list = parse_seeds(seeds) or [base.seed]
    return [(path.name, replace(base, image=str(path), prompt=prompt, seed=seed))
            for path, prompt in zip(paths, per_image) for seed in seed_list]


def queue_batch(jobs: "JobQueue", entries: Sequence[tuple[str, GenerationRequest]], owner: str = "") -> list[Job]:
    """Queue every request of a batch, or none: the queue checks each (image, prompt, numbers) before it stores
    any, and the first bad one refuses the whole batch with its error, which names its file."""
    try:
        return jobs.submit_many([req for _, req in entries], owner, labels=[name for name, _ in entries])
    except AppError as exc:
        exc.en, exc.zh = text("batch_refused", "en", error=exc.en), text("batch_refused", "zh", error=exc.zh)
        exc.args = (exc.en,)
        raise


# The page ----------------------------------------------------------------------------------------

def _checked_by_service(component_cls: type, unwrap: Any = None) -> type:
    """`component_cls` that hands its raw value to the service, which checks it with an error in the caller's
    language naming the parameter. Gradio's own checks answer in English only ('Value 1000 is greater than
    maximum value 100.', 'Could not preprocess input component…') and print a trace. The page's widgets
    keep their ranges, and uploads are still confined to Gradio's upload folder before this runs.
    `unwrap` turns the payload into the value (an upload's path for images)."""

    def preprocess(self: Any, payload: Any) -> Any:
        if payload is None or unwrap is None:
            return payload
        return unwrap(payload)

    # Each kind gets its own name: the browser caches component code by class name.
    name = f"{component_cls.__name__}CheckedByService"
    attrs = {"__module__": __name__, "__qualname__": name, "__doc__": _checked_by_service.__doc__,
             "is_template": True,  # the browser draws it as component_cls
             "preprocess": preprocess}
    # ABCMeta.__new__ rather than a class statement: for a subclass like this one, Gradio's ComponentMeta
    # adds nothing but a .pyi stub that it would write next to this source file at run time.
    return ABCMeta.__new__(type(component_cls), name, (component_cls,), attrs)


# Page events that may tell the user something (gr.Info, gr.Warning): Gradio delivers those only from events of
# its queue. Without a concurrency limit they never wait behind a running generation.
NOTE_EVENT: dict[str, Any] = {"concurrency_limit": None, "api_visibility": "private"}


def build_ui(service: GenerationService, settings: Settings, jobs: Any = None) -> "gr.Blocks":
    """The Gradio page around `service` (and the job queue `jobs`, an app.jobqueue.JobQueue, if given).
    Launch it with run_server(), which adds the translations."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    Slider, Number = _checked_by_service(gr.Slider), _checked_by_service(gr.Number)
    ImageUpload = _checked_by_service(gr.Image, unwrap=lambda payload: payload.path)
    L = gr.I18n(**translations(settings))  # L(key) is a key the browser translates
    lim, dflt = settings.limits, settings.defaults
    runs = CancelRegistry()  # the running /generate, Generate and Extend calls, by owner
    logs_dir = portable(settings.path("logs"), settings.root)  # what a visitor may see: no absolute path
    default_values = tuple(dflt.video().model_dump().values())

    def preset_values(name: str) -> tuple[Any, ...]:
        """The sliders' values (resolution, frames, fps, steps, guidance) for a preset, in VideoParams' order."""
        return tuple((settings.demo if name == "demo" else settings.presets[name]).model_dump().values())

    preset_choices = [(L(f"preset:{name}"), name) for name in settings.presets]
    default_preset = next((n for n in settings.presets if preset_values(n) == default_values), None)

    # Gradio serves every shown video from a copy in its cache: drop copies older than a day, hourly.
    with gr.Blocks(title="Image-to-Video · I2VGen-XL", analytics_enabled=False,
                   delete_cache=(3600, 24 * 3600)) as demo:
        last_seed = gr.State(None)
        current_video = gr.State(None)  # the path of the video shown, which Extend continues
        history_paths = gr.State([])
        defaults_settled = gr.State(False)

        gr.Markdown(L("header"), elem_id="header")
        status_bar = gr.HTML(elem_id="status-bar")

        with gr.Row(equal_height=False):
            # Inputs ------------------------------------------------------------------------------
            with gr.Column(scale=1, elem_id="inputs"):
                with gr.Row(equal_height=True):
                    image = ImageUpload(label=L("input_image"), type="filepath", sources=["upload", "clipboard"],
                                        height=250, elem_id="input-image")
                    crop = gr.Image(label=L("crop_preview"), type="pil", interactive=False, height=250,
                                    elem_id="crop-preview", buttons=[])
                prompt = gr.Textbox(label=L("prompt"), placeholder=L("prompt_placeholder"), lines=2,
                                    max_length=lim.max_prompt_chars, elem_id="prompt")
                examples = example_files(Path(tempfile.gettempdir()) / "i2v-app" / "examples")
                example_gallery = gr.Gallery(value=[(str(p), t) for p, t in examples], label=L("examples"),
                                             columns=len(examples), rows=1, height=150, allow_preview=False,
                                             object_fit="cover", interactive=False, buttons=[],
                                             elem_id="examples")
                preset = gr.Radio(label=L("preset"), choices=preset_choices, value=default_preset,
                                  elem_id="preset")
                with gr.Accordion(L("advanced"), open=False, elem_id="advanced"):
                    negative = gr.Textbox(label=L("negative_prompt"), info=L("negative_info"),
                                          value=dflt.negative_prompt, lines=2, max_length=lim.max_prompt_chars,
                                          elem_id="negative-prompt")
                    with gr.Row():
                        resolution = Slider(lim.min_resolution, lim.max_resolution, value=dflt.resolution,
                                            step=lim.resolution_multiple, label=L("resolution"), elem_id="resolution")
                        num_frames = Slider(lim.min_frames, lim.max_frames, value=dflt.num_frames, step=1,
                                            label=L("num_frames"), elem_id="num-frames")
                    with gr.Row():
                        fps = Slider(lim.min_fps, lim.max_fps, value=dflt.fps, step=1, label=L("fps"),
                                     info=L("fps_info"), elem_id="fps")
                        steps = Slider(lim.min_steps, lim.max_steps, value=dflt.steps, step=1, label=L("steps"),
                                       info=L("steps_info"), elem_id="steps")
                    with gr.Row(equal_height=True):
                        guidance = Slider(lim.min_guidance_scale, lim.max_guidance_scale, value=dflt.guidance_scale,
                                          step=0.5, label=L("guidance"), info=L("guidance_info"), scale=2,
                                          elem_id="guidance")
                        seed = Number(label=L("seed"), info=L("seed_info"), value=dflt.seed, precision=0, minimum=-1,
                                      maximum=MAX_SEED, scale=2, elem_id="seed")
                        with gr.Column(scale=1, min_width=120):
                            seed_random = gr.Button(L("seed_random"), size="sm", elem_id="seed-random")
                            seed_reuse = gr.Button(L("seed_reuse"), size="sm", elem_id="seed-reuse")
                with gr.Accordion(L("output_options"), open=False, elem_id="output-options"):
                    with gr.Row():
                        segments = Slider(1, lim.max_segments, value=1, step=1, label=L("segments"),
                                          info=L("segments_info"), elem_id="segments")
                        crossfade = Slider(0, lim.max_crossfade_frames, value=0, step=1, label=L("crossfade"),
                                           info=L("crossfade_info"), elem_id="crossfade")
                    smooth = gr.Radio([(L("smooth_off"), 0), (L("smooth_2"), 2), (L("smooth_4"), 4)], value=0,
                                      label=L("smooth"), elem_id="smooth")
                    export_kinds = gr.CheckboxGroup(
                        [(L("export_loop"), "loop"), (L("export_gif"), "gif"), (L("export_webm"), "webm"),
                         (L("export_frames"), "frames")], value=[], label=L("exports_pick"), elem_id="export-kinds")
                with gr.Row():
                    generate_btn = gr.Button(L("generate"), variant="primary", scale=3, elem_id="generate-btn")
                    cancel_btn = gr.Button(L("cancel"), variant="stop", scale=1, elem_id="cancel-btn")
                if jobs is not None:
                    with gr.Accordion(L("batch"), open=False, elem_id="batch"):
                        gr.Markdown(L("batch_hint"))
                        batch_files = gr.File(label=L("batch_images"), file_count="multiple", file_types=["image"],
                                              height=160, elem_id="batch-files")
                        batch_prompts = gr.Textbox(label=L("batch_prompts"), info=L("batch_prompts_info"), lines=3,
                                                   elem_id="batch-prompts")
                        batch_seeds = gr.Textbox(label=L("batch_seeds"), info=L("batch_seeds_info"),
                                                 placeholder="1, 2, 3", elem_id="batch-seeds")
                        batch_btn = gr.Button(L("queue_add"), variant="primary", elem_id="batch-add")

            # Outputs -----------------------------------------------------------------------------
            with gr.Column(scale=1, elem_id="outputs"):
                video = gr.Video(label=L("output_video"), autoplay=True, loop=True, buttons=["download"],
                                 interactive=False, height=420, elem_id="output-video")
                extend_btn = gr.Button(L("extend"), size="sm", elem_id="extend-btn")
                export_files = gr.File(label=L("exports"), file_count="multiple", interactive=False,
                                       elem_id="export-files", visible=False)  # shown when a video has exports
                info = gr.Markdown(L("info_empty"), elem_id="run-info")
                with gr.Accordion(L("details"), open=False):
                    details = gr.JSON(elem_id="details")
                gallery = gr.Gallery(label=L("history"), columns=4, height=300, allow_preview=False,
                                     fit_columns=False, object_fit="cover", interactive=False, buttons=[],
                                     elem_id="history")
                with gr.Row(equal_height=True):
                    gr.Markdown(L("history_hint"))
                    refresh_btn = gr.Button(L("refresh"), size="sm", scale=0, elem_id="history-refresh")

        if jobs is not None:
            with gr.Accordion(L("queue"), open=True, elem_id="queue"):
                gr.Markdown(L("queue_hint"))
                queue_table = gr.HTML(js_on_load=QUEUE_TABLE_JS, elem_id="queue-table")
                # (the table this tab shows, the videos its jobs had made): an unchanged table is not sent
                # again, and a new video refreshes the history.
                queue_shown = gr.State(None)
                with gr.Row():
                    queue_clear = gr.Button(L("queue_clear"), size="sm", scale=0, elem_id="queue-clear")

        sliders = [resolution, num_frames, fps, steps, guidance]
        timer = gr.Timer(STATUS_POLL_S)

        # Status bar, and the demo model's small defaults once the model turns out to be tiny -----
        def refresh_status(res: float, frames: float, fps_: float, steps_: float, cfg: float, settled: bool,
                           request: gr.Request) -> tuple[Any, ...]:
            lang = request_lang(request)
            # With the celery backend this process loads no model: the GPU workers' state stands in for it.
            status = service.status() if jobs is None else jobs.service_status()
            if jobs is not None:
                status["queue"] = jobs.status()
            bar = render_status(status, lang)
            keep = (gr.skip(),) * 6
            if settled or status["state"] == "loading":
                return (bar, settled, *keep)
            untouched = (res, frames, fps_, steps_, cfg) == default_values
            if not (status["demo"] and untouched):
                return (bar, True, *keep)
            return (bar, True, gr.update(choices=[*preset_choices, (L("preset:demo"), "demo")], value="demo"),
                    *preset_values("demo"))

        status_io = {"fn": refresh_status, "inputs": [*sliders, defaults_settled],
                     "outputs": [status_bar, defaults_settled, preset, *sliders], "queue": False,
                     "show_progress": "hidden", "api_visibility": "private"}
        demo.load(**status_io)
        timer.tick(**status_io)

        # History -------------------------------------------------------------------------------
        def refresh_history() -> tuple[list[tuple[str, str]], list[str]]:
            return _history_items(service)

        demo.load(refresh_history, None, [gallery, history_paths], queue=False, api_visibility="private")
        refresh_btn.click(refresh_history, None, [gallery, history_paths], queue=False, api_visibility="private")

        def load_from_history(paths: list[str], evt: gr.SelectData, request: gr.Request) -> tuple[Any, ...]:
            lang = request_lang(request)
            path = Path(paths[evt.index]) if paths and 0 <= evt.index < len(paths) else None
            if path is None or not path.is_file():
                gr.Warning(text("history_missing", lang, name=path.name if path else "?"))
                return (gr.skip(),) * 17
            meta = read_metadata(path)
            info_md = render_info(meta, path.name, lang, [text("info_from_history", lang)])

            def value(key: str) -> Any:
                return meta[key] if meta.get(key) is not None else gr.skip()

            kept = path.with_name(meta["input_image"]) if meta.get("input_image") else None
            restored_image = str(kept) if kept is not None and kept.is_file() else gr.skip()
            segs = meta.get("segments") or []
            return (str(path), info_md, meta, value("prompt"), value("negative_prompt"), value("resolution"),
                    value("num_frames"), value("fps"), value("steps"), value("guidance_scale"), value("seed"), None,
                    restored_image, str(path), _shown_exports(path, meta),
                    max(1, len(segs)), meta.get("crossfade") or 0)

        gallery.select(load_from_history, [history_paths],
                       [video, info, details, prompt, negative, *sliders, seed, preset, image, current_video,
                        export_files, segments, crossfade], **NOTE_EVENT)

        # Presets, seed, crop preview -------------------------------------------------------------
        def use_example(evt: gr.SelectData) -> tuple[str, str]:
            path, example_prompt = examples[evt.index]
            return str(path), example_prompt

        example_gallery.select(use_example, None, [image, prompt], queue=False, api_visibility="private")
        preset.input(preset_values, [preset], sliders, queue=False, api_visibility="private")
        for slider in sliders:  # a hand-set value no longer matches any preset
            slider.input(lambda: None, None, [preset], queue=False, api_visibility="private")
        seed_random.click(lambda: -1, None, [seed], queue=False, api_visibility="private")

        def reuse_seed(last: int | None, request: gr.Request) -> Any:
            if last is None:
                gr.Info(text("no_last_seed", request_lang(request)))
                return gr.skip()
            return last

        seed_reuse.click(reuse_seed, [last_seed], [seed], **NOTE_EVENT)

        def preview_crop(img: str | None, res: float, request: gr.Request) -> Any:
            if not img:
                return None
            try:
                return service.preview_crop(img, int(res))
            except AppError as exc:
                gr.Warning(_escape(exc.message(request_lang(request))))
                return None

        for trigger in (image.change, resolution.change):
            trigger(preview_crop, [image, resolution], [crop], show_progress="hidden", **NOTE_EVENT)

        # Generate and cancel ---------------------------------------------------------------------
        def make_video(image: Any, prompt: Any, negative_prompt: Any, video_values: dict[str, Any], seed: Any,
                       request: gr.Request, progress: Any, **more: Any) -> tuple[str, str, dict[str, Any]]:
            """One run for the page or the API: (video path, run info, all parameters). Unset (None) values
            are left out of the request, so the service fills them in (demo or config defaults). `more` holds
            the request's segments, crossfade, exports and extend_from."""
            lang = request_lang(request)
            owner = job_owner(request)
            cancel = runs.open(owner)
            req = _request(image, prompt, negative_prompt, video_values, seed, **more)
            try:
                with errors_for_user("generate", lang, logs_dir):
                    result = _generate_with_progress(service, req, cancel, progress, lang, jobs)
            finally:
                runs.close(owner, cancel)
            notes = [w.text(lang) for w in result.warnings]
            details_ = {**result.metadata, "file": result.video_path.name}
            return (str(result.video_path), render_info(result.metadata, result.video_path.name, lang, notes),
                    details_)

        def generate(image: str, prompt: str, negative_prompt: str | None = None, resolution: int | None = None,
                     num_frames: int | None = None, fps: int | None = None, steps: int | None = None,
                     guidance_scale: float | None = None, seed: int | None = None, segments: int | None = None,
                     crossfade: int | None = None, exports: list[str] | str | None = None,
                     request: gr.Request = None,  # type: ignore[assignment]  # Gradio passes it
                     progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's idiom)
                     ) -> tuple[str, str, dict[str, Any]]:
            video_values = dict(resolution=resolution, num_frames=num_frames, fps=fps, steps=steps,
                                guidance_scale=guidance_scale)
            return make_video(image, prompt, negative_prompt, video_values, seed, request, progress,
                              segments=segments, crossfade=crossfade, exports=exports)

        generate.__doc__ = api_docstring(settings)

        def generate_in_page(image: str | None, prompt: str, negative_prompt: str, resolution: float,
                             num_frames: float, fps: float, steps: float, guidance_scale: float, seed: float,
                             segments: float, crossfade: float, smooth: int, kinds: list[str],
                             request: gr.Request, progress: gr.Progress = gr.Progress(),  # noqa: B008
                             ) -> tuple[Any, ...]:
            """The page's Generate button: a run with every value set, plus the seed for *Reuse last seed*,
            the exported files and the video Extend continues."""
            video_values = dict(resolution=resolution, num_frames=num_frames, fps=fps, steps=steps,
                                guidance_scale=guidance_scale)
            video_path, info_md, details_ = make_video(image, prompt, negative_prompt, video_values, seed,
                                                        request, progress, segments=segments, crossfade=crossfade,
                                                        exports=_page_exports(smooth, kinds))
            return (video_path, info_md, details_, details_["seed"], _shown_exports(Path(video_path), details_),
                    video_path)

        def extend_in_page(shown: str | None, prompt: str, crossfade: float, smooth: int, kinds: list[str],
                           request: gr.Request, progress: gr.Progress = gr.Progress(),  # noqa: B008
                           ) -> tuple[Any, ...]:
            """The Extend button: the video shown (a result or a history entry) continued from its last frame
            by one more segment, with the prompt in the box (the video's own when the box is empty), as a new
            file; the old one is kept."""
            if not shown:
                gr.Info(text("extend_nothing", request_lang(request)))
                return (gr.skip(),) * 6
            video_path, info_md, details_ = make_video(None, prompt, None, {}, None, request, progress,
                                                        extend_from=Path(shown).name, crossfade=crossfade,
                                                        exports=_page_exports(smooth, kinds))
            return (video_path, info_md, details_, details_["seed"], _shown_exports(Path(video_path), details_),
                    video_path)

        page_outputs = [video, info, details, last_seed, export_files, current_video]
        gen_event = generate_btn.click(
            generate_in_page, [image, prompt, negative, *sliders, seed, segments, crossfade, smooth, export_kinds],
            page_outputs, api_visibility="private", concurrency_limit=1, concurrency_id=GPU_QUEUE,
            show_progress_on=[video],
        )
        gen_event.success(refresh_history, None, [gallery, history_paths], queue=False, api_visibility="private")
        extend_event = extend_btn.click(
            extend_in_page, [current_video, prompt, crossfade, smooth, export_kinds], page_outputs,
            api_visibility="private", concurrency_limit=1, concurrency_id=GPU_QUEUE, show_progress_on=[video],
        )
        extend_event.success(refresh_history, None, [gallery, history_paths], queue=False, api_visibility="private")

        # The public endpoint has its own hidden inputs. Their unset value is None, so a client that leaves a
        # parameter out gets the service's default rather than the page's slider value (gradio_client fills a
        # missing parameter with its component's value). It has no gr.State output: Gradio's MCP server
        # drops State outputs by position and fails on an endpoint that returns one.
        with gr.Column(visible=False):
            api_image = ImageUpload(label=L("input_image"), type="filepath")
            api_prompt = gr.Textbox(label=L("prompt"))
            api_negative = gr.Textbox(label=L("negative_prompt"), value=None)
            api_numbers = [Number(label=L("resolution"), value=None, precision=0),
                           Number(label=L("num_frames"), value=None, precision=0),
                           Number(label=L("fps"), value=None, precision=0),
                           Number(label=L("steps"), value=None, precision=0),
                           Number(label=L("guidance"), value=None)]
            api_seed = Number(label=L("seed"), value=None, precision=0)
            api_segments = Number(label=L("segments"), value=None, precision=0)
            api_crossfade = Number(label=L("crossfade"), value=None, precision=0)
            # A list of kinds or one comma-separated text, handed to the service as sent.
            api_exports = _checked_by_service(gr.Textbox)(label=L("exports_pick"), value=None)
            api_trigger = gr.Button()
        api_event = api_trigger.click(
            generate, [api_image, api_prompt, api_negative, *api_numbers, api_seed, api_segments, api_crossfade,
                       api_exports], [video, info, details],
            api_name="generate", concurrency_limit=1, concurrency_id=GPU_QUEUE,
        )

        def cancel(request: gr.Request) -> str:
            """Cancel this client's running generation: it stops after the current step and writes no file."""
            running = runs.cancel(job_owner(request))
            return text("cancel_requested" if running else "cancel_nothing", request_lang(request))

        # `cancels` drops a job still waiting in the queue; the events above stop a running one.
        cancel_btn.click(cancel, None, [info], api_name="cancel", queue=False,
                         cancels=[gen_event, extend_event, api_event])

        def cancel_when_the_page_closes(request: gr.Request) -> None:
            """A closed or reloaded tab (or a closed gradio_client) cancels its running job, as Cancel does:
            nobody is left to receive the video, and the GPU is free for the next in the queue at once.
            (Gradio itself drops the session's jobs that still wait in the queue.)"""
            if runs.cancel(job_owner(request)):
                log.info("a client left during its run; the run is cancelled")

        demo.unload(cancel_when_the_page_closes)

        # The job queue: its panel, the batch and the API ------------------------------------------
        if jobs is not None:
            outputs_dir = settings.path("outputs")

            def show_queue(shown: tuple[str, tuple[str, ...]] | None, request: gr.Request) -> tuple[Any, ...]:
                """The table when it changed, and the history when a job has made a video since the last look."""
                listed = jobs.list()
                table = render_queue(listed, request_lang(request), outputs_dir)
                made = tuple(job.result for job in listed if job.state is JobState.DONE and job.result)
                old_table, old_made = shown or ("", made)
                history = _history_items(service) if set(made) - set(old_made) else (gr.skip(), gr.skip())
                return (gr.skip() if table == old_table else table), (table, made), *history

            queue_io = {"fn": show_queue, "inputs": [queue_shown],
                        "outputs": [queue_table, queue_shown, gallery, history_paths], "queue": False,
                        "show_progress": "hidden", "api_visibility": "private"}
            demo.load(**queue_io)
            gr.Timer(QUEUE_POLL_S).tick(**queue_io)

            def queue_action(evt: gr.EventData, request: gr.Request) -> None:
                """A row's Cancel or Retry button (QUEUE_TABLE_JS sends which, and the job's id)."""
                lang = request_lang(request)
                data = getattr(evt, "_data", None) or {}
                action, job_id = data.get("action"), str(data.get("job") or "")
                try:
                    if action == "cancel":
                        gr.Info(_cancel_note(jobs.cancel(job_id), lang))
                    elif action == "retry":
                        jobs.retry(job_id)
                        gr.Info(text("job_retried", lang, id=job_id))
                except AppError as exc:
                    raise user_error(exc, lang) from None

            # Queued, unlike the table's refresh: gr.Info reaches the page only from an event of the queue.
            queue_table.click(queue_action, None, None, show_progress="hidden", api_visibility="private"
                              ).then(**queue_io)

            def clear_finished(request: gr.Request) -> None:
                gr.Info(text("queue_cleared", request_lang(request), n=jobs.clear_finished()))

            queue_clear.click(clear_finished, None, None, show_progress="hidden", api_visibility="private"
                              ).then(**queue_io)

            def add_batch(files: list[str] | None, prompts: str, seeds: str, prompt_: str, negative_prompt: str,
                          resolution_: float, num_frames_: float, fps_: float, steps_: float, guidance_: float,
                          seed_: float, segments_: float, crossfade_: float, smooth_: int, kinds: list[str],
                          request: gr.Request) -> None:
                """Add to queue: every image of the batch (and every seed) as one job, with the page's settings;
                nothing is queued unless all of them are valid."""
                lang = request_lang(request)
                base = _request(None, prompt_, negative_prompt, dict(resolution=resolution_, num_frames=num_frames_,
                                fps=fps_, steps=steps_, guidance_scale=guidance_), seed_, segments=segments_,
                                crossfade=crossfade_, exports=_page_exports(smooth_, kinds))
                try:
                    queued = queue_batch(jobs, batch_requests(files, prompts, seeds, base), job_owner(request))
                except AppError as exc:
                    log.info("batch refused: %s", exc.en)
                    raise user_error(exc, lang) from None
                gr.Info(text("batch_added", lang, n=len(queued)))

            batch_btn.click(add_batch, [batch_files, batch_prompts, batch_seeds, prompt, negative, *sliders, seed,
                                        segments, crossfade, smooth, export_kinds], None, show_progress="hidden",
                            api_visibility="private").then(**queue_io)

            # The API: the same hidden inputs as /generate, so a job takes exactly what /generate takes.
            with gr.Column(visible=False):
                api_job_id = gr.Textbox(label=L("queue_col_job"))
                api_job_out = gr.Textbox(label=L("queue_col_job"))
                api_position = gr.Number(label=L("queue_col_position"), precision=0)
                api_status = gr.JSON(label=L("queue_col_state"))
                api_job_video = gr.File(label=L("output_video"))
                api_submit, api_status_trigger, api_cancel_job = gr.Button(), gr.Button(), gr.Button()

            def known(job_id: Any) -> Job:
                job = jobs.get(str(job_id or "").strip())
                if job is None:
                    raise unknown_job(str(job_id or "").strip())
                return job

            def submit_job(image: str, prompt: str, negative_prompt: str | None = None, resolution: int | None = None,
                           num_frames: int | None = None, fps: int | None = None, steps: int | None = None,
                           guidance_scale: float | None = None, seed: int | None = None, segments: int | None = None,
                           crossfade: int | None = None, exports: list[str] | str | None = None,
                           request: gr.Request = None,  # type: ignore[assignment]  # Gradio passes it
                           ) -> tuple[str, int]:
                lang = request_lang(request)
                req = _request(image, prompt, negative_prompt, dict(resolution=resolution, num_frames=num_frames,
                               fps=fps, steps=steps, guidance_scale=guidance_scale), seed, segments=segments,
                               crossfade=crossfade, exports=exports)
                with errors_for_user("submit_job", lang, logs_dir):
                    job = jobs.submit(req, job_owner(request))
                return job.id, jobs.position(job.id) or 0

            submit_job.__doc__ = submit_docstring(settings)

            def job_status(job_id: str, request: gr.Request = None,  # type: ignore[assignment]
                           ) -> tuple[dict[str, Any], str | None]:
                """The state of a queued job, and its MP4 once it is done. The JSON has id, state (queued,
                running, done, failed or cancelled), position (1 runs next; null when not waiting), progress
                (0 to 1), text (the current step), eta_s (seconds left), attempts, cancel_requested, prompt,
                video (the file name) and error.

                Args:
                    job_id: the id /submit_job returned.
                Returns:
                    The job as JSON, and the MP4 once the job is done (else nothing).
                """
                lang = request_lang(request)
                try:
                    job = known(job_id)
                except AppError as exc:
                    raise user_error(exc, lang) from None
                video_file = outputs_dir / job.result if job.state is JobState.DONE and job.result else None
                shown = str(video_file) if video_file is not None and video_file.is_file() else None
                return job_info(job, jobs.position(job.id), lang), shown

            def cancel_job(job_id: str, request: gr.Request = None,  # type: ignore[assignment]
                           ) -> dict[str, Any]:
                """Cancel a queued job: a waiting one is cancelled at once, a running one stops after its
                current step (it stays "running" with cancel_requested true until then); neither writes a
                video. A job that has ended is left as it is.

                Args:
                    job_id: the id /submit_job returned.
                Returns:
                    The job as JSON after the cancel, as /job_status returns it.
                """
                lang = request_lang(request)
                try:
                    job = jobs.cancel(known(job_id).id)
                except AppError as exc:
                    raise user_error(exc, lang) from None
                return job_info(job, jobs.position(job.id), lang)

            api_submit.click(submit_job, [api_image, api_prompt, api_negative, *api_numbers, api_seed, api_segments,
                                          api_crossfade, api_exports], [api_job_out, api_position],
                             api_name="submit_job", queue=False)
            api_status_trigger.click(job_status, [api_job_id], [api_status, api_job_video], api_name="job_status",
                                     queue=False)
            api_cancel_job.click(cancel_job, [api_job_id], [api_status], api_name="cancel_job", queue=False)

        # A raw HTTP caller (POST /gradio_api/call/generate, or a script that joins the queue with the page's
        # Generate event) may send only the nine values up to seed that both took before the longer-video and
        # output options: the rest take their components' values (None for /generate: the service's defaults).
        # Gradio has no public hook for this: its own input check is wrapped. A Gradio without that method keeps
        # its plain check (such a caller then has to send every value).
        check_inputs = getattr(demo, "validate_inputs", None)

        def validate_inputs(block_fn: Any, inputs: list[Any]) -> None:
            block_inputs = getattr(block_fn, "inputs", None) or []
            if (getattr(block_fn, "name", None) in (*GENERATE_EVENTS, *JOB_EVENTS)
                    and GENERATE_FIRST_INPUTS <= len(inputs) < len(block_inputs)):
                inputs.extend(getattr(block, "value", None) for block in block_inputs[len(inputs):])
            check_inputs(block_fn, inputs)

        if callable(check_inputs):
            demo.validate_inputs = validate_inputs  # type: ignore[method-assign]
    return demo


def _request(image: Any, prompt: Any, negative_prompt: Any, video_values: dict[str, Any], seed: Any,
             **more: Any) -> GenerationRequest:
    """A request from the page's or the API's values. Unset (None) values are left out, so the service fills
    them in (demo or config defaults); `more` holds segments, crossfade, exports and extend_from."""
    return GenerationRequest(image=image, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                             video={k: v for k, v in video_values.items() if v is not None},
                             **{k: v for k, v in more.items() if v is not None})


def _page_exports(smooth: Any, kinds: list[str] | None) -> list[str]:
    """The export kinds the page's output options ask for."""
    return ([f"smooth{int(smooth)}"] if smooth else []) + list(kinds or [])


def _shown_exports(video: Path, meta: dict[str, Any]) -> Any:
    """The page's exported-files list for `video`: the files beside it that its metadata names, hidden when
    there are none."""
    import gradio as gr

    found = [video.with_name(name) for name in (meta.get("exports") or {}).values()
             if isinstance(name, str) and Path(name).name == name]
    paths = [str(path) for path in found if path.is_file()] or None
    return gr.File(value=paths, visible=bool(paths))


def _generate_with_progress(service: GenerationService, req: GenerationRequest, cancel: threading.Event,
                            progress: Any, lang: str, jobs: "JobQueue | None" = None) -> GenerationResult:
    """service.generate (or the job queue's generate, which runs it through the queue's backend) with its
    progress shown as 'step i/N · about 12 s left' in `lang`."""
    if service.state.value == "loading" and (jobs is None or not jobs.remote):
        progress(0.0, desc=text("progress_wait_model", lang))

    def on_progress(p: Any) -> None:
        if isinstance(p, Job):  # a backend that runs it elsewhere (a Celery worker) reports the job's record
            progress(p.progress, desc=job_text(p, lang) or job_state_label(p, lang))
            return
        # A longer video says which segment it is on: "Segment 2/3 · Step 4/10 · about 5 s left".
        many = getattr(p, "segments", 1) > 1
        head = text("progress_segment", lang, k=p.segment, n=p.segments) + " · " if many else ""
        if p.stage == "encode":
            progress(0.0, desc=head + text("progress_encode", lang))
        elif p.stage == "compile":
            progress(0.0, desc=head + text("progress_compile", lang))
        elif p.stage == "denoise":
            eta = duration(p.eta_s, lang) if p.eta_s is not None else "?"
            progress((p.step, p.total), desc=head + text("progress_denoise", lang, i=p.step, n=p.total, eta=eta),
                     unit="steps")
        elif p.step >= p.total and not (many and p.segment < p.segments):
            progress(1.0, desc=text("progress_write", lang))
        else:
            progress((p.step, p.total), desc=head + text("progress_decode", lang, i=p.step, n=p.total),
                     unit="frames")

    run = service.generate if jobs is None else jobs.generate
    return run(req, on_progress=on_progress, cancel=cancel)


# The server --------------------------------------------------------------------------------------

def _lan_address() -> str | None:
    """This PC's address on its LAN (the interface of the default route); no packet is sent."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return None


def queue_files(settings: Settings) -> list[str]:
    """The job queue's files, which the file route must not serve although they lie in outputs/ by default:
    the database (with SQLite's side files) and the input copies beside it (JobStore.inputs_dir). They hold
    every job's prompt and input image, which a visitor may not fetch by path."""
    database = settings.queue_database.resolve()
    return [str(database), *(f"{database}{side}" for side in ("-wal", "-shm", "-journal")),
            str(database.parent / "inputs")]


def run_server(service: GenerationService, settings: Settings, *, host: str, port: int, share: bool = False,
               auth: tuple[str, str] | None = None, mcp: bool = False, block: bool = True, jobs: Any = None) -> Any:
    """Launch the UI with the safe defaults; block until Ctrl+C, or return the Blocks if block=False."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    if mcp and importlib.util.find_spec("mcp") is None:
        raise InputError('--mcp needs Gradio\'s MCP extra. Install it with: pip install "gradio[mcp]"',
                         '--mcp 需要 Gradio 的 MCP 扩展。请先安装:pip install "gradio[mcp]"')
    if mcp and auth is not None:  # the CLI says so first; this guards every other caller
        raise InputError("--mcp cannot be used with --auth: Gradio's MCP server has no login, so its tools would "
                         "be open to anyone who can reach the app.",
                         "--mcp 不能与 --auth 同时使用:Gradio 的 MCP 服务没有登录验证,其工具会对所有能访问本程序的人开放。")
    import gradio as gr

    outputs = settings.path("outputs").resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    demo = build_ui(service, settings, jobs=jobs)
    demo.queue(default_concurrency_limit=1, max_size=settings.server.max_queue_size, api_open=False)
    theme = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate",
                           font=["ui-sans-serif", "system-ui", "Noto Sans CJK SC", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])
    try:
        _, local_url, share_url = demo.launch(
            server_name=host, server_port=port, share=share, auth=auth,
            allowed_paths=[str(outputs)], blocked_paths=queue_files(settings),
            max_file_size=f"{settings.limits.max_upload_mb}mb",
            show_error=False, run_history=False, mcp_server=mcp, enable_monitoring=False, ssr_mode=False,
            footer_links=["api", "settings"], prevent_thread_lock=True, quiet=True, inbrowser=False,
            i18n=gr.I18n(**translations(settings)), theme=theme, css=CSS,
        )
    except OSError as exc:
        if "port" in str(exc).lower():
            raise InputError(f"Port {port} on {host} is in use; pick another with --port.",
                             f"端口 {port} 被占用 ({host});请用 --port 指定其他端口。") from None
        raise
    if mcp and getattr(demo, "mcp_error", None):
        demo.close()
        raise AppError(f"The MCP server did not start: {demo.mcp_error}", f"MCP 服务未能启动:{demo.mcp_error}")

    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{shown_host}:{demo.server_port}"
    print("[SUCCESS] Web UI is running / 网页界面已启动", flush=True)
    print(f"📍 访问地址 / Local URL: {url}", flush=True)
    if host in ("0.0.0.0", "::"):
        lan = _lan_address()
        where = f"http://{lan}:{demo.server_port}" if lan else f"this PC's LAN address, port {demo.server_port}"
        print(f"[INFO] Open to the LAN / 已对局域网开放: {where}", flush=True)
    if share_url:
        print(f"[INFO] Share link / 公开链接: {share_url}", flush=True)
    if mcp:
        print(f"[INFO] MCP server / MCP 服务: {url}/gradio_api/mcp/sse", flush=True)
    log.info("web UI on %s (share=%s, auth=%s, mcp=%s)", local_url, bool(share_url), auth is not None, mcp)
    if not block:
        return demo
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("[INFO] Stopping the web UI / 正在关闭网页界面", flush=True)
    finally:
        demo.close()
    return None
