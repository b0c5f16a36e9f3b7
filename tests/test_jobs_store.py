"""The job store (app/jobs/store.py): order and positions, atomic claims across threads and processes, cancel,
retry, clearing, recovery after a stopped run, and a database that survives a writer killed mid-transaction."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.errors import InputError
from app.jobs.local import local_runner_alive, runner_id
from app.jobs.store import JobState, JobStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "queue" / "jobs.sqlite3")


def _add(store: JobStore, count: int, image: str = "") -> list[str]:
    return [job.id for job in store.add_many([({"prompt": f"p{i}"}, image) for i in range(count)])]


def _dead_runner() -> str:
    """The runner id of a process that has ended."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{socket.gethostname()}:{int(child.stdout)}"


def test_jobs_run_in_the_order_they_were_added_and_know_their_place(store):
    ids = _add(store, 3)
    assert [store.position(i) for i in ids] == [1, 2, 3]
    first = store.claim_next("me:1")
    assert (first.id, first.state, first.attempts, first.runner) == (ids[0], JobState.RUNNING, 1, "me:1")
    assert [store.position(i) for i in ids] == [None, 1, 2]
    assert store.claim_next("me:1", only_ids=[ids[2]]).id == ids[2]  # a batch's own worker skips the others
    assert store.claim(ids[2], "me:1") is None  # running already
    assert [job.id for job in store.list()] == ids
    assert store.get(ids[1]).params == {"prompt": "p1"}
    assert store.counts()[JobState.RUNNING] == 2 and store.counts()[JobState.QUEUED] == 1


def test_two_threads_never_claim_the_same_job(store):
    ids = _add(store, 60)
    claimed: list[list[str]] = [[] for _ in range(4)]

    def claim_all(mine: list[str]) -> None:
        while (job := store.claim_next(f"thread:{threading.get_ident()}")) is not None:
            mine.append(job.id)

    threads = [threading.Thread(target=claim_all, args=(mine,)) for mine in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job_id for mine in claimed for job_id in mine]
    assert sorted(everything) == sorted(ids)  # each job once, none twice


CLAIMER = """
import sys, time
from pathlib import Path
from app.jobs.store import JobStore

store = JobStore(Path(sys.argv[1]))
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
while (job := store.claim_next(sys.argv[3])) is not None:
    print(job.id, flush=True)
    time.sleep(0.002)  # let the other process in between claims
"""


def test_two_processes_never_claim_the_same_job(store, tmp_path):
    ids = _add(store, 80)
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(store.path), str(go), f"child{i}:{i}"],
                                 cwd=REPO, stdout=subprocess.PIPE, text=True) for i in range(2)]
    go.touch()
    outputs = [child.communicate(timeout=120)[0].split() for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert sorted(outputs[0] + outputs[1]) == sorted(ids)
    for i, mine in enumerate(outputs):
        assert {store.get(job_id).runner for job_id in mine} <= {f"child{i}:{i}"}


def test_cancel_a_queued_job_at_once_and_a_running_one_at_its_next_step(store):
    queued, running = _add(store, 2)
    job = store.request_cancel(queued)
    assert job.state is JobState.CANCELLED and job.finished_at is not None
    assert (job.error_en, job.error_zh) == ("Cancelled; no video was written.", "已取消,未写入视频。")

    assert store.claim_next("me:1").id == running
    assert store.set_progress(running, 0.5, "Step 1/2", "第 1/2 步") is False
    job = store.request_cancel(running)
    assert job.state is JobState.RUNNING and job.cancel_requested
    assert store.set_progress(running, 0.6, "Step 2/2", "第 2/2 步") is True  # the runner is told to stop
    assert store.finish(running, JobState.CANCELLED, error_en="Cancelled", error_zh="已取消").state is JobState.CANCELLED
    assert store.request_cancel(running).state is JobState.CANCELLED  # finished: unchanged
    assert store.finish(running, JobState.DONE, result="x.mp4").state is JobState.CANCELLED


def test_retry_queues_a_failed_job_again_at_the_end(store):
    failed, other = _add(store, 2)
    store.claim_next("me:1")
    store.finish(failed, JobState.FAILED, error_en="boom", error_zh="出错")
    job = store.retry(failed)
    assert (job.state, job.attempts, job.error_en, job.error_zh, job.runner) == (JobState.QUEUED, 0, None, None, None)
    assert [store.position(other), store.position(failed)] == [1, 2]
    with pytest.raises(InputError) as info:
        store.retry(other)
    assert info.value.en == f"Job {other} is queued: only a failed or cancelled job can be run again."
    assert info.value.zh == f"任务 {other} 的状态为 排队中:只有失败或已取消的任务可以重新运行。"


def test_clear_finished_removes_the_finished_jobs_and_the_input_copies_no_job_names(store):
    store.inputs_dir.joinpath("shared.png").write_bytes(b"png")
    store.inputs_dir.joinpath("orphan.png").write_bytes(b"png")  # left by a submit that never finished
    store.inputs_dir.joinpath(".being-written.tmp").write_bytes(b"png")
    done, waiting = _add(store, 2, image="shared.png")
    store.claim_next("me:1")
    store.finish(done, JobState.DONE, result="video.mp4")
    assert store.clear_finished() == 1
    assert [job.id for job in store.list()] == [waiting]
    assert sorted(p.name for p in store.inputs_dir.iterdir()) == [".being-written.tmp", "shared.png"]
    store.request_cancel(waiting)
    assert store.clear_finished() == 1
    assert store.list() == [] and not store.inputs_dir.joinpath("shared.png").exists()
    with pytest.raises(InputError, match="is not in the queue folder"):
        store.add({"prompt": "p"}, "shared.png")  # a copy must be there before its job is stored


def test_recover_requeues_a_dead_runners_job_fails_it_after_max_attempts_and_leaves_live_runners_alone(store):
    once, twice, cancelled, live, mine = _add(store, 5)
    dead = _dead_runner()
    other_live = f"{socket.gethostname()}:{os.getppid()}"  # the parent of this test process runs
    store.claim(twice, dead)
    assert [job.attempts for job in store.recover(lambda runner: False)] == [1]  # its first stopped run
    for job_id, runner in ((once, dead), (twice, dead), (cancelled, dead), (live, other_live), (mine, runner_id())):
        store.claim(job_id, runner)
    store.request_cancel(cancelled)

    # This process starts its queue: a job that names its own runner is from an earlier process with the same id.
    changed = store.recover(lambda runner: local_runner_alive(runner, me=runner_id()))
    assert {job.id: job.state for job in changed} == {once: JobState.QUEUED, twice: JobState.FAILED,
                                                     cancelled: JobState.CANCELLED, mine: JobState.QUEUED}
    assert store.get(once).attempts == 1 and store.get(once).runner is None  # the attempt is kept
    assert store.get(live).state is JobState.RUNNING and store.get(live).runner == other_live
    failed = store.get(twice)
    assert failed.error_en == ("The app stopped 2 times while running this job, so it is not run again on its own. "
                               "Retry it to run it once more.")
    assert failed.error_zh == "运行此任务时程序已停止 2 次,因此不再自动重新运行。可点击“重试”再运行一次。"
    assert not local_runner_alive(f"another-host:{os.getpid()}") and not local_runner_alive("celery")


def test_an_unknown_job_id_is_a_bilingual_error(store):
    for call in (lambda: store.request_cancel("abc123"), lambda: store.retry("abc123"),
                 lambda: store.finish("abc123", JobState.DONE)):
        with pytest.raises(InputError) as info:
            call()
        assert (info.value.en, info.value.zh) == ("No job abc123 in the queue.", "队列中没有任务 abc123。")
    assert store.get("abc123") is None and store.position("abc123") is None


WRITER = """
import sys
from pathlib import Path
from app.jobs.store import JobStore

store = JobStore(Path(sys.argv[1]))
while True:  # batches of 200 jobs, each in one transaction; the ids are printed once committed
    jobs = store.add_many([({"prompt": "x" * 200}, "")] * 200)
    print(" ".join(job.id for job in jobs), flush=True)
"""


def test_a_writer_killed_mid_transaction_leaves_the_database_intact(store):
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(store.path)], cwd=REPO, stdout=subprocess.PIPE)
    committed: list[str] = []
    try:
        while len(committed) < 5 * 200:
            line = child.stdout.readline()
            assert line, "the writer stopped"
            committed += line.split()
        child.send_signal(signal.SIGKILL)  # almost surely inside the next add_many's transaction
        committed += child.stdout.read().split()  # what it printed before it died
    finally:
        child.kill()
        child.wait(30)
    store.close()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = {row[0] for row in conn.execute("SELECT id FROM jobs")}
    assert {job_id.decode() for job_id in committed} <= rows
    assert len(rows) % 200 == 0  # whole transactions only: the one cut off left no row
    job = JobStore(store.path).add({"prompt": "after"}, "")  # and it is still usable
    assert job.seq == len(rows) + 1


def test_a_worker_stopped_while_another_thread_starts_it_never_joins_an_unstarted_thread(tmp_path):
    """The app stops the queue while the loader's thread may be starting its worker: stop() waits for a start()
    under way, and a start() after stop() starts nothing."""
    import threading

    from app.jobs.local import LocalWorker

    store = JobStore(tmp_path / "jobs.sqlite3")
    for _ in range(50):
        worker = LocalWorker(store, lambda job, report, cancel: "", poll_s=0.01)
        starter = threading.Thread(target=worker.start)
        starter.start()
        worker.stop(timeout=5)  # must not raise "cannot join thread before it is started"
        starter.join()
        worker.stop(timeout=5)
        assert worker._thread is None or not worker._thread.is_alive()
    late = LocalWorker(store, lambda job, report, cancel: "", poll_s=0.01)
    late.stop()
    late.start()
    assert late._thread is None
