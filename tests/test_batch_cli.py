"""`python -m app batch FOLDER` and `python -m app jobs`: prompts from a CSV or a text file, seeds, every image
checked before anything is queued, and the queue managed from a terminal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mp4probe import probe
from PIL import Image

from app import cli
from app.config import load_settings
from app.errors import InputError
from app.jobs.batch import plan_batch
from app.jobs.store import JobState, JobStore
from app.logging_setup import remove_logging

SMALL = ["--model", "tiny", "--resolution", "64", "--frames", "2", "--steps", "2", "--quiet"]


@pytest.fixture
def app_dirs(tmp_path, shared_models_dir, tiny_model_dir, monkeypatch):
    """outputs/ and logs/ in a temp folder, the shared tiny model, through I2V_ variables (cli.main reads them)."""
    monkeypatch.setenv("I2V_PATHS__OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("I2V_PATHS__LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("I2V_PATHS__MODELS", str(shared_models_dir))
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path / "outputs"
    remove_logging()


@pytest.fixture
def shared_engine(tiny_engine, monkeypatch):
    """cli.main's model load hands out the tiny engine this test process has loaded already."""
    import app.engine.loader as loader

    monkeypatch.setattr(loader, "load_engine", lambda *args, **kwargs: tiny_engine)


def _store(outputs: Path) -> JobStore:
    settings = load_settings(environ={"I2V_PATHS__OUTPUTS": str(outputs)})
    return JobStore(settings.queue_database)


def _folder(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_folder_with_a_csv_of_prompts_makes_one_video_per_image_with_its_prompt(
        app_dirs, shared_engine, tmp_path, capsys):
    folder = _folder(tmp_path, ["d.bmp", "a.png", "c.webp", "b.jpg"])
    (folder / "prompts.csv").write_text("image,prompt,seed,negative_prompt\n"
                                        "a.png,a cat walking,,\n"
                                        "b.jpg,\"waves, rolling in\",,\n"
                                        "c.webp,一只猫在走路,7,blurry\n"
                                        "d.bmp,clouds drifting,,\n", encoding="utf-8")
    code, out, err = _run(capsys, "batch", str(folder), "--seeds", "3", *SMALL)
    assert code == 0, err
    videos = [Path(line) for line in out.splitlines()]
    assert len(videos) == 4 and all(video.parent == app_dirs for video in videos)
    metas = [json.loads(video.with_suffix(".json").read_text(encoding="utf-8")) for video in videos]
    assert [(m["prompt"], m["seed"]) for m in metas] == [("a cat walking", 3), ("waves, rolling in", 3),
                                                         ("一只猫在走路", 7), ("clouds drifting", 3)]
    assert metas[2]["negative_prompt"] == "blurry"
    jobs = _store(app_dirs).list()
    assert [job.state for job in jobs] == [JobState.DONE] * 4
    assert [m["job_id"] for m in metas] == [job.id for job in jobs]
    for video in videos:
        info = probe(video)
        assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", 2, 8)
    assert "4 of 4 videos made." in err


def test_a_prompts_txt_with_two_seeds_queues_two_jobs_per_image_for_a_running_app(app_dirs, tmp_path, capsys):
    folder = _folder(tmp_path, ["b.png", "a.png", "c.png"])
    (folder / "prompts.txt").write_text("# one line per image, in name order\na cat walking\n\nwaves roll in\n",
                                        encoding="utf-8")
    code, out, err = _run(capsys, "batch", str(folder), "--seeds", "1,2", "--prompt", "clouds drift", "--no-wait",
                          *SMALL)
    assert code == 0, err
    jobs = _store(app_dirs).list()
    assert [(job.params["prompt"], job.params["seed"], job.state) for job in jobs] == [
        ("a cat walking", 1, JobState.QUEUED), ("a cat walking", 2, JobState.QUEUED),
        ("waves roll in", 1, JobState.QUEUED), ("waves roll in", 2, JobState.QUEUED),
        ("clouds drift", 1, JobState.QUEUED), ("clouds drift", 2, JobState.QUEUED)]
    assert out.splitlines() == [f"{job.id}\t{name}\t{seed}" for job, (name, seed) in
                                zip(jobs, [(n, s) for n in ("a.png", "b.png", "c.png") for s in (1, 2)])]
    assert "Queued 6 jobs" in err
    assert len(list(_store(app_dirs).inputs_dir.iterdir())) == 3  # one copy per image, shared by its seeds


def test_named_prompt_lines_and_what_a_prompts_file_may_not_do(tmp_path):
    folder = _folder(tmp_path, ["a.png", "b.png"])
    (folder / "prompts.txt").write_text("b.png: waves: rolling in\na.png: a cat\n", encoding="utf-8")
    assert [(item.label, item.prompt) for item in plan_batch(folder)] == [("a.png", "a cat"),
                                                                        ("b.png", "waves: rolling in")]
    (folder / "prompts.txt").write_text("b.png: waves\na cat\n", encoding="utf-8")
    with pytest.raises(InputError, match="prompts.txt line 2 is a plain prompt, but other lines are"):
        plan_batch(folder)
    (folder / "prompts.txt").write_text("a cat\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        plan_batch(folder)
    assert info.value.en == ("b.png has no prompt in prompts.txt: add one, or give --prompt for every image "
                             "without one.")
    (folder / "prompts.csv").write_text("image,prompt\na.png,x\n", encoding="utf-8")
    with pytest.raises(InputError, match="has both prompts.csv and prompts.txt"):
        plan_batch(folder)


def test_a_bad_image_refuses_the_whole_batch_before_anything_is_queued(app_dirs, tmp_path, capsys):
    folder = _folder(tmp_path, ["a.png", "c.png"])
    (folder / "b.png").write_bytes(b"not a picture")
    code, out, err = _run(capsys, "batch", str(folder), "--prompt", "a cat walking", "--no-wait", *SMALL)
    assert code == 2 and out == ""
    assert "[ERROR] b.png: " in err and err.rstrip().endswith("The batch was not queued.")
    assert _store(app_dirs).list() == [] and list(_store(app_dirs).inputs_dir.iterdir()) == []


def test_the_jobs_command_lists_cancels_and_retries(app_dirs, tmp_path, capsys, monkeypatch):
    folder = _folder(tmp_path, ["a.png", "b.png"])
    assert _run(capsys, "batch", str(folder), "--prompt", "a cat walking", "--no-wait", *SMALL)[0] == 0
    first, second = (job.id for job in _store(app_dirs).list())

    code, out, _ = _run(capsys, "jobs")
    assert code == 0
    assert [line.split() for line in out.splitlines()] == [[first, "queued", "a", "cat", "walking", "#1"],
                                                           [second, "queued", "a", "cat", "walking", "#2"]]
    code, _, err = _run(capsys, "jobs", "cancel", first)
    assert code == 0 and err == "" and _store(app_dirs).get(first).state is JobState.CANCELLED
    code, out, _ = _run(capsys, "jobs", "list")
    assert out.splitlines()[0].split()[:2] == [first, "cancelled"] and out.splitlines()[0].endswith(
        "Cancelled; no video was written.")
    assert out.splitlines()[1].split()[-1] == "#1"
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    code, out, _ = _run(capsys, "jobs", "retry", first)
    assert code == 0 and out.strip() == f"[SUCCESS] Job {first} is queued again. / 任务 {first} 已重新排队。"
    code, out, _ = _run(capsys, "jobs")
    assert [line.split()[1::4] for line in out.splitlines()] == [["排队中", "#1"], ["排队中", "#2"]]
    assert out.splitlines()[1].startswith(first)  # a retried job goes to the end of the queue
    code, _, err = _run(capsys, "jobs", "cancel", "nope00000000")
    assert code == 2 and err.strip() == "[ERROR] 队列中没有任务 nope00000000。"
