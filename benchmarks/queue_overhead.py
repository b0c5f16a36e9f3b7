"""What the job queue adds to each video: a direct GenerationService.generate call against the same request
through JobQueue (submit, the backend runs it, wait), on the tiny model.

    python benchmarks/queue_overhead.py                   # 20 pairs on the CPU, the local backend
    python benchmarks/queue_overhead.py --jobs 50 --json  # also print the results as one JSON line

The direct and the queued runs alternate, so drift in the machine's speed touches both alike; the overhead is
the median of the per-pair differences. That difference carries the noise of two generations; the queue's own
time is also measured without it: the queued run's wall time less the service.generate call inside it (the
call is timed where the worker makes it), plus the progress writes the worker makes during that call (each
timed too). Warm-up runs (one of each, not counted) come first: the first video
of a process pays for torch's and ffmpeg's start. `submit` is the time to check the request, keep its input
copy and store the job; the rest is the worker picking the job up, its progress writes, and the waiter
seeing the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


def _timed(fn: Callable, durations: list[float]) -> Callable:
    """fn, appending the seconds of each call to durations."""
    def timed(*a, **kw):
        started = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            durations.append(time.perf_counter() - started)
    return timed


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20, help="pairs of videos (one direct, one queued) to time")
    ap.add_argument("--device", default="cpu", help="where the tiny model runs (default: cpu)")
    ap.add_argument("--backend", default="local", help="service.backend of the queue (default: local)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--models", type=Path, help="a models folder to build the tiny model in (default: a temp one)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)

    from app.config import load_settings
    from app.engine.loader import load_engine
    from app.engine.tiny import ensure_tiny_model
    from app.jobqueue import JobQueue
    from app.jobs.store import JobState
    from app.service import GenerationRequest, GenerationService

    with tempfile.TemporaryDirectory(prefix="i2v-queue-bench-") as temp:
        root = Path(temp)
        shutil.copytree(REPO / "configs", root / "configs")
        models = args.models or root / "models"
        models.mkdir(parents=True, exist_ok=True)
        ensure_tiny_model(models)
        settings = load_settings(root=root, environ={}, overrides={"paths": {"models": str(models)},
                                                                    "service": {"backend": args.backend}})
        service = GenerationService(settings, lambda: load_engine(settings, source="tiny", device=args.device))
        service.load()
        inside: list[float] = []  # the service.generate calls the queue's worker makes
        generate = service.generate
        timed_generate = _timed(generate, inside)
        queue = JobQueue(service, settings)
        progress_writes: list[float] = []  # the store writes of the worker's progress reports, inside generate
        queue.store.set_progress = _timed(queue.store.set_progress, progress_writes)
        queue.start()
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))

        def request(seed: int) -> GenerationRequest:
            return GenerationRequest(image=image, prompt="a cat walking", seed=seed,
                                     video=dict(resolution=args.resolution, num_frames=args.frames, fps=8,
                                                steps=args.steps))

        def direct(seed: int) -> float:
            started = time.perf_counter()
            generate(request(seed))
            return time.perf_counter() - started

        def queued(seed: int) -> tuple[float, float, float]:
            """(wall time, submit time, the queue's own time: wall less the generate call, plus its progress writes)."""
            service.generate = timed_generate
            try:
                started = time.perf_counter()
                job = queue.submit(request(seed))
                submitted = time.perf_counter()
                final = queue.wait(job.id)
                wall = time.perf_counter() - started
            finally:
                service.generate = generate
            if final.state is not JobState.DONE:
                raise SystemExit(f"job {job.id} ended {final.state.value}: {final.error_en}")
            writes = sum(progress_writes)
            progress_writes.clear()
            return wall, submitted - started, wall - inside.pop() + writes

        try:
            direct(0), queued(0)  # warm-up
            times_direct, times_queued, submits, differences, own = [], [], [], [], []
            for i in range(1, args.jobs + 1):
                d = direct(i)
                q, s, o = queued(i)
                times_direct.append(d)
                times_queued.append(q)
                submits.append(s)
                differences.append(q - d)
                own.append(o)
        finally:
            queue.stop()
        engine = service.engine
        results = {
            "jobs": args.jobs, "backend": args.backend, "device": str(engine.device) if engine else args.device,
            "size": f"{args.resolution}px x {args.frames} frames, {args.steps} steps",
            "direct_median_ms": _median_ms(times_direct), "queued_median_ms": _median_ms(times_queued),
            "overhead_median_ms": _median_ms(differences), "submit_median_ms": _median_ms(submits),
            "queue_own_median_ms": _median_ms(own),
            "queue_own_p90_ms": round(sorted(own)[int(0.9 * (len(own) - 1))] * 1000, 2),
        }
    print(f"{results['jobs']} pairs, backend {results['backend']}, {results['device']}, {results['size']}")
    print(f"  direct service.generate   median {results['direct_median_ms']:8.1f} ms")
    print(f"  through the queue         median {results['queued_median_ms']:8.1f} ms")
    print(f"  overhead per job          median {results['overhead_median_ms']:8.1f} ms (queued - direct, per pair)")
    print(f"  the queue's own time      median {results['queue_own_median_ms']:8.1f} ms "
          f"(p90 {results['queue_own_p90_ms']:.1f} ms; submit alone {results['submit_median_ms']:.1f} ms)")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
