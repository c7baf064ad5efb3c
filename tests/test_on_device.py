"""The training loop on the test device (GLOWTRAIN_TEST_DEVICE; the CPU when unset): it trains there, a run
resumed halfway in deterministic mode ends bit for bit where an uninterrupted one does, its checkpoint
samples reproducibly there, CUDA graphs train as eager does, and every command that reads a run (eval, score,
reconstruct, interpolate, manipulate, sample, glowtrain.load_run) works there."""

import json
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from helpers import GLOW_LAYERS, TEST_DEVICE, assert_same_training_state, compile_with, invoke
from torch._dynamo.utils import counters

import glowtrain
from glowtrain.checkpoint import load_checkpoint, open_run
from glowtrain.config import apply_overrides, default_config
from glowtrain.data import build_dataset
from glowtrain.evaluation import evaluate
from glowtrain.images import sample_images
from glowtrain.optim import GatedAdamax
from glowtrain.runs import RunDir
from glowtrain.train import Trainer, train

STEPS = 4
# train.compile=off: compilation has its own tests (test_compile.py); here it would only add minutes of
# compiling on a GPU to each of the three runs.
TINY = [
    "run.deterministic=true", "train.compile=off", *GLOW_LAYERS,
    "model.n_levels=2", "model.n_steps=2", "model.hidden_channels=16",
    "train.batch_size=16", "train.init_batch_size=32", "train.eval_batch_size=300",
    f"train.steps={STEPS}", "train.log_every=1", f"train.eval_every={STEPS}", f"train.sample_every={STEPS}",
    f"train.checkpoint_every={STEPS}", "train.n_samples=4", "train.warmup_steps=2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, device):
    """(config, the uninterrupted run's directory, the directory of a run stopped halfway and resumed)."""
    cfg = apply_overrides(default_config(), [f"run.device={device}", *TINY])
    root = tmp_path_factory.mktemp("on_device")
    straight, split = root / "straight", root / "split"
    train(cfg, out=str(straight), progress=False)
    train(apply_overrides(cfg, [f"train.steps={STEPS // 2}"]), out=str(split), progress=False)
    train(cfg, out=str(split), resume="auto", progress=False)
    return cfg, straight, split


def _metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput, which legitimately differs between runs."""
    lines = RunDir(run_dir).metrics.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


def test_a_run_trains_on_the_test_device(runs, device):
    cfg, straight, _ = runs
    state = load_checkpoint(RunDir(straight).last)
    assert state["step"] == STEPS and state["config"]["run"]["device"] == str(device)
    raw = torch.load(RunDir(straight).last, weights_only=True)  # each tensor where it was stored: on the CPU
    stored = [*raw["model"].values(), *raw["ema"].values(),
              *(t for moments in raw["optimizer"]["state"].values() for t in moments.values() if torch.is_tensor(t))]
    assert {t.device.type for t in stored} == {"cpu"} and len(stored) > 3 * len(raw["model"])
    train_bpd = [r["bpd"] for r in _metrics(straight) if r["split"] == "train"]
    assert len(train_bpd) == STEPS and train_bpd[-1] < train_bpd[0]  # it learned
    test = [r for r in _metrics(straight) if r["split"] == "test"]
    assert [r["step"] for r in test] == [STEPS] and 0 < test[0]["bpd"] < 8


def test_a_deterministic_run_resumed_halfway_ends_bit_for_bit_where_an_uninterrupted_one_does(runs):
    _, straight_dir, split_dir = runs
    straight, resumed = load_checkpoint(RunDir(straight_dir).last), load_checkpoint(RunDir(split_dir).last)
    assert straight["step"] == resumed["step"] == STEPS
    assert_same_training_state(straight, resumed)
    # Every logged number after the resume point too, the test bits/dim included.
    later = [r for r in _metrics(straight_dir) if r["step"] > STEPS // 2]
    assert later and [r for r in _metrics(split_dir) if r["step"] > STEPS // 2] == later
    # The sample grid drawn at the last step on the device, from a seeded device generator: the same picture.
    grids = sorted(RunDir(straight_dir).samples.glob("*.png"))
    assert grids and [(RunDir(split_dir).samples / g.name).read_bytes() for g in grids] == [
        g.read_bytes() for g in grids]


def test_a_checkpoint_samples_the_same_images_for_the_same_seed_on_the_test_device(runs, device):
    cfg, straight, _ = runs
    model = open_run(None, str(RunDir(straight).last), device=device).model

    def draw(seed: int) -> torch.Tensor:
        return sample_images(model, 6, 0.7, cfg.data.n_bits, torch.Generator(device=device).manual_seed(seed),
                             batch_size=4)

    first = draw(0)
    assert first.shape == (6, *cfg.image_shape) and first.dtype == torch.uint8
    assert torch.equal(draw(0), first) and not torch.equal(draw(1), first)


# CUDA graphs (train.compile_mode: reduce-overhead) where they can go wrong: gradients accumulated over two
# micro-batches, and memory saving's steps, which run without autograd. On a GPU this compiles for real (about
# a minute each); on a CPU Inductor leaves CUDA graphs out, and aot_eager stands in for it to keep this fast.
CUDA_GRAPH_CASES = {
    "whole model, accumulating": ["train.compile_scope=model"],
    "flow steps, accumulating": ["train.compile_scope=steps"],
    "flow steps, accumulating, memory saving": ["train.compile_scope=steps", "train.memory_saving=true"],
}


@pytest.mark.parametrize("case", CUDA_GRAPH_CASES)
def test_cuda_graphs_train_as_eager_does_on_the_test_device(tmp_path, device, monkeypatch, case):
    overrides = [f"run.device={device}", *TINY, "run.deterministic=false", "train.grad_accum_steps=2",
                 "train.compile=on", "train.compile_mode=reduce-overhead", *CUDA_GRAPH_CASES[case]]
    cfg = apply_overrides(default_config(), overrides)
    eager = train(apply_overrides(cfg, ["train.compile=off"]), out=str(tmp_path / "eager"), progress=False)
    if device.type != "cuda":
        compile_with(monkeypatch, "aot_eager")
    counters.clear()
    recorded = []

    class Watching(Trainer):
        def train_step(self, images, labels):
            metrics = super().train_step(images, labels)
            recorded.append(_cuda_graphs_recorded(self.device))
            return metrics

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = train(cfg, out=str(tmp_path / "compiled"), progress=False, trainer=Watching)
    # Neither a fallback to eager nor CUDA graphs' warning that a step's outputs kept it off its fast path, and
    # no graph that CUDA graphs skipped (torch only logs and counts those).
    # (torch 2.11 on the H200 also warns that torch.jit.script_method is deprecated, naming torch.compile: not ours.)
    assert not [str(w.message) for w in caught if "training without it" in str(w.message)
                or "CUDAGraphs" in str(w.message)]
    assert counters["inductor"]["cudagraph_skips"] == 0
    if device.type == "cuda":  # and graphs were recorded: a mode that stopped reaching Inductor would record none
        assert recorded[-1] > 0, recorded
    assert compiled.step == STEPS and compiled.test == pytest.approx(eager.test, abs=2e-3)


def _cuda_graphs_recorded(device: torch.device) -> int:
    """How many CUDA graphs torch's graph trees hold for this device now (0 on a CPU)."""
    if device.type != "cuda":
        return 0
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    return 0 if manager is None or not manager.roots else sum(len(nodes) for nodes in manager.roots.values())


# Every command that reads a trained run, on the test device, with the layers the runs above leave out: spline
# couplings, learned dequantisation and a class-conditional prior.
READER_LAYERS = ["model.coupling=spline", "model.dequantization=variational", "model.dequant_steps=2",
                 "model.dequant_hidden_channels=8", "model.n_classes=10"]


@pytest.fixture(scope="module")
def reader_run(tmp_path_factory, device):
    """(a run trained on the test device with READER_LAYERS, its final test bits/dim from metrics.jsonl)."""
    run_dir = tmp_path_factory.mktemp("reader") / "run"
    train(apply_overrides(default_config(), [f"run.device={device}", *TINY, *READER_LAYERS]), out=str(run_dir),
          progress=False)
    (test,) = [r for r in _metrics(run_dir) if r["split"] == "test"]
    return run_dir, test["bpd"]


def _ok_json(*args) -> dict:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_and_score_on_the_test_device_agree_with_training_and_across_batch_sizes(reader_run, device, tmp_path):
    run_dir, trained_bpd = reader_run
    evaluated = _ok_json("eval", "--run", run_dir, "--device", device, "--no-progress")
    # README promises eval reproduces the test line to its 4 printed decimals (eval may pick other cuDNN kernels).
    assert evaluated["bpd"] == pytest.approx(trained_bpd, abs=5e-5) and 0 <= evaluated["accuracy"] <= 1

    def mean_score(batch_size: int) -> float:
        out = tmp_path / f"b{batch_size}"
        result = invoke("score", "--run", run_dir, "--device", device, "--no-progress", "--dataset", "digits",
                        "--batch-size", batch_size, "--out", out)
        assert result.exit_code == 0, result.output
        return json.loads((out / "summary.json").read_text())["sets"]["images"]["scores"]["bpd"]["mean"]

    # The dequantisation noise is keyed by image, not by batch (a class-conditional model scores the class
    # marginal, so eval's class-given figure is not the reference; the noise differs between devices).
    assert mean_score(7) == pytest.approx(mean_score(256), abs=1e-5)


def test_reconstruct_interpolate_manipulate_and_sample_run_on_the_test_device(reader_run, device, tmp_path):
    run_dir, _ = reader_run
    on_device = ("--run", run_dir, "--device", device, "--out", tmp_path)
    reconstructed = _ok_json("reconstruct", *on_device, "--n", 6)
    assert reconstructed["max_abs_error"] < 1e-2  # in pixel levels: every pixel decodes to its own value
    for command in (["interpolate", "--pairs", 2, "--steps", 3], ["manipulate", "--from-class", 1, "--to-class", 7],
                    ["sample", "--class", 3, "--n", 4, "--temp", 0.7]):
        result = invoke(*command, *on_device)
        assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*.png"))) == 4


def test_load_run_on_the_test_device_encodes_decodes_scores_and_samples_there(reader_run, device):
    run_dir, _ = reader_run
    run = glowtrain.load_run(run_dir, device=str(device))
    images = build_dataset(run.cfg.data, "test").images[:5]
    pixels = run.preprocess(list(images.permute(0, 2, 3, 1).numpy()))
    assert pixels.device == device
    latents, logdet = run.encode(pixels)
    assert all(z.device == device for z in latents) and logdet.shape == (5,)
    assert torch.equal(run.decode(latents), pixels)
    assert torch.equal(run.decode([z.cpu() for z in latents]), pixels)  # latents made or kept on the host
    bpd = run.bits_per_dim(pixels)
    assert bpd.shape == (5,) and torch.isfinite(bpd).all()
    assert torch.equal(run.sample(3, seed=1), run.sample(3, seed=1))


def _cuda_syncs(work) -> list[str]:
    """Where `work()` makes the host wait for the GPU: the innermost function of the package in each sync that
    CUDA's sync debug mode reports (blocking copies either way, reads of values), "outside" for one elsewhere."""
    package, places = str(Path(glowtrain.__file__).parent), []

    def show(message, *args, **kwargs):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack() if f.filename.startswith(package)]
            places.append(frames[-1].name if frames else "outside")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        real, warnings.showwarning = warnings.showwarning, show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = real
    return places


@pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="CUDA's sync debug mode; test_optim.py checks on a CPU")
def test_gated_adamax_steps_without_waiting_for_the_gpu_from_the_first_step_and_after_loading(device):
    # On the H200 the first step waited once: the flat state's sizes were copied from host memory. Not yet run on
    # a GPU since that was fixed; test_optim.py checks the same with a meta tensor standing for the GPU.
    assert _cuda_syncs(lambda: torch.ones((), device=device).item()) == ["outside"]  # the check sees syncs
    params = [torch.randn(n, device=device, requires_grad=True) for n in (3, 500, 7)]
    expected = [p.detach().clone().requires_grad_() for p in params]
    optimizer, reference = GatedAdamax(params, lr=1e-2), torch.optim.Adamax(expected, lr=1e-2, foreach=False)
    optimizer.found_inf = torch.zeros((), device=device)

    def set_grads(step: int) -> None:
        for p, q in zip(params, expected):
            p.grad = torch.full_like(p, float(step + 1)).sin()
            q.grad = p.grad.clone()

    for step in range(3):
        set_grads(step)
        assert _cuda_syncs(optimizer.step) == []
        reference.step()
    resumed = GatedAdamax(params, lr=1e-2)
    resumed.load_state_dict(reference.state_dict())  # step counts stay in host memory, as torch keeps them
    resumed.found_inf = torch.zeros((), device=device)
    set_grads(3)
    assert _cuda_syncs(resumed.step) == []
    reference.step()
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q)
        assert float(resumed.state[p]["step"]) == 4.0  # the counts written from host numbers


@pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="CUDA's sync debug mode")
def test_evaluation_waits_for_the_gpu_only_to_read_its_totals(reader_run, device):
    # On the H200 each batch waited three times (blocking copies of the images, labels and image count). Not yet
    # run on a GPU since.
    run = glowtrain.load_run(reader_run[0], device=str(device))
    test_set = build_dataset(run.cfg.data, "test")
    cfg = apply_overrides(run.cfg, ["train.eval_batch_size=64"])  # several batches
    syncs = _cuda_syncs(lambda: evaluate(run.objective, test_set, cfg, device))  # with its learned dequantiser
    assert syncs and set(syncs) <= {"_split_means"}, syncs
