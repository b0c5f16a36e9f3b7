"""The job queue in the web UI and its API: the real server with a JobQueue (tiny model), driven by
gradio_client and the mcp package's client, plus the page's batch and queue-table functions.

/submit_job queues jobs that /job_status follows to their MP4, /cancel_job stops a waiting one (no video), a bad
id is the bilingual error, a batch of images with one prompt line each becomes one job per image, and a batch
with one unreadable image queues nothing.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError as ClientAppError
from mp4probe import probe
from ports import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas deprecations in Gradio
FAST = {"resolution": 64, "num_frames": 4, "fps": 8, "steps": 2}
WAIT_S = 120  # a guard against a hang, never a speed check


def _launch(service, settings, jobs):
    """run_server on a free port (another test process may take the probed port first: then try another)."""
    from app.errors import InputError
    from app.ui import run_server

    for attempt in range(5):
        port = free_port()
        try:
            demo = run_server(service, settings, host="127.0.0.1", port=port, block=False, jobs=jobs, mcp=True)
            return demo, f"http://127.0.0.1:{port}/"
        except InputError as exc:
            if "in use" not in str(exc) or attempt == 4:
                raise
    raise AssertionError("unreachable")


def _draw(path: Path, colour: tuple[int, int, int]) -> Path:
    """A small input image with its own bytes (Gradio keeps uploads by content in a folder that every server
    of the machine shares, and deletes them when it closes)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 72), colour)
    ImageDraw.Draw(img).rectangle([20, 15, 60, 50], fill=(250, 210, 40))
    img.putpixel((0, 0), tuple(os.urandom(3)))
    img.save(path)
    return path


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory, shared_models_dir):
    """The app with its job queue (and MCP server) on a free port: tiny model, the queue's worker running."""
    from app.config import load_settings
    from app.engine.loader import load_engine
    from app.jobqueue import JobQueue
    from app.service import GenerationService

    root = tmp_path_factory.mktemp("ui-queue")
    shutil.copytree(REPO / "configs", root / "configs")
    for name in ("outputs", "logs"):
        (root / name).mkdir()
    settings = load_settings(root / "configs" / "config.yaml", root=root, environ={},
                             overrides={"paths": {"models": str(shared_models_dir)}})
    service = GenerationService(settings, lambda: load_engine(settings, source="tiny"))
    service.load()
    jobs = JobQueue(service, settings)
    jobs.start()
    demo, url = _launch(service, settings, jobs)
    yield SimpleNamespace(url=url, service=service, jobs=jobs, settings=settings, outputs=settings.path("outputs"),
                          image=_draw(root / "input.png", (30, 80, 160)), root=root)
    demo.close()
    jobs.stop()


def _client(url: str, **headers: str) -> Client:
    return Client(url, verbose=False, headers=headers or None, analytics_enabled=False)


def _videos(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.mp4")}


def _wait_status(client: Client, job_id: str, until: tuple[str, ...]) -> tuple[dict, str | None]:
    deadline = time.monotonic() + WAIT_S
    while True:
        status, video = client.predict(job_id, api_name="/job_status")
        if status["state"] in until:
            return status, video
        assert time.monotonic() < deadline, f"job {job_id} never reached {until}: {status}"
        time.sleep(0.1)


def _check_mp4(path: Path, frames: int = FAST["num_frames"], fps: int = FAST["fps"]) -> None:
    meta = probe(path)
    assert (meta["codec"], meta["pix_fmt"], meta["width"], meta["nb_frames"], meta["fps"]) == \
        ("h264", "yuv420p", FAST["resolution"], frames, fps)


# The API -----------------------------------------------------------------------------------------

def test_the_api_lists_the_job_endpoints_beside_generate_and_cancel(queue_server):
    api = _client(queue_server.url).view_api(print_info=False, return_format="dict")
    endpoints = api["named_endpoints"]
    assert set(endpoints) == {"/generate", "/cancel", "/submit_job", "/job_status", "/cancel_job"}
    names = [p["parameter_name"] for p in endpoints["/submit_job"]["parameters"]]
    assert names == [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
    assert [p["parameter_name"] for p in endpoints["/job_status"]["parameters"]] == ["job_id"]
    assert [p["parameter_name"] for p in endpoints["/cancel_job"]["parameters"]] == ["job_id"]


def test_two_submitted_jobs_are_followed_to_their_videos(queue_server):
    client = _client(queue_server.url)
    submitted = [client.predict(handle_file(str(queue_server.image)), f"job number {i}", "", *FAST.values(), 9.0,
                                500 + i, api_name="/submit_job") for i in range(2)]
    ids = [job_id for job_id, _ in submitted]
    assert len(set(ids)) == 2 and all(len(job_id) == 12 for job_id in ids)
    assert all(isinstance(position, (int, float)) and position >= 0 for _, position in submitted)

    for i, job_id in enumerate(ids):
        status, video = _wait_status(client, job_id, ("done", "failed", "cancelled"))
        assert status["state"] == "done", status
        assert (status["id"], status["progress"], status["position"], status["error"]) == (job_id, 1.0, None, None)
        assert status["attempts"] == 1 and status["prompt"] == f"job number {i}" and status["text"] == ""
        assert Path(video).name == status["video"]
        _check_mp4(Path(video))
        from app.video import read_metadata

        meta = read_metadata(queue_server.outputs / status["video"])
        assert (meta["prompt"], meta["seed"], meta["job_id"]) == (f"job number {i}", 500 + i, job_id)


def test_cancel_job_removes_a_waiting_job_and_stops_a_running_one(queue_server):
    client = _client(queue_server.url)
    before = _videos(queue_server.outputs)
    image = handle_file(str(queue_server.image))
    # A long job keeps the worker busy (only a cancel ends it in time), so the next one surely waits.
    running, _ = client.predict(image, "a long job", "", 64, 24, 8, 100, 9.0, 1, api_name="/submit_job")
    _wait_status(client, running, ("running",))
    waiting, position = client.predict(image, "a job that waits", "", *FAST.values(), 9.0, 2,
                                       api_name="/submit_job")
    assert position == 1

    status = client.predict(waiting, api_name="/cancel_job")
    assert (status["id"], status["state"], status["video"]) == (waiting, "cancelled", None)
    status, video = client.predict(waiting, api_name="/job_status")
    assert status["state"] == "cancelled" and video is None and "no video was written" in status["error"]

    status = client.predict(running, api_name="/cancel_job")
    assert status["state"] in ("running", "cancelled") and (status["state"] == "cancelled"
                                                             or status["cancel_requested"])
    status, video = _wait_status(client, running, ("done", "failed", "cancelled"))
    assert status["state"] == "cancelled" and video is None
    assert _videos(queue_server.outputs) == before


@pytest.mark.parametrize(("endpoint", "headers", "expected"), [
    ("/job_status", {}, "No job nosuchjob in the queue."),
    ("/cancel_job", {}, "No job nosuchjob in the queue."),
    ("/job_status", {"Accept-Language": "zh-CN,zh;q=0.9"}, "队列中没有任务 nosuchjob。"),
], ids=["status", "cancel", "status-zh"])
def test_a_bad_job_id_is_the_bilingual_error(queue_server, endpoint, headers, expected):
    with pytest.raises(ClientAppError) as err:
        _client(queue_server.url, **headers).predict("nosuchjob", api_name=endpoint)
    assert expected in str(err.value) and "Traceback" not in str(err.value)


def test_submit_job_refuses_bad_input_and_stores_nothing(queue_server):
    before = [job.id for job in queue_server.jobs.list()]
    with pytest.raises(ClientAppError, match="The prompt is empty"):
        _client(queue_server.url).predict(handle_file(str(queue_server.image)), "   ", api_name="/submit_job")
    with pytest.raises(ClientAppError, match="帧数为 99,超出允许范围"):
        _client(queue_server.url, **{"Accept-Language": "zh-CN"}).predict(
            handle_file(str(queue_server.image)), "a cat", num_frames=99, api_name="/submit_job")
    assert [job.id for job in queue_server.jobs.list()] == before


def _mcp(url: str, work):
    """`await work(session)` in one session of the mcp package's streamable-HTTP client."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def session():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=300)) as http:
            async with streamable_http_client(url + "gradio_api/mcp/", http_client=http) as (read, write, _):
                async with ClientSession(read, write) as mcp_session:
                    await mcp_session.initialize()
                    return await work(mcp_session)

    return asyncio.run(session())


def test_mcp_tools_queue_a_job_and_follow_it_to_its_video(queue_server, tmp_path):
    """An assistant's way: submit_job with a data-URL image, job_status until done, the MP4 fetched by URL."""
    image = "data:image/png;base64," + base64.b64encode(queue_server.image.read_bytes()).decode("ascii")

    async def work(session):
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        submitted = await session.call_tool("submit_job", {"image": image, "prompt": "an assistant's job",
                                                           **FAST, "seed": 9})
        assert not submitted.isError, submitted.content
        job_id = submitted.content[0].text
        for _ in range(WAIT_S * 5):
            status = await session.call_tool("job_status", {"job_id": job_id})
            texts = [c.text for c in status.content if c.type == "text"]
            if "'state': 'queued'" not in texts[0] and "'state': 'running'" not in texts[0]:
                break
            await asyncio.sleep(0.2)
        unknown = await session.call_tool("cancel_job", {"job_id": "nosuchjob"})
        return tools, job_id, texts, unknown

    tools, job_id, texts, unknown = _mcp(queue_server.url, work)
    assert {"submit_job", "job_status", "cancel_job"} <= set(tools)
    assert tools["submit_job"].inputSchema["required"] == ["image", "prompt"]
    assert list(tools["job_status"].inputSchema["properties"]) == ["job_id"]
    assert "'state': 'done'" in texts[0] and f"'id': '{job_id}'" in texts[0], texts
    reply = httpx.get(texts[1], timeout=30)
    assert reply.status_code == 200 and texts[1].endswith(".mp4"), texts
    video = tmp_path / "job.mp4"
    video.write_bytes(reply.content)
    _check_mp4(video)
    assert unknown.isError and "No job nosuchjob in the queue." in unknown.content[0].text


def test_the_file_route_serves_a_jobs_video_but_not_the_queues_database_or_input_copies(queue_server):
    """The queue's files lie in outputs/ (outputs/.queue/), which the app serves: they are blocked."""
    client = _client(queue_server.url)
    job_id, _ = client.predict(handle_file(str(queue_server.image)), "a served video", "", *FAST.values(), 9.0, 3,
                               api_name="/submit_job")
    status, _ = _wait_status(client, job_id, ("done", "failed", "cancelled"))
    database = queue_server.settings.queue_database
    copies = list((database.parent / "inputs").glob("*.png"))
    assert database.is_file() and copies and database.is_relative_to(queue_server.outputs)

    def fetch(path: Path) -> int:
        return httpx.get(queue_server.url + "gradio_api/file=" + str(path.resolve()), timeout=30).status_code

    assert fetch(queue_server.outputs / status["video"]) == 200
    for path in (database, Path(f"{database}-wal"), copies[0]):
        assert fetch(path) == 403, path


# The batch ---------------------------------------------------------------------------------------

def _base(**values):
    from app.service import GenerationRequest

    return GenerationRequest(image=None, prompt=values.pop("prompt", "the page's prompt"), seed=values.pop("seed", 7),
                             negative_prompt="", video={**FAST, "guidance_scale": 9.0}, **values)


def test_a_batch_of_two_images_with_a_prompt_line_each_makes_two_videos(queue_server):
    from app.jobs.store import JobState
    from app.ui import batch_requests, queue_batch
    from app.video import read_metadata

    images = [_draw(queue_server.root / name, colour) for name, colour in
              (("first.png", (200, 40, 40)), ("second.png", (40, 200, 40)))]
    entries = batch_requests([str(p) for p in images], "a red card turns\n\n a green card falls \n", "", _base())
    assert [(name, req.prompt, req.seed) for name, req in entries] == [
        ("first.png", "a red card turns", 7), ("second.png", "a green card falls", 7)]

    queued = queue_batch(queue_server.jobs, entries, owner="test")
    assert len(queued) == 2
    for job, prompt in zip(queued, ("a red card turns", "a green card falls")):
        done = queue_server.jobs.wait(job.id)
        assert done.state is JobState.DONE, done
        _check_mp4(queue_server.outputs / done.result)
        meta = read_metadata(queue_server.outputs / done.result)
        assert (meta["prompt"], meta["seed"], meta["job_id"]) == (prompt, 7, job.id)


def test_a_batch_with_one_unreadable_image_queues_nothing(queue_server):
    from app.errors import InputError
    from app.ui import batch_requests, queue_batch

    good = _draw(queue_server.root / "good.png", (90, 90, 200))
    broken = queue_server.root / "broken.png"
    broken.write_bytes(b"this is not an image")
    before = [job.id for job in queue_server.jobs.list()]
    entries = batch_requests([str(good), str(broken)], "one prompt for both", "1, 2", _base())
    assert [(name, req.seed) for name, req in entries] == [("good.png", 1), ("good.png", 2), ("broken.png", 1),
                                                           ("broken.png", 2)]

    with pytest.raises(InputError) as err:
        queue_batch(queue_server.jobs, entries)
    assert err.value.en.startswith("broken.png: ") and err.value.en.endswith("Nothing was queued.")
    assert err.value.zh.startswith("broken.png:") and err.value.zh.endswith("未加入任何任务。")
    assert [job.id for job in queue_server.jobs.list()] == before


@pytest.mark.parametrize(("files", "prompts", "seeds", "expected"), [
    ([], "a cat", "", "Add one or more images to the batch first."),
    (["a.png", "b.png", "c.png"], "one\ntwo", "", "The prompts box has 2 lines for 3 images"),
    (["a.png"], "a cat", "1, two", "Seeds: 'two' is not a whole number"),
], ids=["no-images", "prompt-lines", "seed"])
def test_a_batch_of_the_wrong_shape_is_refused_before_any_check(files, prompts, seeds, expected):
    from app.errors import InputError
    from app.ui import batch_requests

    with pytest.raises(InputError) as err:
        batch_requests(files, prompts, seeds, _base())
    assert expected in err.value.en and err.value.zh != err.value.en


def test_a_batch_without_prompts_or_seeds_takes_the_pages(tmp_path):
    from app.ui import batch_requests

    entries = batch_requests(["x/a.png", "x/b.png"], "  \n", "3,4", _base(prompt="from the page"))
    assert [(name, req.prompt, req.seed, req.image) for name, req in entries] == [
        ("a.png", "from the page", 3, "x/a.png"), ("a.png", "from the page", 4, "x/a.png"),
        ("b.png", "from the page", 3, "x/b.png"), ("b.png", "from the page", 4, "x/b.png")]
    assert all(req.video == {**FAST, "guidance_scale": 9.0} for _, req in entries)


# The queue table ---------------------------------------------------------------------------------

def test_the_queue_table_shows_states_attempts_progress_results_and_errors(tmp_path):
    from app.jobs.store import JobState, JobStore
    from app.ui import render_queue

    store = JobStore(tmp_path / "jobs.sqlite3")
    done, failed, requeued, running, waiting = (store.add({"prompt": f"prompt {i} " + "x" * 80}, "")
                                                for i in range(5))
    for job in (done, failed, requeued):
        store.claim(job.id, "host:1")
    store.finish(done.id, JobState.DONE, result="video_1.mp4")
    store.finish(failed.id, JobState.FAILED, error_en="Out of GPU memory.", error_zh="显存不足。")
    store.recover(lambda runner: False)  # the app stopped while `requeued` ran: it waits for its second attempt
    store.claim(running.id, "host:2")
    store.set_progress(running.id, 0.5, "Step 5/10 · about 3.0 s left", "第 5/10 步 · 预计剩余时间 3.0 秒", 3.0)

    en = render_queue(store.list(), "en", tmp_path / "outputs")
    zh = render_queue(store.list(), "zh", tmp_path / "outputs")
    rows = en.split("<tr data-job=")[1:]
    assert [row.split('"')[1] for row in rows] == [requeued.id, running.id, waiting.id, failed.id, done.id]
    assert "attempt 2" in rows[0] and rows[0].startswith(f'"{requeued.id}" data-state="queued"><td>1</td>')
    assert rows[2].startswith(f'"{waiting.id}" data-state="queued"><td>2</td>') and "attempt" not in rows[2]
    assert "50%" in rows[1] and "Step 5/10" in rows[1] and "3.0 s" in rows[1] and "Running" in rows[1]
    assert 'data-action="cancel"' in rows[1] and 'data-action="cancel"' in rows[2]
    assert "Out of GPU memory." in rows[3] and 'data-action="retry"' in rows[3]
    assert "video_1.mp4</a>" in rows[4] and "gradio_api/file=" in rows[4] and "data-action" not in rows[4]
    assert "prompt 0 " + "x" * 50 + "…" in rows[4] and "x" * 80 + "</span>" not in rows[4]  # the whole one: a tooltip
    for word in ("排队中", "运行中", "已完成", "失败", "第 2 次尝试", "显存不足。", "第 5/10 步", "取消", "重试"):
        assert word in zh
    assert "The queue is empty" in render_queue([], "en", tmp_path)


def test_a_page_built_without_a_queue_has_no_queue_panel(settings, make_service):
    from app.ui import build_ui

    demo = build_ui(make_service(), settings)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert "history" in ids and not ids & {"queue", "queue-table", "batch"}
    assert not {"submit_job", "job_status", "cancel_job"} & {fn.api_name for fn in demo.fns.values()}
