"""Longer videos (segments that continue from the last frame, cross-fades, extending a finished video) and
the exports made after the MP4, through GenerationService with the tiny model on the CPU."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.errors import CancelledError, InputError
from app.service import GenerationRequest, join_segment, read_frames, segment_seed
from app.video import read_metadata, write_video
from tests.mp4probe import probe


def _req(image, **kw) -> GenerationRequest:
    video = dict(resolution=64, num_frames=kw.pop("num_frames", 4), fps=8, steps=1)
    return GenerationRequest(**{"image": image, "prompt": "a cat walking", "seed": 7, **kw}, video=video)


class SpySampler:
    """The real tiny sampler, keeping each request it gets and each result's frames."""

    def __init__(self, real, on_call=None):
        self.real, self.on_call = real, on_call
        self.requests: list = []
        self.outputs: list[np.ndarray] = []

    def count_tokens(self, prompt):
        return self.real.count_tokens(prompt)

    def __call__(self, req, **kw):
        self.requests.append(req)
        if self.on_call is not None:
            self.on_call(len(self.requests), kw.get("cancel"))
        result = self.real(req, **kw)
        self.outputs.append(result.frames_thwc_uint8.copy())
        return result


class FrameKeeper:
    """A writer that keeps the frames it is given, then writes the video as usual."""

    def __init__(self):
        self.frames: list[np.ndarray] = []

    def __call__(self, frames, fps, out_dir, metadata):
        self.frames.append(np.array(frames))
        return write_video(frames, fps, out_dir, metadata)


@pytest.fixture
def spy_service(settings, tiny_engine):
    from app.service import GenerationService

    def build(on_call=None):
        spy = SpySampler(tiny_engine.sampler, on_call)
        keeper = FrameKeeper()
        svc = GenerationService(settings, lambda: replace(tiny_engine, sampler=spy), writer=keeper)
        svc.load()
        return svc, spy, keeper

    return build


def test_three_segments_of_eight_frames_make_22_and_each_continues_from_the_last_frame(spy_service, image_rgb):
    svc, spy, keeper = spy_service()
    seen: list[tuple[int, int]] = []
    result = svc.generate(_req(image_rgb, num_frames=8, segments=3, seed=11),
                          on_progress=lambda p: seen.append((p.segment, p.segments)))
    info = probe(result.video_path)
    assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", 22, 8)
    assert [r.seed for r in spy.requests] == [11, 12, 13]
    for k in (1, 2):  # segment k+1's input image is segment k's last frame, exactly
        assert np.array_equal(np.asarray(spy.requests[k].image), spy.outputs[k - 1][-1])
    # The join drops each later segment's first frame.
    assert np.array_equal(keeper.frames[0], np.concatenate([spy.outputs[0], spy.outputs[1][1:], spy.outputs[2][1:]]))
    assert sorted(set(seen)) == [(1, 3), (2, 3), (3, 3)]
    meta = read_metadata(result.video_path)
    assert meta["segments"] == [
        {"index": 1, "seed": 11, "prompt": "a cat walking", "input": "image"},
        {"index": 2, "seed": 12, "prompt": "a cat walking", "input": "previous segment's last frame"},
        {"index": 3, "seed": 13, "prompt": "a cat walking", "input": "previous segment's last frame"}]
    assert (meta["crossfade"], meta["total_frames"], meta["video"]["num_frames"]) == (0, 22, 22)


def test_the_metadata_rebuilds_the_same_video_bit_for_bit(spy_service, image_rgb):
    svc, spy, keeper = spy_service()
    first = svc.generate(_req(image_rgb, segments=2, crossfade=2, segment_prompts=["a cat", "a cat jumps"]))
    meta = read_metadata(first.video_path)
    kept_input = first.video_path.with_name(meta["input_image"])
    again = svc.generate(GenerationRequest.from_metadata(meta, str(kept_input)))
    assert [r.prompt for r in spy.requests] == ["a cat", "a cat jumps"] * 2
    assert keeper.frames[0].shape == (4 + 3 - 2, 64, 64, 3)
    assert np.array_equal(keeper.frames[0], keeper.frames[1])
    assert read_metadata(again.video_path)["segments"] == meta["segments"]


def test_crossfade_blends_the_meeting_frames():
    video = np.zeros((4, 2, 2, 3), np.uint8)
    segment = np.full((4, 2, 2, 3), 90, np.uint8)
    joined = join_segment(video, segment, 2)
    assert joined.shape[0] == 4 + 3 - 2
    assert [int(f[0, 0, 0]) for f in joined] == [0, 0, 30, 60, 90]
    assert segment_seed(2 ** 32 - 1, 2) == 0


def test_cancel_during_segment_two_writes_nothing(spy_service, image_rgb, settings):
    cancel = threading.Event()

    def on_call(n, event):
        if n == 2:
            event.set()

    svc, spy, _ = spy_service(on_call)
    with pytest.raises(CancelledError, match="Cancelled"):
        svc.generate(_req(image_rgb, segments=3), cancel=cancel)
    assert len(spy.requests) == 2
    assert list(settings.path("outputs").iterdir()) == []


@pytest.mark.parametrize("kw, en, zh", [
    (dict(segments=9), "segments is 9, outside the allowed range 1–8 (limits.max_segments = 8)", "段数为 9"),
    (dict(segments=0), "segments is 0, outside the allowed range 1–8", "段数为 0"),
    (dict(segments=2.5), "segments must be a whole number", "段数必须是整数"),
    (dict(segments=float("nan")), "segments must be a finite number, got nan", "段数必须是有限的数字"),
    (dict(segments="two"), "segments must be a number, got 'two'", "段数必须是数字"),
    (dict(crossfade=float("inf")), "crossfade must be a finite number, got inf", "交叉淡化帧数必须是有限的数字"),
    (dict(segments=2, crossfade=5), "crossfade is 5, outside the allowed range 0–3 (limits.max_crossfade_frames = 4",
     "交叉淡化帧数为 5"),
    (dict(segments=2, segment_prompts=["a"]), "one prompt per segment (2), got 1", "共 2 段"),
    (dict(exports="gif,mkv"), "Unknown export 'mkv'", "未知的导出格式 'mkv'"),
    (dict(extend_from="../secret.mp4"), "extend_from must be the file name of a video in the outputs folder",
     "extend_from 必须是输出目录中某个视频的文件名"),
    (dict(extend_from="video_20250101_000000_000.mp4"), "is not in the outputs folder", "输出目录中没有"),
])
def test_bad_segments_crossfade_exports_are_refused_before_sampling(spy_service, image_rgb, settings, kw, en, zh):
    svc, spy, _ = spy_service()
    with pytest.raises(InputError) as caught:
        svc.generate(_req(image_rgb, **kw))
    assert en in caught.value.en and zh in caught.value.zh
    assert spy.requests == []
    assert list(settings.path("outputs").iterdir()) == []


def test_extend_continues_a_finished_video_by_one_segment(spy_service, image_rgb):
    svc, spy, keeper = spy_service()
    first = svc.generate(_req(image_rgb, segments=2, seed=20))
    longer = svc.generate(GenerationRequest(image=None, prompt="", extend_from=first.video_path.name))
    assert first.video_path.is_file() and longer.video_path != first.video_path
    info = probe(longer.video_path)
    assert (info["codec"], info["pix_fmt"], info["nb_frames"], info["fps"]) == ("h264", "yuv420p", 7 + 3, 8)
    # The new segment starts from the finished video's last frame, as the MP4 holds it.
    assert np.array_equal(np.asarray(spy.requests[2].image), read_frames(first.video_path)[-1])
    meta = read_metadata(longer.video_path)
    assert [(s["index"], s["seed"]) for s in meta["segments"]] == [(1, 20), (2, 21), (3, 22)]
    assert (meta["seed"], meta["prompt"], meta["extended_from"]) == (20, "a cat walking", first.video_path.name)
    assert Image.open(longer.video_path.with_name(meta["input_image"])).size == Image.open(
        first.video_path.with_name(read_metadata(first.video_path)["input_image"])).size


def test_exports_are_made_beside_the_mp4(spy_service, image_rgb):
    svc, _, _ = spy_service()
    result = svc.generate(_req(image_rgb, exports=["gif", "smooth2"]))
    assert set(result.exports) == {"gif", "smooth2"}
    for path in result.exports.values():
        assert path.parent == result.video_path.parent and path.is_file()
    smooth = probe(result.exports["smooth2"])
    assert (smooth["codec"], smooth["pix_fmt"]) == ("h264", "yuv420p")
    assert read_metadata(result.video_path)["exports"] == {k: p.name for k, p in result.exports.items()}


def test_a_failing_export_keeps_the_video_and_warns(spy_service, image_rgb, monkeypatch):
    import sys
    import types

    from app.errors import AppError

    def broken(video, kind, settings, *, cancel=None):
        raise AppError("the encoder is missing", "缺少编码器")

    fake = types.ModuleType("app.exports")
    fake.EXPORT_KINDS, fake.export = ("smooth2", "smooth4", "loop", "gif", "webm", "frames"), broken
    monkeypatch.setitem(sys.modules, "app.exports", fake)
    svc, _, _ = spy_service()
    result = svc.generate(_req(image_rgb, exports="webm"))
    assert result.video_path.is_file() and result.exports == {}
    assert [w.en for w in result.warnings] == ["The video was saved, but its webm export failed: the encoder is missing"]
    assert "webm 导出失败:缺少编码器" in result.warnings[0].zh
    assert read_metadata(result.video_path)["exports"] == {}
