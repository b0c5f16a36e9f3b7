"""The celery backend end to end: a Redis server of the tests' own on a free loopback port, two real
`python -m app worker` processes with the tiny model on the CPU, and front ends on the same broker (JobQueue
objects with their own outputs folders, and `python -m app serve` driven by gradio_client).

Each test names what it covers: jobs from two front ends spread over both workers, progress, cancel (running
and waiting jobs), a worker process killed mid-job (once, and at every attempt), the UI's /generate, and a
broker that is down at start or goes away and comes back. Needs Debian's redis-server (.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mp4probe import probe
from PIL import Image

from app.jobs.store import JobState
from ports import free_port

REPO = Path(__file__).resolve().parent.parent
SMALL = {"resolution": 64, "num_frames": 4, "fps": 8, "steps": 3}
# Jobs long enough to cancel or kill mid-way: more denoising steps, not a slower product. A killed job runs again
# from its start, so that one is shorter; a cancel is seen a poll or two after the progress that triggers it.
LONG = {"resolution": 64, "num_frames": 4, "fps": 8, "steps": 100}
KILLED = {**LONG, "steps": 40}
WORKER_NAMES = ("alpha@tests", "beta@tests")
START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 120.0


def _until(check, timeout: float, what: str, every: float = 0.05):
    """check()'s first true value, polled until `timeout`; fails naming `what`."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


class RedisServer:
    """redis-server on a free loopback port, in a temp folder, saving nothing."""

    def __init__(self, folder: Path, port: int | None = None):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
        self.exe, self.folder, self.port = exe, folder, port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        import redis

        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        _until(up, 15, "redis-server to answer")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """The tests' own Redis, for the whole file (the workers and every front end share it)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def _worker_env(broker_url: str, models: Path, logs: Path) -> dict[str, str]:
    return {**os.environ, "I2V_SERVICE__BROKER_URL": broker_url, "I2V_PATHS__MODELS": str(models),
            "I2V_PATHS__LOGS": str(logs), "I2V_PATHS__OUTPUTS": str(logs / "unused-outputs"), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def workers(broker, tiny_model_dir, shared_models_dir, tmp_path_factory):
    """Two `python -m app worker --model tiny --device cpu` processes (their own process groups), ready."""
    logs = tmp_path_factory.mktemp("worker-logs")
    env = _worker_env(broker.url, shared_models_dir, logs)
    procs = {}
    for name in WORKER_NAMES:
        out = (logs / f"{name}.out").open("w")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "app", "worker", "--model", "tiny", "--device", "cpu", "--name", name],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = broker.client()
    state = SimpleNamespace(procs=procs, logs=logs, client=client, names=WORKER_NAMES)

    def ready() -> bool:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"worker {name} stopped: {(logs / f'{name}.out').read_text()[-3000:]}")
        return _ready_workers(client) >= set(WORKER_NAMES)

    try:
        _until(ready, START_TIMEOUT_S, "both workers to be ready", every=0.2)
        yield state
    finally:
        _stop_groups(procs.values())


def _stop_groups(procs) -> None:
    """SIGTERM to each process group still running (a clean stop), SIGKILL to any not gone after 20 s."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _heartbeats(client) -> dict[str, dict]:
    from app.jobs.celery_app import read_heartbeats

    return {beat["name"]: beat for beat in read_heartbeats(client)}


def _ready_workers(client) -> set[str]:
    return {name for name, beat in _heartbeats(client).items() if beat.get("state") == "ready"}


@pytest.fixture
def front_end(broker, tmp_path, shared_models_dir):
    """make(name) -> a started JobQueue on the celery backend with its own project folder; stopped after."""
    from conftest import make_root

    from app.config import load_settings
    from app.jobqueue import JobQueue
    from app.service import GenerationService

    made = []

    def make(name: str, **service: object):
        root = make_root(tmp_path / name)
        settings = load_settings(root=root, environ={
            "I2V_SERVICE__BACKEND": "celery", "I2V_SERVICE__BROKER_URL": broker.url,
            **{f"I2V_SERVICE__{k.upper()}": str(v) for k, v in service.items()}})

        def no_model():  # a celery front end loads no model: the GPU workers do
            raise AssertionError("the front end must not load a model")

        queue = JobQueue(GenerationService(settings, no_model), settings)
        queue.start()
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.stop()


@pytest.fixture
def image() -> Image.Image:
    y, x = np.mgrid[0:80, 0:96]
    return Image.fromarray(np.stack([x * 2, y * 3, (x + y) % 256], axis=-1).astype(np.uint8))


def _request(image, video=SMALL, seed=1, **more):
    from app.service import GenerationRequest

    return GenerationRequest(image=image, prompt="a red square drifts", seed=seed, video=dict(video), **more)


def _videos(queue) -> list[Path]:
    return sorted(queue.settings.path("outputs").glob("*.mp4"))


def _check_video(path: Path, video=SMALL) -> dict:
    info = probe(path)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert (info["width"], info["height"]) == (video["resolution"], video["resolution"])
    assert info["nb_frames"] == video["num_frames"]
    assert info["fps"] == Fraction(video["fps"])
    return json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))


def _task_meta(client, job_id: str) -> dict:
    """The job's Celery state as the broker has it (status, and the PROGRESS meta with the worker's pid)."""
    task_id = client.get(f"i2v:task:{job_id}")
    raw = client.get(f"celery-task-meta-{task_id}") if task_id else None
    return json.loads(raw) if raw else {}


def _running_pid(client, job_id: str) -> int | None:
    meta = _task_meta(client, job_id)
    if meta.get("status") != "PROGRESS":
        return None
    info = meta.get("result") or {}
    return info.get("pid") if 0 < info.get("fraction", 0) < 1 else None


# Jobs ------------------------------------------------------------------------------------------------

def test_six_jobs_from_two_front_ends_all_complete_spread_over_both_workers(workers, front_end, image):
    """Two front ends (each its own outputs folder and queue) send three jobs each to one broker. Every job ends
    done with one probed video in its own front end's outputs, each naming its job and the worker that made it,
    and both workers made some."""
    first, second = front_end("first"), front_end("second")
    sent = [(queue, queue.submit(_request(image, seed=i))) for i, queue in enumerate([first, second] * 3)]
    ran_on = set()
    for queue, job in sent:
        done = queue.wait(job.id)
        assert done.state is JobState.DONE, (done.error_en, done.runner)
        assert done.runner.startswith("celery:") and done.runner[len("celery:"):] in WORKER_NAMES
        meta = _check_video(queue.settings.path("outputs") / done.result)
        assert meta["job_id"] == job.id
        assert meta["worker"]["name"] in WORKER_NAMES
        assert meta["input_image"] and (queue.settings.path("outputs") / meta["input_image"]).is_file()
        ran_on.add(meta["worker"]["name"])
    assert ran_on == set(WORKER_NAMES)
    for queue in (first, second):
        metas = [json.loads(p.with_suffix(".json").read_text(encoding="utf-8")) for p in _videos(queue)]
        assert sorted(m["job_id"] for m in metas) == sorted(job.id for q, job in sent if q is queue)
    keys = set(workers.client.keys("i2v:*")) - {f"i2v:worker:{name}" for name in WORKER_NAMES}
    assert keys == set(), "a finished job leaves nothing of its own in the broker"


def test_generate_through_the_queue_gives_the_result_with_its_exports(workers, front_end, image):
    """JobQueue.generate on the celery backend (what the UI calls): queued, run on a worker, written here,
    and the export is made here, beside it; an extend of that video runs on a worker too. The status bar's parts
    say the workers' model is ready."""
    queue = front_end("generate")
    model = queue.service_status()  # the status bar's model part: the workers' state, this process loads none
    assert (model["state"], model["model"], model["demo"]) == ("ready", "tiny", True)
    assert "2 GPU workers" in queue.status()["en"] and "2 个 GPU worker" in queue.status()["zh"]
    result = queue.generate(_request(image, seed=7, exports="gif"))
    meta = _check_video(result.video_path)
    assert result.seed == 7 == meta["seed"]
    assert result.video_path.parent == queue.settings.path("outputs")
    assert set(result.exports) == {"gif"} and result.exports["gif"].is_file()
    assert meta["exports"] == {"gif": result.exports["gif"].name}

    # Extend: the worker has no access to this outputs folder, so the video it continues travels with the job.
    longer = queue.generate(_request(None, video={}, seed=None, extend_from=result.video_path.name, crossfade=1))
    meta = _check_video(longer.video_path, {**SMALL, "num_frames": 2 * SMALL["num_frames"] - 2})
    assert meta["extended_from"] == result.video_path.name and len(meta["segments"]) == 2
    kept = longer.video_path.with_name(meta["input_image"])
    assert kept.read_bytes() == (result.video_path.with_name(result.metadata["input_image"])).read_bytes()


# Cancel --------------------------------------------------------------------------------------------------

def test_cancel_stops_running_and_waiting_jobs_and_nothing_is_written(workers, front_end, image):
    """Three long jobs: two run (one per worker) and one waits in the broker. The waiting one is cancelled at
    once; each running one is cancelled once its progress shows it mid-way, and stops at its next step. Progress
    reaches the client as fractions strictly between 0 and 1; no file is written; both workers are free again."""
    queue = front_end("cancel")
    jobs = [queue.submit(_request(image, video=LONG, seed=i)) for i in range(3)]

    def two_running():
        now = [j for j in jobs if queue.get(j.id).state is JobState.RUNNING]
        return now if len(now) == 2 else None

    running = _until(two_running, JOB_TIMEOUT_S, "two jobs running")
    waiting = next(j for j in jobs if j not in running)
    assert queue.get(waiting.id).state is JobState.QUEUED
    assert queue.cancel(waiting.id).state is JobState.CANCELLED

    results = {}

    def follow(job_id: str) -> None:
        fractions: list[float] = []
        stop = threading.Event()

        def on_progress(job) -> None:
            fractions.append(job.progress)
            if job.state is JobState.RUNNING and 0 < job.progress < 1:
                stop.set()

        results[job_id] = (queue.wait(job_id, on_progress=on_progress, cancel=stop), fractions)

    threads = [threading.Thread(target=follow, args=(j.id,)) for j in running]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOB_TIMEOUT_S)
    for job in running:
        done, fractions = results[job.id]
        assert done.state is JobState.CANCELLED, (done.state, done.error_en)
        assert done.error_en.startswith("Cancelled") and done.error_zh.startswith("已取消")
        assert any(0 < f < 1 for f in fractions), fractions
    assert queue.get(waiting.id).state is JobState.CANCELLED
    _until(lambda: all(b.get("job") is None for b in _heartbeats(workers.client).values()) or None,
           JOB_TIMEOUT_S, "both workers to be free", every=0.2)
    assert _videos(queue) == []
    assert [p.name for p in queue.settings.path("outputs").iterdir()] == [".queue"]


# The UI ---------------------------------------------------------------------------------------------------

def test_the_ui_on_the_celery_backend_gives_a_video_through_generate(workers, broker, tmp_path, shared_models_dir):
    """`python -m app serve --model tiny` with I2V_SERVICE__BACKEND=celery: /generate through gradio_client
    returns a video made by a worker and written into the server's outputs folder."""
    from gradio_client import Client, handle_file

    port = free_port()
    dirs = {name: tmp_path / name for name in ("outputs", "logs")}
    env = {**_worker_env(broker.url, shared_models_dir, dirs["logs"]), "I2V_SERVICE__BACKEND": "celery",
           "I2V_PATHS__OUTPUTS": str(dirs["outputs"])}
    log = (tmp_path / "serve.out").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--model", "tiny", "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "serve.out").read_text())
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        _until(up, START_TIMEOUT_S, "the UI to listen", every=0.2)
        png = tmp_path / "in.png"
        Image.fromarray(np.full((70, 90, 3), 120, np.uint8)).save(png)
        client = Client(url, verbose=False)
        video, _info, details = client.predict(handle_file(str(png)), "waves roll in", None, 64, 4, 8, 3, None, 5,
                                               api_name="/generate")
        path = Path(video["video"] if isinstance(video, dict) else video)
        written = dirs["outputs"] / details["file"]
        assert written.is_file() and written.read_bytes() == path.read_bytes()
        meta = _check_video(written)
        assert details["worker"]["name"] in WORKER_NAMES and details["seed"] == 5
        text = (tmp_path / "serve.out").read_text()
        assert "GPU workers" in text, text  # the queue's state, said at start
        assert meta["job_id"]
    finally:
        _stop_groups([proc])


# The settings both sides share ------------------------------------------------------------------------------

def test_the_celery_app_takes_json_only_and_hands_a_dead_workers_job_on():
    """JSON for messages and results (never pickle), late acknowledgement with the job handed back when its
    process dies, one job per worker at a time, and the service settings' timeout and expiry."""
    from app.config import load_settings
    from app.jobs.celery_app import make_celery, masked_url

    settings = load_settings(environ={"I2V_SERVICE__VISIBILITY_TIMEOUT_S": "7200",
                                      "I2V_SERVICE__RESULT_EXPIRES_S": "600"})
    conf = make_celery(settings.service).conf
    assert (conf.task_serializer, conf.result_serializer) == ("json", "json")
    assert list(conf.accept_content) == ["json"] and list(conf.result_accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert (conf.worker_prefetch_multiplier, conf.worker_concurrency, conf.worker_pool) == (1, 1, "prefork")
    assert conf.broker_transport_options["visibility_timeout"] == 7200 and conf.result_expires == 600
    assert masked_url("redis://:pa55@host:6379/0") == "redis://:***@host:6379/0"
    assert masked_url("redis://user:pa55@host/1") == "redis://user:***@host/1"
    assert masked_url("redis://host:6379/0") == "redis://host:6379/0"


def test_a_video_over_max_result_mb_fails_its_job_with_its_size_and_the_setting(tmp_path, monkeypatch):
    """The worker sends back no video larger than service.max_result_mb: the job fails saying how large it was
    and which setting to raise (here with a stand-in model that makes a 5 kB "video" and a cap of 1 kB)."""
    from app import worker
    from app.config import load_settings

    video = tmp_path / "video.mp4"
    video.write_bytes(b"\0" * 5000)
    video.with_suffix(".json").write_text("{}", encoding="utf-8")

    class Service:
        def generate(self, req, on_progress=None, cancel=None):
            return SimpleNamespace(video_path=video, metadata_path=video.with_suffix(".json"), warnings=[])

    class Redis:
        def incr(self, key):
            return 1

        def expire(self, key, seconds):
            return True

        def exists(self, key):
            return 0

    settings = load_settings(environ={"I2V_SERVICE__MAX_RESULT_MB": "0.001"})
    monkeypatch.setattr(worker, "_config", worker.WorkerConfig(settings=settings, name="w@tests", source="tiny"))
    monkeypatch.setattr(worker, "_process", worker._Process(service=Service(), folder=tmp_path / "job", redis=Redis()))
    task = SimpleNamespace(request=SimpleNamespace(id="job1-0001"), update_state=lambda **kw: None)
    out = worker.run_job(task, "job1", {"prompt": "a cat", "video": {}}, "", None)
    assert out["outcome"] == "failed" and "video_b64" not in out
    assert "The video is 0.00477 MB, more than a worker may send back (service.max_result_mb = 0.001)" in out["en"]
    assert "service.max_result_mb = 0.001" in out["zh"] and "视频大小为" in out["zh"]


# The worker command ----------------------------------------------------------------------------------------

WORKER_ENV_PROBE = """
import os, sys
from app import cli, worker

def run_worker(settings, **kw):
    print(os.environ.get("CUDA_VISIBLE_DEVICES"), "torch" in sys.modules, settings.model.device, kw["gpu"], kw["name"])
    return 0

worker.run_worker = run_worker
sys.exit(cli.main(sys.argv[1:]))
"""


def test_worker_gpu_n_sets_cuda_visible_devices_before_torch_is_imported(tmp_path):
    """`worker --gpu 3`: CUDA_VISIBLE_DEVICES=3 is set before anything imports torch, and the model goes to the
    one GPU left visible; without --gpu the configured device stays."""
    env = {**os.environ, "I2V_PATHS__LOGS": str(tmp_path)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for args, expected in ((["--gpu", "3", "--name", "left"], "3 False cuda 3 left"),
                           (["--gpu", "1", "--device", "cpu"], "1 False cpu 1 None"),
                           ([], "None False auto None None")):
        out = subprocess.run([sys.executable, "-c", WORKER_ENV_PROBE, "worker", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == expected


# The broker ------------------------------------------------------------------------------------------------

def test_an_unreachable_broker_at_start_is_an_error_naming_its_url(tmp_path, shared_models_dir):
    """The front end (JobQueue.start, and `serve`) and the worker both refuse to start with a message naming
    the broker's URL, its password masked, in English and Chinese."""
    from conftest import make_root

    from app.config import load_settings
    from app.jobqueue import JobQueue
    from app.jobs.celery_app import BrokerError
    from app.service import GenerationService

    port = free_port()  # nothing listens there
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    shown = f"redis://:***@127.0.0.1:{port}/0"
    root = make_root(tmp_path / "front")
    settings = load_settings(root=root, environ={"I2V_SERVICE__BACKEND": "celery", "I2V_SERVICE__BROKER_URL": url})
    queue = JobQueue(GenerationService(settings, lambda: None), settings)
    with pytest.raises(BrokerError) as caught:
        queue.start()
    assert f"Cannot reach the job broker (Redis) at {shown}" in caught.value.en
    assert f"无法连接任务代理(Redis){shown}" in caught.value.zh
    assert "s3cret" not in caught.value.en + caught.value.zh

    env = {**_worker_env(url, shared_models_dir, tmp_path / "logs"), "LANG": "C.UTF-8", "LC_ALL": "",
           "LC_MESSAGES": ""}  # English messages
    commands = {"worker": ["worker", "--model", "tiny", "--device", "cpu"],
                "serve": ["serve", "--model", "tiny", "--port", str(free_port())]}
    for name, args in commands.items():
        extra = {"I2V_SERVICE__BACKEND": "celery"} if name == "serve" else {}
        out = subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO, env={**env, **extra},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 6, (name, out.stdout, out.stderr)
        assert f"Cannot reach the job broker (Redis) at {shown}" in out.stderr, (name, out.stderr)
        assert "s3cret" not in out.stdout + out.stderr


def test_a_broker_that_goes_away_is_shown_in_the_status_and_the_queue_recovers(front_end, tmp_path, image):
    """A front end whose Redis stops: status() says the broker is unreachable, naming it; a job queued meanwhile
    waits. Redis back on the same port: the status is fine again and the job is sent."""
    folder = tmp_path / "redis-2"
    folder.mkdir()
    server = RedisServer(folder).start()
    try:
        queue = front_end("flaky", broker_url=server.url)
        assert queue.status()["ok"] is True
        server.stop()
        status = _until(lambda: None if (s := queue.status())["ok"] else s, 30, "the status to say so")
        assert f"the job broker {server.url} is unreachable" in status["en"]
        assert f"无法连接任务代理 {server.url}" in status["zh"]
        job = queue.submit(_request(image, seed=9))
        assert queue.get(job.id).state is JobState.QUEUED
        server.start()
        _until(lambda: queue.status()["ok"], 30, "the status to recover")
        client = server.client()
        _until(lambda: client.get(f"i2v:task:{job.id}"), 30, "the waiting job to be sent")
        assert client.llen("i2v") == 1  # in the broker's queue, for a worker (none listens on this Redis)
    finally:
        server.stop()


# A worker process that dies ------------------------------------------------------------------------------

def test_a_worker_process_killed_mid_job_hands_the_job_on_and_it_is_written_once(workers, front_end, image):
    """kill -9 of the process running a job, mid-way: the job runs again (on the other worker or the killed
    one's new process), completes, and exactly one video names it."""
    queue = front_end("kill")
    job = queue.submit(_request(image, video=KILLED, seed=3))
    pid = _until(lambda: _running_pid(workers.client, job.id), JOB_TIMEOUT_S, "the job to run mid-way")
    os.kill(pid, signal.SIGKILL)
    done = queue.wait(job.id)
    assert done.state is JobState.DONE, done.error_en
    videos = _videos(queue)
    assert len(videos) == 1
    meta = _check_video(videos[0], KILLED)
    assert meta["job_id"] == job.id
    assert meta["worker"]["attempt"] == 2 and meta["worker"]["pid"] != pid


def test_a_job_that_stops_every_worker_it_meets_is_failed_with_a_clear_message(workers, front_end, image):
    """Its process is killed at every attempt: after service.max_attempts (2) stopped workers the job is not
    run a third time but fails, saying so in both languages."""
    queue = front_end("poison")
    job = queue.submit(_request(image, video=LONG, seed=4))
    killed = []
    for _ in range(2):
        pid = _until(lambda: (p := _running_pid(workers.client, job.id)) not in (None, *killed) and p,
                     JOB_TIMEOUT_S, "the job to run mid-way")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    done = queue.wait(job.id)
    assert done.state is JobState.FAILED
    assert "stopped 2 workers" in done.error_en and "not run again" in done.error_en
    assert "2 个 worker" in done.error_zh
    assert _videos(queue) == []


def test_a_worker_runs_on_one_gpu_whatever_model_gpus_says():
    from app.config import load_settings
    from app.worker import one_gpu

    pair = load_settings(environ={"I2V_MODEL__GPUS": "0,1"})
    assert pair.model.gpus == "0,1" and one_gpu(pair).model.gpus == ""
    plain = load_settings(environ={})
    assert one_gpu(plain) is plain
