"""The graph store (app.speedups.graphstore): a start with stored graphs runs the compile regions without
Dynamo and computes what the eager UNet computes; graphs that cannot be described, files that do not load
and graphs that fail fall back to torch.compile's way with a note.

The fast tests trace with the real Dynamo but "compile" each graph to itself (a fake artifact kept in a dict
instead of a file); one test runs the real Inductor (CPU) and loads in a second process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from inductor_cpu import needs_cpp_inductor
import torch
from PIL import Image

from app.speedups.unet import apply_accel, remove_accel
from app.engine.components import load_components
from app.speedups.graphstore import GraphStore, store_folder
from app.config import VideoParams
from app.engine.sampler import I2VGenXLSampler, SampleRequest

REPO = Path(__file__).resolve().parent.parent


class FakeArtifact:
    """Stands in for Inductor's CompiledArtifact: runs Dynamo's graph module as it is."""

    saved: dict[str, "FakeArtifact"] = {}

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm, self.calls = gm, 0

    def __call__(self, *args):
        self.calls += 1
        return self.gm(*args)

    def save(self, *, path: str, format: str) -> None:
        assert format == "binary"
        Path(path).write_bytes(b"fake")
        FakeArtifact.saved[_name(Path(path))] = self


def _name(path: Path) -> str:
    return str(path.parent / path.name.split(".")[0])  # the call key, without ".graph" or a temporary suffix


def _fake_load(path: Path) -> FakeArtifact:
    return FakeArtifact.saved[_name(path)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    FakeArtifact.saved.clear()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def sampler(tiny_model_dir):
    s = I2VGenXLSampler(load_components(tiny_model_dir, dtype=torch.float32), "cpu", torch.float32)
    s.place()
    return s


def _req(image_rgb, steps=2) -> SampleRequest:
    return SampleRequest(image=Image.fromarray(image_rgb), prompt="a cat", negative_prompt="", seed=1,
                         video=VideoParams(resolution=64, num_frames=4, fps=8, steps=steps, guidance_scale=6.0))


def _store_compiler(store_box: list):
    """torch.compile, with the graph store's fake compile and load swapped in once apply_accel made it."""
    def compiler(fn, **kw):
        backend = kw.pop("backend")
        store = backend.__self__
        store._compile, store._load = (lambda gm, ex: FakeArtifact(gm)), _fake_load
        store_box.append(store)
        return torch.compile(fn, backend=backend, **kw)
    return compiler


def _refusing_compiler(fn, **kw):
    def refuse(*a, **k):
        raise AssertionError("torch.compile's way was taken although the graph is stored")
    return refuse


def test_a_second_start_runs_every_region_from_the_store_and_matches_eager(sampler, image_rgb, tmp_path):
    eager = sampler(_req(image_rgb)).frames_thwc_uint8
    box: list = []
    # The app's rewrites on (on the CPU the temporal attention's matmul form stands in for the Triton kernel).
    rewrites = {"share_cfg_prefix": True, "temporal_conv2d": True, "temporal_attention": "math"}
    report = apply_accel(sampler, "regional", compiler=_store_compiler(box), force=True, graph_store=tmp_path,
                         **rewrites)
    first = sampler(_req(image_rgb)).frames_thwc_uint8
    stats = dict(report.graph_store_stats)
    remove_accel(sampler)
    files = sorted(p.name for p in Path(report.graph_store).iterdir())
    assert stats["saved"] > 0 and stats["not_storable"] == 0 and stats["failed"] == 0, (stats, report.notes)
    assert len([f for f in files if f.endswith(".json")]) == len([f for f in files if f.endswith(".graph")]) == stats["saved"]
    assert not [f for f in files if f.endswith(".tmp")]

    # A new start: a fresh store on the same folder, and a compiler that fails if anything reaches it.
    def load_only(fn, **kw):
        store = kw["backend"].__self__
        store._load = _fake_load
        box.append(store)
        return _refusing_compiler(fn, **kw)

    report2 = apply_accel(sampler, "regional", compiler=load_only, force=True, graph_store=tmp_path, **rewrites)
    second = sampler(_req(image_rgb)).frames_thwc_uint8
    assert report2.graph_store == report.graph_store
    assert report2.graph_store_stats["loaded"] == stats["saved"] and report2.graph_store_stats["failed"] == 0
    assert report2.compile == "regional", report2.notes  # no fallback to eager happened
    # The stored graphs compute exactly what the traced ones did; the rewrites round a little differently from
    # the plain eager UNet (float32 on the CPU).
    assert (second == first).all()
    assert np.abs(first.astype(int) - eager.astype(int)).max() <= 1
    assert all(a.calls > 0 for a in FakeArtifact.saved.values())


def test_the_store_folder_changes_with_the_settings_that_change_a_graph(tmp_path):
    cpu = torch.device("cpu")
    base = {"regions": "layers", "temporal_attention": "math"}
    assert store_folder(tmp_path, cpu, base) == store_folder(tmp_path, cpu, dict(base))
    assert store_folder(tmp_path, cpu, base) != store_folder(tmp_path, cpu, {**base, "temporal_attention": "triton"})
    assert store_folder(tmp_path, cpu, base).parent == tmp_path


def test_a_graph_file_that_does_not_load_is_compiled_again_with_a_note(sampler, image_rgb, tmp_path, caplog):
    eager = sampler(_req(image_rgb, steps=1)).frames_thwc_uint8
    report = apply_accel(sampler, "regional", compiler=_store_compiler([]), force=True, graph_store=tmp_path)
    sampler(_req(image_rgb, steps=1))
    saved = report.graph_store_stats["saved"]
    remove_accel(sampler)
    torch._dynamo.reset()

    def broken_load(path):
        raise EOFError("truncated file")

    def compiler(fn, **kw):
        store = kw["backend"].__self__
        store._compile, store._load = (lambda gm, ex: FakeArtifact(gm)), broken_load
        return torch.compile(fn, **kw)

    with caplog.at_level("WARNING"):
        report2 = apply_accel(sampler, "regional", compiler=compiler, force=True, graph_store=tmp_path)
        again = sampler(_req(image_rgb, steps=1)).frames_thwc_uint8
    stats = report2.graph_store_stats
    assert stats["loaded"] == 0 and stats["failed"] == saved and stats["saved"] == saved, stats
    assert any("did not load" in n and "EOFError: truncated file" in n for n in report2.notes), report2.notes
    assert "did not load" in caplog.text
    assert (again == eager).all()


def test_a_stored_graph_that_fails_runs_the_compiled_way_for_that_call(sampler, image_rgb, tmp_path):
    eager = sampler(_req(image_rgb, steps=1)).frames_thwc_uint8
    report = apply_accel(sampler, "regional", compiler=_store_compiler([]), force=True, graph_store=tmp_path)
    sampler(_req(image_rgb, steps=1))
    remove_accel(sampler)

    class Broken:
        def __call__(self, *args):
            raise RuntimeError("kernel launch failed")

    def compiler(fn, **kw):
        store = kw["backend"].__self__
        store._load = lambda path: Broken()
        return fn  # "compiled" = eager: what torch.compile's way gives here

    report2 = apply_accel(sampler, "regional", compiler=compiler, force=True, graph_store=tmp_path)
    again = sampler(_req(image_rgb, steps=1)).frames_thwc_uint8
    assert report2.compile == "regional"
    assert report2.graph_store_stats["loaded"] == report.graph_store_stats["saved"]
    assert any("a stored graph failed (RuntimeError: kernel launch failed)" in n for n in report2.notes)
    assert (again == eager).all()


def test_a_graph_whose_inputs_cannot_be_named_is_not_stored(tmp_path):
    store = GraphStore(tmp_path)
    module = torch.nn.Linear(3, 3)
    slot = {"artifact": object(), "inputs": ["L['x']", None], "called_with": [torch.zeros(1), torch.zeros(1)],
            "returned": [torch.zeros(1)]}
    assert store.keep("k", slot, {"self": module, "x": slot["called_with"][0]}, slot["returned"][0]) is None
    # A source that names another tensor than the graph was called with.
    slot["inputs"] = ["L['x']", "L['self']._parameters['weight']"]
    assert store.keep("k", slot, {"self": module, "x": slot["called_with"][0]}, slot["returned"][0]) is None
    # A source that is not a plain name (here a call) is refused too.
    slot["inputs"] = ["L['x']", "L['self'].weight.zero_()"]
    assert store.keep("k", slot, {"self": module, "x": slot["called_with"][0]}, slot["returned"][0]) is None
    assert store.stats["not_storable"] == 3 and not list(tmp_path.iterdir())
    assert module.weight.abs().sum() > 0  # the refused source was never evaluated


def test_with_grad_enabled_the_compiled_way_is_taken(tmp_path):
    store = GraphStore(tmp_path)
    module = torch.nn.Linear(2, 2)
    calls = []
    region = store.wrap(module, module.forward, lambda *a, **k: calls.append(a) or module.forward(*a, **k))
    with torch.enable_grad():
        region(torch.zeros(1, 2))
    assert len(calls) == 1 and not list(tmp_path.iterdir())


def test_no_store_folder_uses_no_store(sampler):
    report = apply_accel(sampler, "regional", compiler=lambda fn, **kw: fn, force=True)
    assert report.graph_store is None


REAL_CHILD = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from diffusers.models.resnet import ResnetBlock2D
    from app.speedups.graphstore import GraphStore

    folder, mode, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if mode == "corrupt":  # every stored graph and every file of Inductor's cache cut to half its length
        import os
        for root in (folder, Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])):
            for f in [f for f in root.rglob("*") if f.is_file()]:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    torch.manual_seed(seed)  # other weights and inputs in each process: the stored graph holds neither
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4).eval().requires_grad_(False)
    x, temb = torch.randn(2, 8, 8, 8), torch.randn(2, 16)
    store = GraphStore(folder)
    forward = block.forward
    if mode in ("save", "corrupt"):
        compiled = torch.compile(forward, backend=store.backend, fullgraph=True, dynamic=False)
    else:
        def compiled(*a, **k):
            raise AssertionError("Dynamo was asked to trace")
    block.forward = store.wrap(block, forward, compiled)
    with torch.no_grad():
        out = block(x, temb)
        ref = forward(x, temb)
    print(json.dumps({"stats": store.stats, "notes": store.notes, "max_diff": float((out - ref).abs().max()),
                      "weights": float(block.conv1.weight.sum()), "scale": float(ref.abs().max()),
                      "frames": torch._dynamo.utils.counters["stats"]["unique_graphs"]}))
""")


@needs_cpp_inductor
def test_real_inductor_graphs_saved_in_one_process_run_in_the_next_without_dynamo(tmp_path):
    """Inductor (C++ on the CPU) through standalone_compile; the second process never traces, and its other
    weights and inputs give its own eager output, not the first process's. A third process finds the store and
    Inductor's cache damaged, compiles again and still computes eager's output."""
    script = tmp_path / "child.py"
    script.write_text(REAL_CHILD, encoding="utf-8")
    env = {"PYTHONPATH": str(REPO), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    results = []
    for mode, seed in (("save", "0"), ("load", "1"), ("corrupt", "2")):
        run = subprocess.run([sys.executable, str(script), str(tmp_path / "graphs"), mode, seed], capture_output=True,
                             text=True, env=env, cwd=REPO, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    saved, loaded, corrupt = results
    assert saved["stats"]["saved"] == 1 and saved["frames"] == 1, saved
    assert loaded["stats"]["loaded"] == 1 and loaded["frames"] == 0 and loaded["stats"]["failed"] == 0, loaded
    assert saved["weights"] != loaded["weights"]
    assert saved["max_diff"] < 1e-5 * saved["scale"] and loaded["max_diff"] < 1e-5 * loaded["scale"], (saved, loaded)
    # A damaged store and compile cache: the graph does not load (said in a note), is compiled again, and the
    # result is still eager's.
    assert corrupt["stats"]["loaded"] == 0 and corrupt["stats"]["failed"] == 1 and corrupt["frames"] == 1, corrupt
    assert "did not load" in corrupt["notes"][0], corrupt["notes"]
    assert corrupt["max_diff"] < 1e-5 * corrupt["scale"], corrupt
