"""torch.compile: the model compiles whole (fresh, resumed, class-conditional, eval), the training step
compiles once and never again, train.compile resolves per device, and a compiler failure falls back to eager."""

import json
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
from helpers import GLOW_LAYERS, compile_with
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

from glowtrain import train as train_module
from glowtrain.compilation import LazyCompile, compile_enabled
from glowtrain.config import apply_overrides, default_config
from glowtrain.errors import UserError
from glowtrain.model import Glow
from glowtrain.train import Trainer, train

SHAPE = (3, 16, 16)


def _model(**kwargs) -> Glow:
    torch.manual_seed(0)
    return Glow(SHAPE, n_levels=2, n_steps=2, hidden_channels=16, **kwargs)


def _graphs(fn, *args) -> tuple[int, int]:
    """(graphs, graph breaks) that dynamo makes of fn(*args)."""
    dynamo.reset()
    explained = dynamo.explain(fn)(*args)
    return explained.graph_count, explained.graph_break_count


def _images(n=4):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1)) - 0.5


def _fresh():
    model = _model()
    model.initialize(_images())
    return model, (_images(),)


def _loaded():
    """What a resume or a rollback does: a new model given a saved state dict."""
    source, _ = _fresh()
    model = _model()
    model.load_state_dict(source.state_dict())
    return model, (_images(),)


def _class_conditional(with_labels: bool):
    def build():
        model = _model(n_classes=5)
        labels = torch.tensor([0, 4, 2, 1])
        model.initialize(_images(), labels)
        return model, (_images(), labels) if with_labels else (_images(),)
    return build


CASES = {"fresh": _fresh, "after load_state_dict": _loaded, "class-conditional": _class_conditional(True),
         "class-conditional marginal": _class_conditional(False)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_model_compiles_to_one_graph(case, mode):
    model, args = CASES[case]()
    model.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        assert _graphs(model, *args) == (1, 0)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(*args)[0], model(*args)[0], rtol=0, atol=0)


def test_memory_saving_leaves_each_level_eager_and_compiles_the_rest():
    """The README's figure: with memory saving, each level's flow steps are one graph break (they run eager)."""
    model, (x,) = _fresh()
    model.set_memory_saving(True)
    assert _graphs(model, x.requires_grad_()) == (model.n_levels + 1, model.n_levels)


def test_labels_out_of_range_are_refused_in_eager_mode():
    model, (x, _) = _class_conditional(True)()
    with pytest.raises(ValueError, match="labels must lie in 0..4"):
        model(x, torch.tensor([0, 1, 5, 2]))


@pytest.mark.parametrize(("setting", "device", "expected"), [
    ("on", "cpu", True), ("off", "cpu", False), ("auto", "cpu", False), ("off", "cuda", False)])
def test_train_compile_resolves_per_device(setting, device, expected):
    assert compile_enabled(setting, torch.device(device)) is expected


def test_auto_compiles_on_cuda_exactly_when_triton_is_there(monkeypatch):
    import torch.utils._triton as triton

    for available in (True, False):
        monkeypatch.setattr(triton, "has_triton", lambda available=available: available)
        assert compile_enabled("auto", torch.device("cuda")) is available


@pytest.mark.parametrize(("value", "expected"), [("true", "on"), ("false", "off"), ("auto", "auto"), ("on", "on")])
def test_compile_accepts_the_booleans_of_older_configs(value, expected):
    assert apply_overrides(default_config(), [f"train.compile={value}"]).train.compile == expected


STEP_RUN = ["run.device=cpu", "model.n_levels=2", "model.n_steps=2", "model.hidden_channels=8", "train.batch_size=8",
            "train.grad_accum_steps=2", "train.init_batch_size=32", "train.eval_batch_size=300", "train.steps=6",
            "train.warmup_steps=3", "train.log_every=2", "train.eval_every=3", "train.sample_every=100",
            "train.checkpoint_every=3", "train.n_samples=1", "train.sample_temperatures=[0]", "train.compile=on",
            *GLOW_LAYERS]


# Graphs of the whole training step's forward and backward: one for the model; one per level for its flow
# steps (one shape per level), and one more for the very first step, whose input (the image) needs no gradient.
GRAPHS_BY_SCOPE = {"model": 1, "steps": 3}


@pytest.mark.parametrize("scope", GRAPHS_BY_SCOPE)
def test_the_training_step_compiles_once_and_is_never_recompiled(tmp_path, monkeypatch, scope):
    """Forward and backward (AOTAutograd), across warm-up learning rates, logging, evaluation with another
    batch size, checkpoints, and a resume."""
    compile_with(monkeypatch, "aot_eager")
    graphs_by_step = []

    class Counting(Trainer):
        def prepare_batch(self, images, labels):
            graphs_by_step.append(counters["stats"]["unique_graphs"])
            return super().prepare_batch(images, labels)

    dynamo.reset()
    counters.clear()
    cfg = apply_overrides(default_config(), [*STEP_RUN, f"train.compile_scope={scope}"])
    # A scope of flow steps compiles one function (FlowSequence.forward) for several shapes: recompiles by design.
    with torch._dynamo.config.patch(error_on_recompile=scope == "model"):
        train(apply_overrides(cfg, ["train.steps=3"]), out=str(tmp_path / "run"), progress=False, trainer=Counting)
        first_run = counters["stats"]["unique_graphs"]
        train(cfg, out=str(tmp_path / "run"), resume="auto", progress=False, trainer=Counting)
    # Compiled at the first step; the resumed run's new Trainer passes the guards and reuses the graphs.
    graphs = GRAPHS_BY_SCOPE[scope]
    assert first_run == graphs and counters["stats"]["unique_graphs"] == graphs
    assert graphs_by_step == [0] + [graphs] * 5


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward graph did not compile")


def _failing_in_backward(module, mode=None, **kwargs):
    def call(*args):
        output = module(*args)
        return output._replace(loss=_FailingBackward.apply(output.loss))
    return call


def _failing_in_forward(function, mode=None, **kwargs):
    def call(*args, **kwargs):
        raise RuntimeError("the step's graph did not compile")
    return call


@pytest.mark.parametrize("scope, broken_compile, message", [
    ("model", _failing_in_backward, "backward graph did not compile"),
    ("steps", _failing_in_forward, "the step's graph did not compile")])
def test_a_compiler_failure_in_the_first_step_falls_back_to_eager_with_the_same_result(
        tmp_path, monkeypatch, capsys, scope, broken_compile, message):
    cfg = apply_overrides(default_config(), STEP_RUN + ["train.steps=2", "train.grad_accum_steps=1",
                                                        f"train.compile_scope={scope}"])
    eager = train(apply_overrides(cfg, ["train.compile=off"]), out=str(tmp_path / "eager"), progress=False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match=f"torch.compile failed .*{message}") as warned:
        fallen_back = train(cfg, out=str(tmp_path / "compiled"), progress=False)
    assert len([w for w in warned if "torch.compile" in str(w.message)]) == 1
    assert fallen_back.test == eager.test and fallen_back.step == 2
    assert "compiled in" not in capsys.readouterr().out  # it did not: the step ran eager


def _raise_in(filename: str, message: str):
    """A function that raises `message` as code in `filename` would (the frame torch's traceback shows)."""
    namespace = {}
    exec(compile(f"def fail():\n    raise RuntimeError({message!r})\n", filename, "exec"), namespace)
    return namespace["fail"]


IN_CUDAGRAPH_TREES = _raise_in("/site-packages/torch/_inductor/cudagraph_trees.py", "CUDA error: unknown error")
# CUDA graphs' own words, raised from C++ where the step's eager code reads a replayed graph's output.
SAID_BY_CUDA_GRAPHS = _raise_in("/site-packages/glowtrain/flows.py", "Error: accessing tensor output of CUDAGraphs "
                                                                     "that has been overwritten by a subsequent run")
IN_THE_STEP = _raise_in("/site-packages/glowtrain/flows.py", "CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("mode, failing_step, fail, falls_back", [
    ("reduce-overhead", 2, IN_CUDAGRAPH_TREES, True), ("reduce-overhead", 3, IN_CUDAGRAPH_TREES, True),
    ("reduce-overhead", 4, IN_CUDAGRAPH_TREES, False), ("reduce-overhead", 2, IN_THE_STEP, False),
    ("reduce-overhead", 3, SAID_BY_CUDA_GRAPHS, True),
    ("default", 1, IN_THE_STEP, True), ("default", 2, IN_CUDAGRAPH_TREES, False)])
def test_with_cuda_graphs_a_failure_in_recording_or_first_replay_falls_back_to_eager_too(
        monkeypatch, mode, failing_step, fail, falls_back):
    """CUDA graphs warm up in the first step, record in the second and first replay in the third: a capture error
    there is the compiler's too. Later, as in any step after the first without them, an error is the step's own,
    and so is one in the second and third steps that did not come from the compiler's code."""
    monkeypatch.setattr(torch, "compile", lambda module, **options: lambda *args: module(*args))
    compiled = LazyCompile(torch.nn.Identity(), True, mode)
    undone, steps = [], []

    def work():
        steps.append(compiled.active)
        if len(steps) == failing_step:
            fail()
        return len(steps)

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for _ in range(failing_step - 1):
            compiled.first_use(work, lambda: undone.append(True))
        if falls_back:
            assert compiled.first_use(work, lambda: undone.append(True)) == failing_step + 1  # run again, eager
        else:
            with pytest.raises(RuntimeError, match="CUDA error"):
                compiled.first_use(work, lambda: undone.append(True))
    assert [str(w.message).split(" (")[0] for w in warned] == (["torch.compile failed"] if falls_back else [])
    assert undone == ([True] if falls_back else [])
    assert compiled.active is not falls_back and not compiled.pending
    assert steps[-1] is not falls_back  # the step run again ran eager


@pytest.mark.parametrize("compiles", [True, False])
def test_the_compiling_step_is_timed_and_left_out_of_the_images_per_second(tmp_path, monkeypatch, capsys, compiles):
    """On a clock where compiling takes 100 s and every step 1 s, the first logged speed is a step's: 16 images
    per second (steps of 2 x 8), not 32 images in 101 s; the compile time is said once."""
    clock = [0.0]

    class Clock:  # the trainer's view of time: perf_counter moves only when a step says so
        perf_counter = staticmethod(lambda: clock[0])
        monotonic = staticmethod(time.monotonic)

    class Timed(Trainer):
        def train_step(self, images, labels):
            clock[0] += 100.0 if self.forward.pending else 1.0
            return super().train_step(images, labels)

    compile_with(monkeypatch, "aot_eager")
    monkeypatch.setattr(train_module, "time", Clock)
    cfg = apply_overrides(default_config(), [*STEP_RUN, "train.steps=2", f"train.compile={'on' if compiles else 'off'}",
                                             "train.compile_scope=steps"])
    run = train(cfg, out=str(tmp_path / "run"), progress=False, trainer=Timed)
    logged = [json.loads(line) for line in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]
    first_speed = next(m["images_per_s"] for m in logged if m["split"] == "train")
    assert first_speed == pytest.approx(16.0)
    assert capsys.readouterr().out.count("the first step compiled in 100 s") == (1 if compiles else 0)


def _eager_and_compiled(tmp_path, monkeypatch, overrides: list[str]) -> tuple:
    """(eager run's result, compiled run's result, graphs compiled) of one short run, compiled with aot_eager."""
    cfg = apply_overrides(default_config(), [*STEP_RUN, *overrides])
    eager = train(apply_overrides(cfg, ["train.compile=off"]), out=str(tmp_path / "eager"), progress=False)
    compile_with(monkeypatch, "aot_eager")
    dynamo.reset()
    counters.clear()
    compiled = train(cfg, out=str(tmp_path / "compiled"), progress=False)
    return eager, compiled, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("classes", [0, 10])
def test_compiled_flow_steps_train_as_eager_does_and_leave_evaluation_eager(tmp_path, monkeypatch, classes):
    """Without EMA, evaluation runs the training model itself: its steps run eager there (no graphs for
    evaluation's batch sizes), as the whole model does in the model scope. Labels shape only the prior, outside
    the steps: a class-conditional model compiles the same graphs."""
    eager, compiled, graphs = _eager_and_compiled(tmp_path, monkeypatch, [
        "train.steps=4", "train.ema_decay=0", "train.compile_scope=steps", f"model.n_classes={classes}"])
    assert graphs == GRAPHS_BY_SCOPE["steps"]
    assert compiled.test == pytest.approx(eager.test, abs=1e-5) and compiled.step == eager.step == 4


def test_a_learned_dequantiser_compiles_whole_beside_the_flow_steps(tmp_path, monkeypatch):
    """The default model (spline couplings, variational dequantisation): a graph per level and the noise flow's.
    (The flow's first step needs no graph of its own here: the dequantiser's output needs a gradient.)"""
    eager, compiled, graphs = _eager_and_compiled(tmp_path, monkeypatch, [
        "model.coupling=spline", "model.dequantization=variational", "train.steps=2", "train.compile_scope=steps"])
    assert graphs == 2 + 1
    assert compiled.test == pytest.approx(eager.test, abs=1e-5)


@pytest.mark.parametrize("mode, accumulation, stable", [("reduce-overhead", 2, True), ("max-autotune", 2, True),
                                                        ("reduce-overhead", 1, False), ("default", 2, False)])
def test_cuda_graphs_accumulate_gradients_into_buffers_of_their_own(tmp_path, monkeypatch, mode, accumulation,
                                                                     stable):
    """A CUDA graph overwrites its outputs at its next replay, so a .grad allocated by the compiled backward would
    be gone before the next micro-batch adds to it: with accumulation, .grad buffers are allocated outside the
    graphs once and zeroed in place; without, they are freed each step as usual. Either way the result is eager's."""
    grads_seen = []

    class Watching(Trainer):
        def _clear_grads(self):
            super()._clear_grads()
            grads_seen.append([None if p.grad is None else p.grad.data_ptr() for p in self.model.parameters()])

    overrides = ["train.steps=3", f"train.grad_accum_steps={accumulation}", f"train.compile_mode={mode}",
                 "train.compile_scope=steps"]
    cfg = apply_overrides(default_config(), [*STEP_RUN, *overrides])
    eager = train(apply_overrides(cfg, ["train.compile=off"]), out=str(tmp_path / "eager"), progress=False)
    compile_with(monkeypatch, "aot_eager")
    # The real mark would switch CUDA graphs to marked steps for the rest of this process, GPU tests included.
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    compiled = train(cfg, out=str(tmp_path / "compiled"), progress=False, trainer=Watching)
    assert len(grads_seen) == 3
    if stable:
        assert None not in grads_seen[0] and grads_seen == [grads_seen[0]] * 3
    else:
        assert all(pointer is None for pointers in grads_seen for pointer in pointers)
    assert compiled.test == pytest.approx(eager.test, abs=1e-5)


def test_compiled_steps_keep_a_graph_for_every_level_past_dynamos_limit(monkeypatch):
    """Every level's steps share one function, and dynamo keeps only so many graphs of a function (8 by default;
    2 here, against the 4 this model needs) before quietly running the rest eager. Each graph has static shapes
    (dynamo would make the second level's sizes symbolic and reuse that graph for the third)."""
    symbolic_sizes = []

    def recording(graph, example_inputs):  # a graph with symbolic sizes takes them as inputs of their own
        symbolic_sizes.extend(value for value in example_inputs if isinstance(value, torch.SymInt))
        return aot_eager(graph, example_inputs)
    compile_with(monkeypatch, recording)
    torch.manual_seed(0)
    model = Glow((3, 16, 16), n_levels=3, n_steps=2, hidden_channels=8)
    x = torch.rand(2, 3, 16, 16) - 0.5
    model.initialize(x)
    expected = model(x)[0]
    dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=2):
        compiled = LazyCompile(model, True, regions=model.flow_steps())
        result = compiled(x)[0]
        result.sum().backward()
    assert counters["stats"]["unique_graphs"] == 4 and symbolic_sizes == []
    torch.testing.assert_close(result, expected)
    assert all("forward" not in vars(step) for step in model.flow_steps())  # eager again outside the call


def test_memory_saving_runs_compiled_steps_in_its_forward_and_rebuilds_them_eager(monkeypatch):
    """The forward without autograd compiles one graph per level; backward's rebuild, layer by layer, stays eager."""
    compile_with(monkeypatch, "aot_eager")
    model, (x,) = _fresh()
    model.set_memory_saving(True)
    expected = model(x)[0].sum()
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    dynamo.reset()
    counters.clear()
    result = LazyCompile(model, True, regions=model.flow_steps())(x)[0].sum()
    result.backward()
    assert counters["stats"]["unique_graphs"] == model.n_levels
    torch.testing.assert_close(result, expected)
    for grad, expected_grad in zip((p.grad for p in model.parameters()), expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_lazy_compile_passes_the_mode_on(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: seen.setdefault("mode", mode) and module)
    LazyCompile(torch.nn.Identity(), True, "reduce-overhead")
    assert seen["mode"] == "reduce-overhead"
    seen.clear()
    LazyCompile(torch.nn.Identity(), True, "default")
    assert seen["mode"] is None


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_regions_get_the_mode_and_static_shapes_and_each_call_is_one_cuda_graph_step(monkeypatch, mode):
    """With CUDA graphs, every training forward marks a new step: unmarked, torch would start one at each region
    that owes no backward (memory saving's steps) and free the output the next region takes in."""
    calls, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda function, **options: calls.append(options) or function)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model, (x,) = _fresh()
    compiled = LazyCompile(model, True, mode, regions=model.flow_steps())
    expected = {"mode": None if mode == "default" else mode, "dynamic": False}
    assert calls == [expected] * len(model.flow_steps())
    compiled(x)
    compiled(x)
    assert len(marks) == (2 if mode == "reduce-overhead" else 0)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   UserError("labels must lie in 0..9")])
def test_errors_of_the_step_itself_are_not_taken_for_compiler_failures(error):
    """Out of memory in the first compiled step is not retried eager (which needs more memory), and no warning
    blames the compiler: the error reaches the user as it is, and the module stays compiled."""
    compiled = LazyCompile(torch.nn.Identity(), True)
    undone = []

    def work():
        raise error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error), match=str(error).split(".")[0]):
            compiled.first_use(work, lambda: undone.append(True))
    assert compiled.module is not compiled.eager and compiled.pending and undone == []
