"""Command line: `python -m app serve | generate | batch | jobs | worker | download | diagnose`.

The CLI only parses arguments, builds the settings and the service, and maps errors to exit
codes (app/errors.py). Heavy imports happen inside the commands, never at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from app.errors import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNEXPECTED,
    AppError,
    ModelNotReadyError,
)

log = logging.getLogger("app.cli")

EXIT_CODES_HELP = """exit codes:
  0 success · 1 unexpected error · 2 bad input or usage · 3 model missing or broken
  4 out of GPU memory · 5 cancelled · 6 configuration error · 130 interrupted (Ctrl+C)"""


def _say(level: str, text: str) -> None:
    stream = sys.stderr if level in ("ERROR", "WARN") else sys.stdout
    print(f"[{level}] {text}", file=stream, flush=True)


def cli_lang(environ: Any = None) -> str:
    """'zh' or 'en' for the console's messages, from the locale variables in POSIX order (LC_ALL, then
    LC_MESSAGES, then LANG: the first one set decides); English when none is set."""
    environ = os.environ if environ is None else environ
    for key in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = environ.get(key, "")
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def _number_arg(text: str) -> int | float | str:
    """A number flag's value: an int or a float where it is one (nan and inf included), else the text itself,
    so the service refuses it with the same message, in the user's language, as any other bad value."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="tiny (demo model, output is noise), a folder in the hub layout, or a hub id "
                                   "(default: model.source in the config)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: model.device in the config)")
    p.add_argument("--offline", action="store_true", help="never touch the network (sets HF_HUB_OFFLINE=1)")
    p.add_argument("--low-vram", choices=["auto", "on", "off"], help="model offload + small decode chunks")
    p.add_argument("--config", type=Path, help="another config file instead of configs/config.yaml")


def _add_video_flags(p: argparse.ArgumentParser) -> None:
    """The preset and the VideoParams numbers (unset: from the preset, then the config)."""
    p.add_argument("--preset", help="fast, standard or high (values not given below come from it)")
    p.add_argument("--resolution", type=_number_arg, help="output side in pixels, a multiple of 64 (512, 768)")
    p.add_argument("--frames", type=_number_arg, dest="num_frames", help="number of frames")
    p.add_argument("--fps", type=_number_arg, help="frames per second (also conditions the motion)")
    p.add_argument("--steps", type=_number_arg, help="denoising steps")
    p.add_argument("--guidance", type=_number_arg, dest="guidance_scale", help="guidance scale")


def _add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smooth", type=int, choices=[2, 4], help="also export a smoother MP4 with 2× or 4× the frames")
    p.add_argument("--loop", action="store_true", help="also export a forward-then-backward looping MP4")
    p.add_argument("--export", metavar="KINDS",
                   help="also export these, comma-separated: gif, webm, frames (a ZIP of PNG frames)")


def _export_kinds(args: argparse.Namespace) -> list[str]:
    """The exports that --smooth, --loop and --export ask for, in that order."""
    kinds = [f"smooth{args.smooth}"] if args.smooth else []
    kinds += ["loop"] if args.loop else []
    return kinds + [kind.strip() for kind in (args.export or "").split(",") if kind.strip()]


def _add_gpus_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", metavar="IDS", help='GPU indices: "0,1" makes each video on two GPUs (each computes one '
                                                 'half of the guidance pair), "1" uses that GPU, "" one GPU '
                                                 "(default: model.gpus in the config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="Image-to-Video with I2VGen-XL",
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the web UI", epilog=EXIT_CODES_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(serve)
    _add_gpus_flag(serve)
    serve.add_argument("--port", type=int, help="port of the web UI (default: server.port, 7860)")
    serve.add_argument("--listen", action="store_true", help="bind 0.0.0.0 so other machines on the LAN can connect")
    serve.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    serve.add_argument("--auth", metavar="USER:PASS", help="require this login")
    serve.add_argument("--mcp", action="store_true", help="also expose /generate as an MCP tool (gradio[mcp])")

    gen = sub.add_parser("generate", help="make one video from an image and a prompt", epilog=EXIT_CODES_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(gen)
    _add_gpus_flag(gen)
    gen.add_argument("--image", required=True, type=Path, help="input image (PNG, JPEG, WebP, …)")
    gen.add_argument("--prompt", required=True, help="what should happen in the video")
    gen.add_argument("--negative-prompt", help="what the video should not show (default from the config)")
    _add_video_flags(gen)
    gen.add_argument("--seed", type=_number_arg, help="seed; -1 picks a random one")
    gen.add_argument("--segments", type=_number_arg, help="make a longer video of N segments, each continuing "
                                                           "from the last frame of the one before (default 1)")
    gen.add_argument("--segment-prompt", action="append", dest="segment_prompts", metavar="PROMPT",
                     help="the prompt of one segment, once per segment in order (default: --prompt for all)")
    gen.add_argument("--crossfade", type=_number_arg, help="frames blended where two segments meet (default 0)")
    _add_export_flags(gen)
    gen.add_argument("--output-dir", type=Path, help="folder for the MP4 and JSON (default: outputs/)")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the UNet as `serve` does (worth it only for many videos: the first "
                          "compile takes minutes)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    dl = sub.add_parser("download", help="download the real I2VGen-XL weights into models/", epilog=EXIT_CODES_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    dl.add_argument("--model", help="hub id (default: model.source in the config)")
    dl.add_argument("--revision", help="branch, tag or commit (default: model.revision)")
    dl.add_argument("--local-dir", type=Path, help="target folder (default: model.local_dir)")
    dl.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    dl.add_argument("--config", type=Path, help="another config file")

    diag = sub.add_parser("diagnose", help="check Python, torch, GPU, driver and disk, and suggest fixes")
    diag.add_argument("--config", type=Path, help="another config file")

    batch = sub.add_parser("batch", help="queue one video per image of a folder (and per seed), then make them",
                           epilog=BATCH_HELP + "\n\n" + EXIT_CODES_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(batch)
    batch.add_argument("folder", type=Path, help="a folder of images (png, jpg, jpeg, webp, bmp), taken in name order")
    batch.add_argument("--prompt", help="the prompt of every image that has none in the prompts file")
    batch.add_argument("--prompts", type=Path, metavar="FILE",
                       help="a CSV (image,prompt[,seed][,negative_prompt]) or a text file of prompts (default: "
                            "prompts.csv or prompts.txt in the folder)")
    batch.add_argument("--seeds", help="comma-separated seeds: one video per image and seed (default: defaults.seed)")
    batch.add_argument("--negative-prompt", help="what the videos should not show (default from the config)")
    _add_video_flags(batch)
    batch.add_argument("--segments", type=_number_arg, help="segments per video (default 1)")
    batch.add_argument("--crossfade", type=_number_arg, help="frames blended where two segments meet (default 0)")
    _add_export_flags(batch)
    batch.add_argument("--no-wait", action="store_true",
                       help="only queue the jobs and print their ids: a running app (python -m app serve) makes them")
    batch.add_argument("--quiet", action="store_true", help="no progress bars")

    worker = sub.add_parser("worker", help="run queued jobs on one GPU of this machine for a front end whose "
                                           "service.backend is celery (docs/scale-out.md)", epilog=EXIT_CODES_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(worker)
    worker.add_argument("--gpu", type=_gpu_index, metavar="N",
                        help="the GPU this worker uses (sets CUDA_VISIBLE_DEVICES=N); start one worker per GPU. "
                             "Each worker runs one job at a time")
    worker.add_argument("--name", help="the worker's name in the queue (default: gpuN@HOST)")

    jobs = sub.add_parser("jobs", help="list the job queue, cancel or retry a job, clear finished jobs",
                          epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    jobs.add_argument("action", nargs="?", default="list", choices=["list", "cancel", "retry", "clear"],
                      help="list (default), cancel ID, retry ID, or clear (removes done, failed and cancelled jobs)")
    jobs.add_argument("job_id", nargs="?", metavar="ID", help="the job to cancel or retry")
    jobs.add_argument("--config", type=Path, help="another config file")
    return parser


BATCH_HELP = """prompts file (FOLDER/prompts.csv or FOLDER/prompts.txt, or --prompts FILE):
  CSV:  image,prompt[,seed][,negative_prompt] with that first row; one video per row
  text: one prompt a line for the images in name order, or `name.png: prompt` lines
  an image without a prompt there takes --prompt
every image is checked before anything is queued: one bad image or prompt refuses the whole batch"""


def _gpu_index(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a GPU number such as 0 or 1, got {text!r}")
    return int(text)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"model": {}, "server": {}, "paths": {}, "speedups": {}}
    if args.command == "generate" and not args.compile:
        # One video: a first compile takes minutes, far more than it saves on one video.
        out["speedups"]["compile"] = "off"
    if getattr(args, "device", None):
        out["model"]["device"] = args.device
    elif args.command == "worker" and args.gpu is not None:
        out["model"]["device"] = "cuda"  # the one GPU CUDA_VISIBLE_DEVICES leaves visible
    if getattr(args, "low_vram", None):
        out["model"]["low_vram"] = args.low_vram
    if getattr(args, "gpus", None) is not None:
        out["model"]["gpus"] = args.gpus
    if getattr(args, "port", None) is not None:
        out["server"]["port"] = args.port
    if getattr(args, "listen", False):
        out["server"]["host"] = "0.0.0.0"
    if getattr(args, "output_dir", None):
        out["paths"]["outputs"] = str(args.output_dir.resolve())
    return out


def _network_env(offline: bool) -> None:
    """No telemetry ever; no hub traffic at all with --offline. Must run before HF/Gradio imports."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"


def _quiet_libraries() -> None:
    """Library chatter (loading bars, deprecation notes) goes to the log file, not the terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if sys.platform == "win32":
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(encoding="utf-8", errors="replace")
    _network_env(getattr(args, "offline", False))
    if args.command == "worker" and args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)  # before anything imports torch
    from app.config import ConfigError, load_settings

    try:
        settings = load_settings(getattr(args, "config", None), overrides=_overrides(args))
    except ConfigError as exc:
        _say("ERROR", f"configs: {exc}")
        return EXIT_CONFIG
    from app.logging_setup import setup_logging

    log_file = setup_logging(settings.path("logs"), settings.logging.level, settings.logging.retention_days,
                             console=False)
    commands = {"serve": _serve, "generate": _generate, "download": _download, "diagnose": _diagnose,
                "batch": _batch, "jobs": _jobs, "worker": _worker}
    try:
        return commands[args.command](args, settings)
    except AppError as exc:
        _say("ERROR", exc.message(cli_lang()))
        log.error("%s: %s", type(exc).__name__, exc.en)
        return exc.exit_code
    except KeyboardInterrupt:
        _say("WARN", "Interrupted (Ctrl+C). / 已中断。")
        return EXIT_INTERRUPTED
    except Exception as exc:
        log.exception("unexpected error")
        where = log_file or "the console output above (the log file could not be written)"
        _say("ERROR", f"Unexpected error: {type(exc).__name__}: {exc}. The full trace is in {where}")
        return EXIT_UNEXPECTED


# Commands --------------------------------------------------------------------------------------

def _make_service(args: argparse.Namespace, settings: Any) -> Any:
    _quiet_libraries()
    from app.engine.loader import load_engine
    from app.service import LOADING_MESSAGES, GenerationService

    source = args.model or settings.model.source

    def on_stage(stage: str) -> None:
        service.show_loading_stage(stage)
        if stage in ("compile_first", "compile_cached") and not getattr(args, "quiet", False):
            message = LOADING_MESSAGES[stage]  # the long part of a start: say it in the console too
            _say("INFO", f"{message.en} / {message.zh}")

    service = GenerationService(settings, lambda: load_engine(settings, source=source, on_stage=on_stage))
    return service


def _serve(args: argparse.Namespace, settings: Any) -> int:
    from app.service import ModelState

    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            _say("ERROR", "--auth needs USER:PASS, e.g. --auth alice:secret / --auth 格式为 用户名:密码")
            return EXIT_BAD_INPUT
        auth = (user, password)
        if args.mcp:
            # Gradio's MCP server asks for no login: its tool list and /cancel would answer anyone, while
            # /generate would fail for everyone.
            _say("ERROR", "--mcp cannot be used with --auth: Gradio's MCP server has no login, so its tools would "
                          "be open to anyone who can reach the app. / --mcp 不能与 --auth 同时使用:Gradio 的 MCP "
                          "服务没有登录验证,其工具会对所有能访问本程序的人开放。")
            return EXIT_BAD_INPUT
    if settings.server.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        _say("WARN", "The app is open to other machines with no login; add --auth USER:PASS. / "
                     "已对其他设备开放且无需登录,建议加上 --auth 用户名:密码。")
    if args.share and auth is None:
        _say("WARN", "The share link is public with no login: anyone who has it can use this GPU and see every "
                     "video in outputs/; add --auth USER:PASS. / 公开链接无需登录:任何拿到链接的人都能使用本机 GPU 并查看"
                     " outputs/ 中的所有视频,建议加上 --auth 用户名:密码。")
    service = _make_service(args, settings)
    remote = settings.service.backend == "celery"  # the GPU workers load the model; this process loads none
    if not remote:
        service.start_loading()
    if args.model == "tiny":
        _say("WARN", "Demo model: videos are random noise. / 演示模型:输出为噪声。")
    from app.jobqueue import JobQueue
    from app.jobs.store import state_text

    jobs = JobQueue(service, settings)
    for job in jobs.start():  # with celery, an unreachable broker stops the start here, before the UI loads
        _say("INFO", f"Job {job.id} was running when the app stopped: now {job.state.value}. / "
                     f"任务 {job.id} 在程序停止时正在运行:现为 {state_text(job.state, 'zh')}。")
    if remote:
        queue = jobs.status()
        _say("INFO", f"{queue['en']} / {queue['zh']}")
    from app.ui import run_server

    def report_model_state() -> None:
        service.wait_until_loaded()
        status = service.status()
        if service.state is ModelState.READY:
            _say("SUCCESS", status["message"].en + " / " + status["message"].zh)
        else:
            _say("WARN", status["message"].en)
            _say("WARN", status["message"].zh)

    import threading

    if not remote:
        threading.Thread(target=report_model_state, name="model-report", daemon=True).start()
    try:
        run_server(service, settings, host=settings.server.host, port=settings.server.port, share=args.share,
                   auth=auth, mcp=args.mcp, block=True, jobs=jobs)
    finally:
        jobs.stop()  # a running job goes back to the queue, to run again at the next start
    return 0


def _generate(args: argparse.Namespace, settings: Any) -> int:
    from app.config import VideoParams
    from app.service import GenerationRequest

    service = _make_service(args, settings)
    from tqdm import tqdm

    bar: dict[str, Any] = {}  # the one live bar, replaced when the stage changes

    def on_progress(p: Any) -> None:
        if args.quiet:
            return
        stage = p.stage if getattr(p, "segments", 1) == 1 else f"{p.segment}/{p.segments} {p.stage}"
        if bar.get("stage") != stage:
            if bar.get("tqdm") is not None:
                bar["tqdm"].close()
            bar.update(stage=stage, tqdm=tqdm(total=p.total, desc=f"{stage:>7}", unit="step", file=sys.stderr))
        bar["tqdm"].n = p.step
        bar["tqdm"].refresh()

    exports = _export_kinds(args)
    req = GenerationRequest(image=args.image, prompt=args.prompt, negative_prompt=args.negative_prompt,
                            seed=args.seed, preset=args.preset,
                            video={name: getattr(args, name) for name in VideoParams.model_fields},
                            segments=1 if args.segments is None else args.segments,
                            segment_prompts=args.segment_prompts,
                            crossfade=0 if args.crossfade is None else args.crossfade, exports=exports)
    service.resolve(req)  # bad input fails here, before the model is even loaded
    service.load()
    try:
        result = service.generate(req, on_progress=on_progress)
    finally:
        if bar.get("tqdm") is not None:
            bar["tqdm"].close()
    for w in result.warnings:
        _say("WARN", w.en)
    if args.json:
        print(json.dumps({"video": str(result.video_path), "metadata": str(result.metadata_path),
                          "exports": {kind: str(path) for kind, path in result.exports.items()},
                          "seed": result.seed, "timings_s": result.timings_s,
                          "peak_vram_gib": result.peak_vram_gib}, ensure_ascii=False))
    else:
        if service.engine and service.engine.demo:
            _say("WARN", "Made with the demo model: the video is noise. / 演示模型生成,输出为噪声。")
        _say("SUCCESS", f"seed {result.seed}, {result.timings_s['total']:.1f} s")
        for path in result.exports.values():
            _say("INFO", f"export / 导出: {path}")
        print(result.video_path)
    return EXIT_OK


def _download(args: argparse.Namespace, settings: Any) -> int:
    from app.engine.components import download_model

    hub_id = args.model or settings.model.source
    target = args.local_dir or settings.model_local_dir
    _say("INFO", f"Downloading {hub_id} into {target} (resumes if interrupted) / 正在下载模型到 {target}")
    path = download_model(hub_id, target, revision=args.revision or settings.model.revision,
                          variant=settings.model.variant, offline=args.offline)
    _say("SUCCESS", f"Model ready in {path} / 模型已就绪")
    return EXIT_OK


def _diagnose(args: argparse.Namespace, settings: Any) -> int:
    from app import diagnose

    return diagnose.run(settings)


def _batch(args: argparse.Namespace, settings: Any) -> int:
    """Queue a folder's images; then make them here (a worker limited to these jobs), or with --no-wait leave
    them to a running app."""
    from app.config import VideoParams
    from app.jobqueue import JobQueue
    from app.jobs.batch import parse_seeds, plan_batch
    from app.service import GenerationRequest

    exports = _export_kinds(args)
    video = {name: getattr(args, name) for name in VideoParams.model_fields}
    service = _make_service(args, settings)
    queue = JobQueue(service, settings)
    try:
        items = plan_batch(args.folder, prompt=args.prompt, prompts_file=args.prompts, seeds=parse_seeds(args.seeds))
        reqs = [GenerationRequest(image=item.image, prompt=item.prompt, seed=item.seed, preset=args.preset,
                                  video=video, negative_prompt=item.negative_prompt if item.negative_prompt is not None
                                  else args.negative_prompt, segments=1 if args.segments is None else args.segments,
                                  crossfade=0 if args.crossfade is None else args.crossfade, exports=exports)
                for item in items]
        labels = [item.label for item in items]
        queue.check(reqs, labels)  # every image and prompt, before the model loads and before anything is queued
        if not args.no_wait and not queue.remote:  # with celery the GPU workers load the model, not this process
            service.load()
            if service.engine is None:
                message = service.status()["message"]
                raise ModelNotReadyError(message.en, message.zh)
        jobs = queue.submit_many(reqs, owner="cli", labels=labels)
    except AppError as exc:
        if exc.exit_code == EXIT_BAD_INPUT:
            exc.en, exc.zh = f"{exc.en} The batch was not queued.", f"{exc.zh} 未加入任何任务。"
        raise
    if args.no_wait:
        print(f"[SUCCESS] Queued {len(jobs)} jobs; a running app (python -m app serve) makes them. / "
              f"已加入 {len(jobs)} 个任务,由运行中的程序(python -m app serve)生成。", file=sys.stderr, flush=True)
        for job, item in zip(jobs, items):
            # stdout: one job a line, for scripts
            print(f"{job.id}\t{item.label}\t{'default' if item.seed is None else item.seed}", flush=True)
        return EXIT_OK
    if service.engine is not None and service.engine.demo:
        _say("WARN", "Demo model: videos are random noise. / 演示模型:输出为噪声。")
    queue.start(only_ids=[job.id for job in jobs])
    try:
        return _run_batch(args, queue, jobs, labels)
    except KeyboardInterrupt:
        for job in jobs:  # Ctrl+C stops the batch: its jobs must not wait for the next app that starts
            queue.cancel(job.id)
        raise
    finally:
        queue.stop()


def _run_batch(args: argparse.Namespace, queue: Any, jobs: list, labels: list[str]) -> int:
    """Wait for each job in order, showing its progress; print each video's path. The exit code: 0 when every
    job is done, else 1 if one failed, 5 if one was cancelled."""
    from tqdm import tqdm

    from app.jobs.store import JobState

    lang = cli_lang()
    ended: dict[JobState, int] = {}
    for n, (job, label) in enumerate(zip(jobs, labels), start=1):
        head = f"[{n}/{len(jobs)}] {label}"
        bar = None if args.quiet else tqdm(total=100, desc=head, unit="%", file=sys.stderr,
                                           bar_format="{desc} {bar} {percentage:3.0f}%{postfix}")

        def show(current: Any, bar: Any = bar) -> None:
            if bar is not None:
                bar.n = round(current.progress * 100)
                bar.set_postfix_str(current.progress_zh if lang == "zh" else current.progress_en, refresh=False)
                bar.refresh()

        try:
            final = queue.wait(job.id, on_progress=show)
        finally:
            if bar is not None:
                bar.close()
        ended[final.state] = ended.get(final.state, 0) + 1
        if final.state is JobState.DONE:
            print(queue.settings.path("outputs") / final.result, flush=True)  # stdout: one video path a line
        else:
            error = (final.error_zh if lang == "zh" else final.error_en) or final.state.value
            _say("ERROR", f"{head}: {error}")
    done = ended.get(JobState.DONE, 0)
    print(f"[{'SUCCESS' if done == len(jobs) else 'WARN'}] {done} of {len(jobs)} videos made. / "
          f"已生成 {done}/{len(jobs)} 个视频。", file=sys.stderr, flush=True)
    if ended.get(JobState.FAILED):
        return EXIT_UNEXPECTED
    return EXIT_CANCELLED if ended.get(JobState.CANCELLED) else EXIT_OK


def _jobs(args: argparse.Namespace, settings: Any) -> int:
    """`python -m app jobs [list|cancel ID|retry ID|clear]`: the queue from a terminal (no model is loaded)."""
    from app.jobs.store import JobState, JobStore, state_text

    store = JobStore(settings.queue_database, max_attempts=settings.service.max_attempts)
    lang = cli_lang()
    if args.action in ("cancel", "retry") and not args.job_id:
        _say("ERROR", f"jobs {args.action} needs a job id (see python -m app jobs list). / "
                      f"jobs {args.action} 需要任务 ID(见 python -m app jobs list)。")
        return EXIT_BAD_INPUT
    if args.action == "cancel":
        job = store.request_cancel(args.job_id)
        if job.state is JobState.RUNNING:
            _say("SUCCESS", f"Job {job.id} stops after its current step. / 任务 {job.id} 将在当前步骤后停止。")
        else:
            _say("SUCCESS", f"Job {job.id}: {job.state.value}. / 任务 {job.id}:{state_text(job.state, 'zh')}。")
        return EXIT_OK
    if args.action == "retry":
        job = store.retry(args.job_id)
        _say("SUCCESS", f"Job {job.id} is queued again. / 任务 {job.id} 已重新排队。")
        return EXIT_OK
    if args.action == "clear":
        removed = store.clear_finished()
        _say("SUCCESS", f"Removed {removed} finished jobs. / 已移除 {removed} 个已结束的任务。")
        return EXIT_OK
    jobs = store.list(limit=1000)
    if not jobs:
        _say("INFO", "The queue is empty. / 队列为空。")
        return EXIT_OK
    place = 0
    for job in jobs:
        if job.state is JobState.QUEUED:
            place += 1
            detail = f"#{place}"
        elif job.state is JobState.RUNNING:
            detail = f"{job.progress:.0%} {job.progress_zh if lang == 'zh' else job.progress_en}".rstrip()
        elif job.state is JobState.DONE:
            detail = job.result or ""
        else:
            detail = (job.error_zh if lang == "zh" else job.error_en) or ""
        prompt = str(job.params.get("prompt") or "")
        prompt = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        print(f"{job.id}  {state_text(job.state, lang):<9}  {prompt:<40}  {detail}", flush=True)
    return EXIT_OK


def _worker(args: argparse.Namespace, settings: Any) -> int:
    _quiet_libraries()
    from app.logging_setup import setup_logging
    from app.worker import run_worker

    # A worker's console is its operator's only view of it: its jobs are logged there too, not only in logs/.
    setup_logging(settings.path("logs"), settings.logging.level, settings.logging.retention_days, console=True)

    return run_worker(settings, source=args.model or settings.model.source, name=args.name, gpu=args.gpu,
                      loglevel=settings.logging.level)
