"""The celery backend on the tiny model: what it adds to each video, and how many videos per minute one and two
workers make.

    python benchmarks/queue_throughput.py                  # its own redis-server, 10 timed jobs, then 8 jobs
    python benchmarks/queue_throughput.py --jobs 20 --batch 16 --json

Needs Debian's redis-server (started here on a free loopback port, saving nothing) unless --broker names one.
The workers are real `python -m app worker --model tiny` processes, one torch thread each (as the tests run them).

Overhead: jobs run one at a time through a front end (JobQueue on the celery backend) and one worker. For each,
the queue's own time is the front end's wall time (submit to done, video written here) less the worker's
service.generate time (its `timings_s.total` in the metadata: sampling and encoding the MP4, which a direct call
does too). The same request is also timed as a direct service.generate call in this
process, alternating with the queued ones; the difference of the two medians is printed as well, but it also
holds the two processes' speed difference, so the queue's own time is the figure to read.

Throughput: `--batch` jobs submitted at once, with one worker and then with two; jobs per minute from the first
submit to the last video written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def _start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server), or pass --broker URL")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"redis://127.0.0.1:{port}/0"


def _beats(client) -> dict[str, dict]:
    from app.jobs.celery_app import read_heartbeats

    return {beat["name"]: beat for beat in read_heartbeats(client)}


class Workers:
    """`python -m app worker` processes on one broker; stopped (their process groups) by stop()."""

    def __init__(self, url: str, models: Path, logs: Path, device: str, model: str = "tiny"):
        self.url, self.models, self.logs, self.device, self.model = url, models, logs, device, model
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        env = {**os.environ, "I2V_SERVICE__BROKER_URL": self.url, "I2V_PATHS__MODELS": str(self.models),
               "I2V_PATHS__LOGS": str(self.logs), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        out = (self.logs / f"{name}.out").open("w")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "app", "worker", "--model", self.model, "--device", self.device, "--name", name],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, client, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while True:
            ready = {n for n, b in _beats(client).items() if b.get("state") == "ready"}
            if ready >= set(self.procs):
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SystemExit(f"worker {name} stopped; see {self.logs / (name + '.out')}")
            if time.monotonic() > end:
                raise SystemExit("the workers did not get ready in time")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10, help="jobs timed one at a time for the overhead")
    ap.add_argument("--batch", type=int, default=8, help="jobs submitted at once for the throughput")
    ap.add_argument("--broker", help="a Redis URL to use instead of starting redis-server here")
    ap.add_argument("--device", default="cpu", help="where the workers run the tiny model (default: cpu)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("--model", default="tiny",
                    help="what the workers and the direct service load: tiny, or a model folder (e.g. the full-size "
                         "random model benchmarks/benchmark.py --parts load saves), on --device")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import redis
    import torch

    torch.set_num_threads(1)  # as the workers: one thread each
    from app.config import load_settings
    from app.engine.loader import load_engine
    from app.engine.tiny import ensure_tiny_model
    from app.jobqueue import JobQueue
    from app.jobs.store import JobState
    from app.service import GenerationRequest, GenerationService
    from app.video import read_metadata

    with tempfile.TemporaryDirectory(prefix="i2v-celery-bench-") as temp:
        root = Path(temp)
        shutil.copytree(REPO / "configs", root / "configs")
        models, logs = root / "models", root / "logs"
        models.mkdir()
        logs.mkdir()
        if args.model == "tiny":
            ensure_tiny_model(models)
        server = None
        url = args.broker
        if url is None:
            server, url = _start_redis(root)
        client = redis.Redis.from_url(url)
        workers = Workers(url, models, logs, args.device, args.model)
        try:
            end = time.monotonic() + 15
            while True:
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.05)
            settings = load_settings(root=root, environ={}, overrides={
                "paths": {"models": str(models)}, "service": {"backend": "celery", "broker_url": url}})
            direct_settings = load_settings(root=root, environ={}, overrides={
                "paths": {"models": str(models), "outputs": str(root / "direct-outputs")}})
            direct = GenerationService(direct_settings, lambda: load_engine(direct_settings, source=args.model,
                                                                            device=args.device))
            direct.load()
            queue = JobQueue(GenerationService(settings, lambda: None), settings)
            workers.start("bench-1@bench")
            workers.wait_ready(client)
            queue.start()
            image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8))

            def request(seed: int) -> GenerationRequest:
                return GenerationRequest(image=image, prompt="a cat walking", seed=seed,
                                         video=dict(resolution=args.resolution, num_frames=args.frames, fps=8,
                                                    steps=args.steps))

            def queued(seed: int) -> tuple[float, float]:
                started = time.perf_counter()
                job = queue.wait(queue.submit(request(seed)).id)
                wall = time.perf_counter() - started
                if job.state is not JobState.DONE:
                    raise SystemExit(f"job {job.id} ended {job.state.value}: {job.error_en}")
                timings = read_metadata(settings.path("outputs") / job.result)["timings_s"]
                return wall, wall - timings["total"]

            def direct_run(seed: int) -> float:
                started = time.perf_counter()
                direct.generate(request(seed))
                return time.perf_counter() - started

            queued(0), direct_run(0)  # warm-up: the first video of a process pays for torch's and ffmpeg's start
            walls, own, directs = [], [], []
            for i in range(1, args.jobs + 1):
                wall, mine = queued(i)
                walls.append(wall)
                own.append(mine)
                directs.append(direct_run(i))

            def batch(count: int) -> float:
                started = time.perf_counter()
                jobs = [queue.submit(request(1000 + i)) for i in range(count)]
                for job in jobs:
                    done = queue.wait(job.id)
                    if done.state is not JobState.DONE:
                        raise SystemExit(f"job {job.id} ended {done.state.value}: {done.error_en}")
                return time.perf_counter() - started

            one = two = 0.0
            if args.batch:  # --batch 0: the overhead only (e.g. one GPU, which two workers would share)
                one = batch(args.batch)
                workers.start("bench-2@bench")
                workers.wait_ready(client)
                batch(2)  # the new worker's first video (warm-up)
                two = batch(args.batch)
            queue.stop()
        finally:
            workers.stop()
            if server is not None:
                server.terminate()
                server.wait(15)
    results = {
        "model": args.model, "device": args.device, "size": f"{args.resolution}px x {args.frames} frames, {args.steps} steps",
        "jobs": args.jobs, "queued_wall_median_ms": _median_ms(walls), "direct_median_ms": _median_ms(directs),
        "queue_own_median_ms": _median_ms(own),
        "queue_own_p90_ms": round(sorted(own)[int(0.9 * (len(own) - 1))] * 1000, 1),
        "wall_minus_direct_median_ms": round(_median_ms(walls) - _median_ms(directs), 1),
        "batch": args.batch, "one_worker_s": round(one, 2), "two_workers_s": round(two, 2),
        "one_worker_jobs_per_min": round(args.batch / one * 60, 1) if one else None,
        "two_workers_jobs_per_min": round(args.batch / two * 60, 1) if two else None,
        "cpu_cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(f"celery backend, model {args.model} on {results['device']}, {results['size']}, {results['cpu_cores']} cores "
          f"(load average {results['load_average_1min']}: other work on the machine slows both sides)")
    print(f"  one job at a time ({args.jobs} jobs): through the queue median {results['queued_wall_median_ms']:.1f} ms,"
          f" direct service.generate median {results['direct_median_ms']:.1f} ms")
    print(f"  the queue's own time per job: median {results['queue_own_median_ms']:.1f} ms "
          f"(p90 {results['queue_own_p90_ms']:.1f} ms); queued - direct medians "
          f"{results['wall_minus_direct_median_ms']:.1f} ms")
    if args.batch:
        print(f"  {args.batch} jobs at once: 1 worker {results['one_worker_s']:.2f} s "
              f"({results['one_worker_jobs_per_min']:.1f} jobs/min), 2 workers {results['two_workers_s']:.2f} s "
              f"({results['two_workers_jobs_per_min']:.1f} jobs/min)")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
