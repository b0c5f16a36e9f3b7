"""app/ui.py in a real browser: Playwright driving Debian's chromium against the app with the tiny model.

Upload, generate with visible progress, a playable <video> of frames/fps seconds, cancel with no
file written, the history read from outputs/, Chinese labels, errors and run details for a zh-CN
browser, and the queue panel (a batch of jobs, one cancelled in its row). Screenshots of the whole page
go to test-artifacts/ (ui-en-generated.png is the README's picture, docs/images/ui.png).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ports import free_port

# No test may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
# The demo preset the page picks for the tiny model: a few quick steps, so progress is visible.
DEMO = {"resolution": 64, "num_frames": 4, "fps": 8, "steps": 6, "guidance_scale": 9.0}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # pandas deprecations in Gradio
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install chromium fonts-noto-cjk)"),
]
sync_api = pytest.importorskip("playwright.sync_api")
# Assertions wait up to 30 s (Playwright's default is 5 s): with the suite on all cores, a generation the
# page waits for can take several seconds.
sync_api.expect.set_options(timeout=30_000)


def _launch(service, settings, jobs):
    """run_server on a free port. Tests run in parallel processes, so another one may take the port between
    the probe and the bind: then try another."""
    from app.errors import InputError
    from app.ui import run_server

    for attempt in range(5):
        port = free_port()
        try:
            return run_server(service, settings, host="127.0.0.1", port=port, block=False, jobs=jobs), port
        except InputError as exc:
            if "in use" not in str(exc) or attempt == 4:
                raise
    raise AssertionError("unreachable")


def _draw_input(path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 100), (40, 90, 170))
    ImageDraw.Draw(img).rectangle([60, 20, 110, 80], fill=(240, 180, 40))
    img.save(path)
    return path


@pytest.fixture(scope="module")
def browser_models_dir(shared_models_dir: Path) -> Path:
    """The run's models folder (tests/conftest.py): the tiny model is built once for all test files."""
    return shared_models_dir


@pytest.fixture(scope="module")
def ui(tmp_path_factory, browser_models_dir):
    """The app on a free port, tiny model loaded, and one video made before the server started."""
    import yaml

    from app.config import load_settings
    from app.engine.loader import load_engine
    from app.jobqueue import JobQueue
    from app.service import GenerationRequest, GenerationService

    root = tmp_path_factory.mktemp("ui-browser")
    shutil.copytree(REPO / "configs", root / "configs")
    config = root / "configs" / "config.yaml"
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["demo"] = DEMO
    config.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    settings = load_settings(config, root=root, environ={}, overrides={"paths": {"models": str(browser_models_dir)}})
    service = GenerationService(settings, lambda: load_engine(settings, source="tiny"))
    service.load()
    image = _draw_input(root / "input.png")
    earlier = service.generate(GenerationRequest(image=image, prompt="made before the server started", seed=42,
                                                 video={"resolution": 64, "num_frames": 4, "fps": 8, "steps": 1}))
    jobs = JobQueue(service, settings)  # as `serve` runs it: the page has its queue panel
    jobs.start()
    demo, port = _launch(service, settings, jobs)
    ARTIFACTS.mkdir(exist_ok=True)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", service=service, outputs=settings.path("outputs"),
                          image=image, earlier=earlier, jobs=jobs)
    demo.close()
    jobs.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, url: str, locale: str = "en-US"):
    context = browser.new_context(locale=locale, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#generate-btn")
    return page


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _watch_text(page, selector: str, pattern: str) -> None:
    """Record every text matching `pattern` that ever appears under `selector` (fast runs flash by)."""
    page.evaluate("""([selector, pattern]) => {
        window.__seen = [];
        const re = new RegExp(pattern);
        const root = document.querySelector(selector);
        const look = () => { const m = root.innerText.match(re); if (m) window.__seen.push(m[0]); };
        new MutationObserver(look).observe(root, {subtree: true, childList: true, characterData: true});
    }""", [selector, pattern])


def _wait_idle(service, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while service.status()["busy"]:
        assert time.monotonic() < deadline, "the run did not stop"
        time.sleep(0.05)


def test_generate_shows_progress_and_plays_a_video_of_frames_over_fps(ui, browser, hold_decode):
    hold_decode(ui.service.engine.sampler)
    page = _open(browser, ui.url)
    status = page.locator("#status-bar")
    sync_api.expect(status).to_contain_text("Model ready")
    sync_api.expect(status).to_contain_text("Demo model (output is noise)")
    # The tiny model brings its own small defaults.
    sync_api.expect(page.locator("#preset input[value=demo]")).to_be_checked()
    page.locator("#advanced").click()
    sync_api.expect(page.locator("#steps input[type=number]")).to_have_value(str(DEMO["steps"]))
    history = page.locator("#history .thumbnail-item")
    sync_api.expect(history).to_have_count(1)
    before = _listing(ui.outputs)

    _fill(page, ui.image, "a yellow box slides to the right")
    _watch_text(page, "#output-video", r"Step \d+/\d+ · about")
    page.locator("#generate-btn").click()

    video = page.locator("#output-video video")
    sync_api.expect(video).to_have_count(1)
    page.wait_for_function("() => document.querySelector('#output-video video').readyState >= 1")
    seconds = video.evaluate("v => v.duration")
    assert seconds == pytest.approx(DEMO["num_frames"] / DEMO["fps"], abs=0.1)
    seen = page.evaluate("window.__seen")
    assert any(s.startswith(f"Step {DEMO['steps']}/{DEMO['steps']}") for s in seen), seen
    new = _listing(ui.outputs) - before
    mp4 = [n for n in new if n.endswith(".mp4")]
    assert len(mp4) == 1
    info = page.locator("#run-info")
    sync_api.expect(info).to_contain_text(mp4[0])
    for word in ("Seed", "denoise", "Peak VRAM"):
        sync_api.expect(info).to_contain_text(word)
    sync_api.expect(history).to_have_count(2)
    _screenshot_when_idle(page, ARTIFACTS / "ui-en-generated.png")
    page.context.close()


def _screenshot_when_idle(page, path: Path) -> None:
    """The whole page once the run is over (the status bar polls every few seconds), the video paused on a
    frame: the picture of the app the README shows."""
    sync_api.expect(page.locator("#status-bar")).not_to_contain_text(re.compile("Generating|正在生成"))
    sync_api.expect(page.locator("#generate-btn")).to_be_enabled()
    page.locator("#output-video video").evaluate("v => { v.pause(); v.currentTime = 0.2; }")
    time.sleep(0.3)
    page.screenshot(path=str(path), full_page=True)


def _fill(page, image: Path, prompt: str) -> None:
    page.locator("#input-image input[type=file]").set_input_files(str(image))
    page.locator("#prompt textarea").fill(prompt)
    # The crop preview shows once the upload reached the server: a click before that would send no image.
    sync_api.expect(page.locator("#crop-preview img")).to_be_visible()


def test_cancel_stops_the_run_and_writes_no_file(ui, browser):
    page = _open(browser, ui.url)
    _fill(page, ui.image, "a run that is cancelled")
    page.locator("#advanced").click()
    _set_number(page, "resolution", 128)  # long enough (minutes) that only Cancel can end it in time
    _set_number(page, "num-frames", 24)
    _set_number(page, "steps", 100)
    sync_api.expect(page.locator("#preset input:checked")).to_have_count(0)  # hand-set values: no preset
    before = _listing(ui.outputs)

    page.locator("#generate-btn").click()
    sync_api.expect(page.locator("#output-video")).to_contain_text(re.compile(r"Step \d+/100"))
    # A second tab queues behind it and sees its place in the queue, then cancels while waiting.
    other = _open(browser, ui.url)
    _fill(other, ui.image, "a queued run that is cancelled")
    other.locator("#generate-btn").click()
    sync_api.expect(other.locator("#output-video")).to_contain_text("queue")
    other.screenshot(path=str(ARTIFACTS / "ui-en-queued.png"), full_page=True)
    other.locator("#cancel-btn").click()
    sync_api.expect(other.locator("#generate-btn")).to_be_enabled()
    page.screenshot(path=str(ARTIFACTS / "ui-en-progress.png"), full_page=True)
    page.locator("#cancel-btn").click()

    sync_api.expect(page.locator("#run-info")).to_contain_text("Cancelling")
    _wait_idle(ui.service)
    time.sleep(1.5)  # long enough for the queued run to start, had it not been removed
    assert not ui.service.status()["busy"]
    assert _listing(ui.outputs) == before
    sync_api.expect(page.locator("#generate-btn")).to_be_enabled()
    page.screenshot(path=str(ARTIFACTS / "ui-en-cancelled.png"), full_page=True)
    other.context.close()
    page.context.close()


def test_history_entry_loads_its_video_and_settings(ui, browser):
    page = _open(browser, ui.url)
    earlier = page.locator("#history .thumbnail-item", has_text="made before the server")
    earlier.click()

    sync_api.expect(page.locator("#prompt textarea")).to_have_value("made before the server started")
    page.locator("#advanced").click()
    sync_api.expect(page.locator("#seed input")).to_have_value("42")
    sync_api.expect(page.locator("#steps input[type=number]")).to_have_value("1")
    src = page.locator("#output-video video").get_attribute("src")
    assert src.endswith(ui.earlier.video_path.name)
    sync_api.expect(page.locator("#run-info")).to_contain_text(ui.earlier.video_path.name)
    # The input image kept beside the video comes back too, and with it the crop preview.
    sync_api.expect(page.locator("#input-image img")).to_be_visible()
    sync_api.expect(page.locator("#crop-preview img")).to_be_visible()
    page.context.close()


def test_extend_on_a_history_entry_makes_a_longer_video(ui, browser, hold_decode):
    hold_decode(ui.service.engine.sampler)
    page = _open(browser, ui.url)
    page.locator("#history .thumbnail-item", has_text="made before the server").click()
    sync_api.expect(page.locator("#run-info")).to_contain_text(ui.earlier.video_path.name)
    before = _listing(ui.outputs)
    _watch_text(page, "#output-video", r"Segment \d+/\d+ · Step \d+/\d+")
    page.locator("#extend-btn").click()

    sync_api.expect(page.locator("#run-info")).to_contain_text("Extended from")
    new = sorted(n for n in _listing(ui.outputs) - before if n.endswith(".mp4"))
    assert len(new) == 1 and ui.earlier.video_path.is_file()
    sync_api.expect(page.locator("#run-info")).to_contain_text(new[0])
    page.wait_for_function("() => document.querySelector('#output-video video').readyState >= 1")
    video = page.locator("#output-video video")
    assert video.get_attribute("src").endswith(new[0])
    # 4 frames, then one more segment of 4 whose first frame is dropped: 7 frames at 8 FPS.
    assert video.evaluate("v => v.duration") == pytest.approx(7 / 8, abs=0.1)
    assert "Segment 2/2 · Step 1/1" in page.evaluate("window.__seen")
    sync_api.expect(page.locator("#run-info")).to_contain_text("2 segments · cross-fade 0 frames")
    page.context.close()


def test_chinese_browser_gets_chinese_labels_and_errors(ui, browser):
    page = _open(browser, ui.url, locale="zh-CN")
    for label in ("图像转视频", "输入图片", "模型实际看到的画面", "提示词", "预设", "高级参数", "生成视频", "取消",
                  "历史记录"):
        sync_api.expect(page.get_by_text(label).first).to_be_visible()
    sync_api.expect(page.locator("#status-bar")).to_contain_text("演示模型 (输出为噪声)")
    sync_api.expect(page.locator("#status-bar")).to_contain_text("模型就绪")
    sync_api.expect(page.locator("#preset")).to_contain_text("演示模型")
    page.locator("#prompt textarea").fill("a cat walking")
    page.locator("#generate-btn").click()  # no image: the error comes back in Chinese
    sync_api.expect(page.locator(".toast-body")).to_contain_text("请上传输入图片")
    page.screenshot(path=str(ARTIFACTS / "ui-zh-error.png"), full_page=True)
    page.context.close()


def test_a_note_from_a_quick_page_event_reaches_the_page(ui, browser):
    """Reusing the seed in a fresh tab has no seed to reuse: the note is shown as a toast, in the page's language."""
    page = _open(browser, ui.url, locale="zh-CN")
    page.locator("#advanced").click()
    page.locator("#seed-reuse").click()
    sync_api.expect(page.locator(".toast-body")).to_contain_text("暂无可复用的种子")
    page.context.close()


def test_chinese_browser_generates_and_reports_in_chinese(ui, browser):
    page = _open(browser, ui.url, locale="zh-CN")
    _fill(page, ui.image, "黄色方块向右滑动")
    page.locator("#generate-btn").click()
    sync_api.expect(page.locator("#output-video video")).to_have_count(1)
    info = page.locator("#run-info")
    for word in ("种子", "去噪", "显存峰值"):
        sync_api.expect(info).to_contain_text(word)
    _screenshot_when_idle(page, ARTIFACTS / "ui-zh-generated.png")
    page.context.close()


def test_queue_panel_runs_a_batch_and_cancels_one_job_in_its_row(ui, browser, monkeypatch):
    """Three jobs from the batch (one image, seeds 1,2,3); the second is cancelled in the queue table while the
    first runs; the first and third end as done with their videos, the second as cancelled without one."""
    from mp4probe import probe

    # The first job holds in its decode until the second is cancelled, so the second surely still waits.
    release = threading.Event()
    sampler = ui.service.engine.sampler
    decode = sampler.decode
    monkeypatch.setattr(sampler, "decode", lambda *a, **kw: (release.wait(120), decode(*a, **kw))[1])
    page = _open(browser, ui.url)
    sync_api.expect(page.locator("#preset input[value=demo]")).to_be_checked()  # the batch takes these settings
    before = {n for n in _listing(ui.outputs) if n.endswith(".mp4")}
    history = page.locator("#history .thumbnail-item")
    sync_api.expect(history).to_have_count(len(before))
    page.locator("#batch").click()
    page.locator("#batch-files input[type=file]").set_input_files(str(ui.image))
    # Gradio shows a file name as its stem and its extension in two spans (text "input .png" or "input.png").
    sync_api.expect(page.locator("#batch-files")).to_contain_text(
        re.compile(re.escape(ui.image.stem) + r"\s*" + re.escape(ui.image.suffix)))
    page.locator("#batch-prompts textarea").fill("a box waits its turn")
    page.locator("#batch-seeds textarea, #batch-seeds input").first.fill("1, 2, 3")
    try:
        page.locator("#batch-add").click()
        sync_api.expect(page.locator(".toast-body")).to_contain_text("3 jobs added to the queue.")
        rows = page.locator("#queue-table tr[data-job]")
        sync_api.expect(rows).to_have_count(3)
        first, second, third = (rows.nth(i).get_attribute("data-job") for i in range(3))
        row = {job: page.locator(f'#queue-table tr[data-job="{job}"]') for job in (first, second, third)}
        sync_api.expect(row[first]).to_have_attribute("data-state", "running")
        sync_api.expect(row[first]).to_contain_text("%")
        sync_api.expect(row[second]).to_have_attribute("data-state", "queued")
        row[second].locator("button[data-action=cancel]").click()
        sync_api.expect(row[second]).to_have_attribute("data-state", "cancelled")
        sync_api.expect(row[second]).to_contain_text("Cancelled")
        page.screenshot(path=str(ARTIFACTS / "ui-en-queue.png"), full_page=True)
    finally:
        release.set()
    for job in (first, third):
        sync_api.expect(row[job]).to_have_attribute("data-state", "done", timeout=120_000)
        sync_api.expect(row[job]).to_contain_text("Done")
    sync_api.expect(row[second]).to_have_attribute("data-state", "cancelled")
    made = {n for n in _listing(ui.outputs) if n.endswith(".mp4")} - before
    assert made == {ui.jobs.get(first).result, ui.jobs.get(third).result}
    sync_api.expect(history).to_have_count(len(before) + 2)  # the history follows the queue's new videos
    assert ui.jobs.get(second).result is None
    for name in made:
        sync_api.expect(page.locator("#queue-table")).to_contain_text(name)
        meta = probe(ui.outputs / name)
        assert (meta["codec"], meta["pix_fmt"], meta["nb_frames"], meta["fps"]) == \
            ("h264", "yuv420p", DEMO["num_frames"], DEMO["fps"])
    page.context.close()
