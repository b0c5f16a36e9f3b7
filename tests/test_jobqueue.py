"""JobQueue (app/jobqueue.py) on the tiny model: bad input is refused before anything is stored, jobs run in
order with bilingual progress and name their video, cancel writes nothing, and an app killed with SIGKILL
mid-job finishes every queued job exactly once after a restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mp4probe import probe
from PIL import Image

from app.errors import InputError, ModelMissingError
from app.jobqueue import JobQueue, progress_of
from app.jobs.store import JobState
from app.service import GenerationRequest, GenerationService, SegmentProgress
from ports import free_port

REPO = Path(__file__).resolve().parent.parent


def _req(image, seed: int = 1, steps: int = 2, **kw) -> GenerationRequest:
    return GenerationRequest(image=image, prompt=kw.pop("prompt", "a cat walking"), seed=seed,
                             video=dict(resolution=64, num_frames=2, fps=8, steps=steps), **kw)


def _assert_playable(path: Path) -> None:
    info = probe(path)
    assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", 2, 8)


def _videos(outputs: Path) -> list[Path]:
    return sorted(outputs.glob("video_*.mp4"))


def _job_ids_in_metadata(outputs: Path) -> Counter:
    return Counter(json.loads(path.read_text(encoding="utf-8")).get("job_id") for path in outputs.glob("video_*.json"))


@pytest.fixture
def image(image_rgb) -> Image.Image:
    return Image.fromarray(image_rgb)


@pytest.fixture
def idle_queue(settings):
    """A queue whose service has no model: it checks and stores requests, and runs nothing."""
    return JobQueue(GenerationService(settings, lambda: None), settings)


def test_submit_refuses_bad_input_with_the_bilingual_message_and_stores_nothing(idle_queue, image, tmp_path):
    with pytest.raises(InputError) as info:
        idle_queue.submit(_req(image, prompt="   "))
    assert info.value.en == "The prompt is empty: describe the motion you want, e.g. 'a cat walking'."
    assert info.value.zh == "提示词为空:请描述想要的动作,例如“一只猫在走路”。"
    with pytest.raises(InputError) as info:
        idle_queue.submit(_req(tmp_path / "missing.png"))
    assert (info.value.en, info.value.zh) == ("The image file 'missing.png' does not exist.",
                                              "图片文件 'missing.png' 不存在。")
    assert idle_queue.list() == [] and list(idle_queue.store.inputs_dir.iterdir()) == []


def test_queued_jobs_run_in_order_with_bilingual_progress_and_their_video_names_them(settings, make_service, image):
    queue = JobQueue(make_service(), settings)
    first, second = queue.submit(_req(image, seed=1)), queue.submit(_req(image, seed=2))
    assert [queue.position(first.id), queue.position(second.id)] == [1, 2]
    assert len(list(queue.store.inputs_dir.iterdir())) == 1  # one copy of the image for both seeds
    seen: list[tuple[str, str]] = []
    queue.start()
    try:
        done = [queue.wait(job.id, on_progress=lambda job: seen.append((job.progress_en, job.progress_zh)))
                for job in (first, second)]
    finally:
        queue.stop()
    assert [job.state for job in done] == [JobState.DONE, JobState.DONE]
    assert done[0].started_at <= done[1].started_at and done[0].attempts == 1
    assert any(en.startswith("Step 1/2 · about ") and zh.startswith("第 1/2 步 · 预计剩余时间") for en, zh in seen)
    outputs = settings.path("outputs")
    for job, seed in zip(done, (1, 2)):
        meta = json.loads((outputs / job.result).with_suffix(".json").read_text(encoding="utf-8"))
        assert (meta["job_id"], meta["seed"], meta["prompt"]) == (job.id, seed, "a cat walking")
        _assert_playable(outputs / job.result)


def test_progress_text_of_a_longer_video_names_the_segment():
    fraction, en, zh, eta = progress_of(SegmentProgress("denoise", 3, 10, 1.5, 3.5, segment=2, segments=3))
    assert (en, zh) == ("Segment 2/3 · Step 3/10 · about 8.5 s left", "第 2/3 段 · 第 3/10 步 · 预计剩余时间 8.5 秒")
    assert eta == pytest.approx(8.5)  # this segment's 3.5 s, and one more segment of 10 steps at 0.5 s each
    assert fraction == pytest.approx((1 + 0.05 + 0.85 * 0.3) / 3)


def test_cancelling_a_running_job_writes_nothing_and_the_next_job_runs(settings, make_service, image):
    queue = JobQueue(make_service(), settings)
    long, short = queue.submit(_req(image, steps=60)), queue.submit(_req(image))
    queue.start()

    def cancel_once_it_steps(job) -> None:
        if job.progress_en.startswith("Step"):
            queue.cancel(job.id)

    try:
        cancelled = queue.wait(long.id, on_progress=cancel_once_it_steps)
        done = queue.wait(short.id)
    finally:
        queue.stop()
    assert cancelled.state is JobState.CANCELLED and cancelled.result is None
    assert cancelled.error_en == "Cancelled by the user; no video was written."
    assert done.state is JobState.DONE
    assert _videos(settings.path("outputs")) == [settings.path("outputs") / done.result]


def test_stopping_the_app_puts_the_running_job_back_without_counting_the_attempt(settings, make_service, image):
    queue = JobQueue(make_service(), settings)
    job = queue.submit(_req(image, steps=60))
    queue.start()
    for _ in range(36_000):  # until it is inside its denoising loop (at most three minutes)
        if queue.get(job.id).progress_en.startswith("Step"):
            break
        time.sleep(0.005)
    queue.stop()  # as Ctrl+C on `serve` does
    after = queue.get(job.id)
    assert (after.state, after.attempts, after.runner) == (JobState.QUEUED, 0, None)
    assert _videos(settings.path("outputs")) == []


def test_a_job_whose_video_was_written_before_the_app_stopped_is_not_made_again(settings, make_service, image):
    service = make_service()
    queue = JobQueue(service, settings)
    job = queue.submit(_req(image))
    # An earlier app claimed it, wrote its video and was killed before it marked the job done.
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    queue.store.claim(job.id, f"{socket.gethostname()}:{int(child.stdout)}")
    written = service.generate(queue.request_from(queue.get(job.id)))
    queue.start()
    try:
        final = queue.wait(job.id)
    finally:
        queue.stop()
    assert (final.state, final.attempts, final.result) == (JobState.DONE, 2, written.video_path.name)
    assert _videos(settings.path("outputs")) == [written.video_path]


def test_a_waiter_takes_back_a_job_whose_app_died_while_running_it(settings, make_service, image):
    queue = JobQueue(make_service(), settings)
    job = queue.submit(_req(image))
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    queue.store.claim(job.id, f"{socket.gethostname()}:{int(child.stdout)}")  # another app took it, then died
    queue.backend.start()  # this process's worker was running already (a batch): no start-up recovery
    try:
        final = queue.wait(job.id)
    finally:
        queue.stop()
    assert (final.state, final.attempts, final.runner) == (JobState.DONE, 2, queue.runner)


def test_queued_jobs_wait_while_the_model_is_not_loaded(settings, image):
    def missing():
        raise ModelMissingError("No model in models/i2vgen-xl.", "models/i2vgen-xl 中没有模型。")

    service = GenerationService(settings, missing)
    service.load()
    queue = JobQueue(service, settings)
    queue.start()
    job = queue.submit(_req(image))
    assert queue.status() == {"ok": False, "en": "Queue: the jobs wait, the model is not loaded.",
                              "zh": "队列:模型未加载,任务等待中。"}
    assert queue.get(job.id).state is JobState.QUEUED
    queue.stop()


def test_an_app_killed_mid_job_makes_every_queued_job_exactly_once_after_a_restart(
        settings, make_service, image, project_root, shared_models_dir, tiny_model_dir):
    outputs = settings.path("outputs")
    queue = JobQueue(GenerationService(settings, lambda: None), settings)
    ids = [queue.submit(_req(image, seed=seed, steps=8)).id for seed in range(1, 6)]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "I2V_PATHS__OUTPUTS": str(outputs),
           "I2V_PATHS__LOGS": str(project_root / "logs"), "I2V_PATHS__MODELS": str(shared_models_dir)}
    child = subprocess.Popen([sys.executable, "-m", "app", "serve", "--model", "tiny", "--port", str(free_port())],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(36_000):  # until the app's worker is inside a job's denoising loop (at most three minutes)
            if any(job.state is JobState.RUNNING and job.progress_en.startswith("Step") for job in queue.list()):
                break
            assert child.poll() is None, "the app stopped by itself"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)  # no handler, no cleanup of its own
    finally:
        child.kill()
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    [cut] = [job for job in queue.list() if job.state is JobState.RUNNING]
    assert cut.runner == f"{socket.gethostname()}:{child.pid}"

    restarted = JobQueue(make_service(), settings)
    assert [job.id for job in restarted.start()] == [cut.id]  # back in the queue
    try:
        final = [restarted.wait(job_id) for job_id in ids]
    finally:
        restarted.stop()
    assert [job.state for job in final] == [JobState.DONE] * 5
    assert {job.id: job.attempts for job in final} == {job_id: 2 if job_id == cut.id else 1 for job_id in ids}
    assert _job_ids_in_metadata(outputs) == Counter(ids)  # each job made one video, none twice
    videos = _videos(outputs)
    assert sorted(outputs / job.result for job in final) == videos
    for video in videos:
        _assert_playable(video)
    assert not [path.name for path in outputs.rglob("*") if path.name.endswith(".part") or ".video_" in path.name]


def test_the_overhead_benchmark_measures_and_prints_its_results(tiny_model_dir, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("queue_overhead", REPO / "benchmarks" / "queue_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--jobs", "2", "--models", str(tiny_model_dir.parent)])
    out = capsys.readouterr().out
    assert results["jobs"] == 2 and results["backend"] == "local"
    assert results["direct_median_ms"] > 0 and results["queued_median_ms"] > 0 and results["queue_own_median_ms"] > 0
    assert f"the queue's own time      median {results['queue_own_median_ms']:8.1f} ms" in out
