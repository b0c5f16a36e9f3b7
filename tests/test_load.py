"""The server under load, on one server with the tiny model: eight gradio_client clients at once, a client
that goes away during its run, and a full queue.

The server runs in the test process (so a test can hold its video writer and keep the GPU busy on demand), and
its memory is measured as this process's resident set. That includes the eight clients: alive at the first
measurement and closed at the second, a few MiB at most, far below the leak the bound is there to catch.
"""

from __future__ import annotations

import ctypes
import gc
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import handle_file
from mp4probe import probe
from test_ui_api import _client, _launch, _make_unique, _ui_root, _ui_settings

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas deprecations in Gradio

SMALL = {"resolution": 64, "num_frames": 2, "fps": 8, "steps": 1, "guidance_scale": 9.0}
CLIENTS, JOBS_PER_CLIENT = 8, 3
# Each job uploads this image; the service decodes it to 3 MiB of RGB.
INPUT_SIDE = 1024
# How much the process may grow over the 16 jobs after the warm-up round (each client's first job). Once warm,
# the server's own growth is small (Python's and Gradio's bookkeeping); a job that kept its decoded input image,
# or anything as large, would add 16 × 3 MiB = 48 MiB and fail.
RSS_GROWTH_BOUND_MIB = 32


def _rss_mib() -> float:
    """Resident memory of this process (the server runs in it) in MiB, once garbage is collected and the C
    allocator has handed its free pages back (else freed memory still counts, and the figure is noise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure keeps some free memory
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def load_server(tmp_path_factory, shared_models_dir):
    """The app on a free port with the tiny model (loaded) and the shipped queue limit. Its video writer waits
    while `hold` is clear: a test clears it to keep the GPU busy with one run."""
    from PIL import Image, ImageDraw

    from app.engine.loader import load_engine
    from app.service import GenerationService
    from app.video import write_video

    root = _ui_root(tmp_path_factory.mktemp("load"))
    settings = _ui_settings(root, shared_models_dir)
    hold = threading.Event()
    hold.set()

    def writer(*args, **kwargs):
        assert hold.wait(120), "the test never released the writer"
        return write_video(*args, **kwargs)

    service = GenerationService(settings, lambda: load_engine(settings, source="tiny"), writer=writer)
    service.load()
    demo, url = _launch(service, settings)
    image = root / "input.png"
    img = Image.new("RGB", (INPUT_SIDE, INPUT_SIDE), (30, 80, 160))
    ImageDraw.Draw(img).ellipse([200, 200, 800, 800], fill=(250, 200, 60))
    _make_unique(img)
    img.save(image)
    yield SimpleNamespace(url=url, service=service, settings=settings, demo=demo, image=image, hold=hold,
                          outputs=settings.path("outputs"))
    hold.set()
    demo.close()


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _wait(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _generate(client, image: Path, prompt: str, seed: int):
    return client.predict(handle_file(str(image)), prompt, seed=seed, **SMALL, api_name="/generate")


# Many clients --------------------------------------------------------------------------------------

def test_eight_clients_with_three_jobs_each_get_their_own_videos_and_memory_settles(load_server):
    """Each client runs its jobs one after another, all eight at once. Memory is measured once every client
    has made its first video (the warm-up: threads, pools and caches exist by then) and again at the end."""
    server = load_server
    rss = []
    warmed_up = threading.Barrier(CLIENTS, action=lambda: rss.append(_rss_mib()), timeout=300)

    def one_client(i: int) -> list[tuple[int, str, str, dict]]:
        client = _client(server.url)
        try:
            done = []
            for j in range(JOBS_PER_CLIENT):
                seed, prompt = 1000 * (i + 1) + j, f"client {i} job {j}"
                video, _, details = _generate(client, server.image, prompt, seed)
                done.append((seed, prompt, video, details))
                if j == 0:
                    warmed_up.wait()
            return done
        finally:
            client.close()

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [job for jobs in pool.map(one_client, range(CLIENTS)) for job in jobs]
    rss.append(_rss_mib())

    assert len(results) == CLIENTS * JOBS_PER_CLIENT
    assert len({details["file"] for *_, details in results}) == len(results)
    for seed, prompt, video, details in results:
        assert (details["seed"], details["prompt"]) == (seed, prompt)
        assert {k: details[k] for k in SMALL} == SMALL
        # The file this client received is the one the server wrote for its request.
        assert Path(video).read_bytes() == (server.outputs / details["file"]).read_bytes()
        meta = probe(Path(video))
        assert (meta["codec"], meta["pix_fmt"], meta["width"], meta["nb_frames"], meta["fps"]) == (
            "h264", "yuv420p", SMALL["resolution"], SMALL["num_frames"], SMALL["fps"])
    growth = rss[1] - rss[0]
    assert growth < RSS_GROWTH_BOUND_MIB, f"the server grew by {growth:.0f} MiB over {CLIENTS * 2} jobs"


# A client that goes away ---------------------------------------------------------------------------

def test_a_tab_closed_during_its_run_cancels_it_and_the_next_client_is_served(load_server):
    """What a browser tab does, over plain HTTP: keep a heartbeat, join the queue with the page's Generate
    event, read its event stream, then vanish mid-run. The run stops without a file, and the GPU is free."""
    server = load_server
    config = httpx.get(server.url + "config").json()
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "generate-btn")
    event = next(d["id"] for d in config["dependencies"] if [button, "click"] in d["targets"])
    upload = httpx.post(server.url + "gradio_api/upload",
                        files={"files": ("input.png", server.image.read_bytes(), "image/png")})
    image = {"path": upload.json()[0], "meta": {"_type": "gradio.FileData"}, "orig_name": "input.png"}
    session = uuid.uuid4().hex
    before = _listing(server.outputs)
    seen = []

    with httpx.Client(timeout=30) as http:
        with http.stream("GET", server.url + f"gradio_api/heartbeat/{session}"):
            joined = http.post(server.url + "gradio_api/queue/join", json={
                "data": [image, "a run nobody waits for", "", 64, 24, 8, 100, 9.0, 3], "fn_index": event,
                "trigger_id": button, "session_hash": session, "event_data": None})
            assert joined.status_code == 200, joined.text
            with http.stream("GET", server.url + f"gradio_api/queue/data?session_hash={session}") as stream:
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        seen.append(json.loads(line[5:])["msg"])
                        if seen[-1] == "progress" and server.service.status()["busy"]:
                            break  # the tab closes mid-run
    assert "process_completed" not in seen

    _wait(lambda: not server.service.status()["busy"], "the run of the closed tab went on", timeout=120)
    assert _listing(server.outputs) == before  # no video, and no partial file, of the abandoned run
    _, _, details = _generate(_client(server.url), server.image, "the next client", seed=4)
    assert details["prompt"] == "the next client"
    assert _listing(server.outputs) - before == {details["file"], details["input_image"],
                                                 Path(details["file"]).with_suffix(".json").name}


# A full queue ----------------------------------------------------------------------------------------

def test_a_full_queue_refuses_each_request_past_the_limit_with_a_clear_message(load_server):
    server = load_server
    limit = server.settings.server.max_queue_size
    before = _listing(server.outputs)
    running_client, waiting_client, late_client = (_client(server.url) for _ in range(3))
    server.hold.clear()  # the first run keeps the GPU until the end of the test
    try:
        running = running_client.submit(handle_file(str(server.image)), "running", seed=1, **SMALL,
                                        api_name="/generate")
        _wait(lambda: server.service.status()["busy"], "the first run never started")
        waiting = [waiting_client.submit(handle_file(str(server.image)), f"waiting {i}", seed=1, **SMALL,
                                         api_name="/generate") for i in range(limit)]
        _wait(lambda: httpx.get(server.url + "gradio_api/queue/status").json()["queue_size"] == limit,
              "the queue never filled")

        # 100 requests past the limit: a few through gradio_client, the rest over plain HTTP (quicker).
        refused = [late_client.submit(handle_file(str(server.image)), "one too many", seed=1, **SMALL,
                                      api_name="/generate") for _ in range(3)]
        for job in refused:
            with pytest.raises(Exception, match=r"^Queue is full! Please try again\.$") as err:
                job.result(timeout=60)
            assert type(err.value).__name__ == "QueueError"
        with httpx.Client(timeout=30) as http:
            for _ in range(100 - len(refused)):
                raw = http.post(server.url + "gradio_api/call/generate", json={"data": [None, "one too many"]})
                assert raw.status_code == 503
                assert raw.json()["detail"] == f"Queue is full. Max size is {limit} and size is {limit}."
        assert httpx.get(server.url + "gradio_api/queue/status").json()["queue_size"] == limit
        # gradio_client sends even the unqueued /cancel through the queue: refused too (docs/ui-and-api.md).
        with pytest.raises(Exception, match=r"^Queue is full! Please try again\.$"):
            running_client.predict(api_name="/cancel")

        for job in waiting:  # drop the waiting runs, as a client's job.cancel() does
            job.cancel()
        _wait(lambda: httpx.get(server.url + "gradio_api/queue/status").json()["queue_size"] == 0,
              "the waiting runs stayed in the queue")
    finally:
        server.hold.set()
    _, _, first = running.result(timeout=60)
    assert first["prompt"] == "running"
    _, _, after = _generate(late_client, server.image, "after the rush", seed=2)
    assert after["prompt"] == "after the rush"
    # Two videos (each with its JSON and input image), nothing from the refused or dropped requests.
    assert len(_listing(server.outputs) - before) == 6
    for client in (running_client, waiting_client, late_client):
        client.close()
