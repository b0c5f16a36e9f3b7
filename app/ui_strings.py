"""Every word the web UI shows, in English and Chinese (terms from GLOSSARY-zh.md).

Static labels go to the browser through gr.I18n and are picked by the browser's language.
Messages made while a request runs (progress, errors, run info) are picked per request from
its Accept-Language header, so both halves of the page speak the same language.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.config import Settings

LANGS = ("en", "zh")

# key: (English, 中文)
STRINGS: dict[str, tuple[str, str]] = {
    # Page ----------------------------------------------------------------------------------------
    "header": (("# Image-to-Video · I2VGen-XL\nOne still image and one sentence in, a short MP4 out, "
                "made on your own GPU."),
               "# 图像转视频 · I2VGen-XL\n输入一张图片和一句话,在你自己的显卡上生成一段短视频 (MP4)。"),
    "input_image": ("Input image", "输入图片"),
    "crop_preview": ("What the model sees (centre crop)", "模型实际看到的画面 (中心裁剪)"),
    "prompt": ("Prompt", "提示词"),
    "prompt_placeholder": ("Describe the motion, e.g. \"waves roll onto the beach\". English works best.",
                           "描述画面中的动作,例如 “waves roll onto the beach”。建议使用英文。"),
    "negative_prompt": ("Negative prompt", "反向提示词"),
    "negative_info": ("What the video should not show.", "视频中不希望出现的内容。"),
    "examples": ("Examples: click one to fill in the image and the prompt", "示例:点击即可填入图片和提示词"),
    "preset": ("Preset", "预设"),
    "advanced": ("Advanced settings", "高级参数"),
    "resolution": ("Resolution (px, square)", "分辨率 (像素,正方形)"),
    "num_frames": ("Number of frames", "帧数"),
    "fps": ("FPS (frame rate)", "帧率 (FPS)"),
    "fps_info": ("Also steers the motion: the model is conditioned on it.", "同时影响运动幅度:帧率是模型的条件输入。"),
    "steps": ("Inference steps", "推理步数"),
    "steps_info": ("More steps: finer detail, longer wait.", "步数越多细节越好,耗时越长。"),
    "guidance": ("Guidance scale", "引导系数 (Guidance Scale)"),
    "guidance_info": ("How closely the video follows the prompt.", "视频遵循提示词的程度。"),
    "seed": ("Seed (-1 = random seed)", "种子 (-1 为随机种子)"),
    "seed_info": ("Same seed and settings, same video while the app runs; a restart may change it slightly.",
                  "应用运行期间,相同种子和设置生成相同视频;重启后可能略有不同。"),
    "seed_random": ("Random", "随机种子"),
    "seed_reuse": ("Reuse last seed", "复用上次种子"),
    "output_options": ("Longer video and output options", "更长视频与输出选项"),
    "segments": ("Segments", "段数"),
    "segments_info": ("Each segment continues from the last frame of the one before; segment k uses seed + k - 1.",
                      "每一段都从上一段的最后一帧继续生成;第 k 段使用种子 + k - 1。"),
    "crossfade": ("Cross-fade (frames)", "交叉淡化 (帧)"),
    "crossfade_info": ("Frames blended where two segments meet; 0 joins them directly.",
                       "两段衔接处混合的帧数;0 表示直接拼接。"),
    "smooth": ("Smoother motion (frame interpolation)", "更流畅的运动 (插帧)"),
    "smooth_off": ("Off", "关闭"),
    "smooth_2": ("×2 frames", "×2 帧"),
    "smooth_4": ("×4 frames", "×4 帧"),
    "exports_pick": ("Also save as", "同时导出为"),
    "export_loop": ("Loop (forward, then backward)", "循环 (正放后倒放)"),
    "export_gif": ("GIF", "GIF 动图"),
    "export_webm": ("WebM", "WebM 视频"),
    "export_frames": ("PNG frames (ZIP)", "PNG 帧序列 (ZIP)"),
    "exports": ("Exported files", "导出文件"),
    "extend": ("Extend by one segment", "延长一段"),
    "extend_nothing": ("Generate a video or pick one in the history first, then extend it.",
                       "请先生成视频或在历史记录中选择一个视频,再进行延长。"),
    "generate": ("Generate video", "生成视频"),
    "cancel": ("Cancel", "取消"),
    "output_video": ("Video", "视频"),
    "info_empty": (("Upload an image, write a prompt and press **Generate video**. "
                    "The seed, the time per stage and the file name will appear here."),
                   "上传图片、填写提示词,然后点击 **生成视频**。种子、各阶段耗时和文件名会显示在这里。"),
    "details": ("All parameters (JSON)", "全部参数 (JSON)"),
    "history": ("History (output folder)", "历史记录 (输出目录)"),
    "history_hint": ("Newest first. Click a video to load it and its settings back.",
                     "最新的在前。点击视频即可载入该视频及其参数。"),
    "refresh": ("Refresh", "刷新"),
    # Presets (the numbers are filled in from the config by translations()) ------------------------
    "preset_fast": ("Fast", "快速模式"),
    "preset_standard": ("Standard quality", "标准质量模式"),
    "preset_high": ("High quality", "高质量模式"),
    "preset_demo": ("Demo model", "演示模型"),
    "preset_numbers": ("{res}p · {frames} frames · {fps} FPS · {steps} steps",
                       "{res}p · {frames} 帧 · {fps} FPS · {steps} 步"),
    # Status bar ------------------------------------------------------------------------------------
    "state_loading": ("Model loading…", "模型加载中…"),
    "state_ready": ("Model ready", "模型就绪"),
    "state_missing": ("Model missing", "未找到模型"),
    "state_error": ("Model failed to load", "模型加载失败"),
    "demo_badge": ("Demo model (output is noise)", "演示模型 (输出为噪声)"),
    "low_vram_badge": ("Low-VRAM mode", "低显存模式"),
    "device_cpu": ("Device: CPU", "设备:CPU"),
    "gpu_line": ("{name} · VRAM used by the app {used:.1f} GiB · free {free:.1f} / {total:.1f} GiB",
                 "{name} · 本程序占用显存 {used:.1f} GiB · 空闲 {free:.1f} / {total:.1f} GiB"),
    "busy": ("Generating…", "正在生成…"),
    "idle": ("Idle", "空闲"),
    # Progress --------------------------------------------------------------------------------------
    "progress_wait_model": ("Waiting for the model to load…", "等待模型加载…"),
    "progress_encode": ("Encoding the image and the prompt…", "正在编码图片和提示词…"),
    "progress_compile": ("Optimising the model for this size (first time only, one to two minutes)…",
                         "首次使用该尺寸,正在优化模型(仅此一次,约一到两分钟)…"),
    "progress_denoise": ("Step {i}/{n} · about {eta} left", "第 {i}/{n} 步 · 预计剩余时间 {eta}"),
    "progress_decode": ("Decoding frames {i}/{n}…", "正在解码帧 {i}/{n}…"),
    "progress_write": ("Writing the MP4…", "正在写入 MP4…"),
    "progress_segment": ("Segment {k}/{n}", "第 {k}/{n} 段"),
    "info_segments": ("{n} segments · cross-fade {c} frames", "{n} 段 · 交叉淡化 {c} 帧"),
    "info_extended": ("Extended from `{name}`", "延长自 `{name}`"),
    "info_exports": ("Exports", "导出文件"),
    # Run info --------------------------------------------------------------------------------------
    "info_file": ("File", "文件"),
    "info_seed": ("Seed", "种子"),
    "info_video": ("{w}×{h} · {frames} frames at {fps} FPS ({seconds:.1f} s)",
                   "{w}×{h} · {frames} 帧 · {fps} FPS (时长 {seconds:.1f} 秒)"),
    "info_time": ("Time", "耗时"),
    "info_peak": ("Peak VRAM", "显存峰值"),
    "info_peak_cpu": ("— (CPU)", "— (CPU 运行)"),
    "stage_encode": ("encode", "编码"),
    "stage_denoise": ("denoise", "去噪"),
    "stage_decode": ("decode", "解码"),
    "stage_write": ("write", "写入"),
    "stage_total": ("total", "总计"),
    "info_from_history": ("Loaded from the history: its image and settings are back in the inputs.",
                          "已从历史记录载入:图片和参数已填入左侧。"),
    # Queue and batch -------------------------------------------------------------------------------
    "queue": ("Queue", "队列"),
    "queue_hint": ("Jobs run one after another, also after a restart of the app. Every page and API client "
                   "sees the same queue.",
                   "任务按顺序逐个运行,应用重启后也会继续。所有页面和 API 客户端看到的是同一个队列。"),
    "queue_empty": ("The queue is empty. Add images with Batch (under Generate video), or send jobs to the API's "
                    "/submit_job.", "队列为空。可在“批量”中添加图片 (位于“生成视频”下方),或通过 API 的 /submit_job 提交任务。"),
    "queue_col_position": ("#", "排队位置"),
    "queue_col_job": ("Job", "任务"),
    "queue_col_prompt": ("Prompt", "提示词"),
    "queue_col_state": ("State", "状态"),
    "queue_col_progress": ("Progress", "进度"),
    "queue_col_eta": ("Time left", "预计剩余时间"),
    "queue_col_result": ("Video or error", "视频或错误"),
    "job_queued": ("Waiting", "排队中"),
    "job_running": ("Running", "运行中"),
    "job_cancelling": ("Cancelling…", "正在取消…"),
    "job_done": ("Done", "已完成"),
    "job_failed": ("Failed", "失败"),
    "job_cancelled": ("Cancelled", "已取消"),
    "job_attempt": ("attempt {n}", "第 {n} 次尝试"),
    "job_cancel": ("Cancel", "取消"),
    "job_retry": ("Retry", "重试"),
    "queue_clear": ("Clear finished jobs", "清除已结束的任务"),
    "queue_refresh": ("Refresh", "刷新"),
    "job_cancel_done": ("Job {id} is cancelled.", "任务 {id} 已取消。"),
    "job_cancel_running": ("Job {id} stops after the current step and writes no file.",
                           "任务 {id} 将在当前步骤结束后停止,不会写入文件。"),
    "job_cancel_ended": ("Job {id} has already ended ({state}).", "任务 {id} 已经结束 ({state})。"),
    "job_retried": ("Job {id} is back in the queue.", "任务 {id} 已重新加入队列。"),
    "queue_cleared": ("{n} finished jobs cleared.", "已清除 {n} 个已结束的任务。"),
    "batch": ("Batch: several images at once", "批量:一次添加多张图片"),
    "batch_hint": ("Each image (and each seed) becomes one job in the queue, with the preset, settings and output "
                   "options above. Nothing is queued unless every image and prompt is valid.",
                   "每张图片 (以及每个种子) 会成为队列中的一个任务,使用上方的预设、参数和输出选项。"
                   "只有所有图片和提示词都有效时才会加入队列。"),
    "batch_images": ("Images", "图片"),
    "batch_prompts": ("Prompts", "提示词"),
    "batch_prompts_info": ("One line for every image, or one line per image in upload order. Empty: the prompt "
                           "above.", "一行提示词用于所有图片,或按上传顺序每张图片一行。留空则使用上方的提示词。"),
    "batch_seeds": ("Seeds (optional)", "种子 (可选)"),
    "batch_seeds_info": ("e.g. 1,2,3: one job per seed for each image. Empty: the seed above.",
                         "例如 1,2,3:每张图片按每个种子各生成一个任务。留空则使用上方的种子。"),
    "queue_add": ("Add to queue", "加入队列"),
    "batch_added": ("{n} jobs added to the queue.", "已将 {n} 个任务加入队列。"),
    "batch_no_images": ("Add one or more images to the batch first.", "请先为批量任务添加一张或多张图片。"),
    "batch_prompt_lines": ("The prompts box has {lines} lines for {images} images: write one line for every image, "
                           "or one line per image. Nothing was queued.",
                           "提示词框有 {lines} 行,而图片有 {images} 张:请填写一行用于所有图片,或每张图片一行。"
                           "未加入任何任务。"),
    "batch_bad_seed": ("Seeds: '{value}' is not a whole number; write them like 1,2,3. Nothing was queued.",
                       "种子:“{value}” 不是整数;请按 1,2,3 的格式填写。未加入任何任务。"),
    "batch_refused": ("{error} Nothing was queued.", "{error}未加入任何任务。"),
    # Messages --------------------------------------------------------------------------------------
    "error_title": ("Error", "错误"),
    "cancelled_title": ("Cancelled", "已取消"),
    "cancel_requested": ("Cancelling: the run stops after the current step and writes no file.",
                         "正在取消:当前步骤结束后停止,不会写入文件。"),
    "cancel_nothing": ("No run of yours is in progress.", "你当前没有正在进行的生成。"),
    "no_last_seed": ("No finished run in this tab yet, so there is no seed to reuse.",
                     "本页面还没有完成的生成,暂无可复用的种子。"),
    "history_missing": ("{name} is no longer in the output folder.", "输出目录中已没有 {name}。"),
    "unexpected": ("Something went wrong ({kind}). Nothing was written; the details are in the log folder {logs}.",
                   "出现意外错误 ({kind}),未写入任何文件;详细信息已写入日志目录 {logs}。"),
    "seconds": ("{s:.1f} s", "{s:.1f} 秒"),
    "minutes": ("{m} min {s} s", "{m} 分 {s} 秒"),
}

_PRESET_KEYS = {"fast": "preset_fast", "standard": "preset_standard", "high": "preset_high", "demo": "preset_demo"}


def text(key: str, lang: str, **values: Any) -> str:
    """The string `key` in `lang` ('en' or 'zh'), formatted with `values`."""
    en, zh = STRINGS[key]
    template = zh if lang == "zh" else en
    return template.format(**values) if values else template


def preset_label(name: str, preset: Any, lang: str) -> str:
    """'Fast · 512p · 16 frames · 8 FPS · 25 steps'; a preset the UI doesn't know keeps its config name."""
    title = text(_PRESET_KEYS[name], lang) if name in _PRESET_KEYS else name
    numbers = text("preset_numbers", lang, res=preset.resolution, frames=preset.num_frames, fps=preset.fps,
                   steps=preset.steps)
    return f"{title} · {numbers}"


def translations(settings: Settings) -> dict[str, dict[str, str]]:
    """The gr.I18n tables. 'zh' also serves zh-CN, zh-TW… through the browser's fallback."""
    out: dict[str, dict[str, str]] = {}
    for i, lang in enumerate(LANGS):
        table = {key: pair[i] for key, pair in STRINGS.items()}
        for name, preset in [*settings.presets.items(), ("demo", settings.demo)]:
            table[f"preset:{name}"] = preset_label(name, preset, lang)
        out[lang] = table
    out["zh-CN"] = out["zh"]
    return out


def pick_lang(accept_language: str | None) -> str:
    """'zh' or 'en' from an Accept-Language header: the first of the two by q-value; English otherwise."""
    best_lang, best_q = "en", -1.0
    for part in (accept_language or "").split(","):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        lang = "zh" if tag.startswith("zh") else "en" if tag.startswith("en") else None
        if lang is None:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > best_q:
            best_lang, best_q = lang, q
    return best_lang


def request_lang(request: Any) -> str:
    """The language of a gr.Request (or of none: English)."""
    headers: Mapping[str, str] | None = getattr(request, "headers", None)
    return pick_lang(headers.get("accept-language") if headers else None)


def duration(seconds: float, lang: str) -> str:
    """'12.3 s' / '2 min 5 s' in `lang`."""
    if seconds < 60:
        return text("seconds", lang, s=seconds)
    m, s = divmod(round(seconds), 60)
    return text("minutes", lang, m=m, s=s)
