"""What stands in for Dynamo's guards in the graph store (app.speedups.graphstore, app.speedups.regions).

A stored graph runs without Dynamo, so nothing checks that the region and the process are still what the
graph was traced for, unless the call key does. Here a small region is traced by the real Dynamo and stored
(a fake artifact: Dynamo's own graph module, kept in a dict), then a new "start" changes one thing Dynamo would
have guarded on: the stored graph must not be used, and the output must be eager's. Things the key leaves out
on purpose (buffer and weight values, which are graph inputs) must stay correct instead.
"""

from __future__ import annotations

import enum
from pathlib import Path

import pytest
import torch

from app.engine.components import load_components
from app.engine.sampler import I2VGenXLSampler, SampleRequest
from app.config import VideoParams
from app.speedups.graphstore import GraphStore, store_folder
from app.speedups.regions import NotDescribable, module_signature
from app.speedups.unet import apply_accel


class Mode(enum.Enum):
    A = "a"
    B = "b"


class Scaler:
    """Stands in for an attention processor: an object whose own attributes decide what it computes."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.factor


class OtherScaler(Scaler):
    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.factor + 1


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("shift", torch.zeros(4))
        self.scale = 1.0
        self.pair = (1, 2)
        self.mode = Mode.A
        self.extra: float | None = None
        self._private = 0
        self.proc = Scaler(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x) * self.scale + self.shift
        if self.mode is Mode.B:
            y = y + 1
        if self.extra is not None:
            y = y * self.extra
        if self._private:
            y = y - 1
        return self.proc(y + self.pair[0])


class FakeArtifact:
    saved: dict[str, "FakeArtifact"] = {}

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm

    def __call__(self, *args):
        return self.gm(*args)

    def save(self, *, path: str, format: str) -> None:
        Path(path).write_bytes(b"fake")
        FakeArtifact.saved[Path(path).name.split(".")[0]] = self


def _fake_load(path: Path) -> FakeArtifact:
    return FakeArtifact.saved[path.name.split(".")[0]]


@pytest.fixture(autouse=True)
def fresh():
    FakeArtifact.saved.clear()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _block() -> Block:
    torch.manual_seed(0)
    return Block().eval().requires_grad_(False)


def _first_start(block: Block, folder: Path) -> GraphStore:
    """Trace and store the block's graph, as a first start does."""
    store = GraphStore(folder, compile_graph=lambda gm, ex: FakeArtifact(gm), load_graph=_fake_load)
    forward = block.forward
    compiled = torch.compile(forward, backend=store.backend, fullgraph=True, dynamic=False)
    block.forward = store.wrap(block, forward, compiled)
    with torch.no_grad():
        block(torch.randn(2, 4))
    block.__dict__.pop("forward")
    assert store.stats["saved"] == 1, (store.stats, store.notes)
    return store


class Restart:
    """A later start on the same folder: `traced` counts the calls that took torch.compile's way (here eager)."""

    def __init__(self, block: Block, folder: Path):
        self.store = GraphStore(folder, compile_graph=lambda gm, ex: FakeArtifact(gm), load_graph=_fake_load)
        self.block, self.traced = block, 0
        forward = block.forward

        def compiled(*args, **kwargs):
            self.traced += 1
            return forward(*args, **kwargs)

        self.eager = forward
        block.forward = self.store.wrap(block, forward, compiled)

    def check(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block; its output must be eager's, whichever way it went."""
        with torch.no_grad():
            out = self.block(x)
            ref = self.eager(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        return out


def test_an_unchanged_region_runs_its_stored_graph(tmp_path):
    block = _block()
    _first_start(block, tmp_path)
    again = Restart(block, tmp_path)
    again.check(torch.randn(2, 4))
    assert again.traced == 0 and again.store.stats["loaded"] == 1


def _set(name: str, value):
    def change(block: Block) -> None:
        setattr(block, name, value)
    return change


MODULE_CHANGES = {
    "plain number": _set("scale", 3.0),
    "number of another type": _set("scale", 1),
    "tuple": _set("pair", (5, 2)),
    "enum": _set("mode", Mode.B),
    "None to a value": _set("extra", 0.5),
    "private attribute": _set("_private", 1),
    "object's own attribute": lambda b: setattr(b.proc, "factor", 5.0),
    "object of another class": _set("proc", OtherScaler(2.0)),
    "inner module's attribute": lambda b: setattr(b.lin, "in_features", 5),
    "buffer's dtype": lambda b: setattr(b, "shift", torch.zeros(4, dtype=torch.float64)),
    "buffer's shape": lambda b: setattr(b, "shift", torch.zeros(1)),
}


@pytest.mark.parametrize("change", MODULE_CHANGES.values(), ids=MODULE_CHANGES.keys())
def test_a_changed_region_never_runs_the_graph_stored_before(tmp_path, change):
    block = _block()
    _first_start(block, tmp_path)
    change(block)  # after the store was made and after the region was wrapped: the key is made on every call
    again = Restart(block, tmp_path)
    again.check(torch.randn(2, 4))
    assert again.traced == 1 and again.store.stats["loaded"] == 0


def _tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on


GLOBAL_CHANGES = {  # name: (change, undo)
    "TF32 matmul": (lambda: _tf32(True), lambda: _tf32(False)),
    "float32 matmul precision": (lambda: torch.set_float32_matmul_precision("medium"),
                                 lambda: torch.set_float32_matmul_precision("highest")),
    "deterministic algorithms": (lambda: torch.use_deterministic_algorithms(True),
                                 lambda: torch.use_deterministic_algorithms(False)),
    "default dtype": (lambda: torch.set_default_dtype(torch.float64), lambda: torch.set_default_dtype(torch.float32)),
    "cuDNN TF32": (lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
                   lambda: setattr(torch.backends.cudnn, "allow_tf32", True)),
}


@pytest.mark.parametrize("change", GLOBAL_CHANGES.values(), ids=GLOBAL_CHANGES.keys())
def test_changed_process_state_never_runs_the_graph_stored_before(tmp_path, change):
    block = _block()
    _first_start(block, tmp_path)
    do, undo = change
    x = torch.randn(2, 4)
    do()
    try:
        again = Restart(block, tmp_path)
        again.check(x)
    finally:
        undo()
    assert again.traced == 1 and again.store.stats["loaded"] == 0


def test_cpu_autocast_takes_the_compiled_way(tmp_path):
    block = _block()
    _first_start(block, tmp_path)
    again = Restart(block, tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        block(torch.randn(2, 4))
    assert again.traced == 1 and again.store.stats["loaded"] == 0


def test_weight_and_buffer_values_are_graph_inputs_and_stay_correct(tmp_path):
    block = _block()
    _first_start(block, tmp_path)
    with torch.no_grad():
        block.lin.weight.normal_()
        block.shift.fill_(0.25)
    again = Restart(block, tmp_path)
    again.check(torch.randn(2, 4))
    assert again.traced == 0 and again.store.stats["loaded"] == 1


def test_a_forward_hook_inside_the_region_keeps_it_off_the_store_with_a_note(tmp_path):
    block = _block()
    _first_start(block, tmp_path)
    block.lin.register_forward_hook(lambda m, a, out: out * 10)
    again = Restart(block, tmp_path)
    out = again.check(torch.randn(2, 4))
    again.check(torch.randn(2, 4))
    assert again.traced == 2 and again.store.stats["loaded"] == 0 and again.store.stats["not_described"] == 2
    assert again.store.notes == ["graph store: not used for Block (lin has a forward hook); it is compiled the "
                                 "ordinary way"]  # said once
    assert out.abs().max() > 0


def test_a_value_the_key_cannot_name_keeps_the_region_off_the_store(tmp_path):
    block = _block()
    block.helper = lambda y: y  # a lambda's name is the same in every process, whatever it does
    store = GraphStore(tmp_path, compile_graph=lambda gm, ex: FakeArtifact(gm), load_graph=_fake_load)
    forward = block.forward
    block.forward = store.wrap(block, forward, torch.compile(forward, backend=store.backend, fullgraph=True))
    with torch.no_grad():
        out = block(torch.randn(2, 4))
    assert store.stats["saved"] == 0 and not list(tmp_path.iterdir()) and out.shape == (2, 4)
    assert store.notes[0].startswith("graph store: not used for Block (helper is a function defined at run time ("
                                     "test_a_value_the_key_cannot_name_keeps_the_region_off_the_store.<locals>"
                                     ".<lambda>)); it is compiled the ordinary way"), store.notes
    with pytest.raises(NotDescribable, match="defined at run time"):
        module_signature(block)


def test_the_region_signature_names_every_kind_of_attribute():
    block = _block()
    block.kernel = torch.ops.aten.add.Tensor  # a registered operator, as the Triton attention processor holds
    sig = module_signature(block)
    for part in ("('kernel', ('op', 'aten.add.Tensor'))", "('scale', ('float', 1.0))", "('pair', ('tuple', [('int', 1), ('int', 2)]))",
                 "Mode', 'A')", "('extra', ('NoneType', None))", "('_private', ('int', 0))",
                 "Scaler', [('factor', ('float', 2.0))]", "('shift', ((4,), (1,), 'torch.float32'))"):
        assert part in sig, part


def test_inductors_config_names_the_store_folder(tmp_path):
    cpu = torch.device("cpu")
    base = store_folder(tmp_path, cpu, {})
    with torch._inductor.config.patch(freezing=True):
        assert store_folder(tmp_path, cpu, {}) != base  # frozen graphs would carry one start's weights
    with torch._inductor.config.patch(max_autotune=True):
        assert store_folder(tmp_path, cpu, {}) != base
    with torch._inductor.config.patch(compile_threads=1):  # how it compiles, not what
        assert store_folder(tmp_path, cpu, {}) == base
    assert store_folder(tmp_path, cpu, {}) == base


def test_a_graph_with_inputs_named_in_an_unknown_way_is_not_stored_and_said_once(tmp_path):
    store = GraphStore(tmp_path)
    module = torch.nn.Linear(3, 3)
    x = torch.zeros(1)
    for _ in range(2):
        slot = {"artifact": object(), "inputs": ["G['x']"], "called_with": [x], "returned": [x]}
        assert store.keep("k", slot, {"self": module, "x": x}, x) is None
    assert store.stats["not_storable"] == 2
    assert len(store.notes) == 1 and "graph store: a compiled graph was not stored (a graph input's source name is not " \
        "understood: not a plain source name: \"G['x']\"); later starts compile it again" == store.notes[0]


class _ConfigWithoutDeterministic:
    """torch._inductor.config of a torch that has no `deterministic` option (torch's own error text)."""

    def __getattr__(self, name):
        raise AttributeError(f"torch._inductor.config.{name} does not exist")

    def __setattr__(self, name, value):
        raise AttributeError(f"torch._inductor.config.{name} does not exist")


def test_a_torch_without_an_inductor_option_runs_eager_with_a_note(tiny_model_dir, image_rgb, monkeypatch, tmp_path):
    from PIL import Image

    sampler = I2VGenXLSampler(load_components(tiny_model_dir, dtype=torch.float32), "cpu", torch.float32)
    sampler.place()
    req = SampleRequest(image=Image.fromarray(image_rgb), prompt="a cat", negative_prompt="", seed=1,
                        video=VideoParams(resolution=64, num_frames=2, fps=8, steps=1, guidance_scale=6.0))
    eager = sampler(req).frames_thwc_uint8
    monkeypatch.setattr(torch._inductor, "config", _ConfigWithoutDeterministic())
    compiled = []
    report = apply_accel(sampler, "regional", compiler=lambda fn, **kw: compiled.append(fn) or fn, force=True,
                         deterministic=True, graph_store=tmp_path)
    assert report.compile == "off" and not report.deterministic and not compiled
    assert report.notes == ["torch.compile unavailable (AttributeError: torch._inductor.config.deterministic does "
                            "not exist); running eager"]
    assert (sampler(req).frames_thwc_uint8 == eager).all()
