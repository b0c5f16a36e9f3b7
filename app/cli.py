"""Command line: `python -m app serve | generate | download | diagnose`.

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
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNEXPECTED,
    AppError,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="Image-to-Video with I2VGen-XL",
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the web UI", epilog=EXIT_CODES_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(serve)
    serve.add_argument("--port", type=int, help="port of the web UI (default: server.port, 7860)")
    serve.add_argument("--listen", action="store_true", help="bind 0.0.0.0 so other machines on the LAN can connect")
    serve.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    serve.add_argument("--auth", metavar="USER:PASS", help="require this login")
    serve.add_argument("--mcp", action="store_true", help="also expose /generate as an MCP tool (gradio[mcp])")

    gen = sub.add_parser("generate", help="make one video from an image and a prompt", epilog=EXIT_CODES_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(gen)
    gen.add_argument("--image", required=True, type=Path, help="input image (PNG, JPEG, WebP, …)")
    gen.add_argument("--prompt", required=True, help="what should happen in the video")
    gen.add_argument("--negative-prompt", help="what the video should not show (default from the config)")
    gen.add_argument("--preset", help="fast, standard or high (values not given below come from it)")
    gen.add_argument("--resolution", type=_number_arg, help="output side in pixels, a multiple of 64 (512, 768)")
    gen.add_argument("--frames", type=_number_arg, dest="num_frames", help="number of frames")
    gen.add_argument("--fps", type=_number_arg, help="frames per second (also conditions the motion)")
    gen.add_argument("--steps", type=_number_arg, help="denoising steps")
    gen.add_argument("--guidance", type=_number_arg, dest="guidance_scale", help="guidance scale")
    gen.add_argument("--seed", type=_number_arg, help="seed; -1 picks a random one")
    gen.add_argument("--segments", type=_number_arg, help="make a longer video of N segments, each continuing "
                                                           "from the last frame of the one before (default 1)")
    gen.add_argument("--segment-prompt", action="append", dest="segment_prompts", metavar="PROMPT",
                     help="the prompt of one segment, once per segment in order (default: --prompt for all)")
    gen.add_argument("--crossfade", type=_number_arg, help="frames blended where two segments meet (default 0)")
    gen.add_argument("--smooth", type=int, choices=[2, 4], help="also export a smoother MP4 with 2× or 4× the frames")
    gen.add_argument("--loop", action="store_true", help="also export a forward-then-backward looping MP4")
    gen.add_argument("--export", metavar="KINDS",
                     help="also export these, comma-separated: gif, webm, frames (a ZIP of PNG frames)")
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
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"model": {}, "server": {}, "paths": {}, "speedups": {}}
    if args.command == "generate" and not args.compile:
        # One video: a first compile takes minutes, far more than it saves on one video.
        out["speedups"]["compile"] = "off"
    if getattr(args, "device", None):
        out["model"]["device"] = args.device
    if getattr(args, "low_vram", None):
        out["model"]["low_vram"] = args.low_vram
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
    from app.config import ConfigError, load_settings

    try:
        settings = load_settings(getattr(args, "config", None), overrides=_overrides(args))
    except ConfigError as exc:
        _say("ERROR", f"configs: {exc}")
        return EXIT_CONFIG
    from app.logging_setup import setup_logging

    log_file = setup_logging(settings.path("logs"), settings.logging.level, settings.logging.retention_days,
                             console=False)
    commands = {"serve": _serve, "generate": _generate, "download": _download, "diagnose": _diagnose}
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
    service.start_loading()
    if args.model == "tiny":
        _say("WARN", "Demo model: videos are random noise. / 演示模型:输出为噪声。")
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

    threading.Thread(target=report_model_state, name="model-report", daemon=True).start()
    from app.jobqueue import JobQueue
    from app.jobs.store import state_text

    jobs = JobQueue(service, settings)
    for job in jobs.start():
        _say("INFO", f"Job {job.id} was running when the app stopped: now {job.state.value}. / "
                     f"任务 {job.id} 在程序停止时正在运行:现为 {state_text(job.state, 'zh')}。")
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

    exports = [f"smooth{args.smooth}"] if args.smooth else []
    exports += ["loop"] if args.loop else []
    exports += [kind.strip() for kind in (args.export or "").split(",") if kind.strip()]
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
