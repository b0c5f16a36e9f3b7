"""CFG-parallel: one video on two GPUs, each computing one half of the classifier-free-guidance pair.

Classifier-free guidance runs the UNet on a batch of two, the unconditional and the conditional half, which are
independent until the sampler mixes them after each step. Here the app's process (rank 0) keeps the first half
and a second process that it starts (rank 1) holds its own copy of the model on the second GPU and computes the
second half. Both join one torch.distributed group: NCCL between CUDA GPUs, gloo on the CPU (the tests).
Rank 0 encodes, drives the loop, decodes and writes, exactly as on one GPU.

Protocol. Commands go over a multiprocessing pipe; tensors over the group, in the same order on both ranks.
- Start: rank 1 joins the group, loads the model through the app's own loader (its speedups included; the
  warm-up is rank 0's, which runs both halves), says "ready" (or why it could not), and a small broadcast
  proves the group works.
- "run", once per video: the timesteps, the fps and the shapes; then broadcasts of rank 1's half of the text
  embeddings, the image embedding and the image latents.
- "step" i: a broadcast of the step's latents (already in the UNet's dtype), each rank's half, and an
  all-gather of the two noise predictions. Per step only these two tensors cross between the GPUs.
- "end": rank 1 answers with the steps it ran and its peak memory, then waits for the next run; "stop" ends it.

Why it cannot hang. Rank 1 never sits in a collective while idle: between runs it waits on the pipe, so the
group's own timeouts only ever cover a step. Rank 0 waits for each step by polling, with a deadline, whether the
step's collectives have finished, whether rank 1's process is still alive and what it said. A rank 1 whose half
fails says so on the pipe and still joins the step's all-gather, so both ranks stay in step and the next run
can use both GPUs again; the run itself ends with a clear error. A rank 1 that dies or stops answering is
killed, the group is torn down, and the sampler runs on one GPU from then on (`fallback` says why). Rank 1
exits by itself when rank 0's process is gone.

The two halves are the same arithmetic as the batch of two, each run at batch 1: the result equals a run that
computes the two halves one after the other in one process, and differs from the batch-of-two run only by how
the kernels round at batch 1 and at batch 2.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from app.config import Settings
from app.engine import device as gpu
from app.errors import AppError

log = logging.getLogger(__name__)

GIB = 1024 ** 3


class CfgParallelError(AppError):
    """The second GPU's half of a run failed, or its process stopped; the run made no video."""


@dataclass(frozen=True)
class Timeouts:
    """How long rank 0 waits for rank 1, in seconds. A real step takes well under a second; a step in which
    rank 1 compiles (it says so first) may take minutes on a first start, and so may loading the weights."""

    start_s: float = 900.0  # rank 1 imports, joins the group and loads the model
    step_s: float = 300.0  # one step, or a run's inputs
    compile_s: float = 3600.0  # a step in which rank 1 compiles first
    stop_s: float = 10.0  # rank 1 leaves after "stop" (then it is killed)

    @property
    def group_s(self) -> float:
        """The group's own timeout, a backstop behind rank 0's deadlines."""
        return max(self.start_s, self.step_s, self.compile_s) + 60.0


def gpu_ids(text: str) -> list[int]:
    """The GPU indices of a `model.gpus` value ("" none, "1", "0,1"); app.config has checked its form."""
    return [int(part) for part in text.split(",") if part.strip()]


def plan_devices(gpus: str, device: str) -> tuple[str, tuple[torch.device, torch.device] | None, str | None]:
    """Where rank 0 runs, the two devices of CFG-parallel (None: one device), and a note when `gpus` names two
    GPUs that cannot be used together here.

    `model.gpus` decides over `model.device`, unless that is the CPU: one index is that GPU, two are
    CFG-parallel on both, the first one rank 0's. Fewer than two visible GPUs, or a torch without NCCL
    (native Windows), run on one GPU with a note rather than fail: the video is the same, only slower.
    """
    ids = gpu_ids(gpus)
    if not ids:
        return device, None, None
    if (device or "").strip().lower() == "cpu":
        return device, None, "model.gpus is not used: model.device is cpu"
    if len(ids) == 1:
        return f"cuda:{ids[0]}", None, None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        first = f"cuda:{ids[0]}" if ids[0] < count else device
        return first, None, f"CFG-parallel needs two CUDA GPUs and this PC has {count}: running on one"
    pair = (gpu.resolve_device(f"cuda:{ids[0]}"), gpu.resolve_device(f"cuda:{ids[1]}"))  # clear error if missing
    if not dist.is_available() or not dist.is_nccl_available():
        return str(pair[0]), None, ("CFG-parallel needs NCCL, which this torch build lacks (native Windows has "
                                    "none; WSL2 and Linux have it): running on one GPU")
    return str(pair[0]), pair, None


def _step_name(i: int) -> tuple[str, str]:
    return f"step {i + 1}", f"第 {i + 1} 步"


def _describe(exc: BaseException) -> dict[str, Any]:
    """What rank 1 tells rank 0 about a failure (an exception cannot cross the pipe reliably)."""
    return {"type": type(exc).__name__, "text": str(exc)[:600], "oom": gpu.is_out_of_memory(exc),
            "en": getattr(exc, "en", None), "zh": getattr(exc, "zh", None)}


def _group_env(backend: str) -> None:
    """Both ranks run on this machine: NCCL's and gloo's sockets stay on the loopback interface (nothing is
    opened to the network), and a timed-out NCCL collective aborts the group instead of the whole process
    (the app's process is rank 0). A value the user set wins."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def _join_group(backend: str, store_path: str, rank: int, timeouts: Timeouts) -> None:
    """Form the two-process group. The rendezvous waits at most `start_s` for the other rank (init's timeout
    bounds it), then the group's own timeout becomes the longer `group_s`, behind rank 0's own deadlines."""
    # A file store, not a TCP one: the rendezvous opens no port (a TCP store listens on every interface).
    store = dist.FileStore(store_path, 2)
    store.set_timeout(timedelta(seconds=timeouts.start_s))
    world = getattr(dist.distributed_c10d, "_world", None)
    if world is not None and hasattr(world, "group_count") and not dist.is_initialized():
        # The group's keys in the store carry a process-wide group count that only destroying a group resets: a
        # rendezvous that failed earlier in rank 0's process leaves it raised, while rank 1 is a fresh process.
        world.group_count = 0
    dist.init_process_group(backend, store=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=timeouts.start_s))
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:
        set_timeout(timedelta(seconds=timeouts.group_s))


# Rank 0 ------------------------------------------------------------------------------------------

class CfgParallel:
    """Rank 0's side: starts rank 1, lets a sampler split its CFG pairs (`attach`), and stops rank 1 (`close`).

    Not thread-safe: the service runs one generation at a time, and only that thread uses it.
    """

    def __init__(self, devices: tuple[torch.device, torch.device], backend: str, process: Any, conn: Any,
                 store_dir: Path, timeouts: Timeouts):
        self.devices, self.backend, self.timeouts = devices, backend, timeouts
        self._process, self._conn, self._store_dir = process, conn, store_dir
        self._sampler: Any = None
        self._init_error: BaseException | None = None
        self._init_thread: threading.Thread | None = None
        self._group = False  # rank 0 is in the group
        self._group_lock = threading.Lock()
        self._closed = False
        self._reset_peak = True
        self._pending: tuple | None = None  # the last step's collectives and their tensors (CUDA)
        self._deadline = 0.0
        self._rank1_failure: dict | None = None
        # What is known about rank 1 and the last run.
        self.fallback: tuple[str, str] | None = None  # (en, zh): why the runs use one GPU, once they do
        self.why_off: str | None = None  # the same, for the load report's notes
        self.rank1_speedups: dict | None = None
        self.runs = 0  # runs that split their CFG pairs
        self.last_run: dict = {}  # rank 1's account of the last one: steps, peak_gib

    @classmethod
    def launch(cls, settings: Settings, *, source: str, devices: tuple[torch.device, torch.device],
               timeouts: Timeouts = Timeouts()) -> "CfgParallel":
        """Start rank 1 on devices[1] and join the group in the background; returns at once, so rank 0 reads
        its weights while rank 1 reads its own. `attach` then waits for rank 1."""
        import multiprocessing

        if dist.is_initialized():  # the group is the process's default one: one CFG-parallel pair at a time
            raise CfgParallelError("CFG-parallel is already running in this process",
                                   "本进程中已在运行 CFG 并行")
        backend = "nccl" if devices[0].type == "cuda" else "gloo"
        _group_env(backend)
        store_dir = Path(tempfile.mkdtemp(prefix="i2v-cfg-"))
        store_path = str(store_dir / "store")
        # Rank 1 loads the same model with the same settings, on its own device and without the parts that are
        # rank 0's: no second CFG-parallel, no low-VRAM mode (it must hold the UNet), no warm-up of its own
        # (rank 0's warm-up runs both halves, each at the batch size it will run).
        rank1_settings = settings.model_copy(update={
            "model": settings.model.model_copy(update={"gpus": "", "device": str(devices[1]), "low_vram": "off"}),
            "speedups": settings.speedups.model_copy(update={"warmup": False})})
        spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        conn, child_conn = spawn.Pipe()
        process = spawn.Process(target=rank1_main, name="i2v-cfg-rank1", daemon=False, args=(
            child_conn, store_path, rank1_settings, source, str(devices[1]), backend, torch.get_num_threads(),
            timeouts))
        process.start()
        child_conn.close()
        parallel = cls(devices, backend, process, conn, store_dir, timeouts)
        atexit.register(parallel.close)
        parallel._init_thread = threading.Thread(target=parallel._join, name="cfg-parallel-join", daemon=True)
        parallel._init_thread.start()
        log.info("CFG-parallel: rank 1 starting on %s (%s)", devices[1], backend)
        return parallel

    def _join(self) -> None:
        try:
            if self.devices[0].type == "cuda":
                torch.cuda.set_device(self.devices[0])
            _join_group(self.backend, str(self._store_dir / "store"), 0, self.timeouts)
        except BaseException as exc:  # reported by attach
            self._init_error = exc
            return
        with self._group_lock:
            self._group = True
            late = self.fallback is not None or self._closed
        if late:  # given up while the group was forming
            self._leave_group(abort=True)

    @property
    def active(self) -> bool:
        """True while runs with guidance split their CFG pairs over both devices."""
        return self._sampler is not None and self.fallback is None and not self._closed

    def report(self, peak_gib: float | None) -> dict[str, Any]:
        """For a video's metadata: the two devices, the peak memory of each (rank 0's is `peak_gib`) since
        `reset_peak`, and what the speedups did on rank 1."""
        peaks = [peak_gib, self.last_run.get("peak_gib")]
        return {"devices": [str(d) for d in self.devices], "backend": self.backend,
                "peak_vram_gib": [None if p is None else round(p, 3) for p in peaks],
                "rank1_speedups": self.rank1_speedups}

    # Start-up ------------------------------------------------------------------------------------
    def attach(self, sampler: Any) -> bool:
        """Wait for rank 1 to be loaded and in the group, then let `sampler` split its CFG pairs. False where
        rank 1 could not start: then `fallback` says why and the sampler runs on one device."""
        try:
            self._deadline = time.monotonic() + self.timeouts.start_s
            ready = self._wait_message("ready", ("loading the model", "加载模型"))
            self.rank1_speedups = ready.get("speedups")
            assert self._init_thread is not None
            self._init_thread.join(max(0.0, self._deadline - time.monotonic()))
            if self._init_thread.is_alive() or self._init_error is not None:
                why = f"{type(self._init_error).__name__}: {self._init_error}" if self._init_error else "timed out"
                raise self._broken(f"the two processes could not form a group ({why})",
                                   f"两个进程无法组成通信组({why})")
            probe = torch.zeros(2, device=self.devices[0])
            self._send(("hello",))
            self._finish([dist.broadcast(probe, src=0, async_op=True)], ("joining the group", "加入通信组"))
        except CfgParallelError:
            return False  # given up: `fallback` says why
        except Exception as exc:
            self._broken(f"{type(exc).__name__}: {exc}", f"{type(exc).__name__}: {exc}")
            return False
        sampler.cfg_split = self.run
        self._sampler = sampler
        log.info("CFG-parallel: %s and %s ready", *self.devices)
        return True

    # One run -------------------------------------------------------------------------------------
    def reset_peak(self) -> None:
        """Rank 1 starts counting its peak memory again at the next run (the service's per-video peak)."""
        self._reset_peak = True

    def peak_gib(self) -> float | None:
        """Rank 1's peak memory since `reset_peak`, as of the last run's end (None on the CPU)."""
        return self.last_run.get("peak_gib")

    @contextlib.contextmanager
    def run(self, timesteps: torch.Tensor, text: torch.Tensor, fps: torch.Tensor, image_latents: torch.Tensor,
            image_emb: torch.Tensor) -> Iterator[Callable[..., torch.Tensor]]:
        """The sampler's hook for one run with guidance: sends rank 1 its half of the run's inputs, and gives
        the callable that stands in for the batch-of-two UNet call of each step."""
        if self.active and not self._process.is_alive():  # it stopped between videos: this one runs on one GPU
            code = self._process.exitcode
            self._give_up(f"its process stopped (exit code {code}) between videos",
                          f"其进程在两次生成之间已停止(退出码 {code})")
        if not self.active:
            yield self._sampler.denoise_fn  # the batch of two, on this device
            return
        halves = [part[1:].contiguous() for part in (text, image_emb, image_latents)]
        spec = {"timesteps": [int(v) for v in timesteps.tolist()], "fps": int(fps[-1].item()),
                "inputs": [(tuple(h.shape), str(h.dtype).removeprefix("torch.")) for h in halves],
                "reset_peak": self._reset_peak}
        self._reset_peak = False
        self._rank1_failure = None
        self.runs += 1
        self._deadline = time.monotonic() + self.timeouts.step_s
        self._send(("run", spec))
        self._finish([dist.broadcast(h, src=0, async_op=True) for h in halves],
                     ("receiving the video's inputs", "接收本视频的输入"))
        step = 0
        sampler = self._sampler

        def unet_pair(sample: torch.Tensor, t: torch.Tensor, text: torch.Tensor, fps: torch.Tensor,
                      image_latents: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
            nonlocal step
            out = self._step(step, sampler.denoise_fn, sample, t, text, fps, image_latents, image_emb)
            step += 1
            return out

        ok = False
        try:
            yield unet_pair
            ok = True
        finally:
            self._end_run(ok)

    def _step(self, i: int, denoise: Callable[..., torch.Tensor], sample: torch.Tensor, *rest: torch.Tensor,
              ) -> torch.Tensor:
        t, text, fps, image_latents, image_emb = rest
        self._send(("step", i))
        theirs = sample[1:].contiguous()
        sent = dist.broadcast(theirs, src=0, async_op=True)
        failure: BaseException | None = None
        try:
            mine = denoise(sample[:1], t, text[:1], fps[:1], image_latents[:1], image_emb[:1])
        except Exception as exc:  # still join the all-gather, so both ranks stay in step; raised below
            failure = exc
            mine = torch.zeros_like(sample[:1])
        both = [torch.empty_like(mine), torch.empty_like(mine)]
        gathered = dist.all_gather(both, mine.contiguous(), async_op=True)
        works = [sent, gathered]
        if failure is not None or self.devices[0].type != "cuda":
            # The CPU reads the result at once; on a failure the step is settled before raising.
            self._settle_pending()
            self._deadline = time.monotonic() + self.timeouts.step_s
            self._finish(works, _step_name(i))
            if failure is not None:
                raise failure
        else:
            # On CUDA the step's result is used through stream order (wait() returns at once), and the host
            # checks the step before, so the next step is queued while this one runs, as on one GPU.
            for work in works:
                work.wait()
            previous, self._pending = self._pending, (i, works, theirs, mine, both)
            if previous is not None:
                self._deadline = time.monotonic() + self.timeouts.step_s
                self._finish(previous[1], _step_name(previous[0]))
        self._raise_rank1_failure()
        return torch.cat(both)

    def _settle_pending(self) -> None:
        if self._pending is not None:
            step, works = self._pending[0], self._pending[1]
            self._pending = None
            self._deadline = time.monotonic() + self.timeouts.step_s
            self._finish(works, _step_name(step))

    def _end_run(self, ok: bool) -> None:
        """After the loop, however it ended (cancel included): settle the last step and send rank 1 back to
        waiting. A failure here is raised only where the run itself succeeded."""
        if not self.active:
            return
        try:
            self._settle_pending()
            self._deadline = time.monotonic() + self.timeouts.step_s
            self._send(("end",))
            self.last_run = self._wait_message("ended", ("ending the run", "结束本次生成"))
        except CfgParallelError:
            if ok:
                raise
            return
        if ok:
            self._raise_rank1_failure()

    # Waiting, with a deadline ---------------------------------------------------------------------
    def _finish(self, works: list[Any], what: tuple[str, str]) -> None:
        """Wait until `works` are done, while rank 1 lives and the deadline holds. Their results are then ready
        on the host (gloo) or ordered before what the current stream runs next (NCCL)."""
        delay = 0.0
        for work in works:
            while not work.is_completed():
                self._read_messages()
                self._check_alive(what)
                time.sleep(delay)
                delay = min(0.002, delay + 0.0001)
            try:
                work.wait()
            except Exception as exc:
                self._check_alive(what, grace_s=2.0)
                raise self._broken(f"its collective failed while {what[0]} ({type(exc).__name__}: {exc})",
                                   f"{what[1]}时通信失败({type(exc).__name__}: {exc})") from None
        self._read_messages()

    def _wait_message(self, kind: str, what: tuple[str, str]) -> dict:
        delay = 0.001
        while True:
            found = self._read_messages(want=kind)
            if found is not None:
                return found
            if self._init_error is not None:  # rank 1 would wait for rank 0 in the rendezvous until it times out
                why = f"{type(self._init_error).__name__}: {self._init_error}"
                raise self._broken(f"the two processes could not form a group ({why})",
                                   f"两个进程无法组成通信组({why})")
            self._check_alive(what)
            time.sleep(delay)
            delay = min(0.05, delay * 2)

    def _read_messages(self, want: str | None = None) -> dict | None:
        """Handle what rank 1 said: "compiling" extends the deadline, "failed" is kept for the caller; returns the
        body of the first `want` message."""
        found = None
        try:
            while self._conn.poll():
                kind, body = self._conn.recv()
                if kind == "compiling":
                    self._deadline = max(self._deadline, time.monotonic() + self.timeouts.compile_s)
                elif kind == "failed":
                    if want in ("ready", "hello"):
                        raise self._start_failure(body)
                    self._rank1_failure = self._rank1_failure or body
                elif kind == want and found is None:
                    found = body
                    if want == "ready":
                        break
        except (EOFError, OSError):
            pass  # the process is gone: _check_alive says so
        return found

    def _check_alive(self, what: tuple[str, str], grace_s: float = 0.0) -> None:
        if grace_s:
            self._process.join(grace_s)
        if not self._process.is_alive():
            code = self._process.exitcode
            raise self._broken(f"its process stopped (exit code {code}) while {what[0]}",
                               f"其进程在{what[1]}时已停止(退出码 {code})")
        if time.monotonic() > self._deadline:
            raise self._broken(f"it did not answer while {what[0]}", f"其在{what[1]}时没有响应")

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (OSError, EOFError, ValueError):
            self._check_alive(("receiving a command", "接收指令"), grace_s=2.0)
            raise self._broken("its pipe is closed", "其通信管道已关闭") from None

    # Failures ------------------------------------------------------------------------------------
    def _broken(self, why_en: str, why_zh: str) -> CfgParallelError:
        """Rank 1 or the group cannot go on: both are taken down, the sampler runs on one device from now on,
        and the error to raise says so."""
        dev, one = self.devices[1], self.devices[0]
        if self._sampler is None:  # still starting: the app simply runs on one GPU
            exc = CfgParallelError(f"The second GPU ({dev}) could not be used: {why_en}.",
                                   f"无法使用第二块 GPU({dev}):{why_zh}。")
        else:
            exc = CfgParallelError(
                f"The second GPU ({dev}) stopped working with the first: {why_en}. No video was written. "
                f"The next videos run on one GPU ({one}); restart the app to use both again.",
                f"第二块 GPU({dev})已无法与第一块协同工作:{why_zh}。本次未写入视频。之后的视频将只用一块 GPU"
                f"({one})生成;重启程序即可再次使用两块 GPU。")
        self._give_up(why_en, why_zh)
        return exc

    def _start_failure(self, body: dict) -> CfgParallelError:
        en = body.get("en") or f"{body['type']}: {body['text']}"
        return self._broken(f"it could not load the model: {en}", f"其无法加载模型:{body.get('zh') or en}")

    def _raise_rank1_failure(self) -> None:
        """Rank 1's half of a step failed (it stays in step): the run ends with its error, the group lives on."""
        body, self._rank1_failure = self._rank1_failure, None
        if body is None:
            return
        if body["oom"]:  # the service turns this into its out-of-memory message
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory on the second GPU ({self.devices[1]}): "
                                              f"{body['text']}")
        raise CfgParallelError(
            f"The second GPU ({self.devices[1]}) failed during the run: {body['type']}: {body['text']}. "
            "No video was written.",
            f"第二块 GPU({self.devices[1]})在生成过程中出错:{body['type']}: {body['text']}。本次未写入视频。")

    def _give_up(self, why_en: str, why_zh: str) -> None:
        """From now on the sampler runs on one device; rank 1 and the group are taken down. Once only."""
        if self.fallback is not None:
            return
        dev, one = self.devices[1], self.devices[0]
        log.warning("CFG-parallel off, running on %s: %s", one, why_en)
        self.why_off = f"CFG-parallel off, the second GPU ({dev}) is not used: {why_en}"
        self.fallback = (
            f"This video was made on one GPU ({one}): the second GPU ({dev}) is no longer used, {why_en}. "
            "Restart the app to use both GPUs again.",
            f"本视频只用一块 GPU({one})生成:第二块 GPU({dev})已停用,{why_zh}。重启程序即可再次使用两块 GPU。")
        if self._sampler is not None:
            self._sampler.cfg_split = None
        self._pending = None
        self._shut_down(kill=True)

    # Stopping ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop rank 1 (asked, then killed after `stop_s`) and leave the group. Safe to call twice."""
        if self._closed:
            return
        if self._sampler is not None and getattr(self._sampler, "cfg_split", None) == self.run:
            self._sampler.cfg_split = None
        self._shut_down(kill=self.fallback is not None)
        self._closed = True

    def _shut_down(self, *, kill: bool) -> None:
        process = self._process
        if not kill and process.is_alive():
            with contextlib.suppress(OSError, EOFError, ValueError):
                self._conn.send(("stop",))
            process.join(self.timeouts.stop_s)
        if process.is_alive():
            process.kill()
            process.join(self.timeouts.stop_s)
        with contextlib.suppress(OSError):
            self._conn.close()
        self._leave_group(abort=kill)
        shutil.rmtree(self._store_dir, ignore_errors=True)

    def _leave_group(self, *, abort: bool) -> None:
        """Leave the group in a thread that may not block rank 0 for long: with a dead peer, NCCL's teardown
        can wait; aborting first ends its pending collectives."""
        with self._group_lock:
            if not self._group:
                return
            self._group = False

        def leave() -> None:
            with contextlib.suppress(Exception):
                if abort and hasattr(dist.distributed_c10d, "_abort_process_group"):
                    dist.distributed_c10d._abort_process_group()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

        thread = threading.Thread(target=leave, name="cfg-parallel-leave", daemon=True)
        thread.start()
        thread.join(self.timeouts.stop_s)


# Rank 1 ------------------------------------------------------------------------------------------

class _ParentGone(Exception):
    pass


def rank1_main(conn: Any, store_path: str, settings: Settings, source: str, device: str, backend: str,
               threads: int, timeouts: Timeouts) -> None:
    """Rank 1's process: join the group, load the model, then serve UNet halves until "stop", or until rank 0's
    process is gone."""
    threading.current_thread().name = "cfg-rank1"  # its lines in the shared log file say so
    for key, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("DIFFUSERS_VERBOSITY", "error")):
        os.environ.setdefault(key, value)  # loading bars and library notes would mix into the app's console
    with contextlib.suppress(Exception):
        from app.logging_setup import setup_logging

        setup_logging(settings.path("logs"), settings.logging.level, settings.logging.retention_days, console=False)
    torch.set_num_threads(threads)  # the same kernels' choices as rank 0 on a CPU
    dev = torch.device(device)
    try:
        _group_env(backend)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        _join_group(backend, store_path, 1, timeouts)
        from app.engine.loader import load_engine

        engine = load_engine(settings, source=source, device=device)
        _keep_only_the_unet(engine.sampler)
    except BaseException as exc:
        log.exception("rank 1 could not start")
        with contextlib.suppress(Exception):
            conn.send(("failed", _describe(exc)))
        os._exit(3)
    conn.send(("ready", {"speedups": engine.speedups}))
    try:
        with torch.no_grad():
            _Rank1(conn, engine.sampler, dev).serve()
    except _ParentGone:
        os._exit(0)  # nobody to answer; a collective left pending must not hold the exit
    except BaseException:
        log.exception("rank 1 stopped")
        os._exit(4)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    logging.shutdown()
    os._exit(0)  # told to stop: nothing left to tidy that the interpreter's slow teardown would


def _keep_only_the_unet(sampler: Any) -> None:
    """Rank 1 runs only the UNet: the encoders and the VAE go back to the CPU, freeing the second GPU."""
    for name, module in sampler.c.modules.items():
        if name != "unet":
            module.to("cpu")
    gpu.release_memory()


class _Rank1:
    def __init__(self, conn: Any, sampler: Any, device: torch.device):
        import multiprocessing

        self.conn, self.sampler, self.device = conn, sampler, device
        self.parent = multiprocessing.parent_process()
        self.run: dict | None = None
        self.pending: list[Any] = []

    def serve(self) -> None:
        while True:
            kind, *body = self._receive()
            if kind == "stop":
                return
            if kind == "hello":
                self._wait([dist.broadcast(torch.zeros(2, device=self.device), src=0, async_op=True)])
            elif kind == "run":
                self._start_run(body[0])
            elif kind == "step":
                self._step(body[0])
            elif kind == "end":
                self._end_run()

    def _receive(self) -> tuple:
        while not self.conn.poll(0.5):
            self._check_parent()
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise _ParentGone() from None

    def _check_parent(self) -> None:
        if self.parent is not None and not self.parent.is_alive():
            raise _ParentGone()

    def _wait(self, works: list[Any]) -> None:
        """Gloo: wait on the host, watching rank 0. NCCL: order the streams and go on (the host is not held)."""
        for work in works:
            if self.device.type != "cuda":
                while not work.is_completed():
                    self._check_parent()
                    time.sleep(0.0005)
            work.wait()

    def _start_run(self, spec: dict) -> None:
        if spec["reset_peak"]:
            gpu.reset_peak(self.device)
        inputs = [torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                  for shape, dtype in spec["inputs"]]
        self._wait([dist.broadcast(tensor, src=0, async_op=True) for tensor in inputs])
        text, image_emb, image_latents = inputs
        sample_shape = (1, self.sampler.c.unet.config.in_channels, *image_latents.shape[2:])
        self.run = {"text": text, "image_emb": image_emb, "image_latents": image_latents,
                    "fps": torch.tensor([spec["fps"]], device=self.device),
                    "timesteps": torch.tensor(spec["timesteps"], device=self.device),
                    "sample_shape": sample_shape, "dtype": text.dtype, "steps": 0}

    def _step(self, i: int) -> None:
        run = self.run
        assert run is not None
        sample = torch.empty(run["sample_shape"], dtype=run["dtype"], device=self.device)
        self._wait([dist.broadcast(sample, src=0, async_op=True)])
        denoise = self.sampler.denoise_fn
        will_compile = getattr(denoise, "will_compile", None)
        if will_compile is not None and will_compile(tuple(sample.shape)):
            self.conn.send(("compiling", {"step": i}))
        try:
            with self.sampler.loop_context(False):  # one half: not a CFG pair
                mine = denoise(sample, run["timesteps"][i], run["text"], run["fps"], run["image_latents"],
                               run["image_emb"])
        except Exception as exc:  # say so, and still join the all-gather
            log.warning("rank 1 step %d failed: %s: %s", i + 1, type(exc).__name__, exc)
            self.conn.send(("failed", _describe(exc)))
            mine = torch.zeros_like(sample)
        both = [torch.empty_like(mine), torch.empty_like(mine)]
        works = [dist.all_gather(both, mine.contiguous(), async_op=True)]
        self._wait(works)
        self.pending = [works, sample, mine, both]  # alive until the next step is queued behind this one
        run["steps"] += 1

    def _end_run(self) -> None:
        steps = self.run["steps"] if self.run else 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        peak = gpu.peak_gib(self.device)
        self.run, self.pending = None, []
        self.conn.send(("ended", {"steps": steps, "peak_gib": peak}))
        gpu.release_memory()  # while rank 0 decodes and writes
