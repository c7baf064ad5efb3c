"""The training loop end to end on a tiny model: run directory, logging, exact resume, schedules, evaluation."""

import copy
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GLOW_LAYERS, HostReads, assert_one_line_error, assert_same_training_state, invoke, ok, sets
from PIL import Image
from torch.utils.data import Subset

from glowtrain.checkpoint import load_checkpoint, model_from_checkpoint
from glowtrain.config import apply_overrides, default_config, load_config
from glowtrain.data import build_dataset
from glowtrain.distributed import Context
from glowtrain.errors import UserError
from glowtrain.evaluation import EVAL_NOISE_SEED, mean_text, per_image_noise
from glowtrain.loaders import make_eval_batches, make_train_batches
from glowtrain.losses import dequantize
from glowtrain.model import Glow
from glowtrain.objective import Objective, ObjectiveOutput
from glowtrain.optim import GatedAdamax
from glowtrain.runs import RunDir, prepare_run_dir
from glowtrain.sample import display_upscale
from glowtrain.train import Trainer, TrainState, ema_decay_at, evaluate, fit_config, lr_at, train

# steps=6: train lines at 2, 4, 6; test lines, samples and checkpoints at 3 and 6.
# warmup_steps=5 puts the resume point (step 3) inside the warm-up.
TINY = [
    "run.device=cpu", *GLOW_LAYERS,
    "model.n_levels=2", "model.n_steps=2", "model.hidden_channels=16",
    "train.batch_size=16", "train.init_batch_size=32", "train.eval_batch_size=300",
    "train.steps=6", "train.log_every=2", "train.eval_every=3", "train.sample_every=3",
    "train.checkpoint_every=3", "train.n_samples=4", "train.warmup_steps=5",
]
N_DIGITS_TEST = 297


def tiny_config(*extra: str):
    return apply_overrides(default_config(), [*TINY, *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 6-step run that several tests only read."""
    cfg = tiny_config()
    out = tmp_path_factory.mktemp("tiny") / "run"
    result = train(cfg, out=str(out), progress=False)
    return cfg, out, result


def read_metrics(run_dir: Path) -> list[dict]:
    lines = RunDir(Path(run_dir)).metrics.read_text().splitlines()
    return [json.loads(line) for line in lines]


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock throughput, which legitimately differs between runs."""
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


# ---------------------------------------------------------------------------- run directory


def test_run_directory_holds_config_checkpoints_tensorboard_metrics_and_samples(tiny_run):
    cfg, out, result = tiny_run
    paths = RunDir(out)
    assert result.run_dir == str(out) and result.step == 6
    assert load_config(paths.config) == cfg
    assert paths.last.is_file() and paths.best.is_file()
    last = load_checkpoint(paths.last)
    assert last["step"] == 6
    assert load_checkpoint(paths.best)["step"] in (3, 6)
    assert list(paths.tb.glob("events.out.tfevents.*"))
    # No temporary files left behind by the atomic writes.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_metrics_jsonl_has_train_lines_at_log_steps_and_test_lines_at_eval_steps(tiny_run):
    cfg, out, result = tiny_run
    records = read_metrics(out)
    assert all({"step", "split", "bpd"} <= r.keys() for r in records)
    assert all(math.isfinite(r["bpd"]) and 0 < r["bpd"] < 8 for r in records)
    train_lines = [r for r in records if r["split"] == "train"]
    test_lines = [r for r in records if r["split"] == "test"]
    assert [r["step"] for r in train_lines] == [2, 4, 6]
    assert [r["step"] for r in test_lines] == [3, 6]
    assert {r["split"] for r in records} == {"train", "test"}
    for r in train_lines:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg))
        assert r["grad_norm"] >= 0 and r["images_per_s"] > 0
    for r in test_lines:
        assert r["n_images"] == N_DIGITS_TEST and r["bpd_stderr"] > 0
    # The returned final metrics are the last test line; best is the lowest test bpd.
    assert result.test["bpd"] == test_lines[-1]["bpd"]
    assert result.best_test_bpd == min(r["bpd"] for r in test_lines)


def test_sample_grids_are_written_at_sample_steps_with_the_upscaled_grid_size(tiny_run):
    cfg, out, _ = tiny_run
    names = sorted(p.name for p in RunDir(out).samples.glob("*.png"))
    assert names == ["step0000003_t0p70.png", "step0000003_t1p00.png",
                     "step0000006_t0p70.png", "step0000006_t1p00.png"]
    # 4 samples -> a 2x2 grid of 8x8 images with 1-pixel padding: 2 * (8 + 1) + 1 = 19, then upscaled.
    side = 19 * display_upscale(cfg.data.image_size)
    assert side == 152
    for name in names:
        with Image.open(RunDir(out).samples / name) as image:
            assert image.size == (side, side)


def test_tensorboard_events_hold_the_logged_scalars_and_sample_images(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = tiny_run
    events = EventAccumulator(str(RunDir(out).tb), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/bpd", "train/lr", "train/grad_norm", "test/bpd", "test/bpd_stderr"} <= set(tags["scalars"])
    assert {"samples/T=0.7", "samples/T=1"} <= set(tags["images"])
    records = read_metrics(out)
    for split, tag_steps in (("train", [2, 4, 6]), ("test", [3, 6])):
        scalars = events.Scalars(f"{split}/bpd")
        assert [s.step for s in scalars] == tag_steps
        logged = [r["bpd"] for r in records if r["split"] == split]
        assert [s.value for s in scalars] == pytest.approx(logged, rel=1e-6)
    assert [i.step for i in events.Images("samples/T=0.7")] == [3, 6]


# ---------------------------------------------------------------------------- resume and determinism


def test_resume_auto_continues_exactly_as_an_uninterrupted_run(tiny_run, tmp_path):
    cfg, straight_dir, _ = tiny_run
    out = str(tmp_path / "run")
    train(apply_overrides(cfg, ["train.steps=3"]), out=out, progress=False)
    assert load_checkpoint(RunDir(Path(out)).last)["step"] == 3

    # The resumed run takes the config stored in the checkpoint, plus the override.
    resumed_cfg = fit_config(None, ["train.steps=6"], out, "auto")
    assert resumed_cfg == cfg
    result = train(resumed_cfg, out=out, resume="auto", progress=False)
    assert result.step == 6

    straight = load_checkpoint(RunDir(straight_dir).last)
    resumed = load_checkpoint(RunDir(Path(out)).last)
    assert resumed["step"] == straight["step"] == 6
    assert_same_training_state(straight, resumed)
    assert resumed["best_test_bpd"] == straight["best_test_bpd"]

    straight_records, resumed_records = comparable(read_metrics(straight_dir)), comparable(read_metrics(out))
    assert [r for r in resumed_records if r["step"] > 3] == [r for r in straight_records if r["step"] > 3]
    # The short run logged its final step (a train line at 3) as every run does; nothing was logged twice.
    extra = [r for r in resumed_records if (r["split"], r["step"]) == ("train", 3)]
    assert len(extra) == 1
    assert [r for r in resumed_records if r not in extra] == straight_records
    # Warm-up did not restart: the step-4 update used lr_at(3) = 4/5 of the peak.
    step4 = next(r for r in resumed_records if r["split"] == "train" and r["step"] == 4)
    assert step4["lr"] == pytest.approx(cfg.train.lr * 4 / 5)


def test_a_checkpoint_written_before_train_state_existed_resumes_exactly(tiny_run, tmp_path):
    cfg, straight_dir, _ = tiny_run
    out = tmp_path / "run"
    train(apply_overrides(cfg, ["train.steps=3"]), out=str(out), progress=False)
    last = RunDir(out).last
    state = torch.load(last, weights_only=True)
    # The layout glowtrain wrote until 2026-11-27: these counters at the top level, no train_state.
    old = state.pop("train_state")
    # Counters that do not change the training (a used rollback, past bad steps), so the weights can match.
    old.update(n_rollbacks=1, n_bad_total=5)
    state.update({key: old[key] for key in ("lr_scale", "n_rollbacks", "n_bad_in_row", "n_bad_total")})
    torch.save(state, last)
    train(cfg, out=str(out), resume="auto", progress=False)
    straight, resumed = load_checkpoint(RunDir(straight_dir).last), load_checkpoint(last)
    assert_same_training_state(straight, resumed)  # weights, EMA and optimiser state
    assert resumed["train_state"] == {**straight["train_state"], "n_rollbacks": 1, "n_bad_total": 5}


def test_fused_adam_resumes_exactly_too(tmp_path):
    cfg = apply_overrides(default_config(), NAN_RUN + ["train.optimizer=adam", "train.steps=6"])
    train(cfg, out=str(tmp_path / "straight"), progress=False)
    train(apply_overrides(cfg, ["train.steps=3"]), out=str(tmp_path / "split"), progress=False)
    train(cfg, out=str(tmp_path / "split"), resume="auto", progress=False)
    straight, resumed = (load_checkpoint(RunDir(tmp_path / name).last) for name in ("straight", "split"))
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for index, param_state in straight["optimizer"]["state"].items():
        for name, value in param_state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed["optimizer"]["state"][index][name]))


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tiny_run, tmp_path):
    cfg, first_dir, _ = tiny_run
    train(cfg, out=str(tmp_path / "same"), progress=False)
    assert comparable(read_metrics(tmp_path / "same")) == comparable(read_metrics(first_dir))

    train(apply_overrides(cfg, ["run.seed=1", "train.steps=3"]), out=str(tmp_path / "other"), progress=False)
    other = {(r["split"], r["step"]): r["bpd"] for r in read_metrics(tmp_path / "other")}
    first = {(r["split"], r["step"]): r["bpd"] for r in read_metrics(first_dir)}
    assert other.keys() == {("train", 2), ("train", 3), ("test", 3)}
    for key in (("train", 2), ("test", 3)):
        assert other[key] != first[key]


def test_fit_into_an_existing_run_without_resume_is_refused(tiny_run):
    cfg, out, _ = tiny_run
    before = RunDir(out).metrics.read_text()
    with pytest.raises(UserError, match="--resume"):
        train(cfg, out=str(out), progress=False)
    assert RunDir(out).metrics.read_text() == before


@pytest.mark.parametrize("change,key", [("data.n_bits=2", "data.n_bits"), ("model.n_steps=3", "model.n_steps")])
def test_the_python_apis_resume_refuses_a_config_that_changes_the_model_as_fit_does(tiny_run, change, key):
    """train(cfg, resume=...) went on learning 4-bit images from 2-bit ones, and wrote their bits/dim as the run's."""
    cfg, out, _ = tiny_run
    before = {path.name: path.read_bytes() for path in Path(out).iterdir() if path.is_file()}
    checkpoints = {path.name: path.read_bytes() for path in RunDir(out).checkpoints.iterdir()}
    with pytest.raises(UserError, match=f"^{key} cannot change when resuming"):
        train(apply_overrides(cfg, ["train.steps=9", change]), out=str(out), resume="auto", progress=False)
    assert {path.name: path.read_bytes() for path in Path(out).iterdir() if path.is_file()} == before
    assert {path.name: path.read_bytes() for path in RunDir(out).checkpoints.iterdir()} == checkpoints


def test_resume_auto_without_a_checkpoint_is_a_user_error(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with pytest.raises(UserError, match="nothing to resume"):
        train(tiny_config(), out=str(out), resume="auto", progress=False)
    with pytest.raises(UserError, match="nothing to resume"):
        fit_config(None, [], str(out), "auto")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------- schedules


def test_lr_warms_up_linearly_then_stays_constant():
    cfg = apply_overrides(default_config(), ["train.lr=0.01", "train.warmup_steps=4", "train.steps=100"])
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert all(lr_at(s, cfg) == 0.01 for s in (4, 5, 50, 99, 100))


def test_cosine_lr_decays_from_peak_to_min_lr_ratio_at_the_end():
    cfg = apply_overrides(default_config(), ["train.lr=0.01", "train.warmup_steps=10", "train.steps=110",
                                             "train.lr_schedule=cosine", "train.min_lr_ratio=0.1"])
    assert lr_at(9, cfg) == pytest.approx(0.01)
    assert lr_at(10, cfg) == pytest.approx(0.01)
    assert lr_at(60, cfg) == pytest.approx(0.001 + 0.009 * 0.5)  # half way: the mean of peak and floor
    assert lr_at(110, cfg) == pytest.approx(0.001)
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert min(values) == pytest.approx(0.001)


def test_ema_decay_warms_up_as_one_plus_step_over_ten_plus_step_capped_at_decay():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10, 0.999) == pytest.approx(11 / 20)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(100_000, 0.999) == 0.999
    assert ema_decay_at(5, 0.5) == pytest.approx(0.4)
    assert ema_decay_at(50, 0.5) == 0.5


# ---------------------------------------------------------------------------- evaluation and learning


@pytest.fixture(scope="module")
def fresh_model():
    cfg = tiny_config()
    torch.manual_seed(cfg.run.seed)
    model = Glow.from_config(cfg)
    images, _ = next(make_train_batches(build_dataset(cfg.data, "train"), cfg.train.init_batch_size, seed=0))
    model.initialize(dequantize(images, cfg.data.n_bits, generator=torch.Generator().manual_seed(0)))
    return cfg, model


def test_evaluate_is_deterministic_over_the_whole_digits_test_split(fresh_model, monkeypatch):
    cfg, model = fresh_model
    test_set = build_dataset(cfg.data, "test")
    modes = []
    real_forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: modes.append(torch.is_inference_mode_enabled())
                        or real_forward(self, *a, **k))
    first = evaluate(model, test_set, cfg, torch.device("cpu"))
    assert modes and all(modes)  # no autograd bookkeeping where no gradient is wanted
    second = evaluate(model, test_set, cfg, torch.device("cpu"))
    assert first == second
    assert first["n_images"] == N_DIGITS_TEST
    assert first["bpd_stderr"] > 0 and 0 < first["bpd"] < 8
    assert "accuracy" not in first
    # Batch size does not change the result beyond rounding (same noise stream, same images).
    small = evaluate(model, test_set, apply_overrides(cfg, ["train.eval_batch_size=297"]), torch.device("cpu"))
    assert small["bpd"] == pytest.approx(first["bpd"], rel=1e-6)


def test_one_image_has_a_mean_and_no_standard_error(fresh_model):
    cfg, model = fresh_model
    test_set = build_dataset(cfg.data, "test")
    one, two = (evaluate(model, Subset(test_set, range(n)), cfg, torch.device("cpu")) for n in (1, 2))
    assert one["n_images"] == 1 and one["bpd_stderr"] is None and 0 < one["bpd"] < 8
    assert two["n_images"] == 2 and two["bpd_stderr"] > 0
    assert mean_text(one["bpd"], None) == f"{one['bpd']:.4f} (one image, no error bar)"
    assert mean_text(2.5, 0.00123) == "2.5000 ± 0.0012"


def test_short_training_lowers_test_bpd_below_the_initial_model(fresh_model, tmp_path):
    cfg, model = fresh_model
    cfg = apply_overrides(cfg, ["train.steps=30", "train.lr=3e-3", "train.warmup_steps=5", "train.log_every=10",
                                "train.eval_every=30", "train.sample_every=30", "train.checkpoint_every=30"])
    initial = evaluate(model, build_dataset(cfg.data, "test"), cfg, torch.device("cpu"))["bpd"]
    result = train(cfg, out=str(tmp_path / "run"), progress=False)
    assert result.test["bpd"] < initial - 0.1, (initial, result.test["bpd"])


def test_class_conditional_training_logs_test_accuracy(tmp_path, capsys):
    cfg = tiny_config("model.n_classes=10", "train.steps=3", "train.eval_every=3")
    result = train(cfg, out=str(tmp_path / "run"), progress=False)
    test_lines = [r for r in read_metrics(tmp_path / "run") if r["split"] == "test"]
    assert [r["step"] for r in test_lines] == [3]
    assert 0 <= test_lines[0]["accuracy"] <= 1
    assert f", accuracy {test_lines[0]['accuracy']:.3f}\n" in capsys.readouterr().out  # on the test line too
    assert result.test["accuracy"] == test_lines[0]["accuracy"]
    # Training logs the objective's classification terms too: cross-entropy near log(10) at the start.
    train_lines = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train" and "bpd" in r]
    assert train_lines and all(0 <= r["accuracy"] <= 1 and 0 < r["class_ce"] < 2 * math.log(10) for r in train_lines)
    assert 0 < test_lines[0]["class_ce"] < 2 * math.log(10)


def test_class_count_that_does_not_match_the_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"model\.n_classes"):
        train(tiny_config("model.n_classes=3"), out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_weight_decay_shrinks_weights_relative_to_no_decay(tmp_path):
    overrides = [*GLOW_LAYERS, "model.n_levels=2", "model.n_steps=1", "model.hidden_channels=8", "train.batch_size=16",
                 "train.init_batch_size=32", "train.eval_batch_size=300", "train.steps=3", "train.warmup_steps=0",
                 "train.ema_decay=0", "train.n_samples=1", "train.sample_temperatures=[0]"]
    norms = {}
    for decay in (0.0, 50.0):
        cfg = apply_overrides(default_config(), overrides + [f"train.weight_decay={decay}"])
        train(cfg, out=str(tmp_path / f"wd{decay}"), progress=False)
        state = load_checkpoint(tmp_path / f"wd{decay}" / "checkpoints" / "last.pt")
        norms[decay] = sum(v.double().square().sum() for k, v in state["model"].items() if "conv_in.weight" in k)
    # lr 1e-3 * decay 50 shrinks each weight by 5% a step before the optimiser moves it.
    assert norms[50.0] < 0.9 * norms[0.0]


def test_run_threads_sets_torchs_cpu_threads_while_training_and_puts_them_back(tmp_path):
    seen = []

    class Watching(Trainer):
        def prepare_batch(self, images, labels):
            seen.append(torch.get_num_threads())
            return super().prepare_batch(images, labels)

    before = torch.get_num_threads()
    train(tiny_config("run.threads=2", "train.steps=2"), out=str(tmp_path / "run"), progress=False, trainer=Watching)
    assert seen == [2, 2] and torch.get_num_threads() == before
    train(tiny_config("train.steps=1"), out=str(tmp_path / "default"), progress=False, trainer=Watching)
    assert seen[2:] == [before]  # 0: left as it was
    with pytest.raises(UserError, match="run.threads"):
        tiny_config("run.threads=-1")


def _poisoned(bad_calls) -> type[Trainer]:
    """A trainer whose batches become NaN on the given calls of prepare_batch (1: the first training step)."""

    class Poisoned(Trainer):
        calls = 0

        def prepare_batch(self, images, labels):
            images, labels, noise = super().prepare_batch(images, labels)
            Poisoned.calls += 1
            return images, labels, noise * float("nan") if bad_calls(Poisoned.calls) else noise

    return Poisoned


NAN_RUN = ["run.device=cpu", *GLOW_LAYERS, "model.n_levels=2", "model.n_steps=1", "model.hidden_channels=8",
           "train.batch_size=16", "train.init_batch_size=32", "train.eval_batch_size=300", "train.steps=10",
           "train.warmup_steps=0",
           "train.log_every=1", "train.eval_every=100", "train.sample_every=100", "train.checkpoint_every=2",
           "train.n_samples=1", "train.sample_temperatures=[0]", "train.max_bad_steps=2"]


@pytest.mark.parametrize("optimizer", ["adam", "adamax"])  # fused Adam and GatedAdamax skip on the device
def test_training_steps_read_nothing_back_from_the_device_between_logging_steps(tmp_path, monkeypatch, optimizer):
    """On a GPU every host read of a device value stalls the queue; here the loop may read only when it logs."""
    monkeypatch.setattr(GatedAdamax, "gate_on_cpu", True)  # the path accelerators take (a CPU reads the flag)
    step = {"n": 0}  # 0 while setting up, then k during the k-th training step and the logging after it

    class Counting(Trainer):
        def prepare_batch(self, images, labels):
            step["n"] += 1
            return super().prepare_batch(images, labels)

    cfg = apply_overrides(default_config(), NAN_RUN + [f"train.optimizer={optimizer}", "train.log_every=5",
                                                       "train.checkpoint_every=10", "train.weight_decay=0.01"])
    # The batch sampler's indices live on the host by design, whatever the device.
    sampler = lambda frame: frame.filename.endswith("glowtrain/loaders.py")  # noqa: E731
    with HostReads(label=lambda: step["n"], ignore=sampler) as host:
        train(cfg, out=str(tmp_path / "run"), progress=False, trainer=Counting)
    in_steps = [read for read in host.reads if read[0] >= 1]
    assert in_steps and {n for n, _, _ in in_steps} <= {5, 10}, in_steps


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


OPTIMIZERS = pytest.mark.parametrize("optimizer", ["adamax", "adam"])  # GatedAdamax's and fused Adam's on-device skips


@OPTIMIZERS
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, optimizer):
    poisoned = _poisoned(lambda call: call == 4)  # training step 4 (1-based)
    cfg = apply_overrides(default_config(), NAN_RUN + [f"train.optimizer={optimizer}"])
    result = train(cfg, out=str(tmp_path / "run"), progress=False, trainer=poisoned)
    assert result.step == 10 and math.isfinite(result.test["bpd"])
    bad = [m for m in _metrics(tmp_path / "run") if "bad_steps" in m]
    assert bad == [{"step": 4, "split": "train", "bad_steps": 1}]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # Skipped, not taken with zeroed gradients: the optimiser counted 9 updates in 10 steps.
    assert {float(v["step"]) for v in state["optimizer"]["state"].values()} == {9.0}


@OPTIMIZERS
def test_a_run_of_non_finite_steps_rolls_back_with_half_the_learning_rate(tmp_path, monkeypatch, optimizer):
    poisoned = _poisoned(lambda call: call in (5, 6, 7))  # steps 5-7: three in a row > max_bad_steps=2
    cfg = apply_overrides(default_config(), NAN_RUN + [f"train.optimizer={optimizer}"])
    result = train(cfg, out=str(tmp_path / "run"), progress=False, trainer=poisoned)
    assert result.step == 10
    metrics = _metrics(tmp_path / "run")
    rollback = [m for m in metrics if m.get("event") == "rollback"]
    # last.pt was written at step 6 (skipped steps leave the weights as they were), so that is where it resumes.
    assert rollback == [{"step": 6, "split": "train", "event": "rollback", "from_step": 7, "bad_steps_in_row": 3,
                         "lr_scale": 0.5}]
    # Each step once: step 7's records, of the abandoned steps, were moved aside when training went back to 6.
    steps = [m["step"] for m in metrics if m["split"] == "train" and "bpd" in m]
    assert steps == list(range(1, 11))
    discarded = [json.loads(line) for line in RunDir(tmp_path / "run").metrics_discarded.read_text().splitlines()]
    assert {m["step"] for m in discarded} == {7} and {"step": 7, "split": "train", "bad_steps": 3} in discarded
    after = [m for m in metrics[metrics.index(rollback[0]):] if "lr" in m]
    assert after and all(m["lr"] == pytest.approx(0.5 * cfg.train.lr) for m in after)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["train_state"]["lr_scale"] == 0.5 and state["train_state"]["n_rollbacks"] == 1


def test_after_a_roll_back_each_step_still_moves_the_tensors_the_model_and_its_average_hold(tmp_path):
    """The trainer lists the parameters once (clipping, weight decay and EMA take the lists): a roll-back, like a
    resume, must load into those very tensors, or later steps would update copies the model no longer holds."""
    seen = []

    class Watched(_poisoned(lambda call: call in (5, 6, 7))):
        def prepare_batch(self, images, labels):
            seen.append(self)
            return super().prepare_batch(images, labels)

    train(apply_overrides(default_config(), NAN_RUN), out=str(tmp_path / "run"), progress=False, trainer=Watched)
    trainer = seen[-1]
    assert trainer.state.n_rollbacks == 1
    assert list(map(id, trainer.params)) == list(map(id, trainer.objective.parameters()))
    assert list(map(id, trainer.ema_params)) == list(map(id, trainer.ema.parameters()))
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")  # step 10, written after the roll-back
    assert all(torch.equal(p, saved["model"][name]) for name, p in trainer.model.named_parameters())
    assert all(torch.equal(p, saved["ema"][name]) for name, p in trainer.ema.model.named_parameters())
    assert not all(torch.equal(p, a) for p, a in zip(trainer.params, trainer.ema_params))  # an average, not a copy


def test_a_roll_back_keeps_the_sample_grids_of_the_steps_it_abandons(tmp_path, capsys):
    poisoned = _poisoned(lambda call: call in (5, 6, 7))  # three in a row: back to last.pt, saved at step 4
    cfg = apply_overrides(default_config(), NAN_RUN + ["train.checkpoint_every=4", "train.sample_every=1"])
    train(cfg, out=str(tmp_path / "run"), progress=False, trainer=poisoned)
    samples = RunDir(tmp_path / "run").samples
    assert f"note: 2 sample grid(s) drawn after step 4 kept as {samples}/discarded_*.png" in capsys.readouterr().out
    assert sorted(path.name[:21] for path in samples.glob("discarded_*")) == ["discarded_step0000005",
                                                                              "discarded_step0000006"]
    assert len(list(samples.glob("step*.png"))) == 10  # steps 5 and 6 drawn again, after the roll-back


def test_a_checkpoint_due_after_too_many_bad_steps_rolls_back_instead_of_saving(tmp_path, monkeypatch):
    poisoned = _poisoned(lambda call: call in (4, 5, 6))  # steps 4-6; step 6 is a checkpoint step, 8 a logging one
    cfg = apply_overrides(default_config(), NAN_RUN + ["train.log_every=8", "train.checkpoint_every=3"])
    train(cfg, out=str(tmp_path / "run"), progress=False, trainer=poisoned)
    rollback = [m for m in _metrics(tmp_path / "run") if m.get("event") == "rollback"]
    assert rollback == [{"step": 3, "split": "train", "event": "rollback", "from_step": 6, "bad_steps_in_row": 3,
                         "lr_scale": 0.5}]


def test_a_stop_between_checks_after_a_run_of_bad_steps_resumes_exactly_as_an_uninterrupted_run(tmp_path,
                                                                                                  monkeypatch):
    """Bad steps 6-8 are checked at step 10 (a logging step); a stop after step 9 must not hide them."""

    class Poisoned(Trainer):
        def prepare_batch(self, images, labels):
            images, labels, noise = super().prepare_batch(images, labels)
            bad = self.state.step + 1 in (6, 7, 8) and self.state.n_rollbacks == 0
            return images, labels, noise * float("nan") if bad else noise

    cfg = apply_overrides(default_config(), NAN_RUN + ["train.log_every=5", "train.checkpoint_every=5"])
    train(cfg, out=str(tmp_path / "straight"), progress=False, trainer=Poisoned)
    monkeypatch.setattr(Trainer, "_now", lambda self: 10.0 * self.state.step)  # stops after step 9
    stopped = train(apply_overrides(cfg, ["train.max_time=85s"]), out=str(tmp_path / "stopped"), progress=False,
                    trainer=Poisoned)
    assert stopped.timed_out
    monkeypatch.undo()
    train(cfg, out=str(tmp_path / "stopped"), resume="auto", progress=False, trainer=Poisoned)
    straight, resumed = (load_checkpoint(RunDir(tmp_path / name).last) for name in ("straight", "stopped"))
    assert straight["train_state"]["lr_scale"] == resumed["train_state"]["lr_scale"] == 0.5
    assert straight["step"] == resumed["step"] == 10
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


def test_tensorboard_hides_a_resumes_redone_steps_also_when_one_process_logged_both_within_a_second(
        tmp_path, monkeypatch):
    """Event files are read in name order, and a name ends in the process's count of writers: a resume's file
    (…100) written in the second of the first (…99) sorted before it, and the first's steps 4-5 showed."""
    import types

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import event_file_writer

    from glowtrain.logs import RunLogger

    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1795976353.0))  # one second
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(99))
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for resumed_step, values in ((None, {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0, 5: 1.0}), (3, {4: 2.5, 5: 1.5})):
        logger = RunLogger(run, resumed_step)
        for step, value in values.items():
            logger.log(step, "train", bpd=value)
        logger.close()
    events = EventAccumulator(str(run.tb)).Reload().Scalars("train/bpd")
    assert [(e.step, e.value) for e in events] == [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.5), (5, 1.5)]


def test_an_init_batch_larger_than_the_training_split_is_said(tmp_path, capsys):
    cfg = apply_overrides(default_config(), NAN_RUN + ["train.steps=1", "train.init_batch_size=5000"])
    train(cfg, out=str(tmp_path / "run"), progress=False)
    assert ("note: train.init_batch_size=5,000 is more than the 1,500 training images: ActNorm's initial statistics "
            "come from all of them\n") in capsys.readouterr().out


def test_more_data_workers_than_the_cpus_allow_are_said_and_not_started(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("glowtrain.loaders.cpus_per_process", lambda: 1)
    started = []
    real = torch.utils.data.DataLoader.__init__

    def counting(self, *args, **kwargs):
        started.append(kwargs.get("num_workers", 0))
        real(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", counting)
    images = tmp_path / "images"  # read from files, unlike the bundled digits, which start no workers
    images.mkdir()
    for i in range(24):
        Image.fromarray(np.full((8, 8), 10 * i, dtype=np.uint8), "L").save(images / f"{i:02d}.png")
    folder = ["data.dataset=folder", f"data.root={images}", "data.image_size=8", "data.channels=1",
              "train.batch_size=4", "train.init_batch_size=8"]
    cfg = apply_overrides(default_config(), NAN_RUN + folder + ["train.steps=1", "data.n_workers=3"])
    train(cfg, out=str(tmp_path / "run"), progress=False)
    assert ("note: data.n_workers=3 is more than this process's share of the CPUs: the data loads in 1 worker "
            "process\n") in capsys.readouterr().out
    assert max(started) == 1  # training's and evaluation's loaders (ActNorm's init batch loads in this process)
    train(apply_overrides(cfg, ["data.n_workers=1", "train.steps=2"]), out=str(tmp_path / "run"), resume="auto",
          progress=False)
    assert "data.n_workers" not in capsys.readouterr().out


def test_a_resume_names_each_training_setting_it_changes(tmp_path, capsys):
    """A resume with the same --config quietly undid the run's --set train.lr and warmup_steps (a config sets every
    key it holds): the lr in the log changed with no word."""
    cfg = apply_overrides(default_config(), NAN_RUN + ["train.steps=2", "train.lr=1e-2"])
    train(cfg, out=str(tmp_path / "run"), progress=False)
    capsys.readouterr()
    train(apply_overrides(cfg, ["train.steps=3"]), out=str(tmp_path / "run"), resume="auto", progress=False)
    assert "note: this resume trains with" not in capsys.readouterr().out  # train.steps: the resume line says it
    train(apply_overrides(cfg, ["train.steps=4", "train.lr=3e-2", "train.warmup_steps=7"]), out=str(tmp_path / "run"),
          resume="auto", progress=False)
    assert ("note: this resume trains with train.lr=0.03 (the run had 0.01), train.warmup_steps=7 (the run had 0)\n"
            in capsys.readouterr().out)
    train(apply_overrides(cfg, ["train.steps=4", "train.lr=5e-2"]), out=str(tmp_path / "run"), resume="auto",
          progress=False)
    assert "this resume trains with" not in capsys.readouterr().out  # at step 4 of 4: it trains with nothing


def test_a_resume_after_a_crash_logs_each_step_once_and_keeps_the_lost_records_aside(tmp_path):
    """A crash after step 5 with last.pt at step 3: steps 4-5 run again; their first records are moved out of
    metrics.jsonl (into metrics_discarded.jsonl) and hidden in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = apply_overrides(default_config(), NAN_RUN + ["train.steps=3", "train.checkpoint_every=3"])
    run = RunDir(tmp_path / "run")
    train(cfg, out=str(run.path), progress=False)
    at_step_3 = run.last.read_bytes()
    train(apply_overrides(cfg, ["train.steps=5", "train.lr=1e-3"]), out=str(run.path), resume="auto", progress=False)
    lost = [m for m in _metrics(run.path) if m["step"] > 3]
    assert [m["step"] for m in lost if m["split"] == "train" and "bpd" in m] == [4, 5]
    run.last.write_bytes(at_step_3)  # the crash: nothing of steps 4-5 was saved
    train(apply_overrides(cfg, ["train.steps=5"]), out=str(run.path), resume="auto", progress=False)
    kept = _metrics(run.path)
    assert [m["step"] for m in kept if m["split"] == "train" and "bpd" in m] == [1, 2, 3, 4, 5]
    assert [json.loads(line) for line in run.metrics_discarded.read_text().splitlines()] == lost
    accumulator = EventAccumulator(str(run.tb))
    accumulator.Reload()
    events = accumulator.Scalars("train/bpd")
    assert [e.step for e in events] == [1, 2, 3, 4, 5]
    new = {m["step"]: m["bpd"] for m in kept if m["split"] == "train" and "bpd" in m}
    assert [e.value for e in events] == pytest.approx([new[step] for step in range(1, 6)])


def test_a_second_fit_on_a_run_being_trained_is_refused_and_runs_says_it_is_training(tmp_path):
    import os

    from glowtrain.runs import list_runs

    seen = {}

    class Meddling(Trainer):
        def prepare_batch(self, images, labels):
            if not seen and self.run_dir.has_checkpoint():  # mid-run: another fit of it, as from a second terminal
                for resume in (None, "auto"):  # a fresh start was told to resume it, which would be refused too
                    with pytest.raises(UserError) as refused:
                        train(tiny_config("train.steps=4"), out=str(self.run_dir.path), resume=resume, progress=False)
                    seen.setdefault("errors", []).append(str(refused.value))
                seen["runs"] = list_runs(tmp_path)
            return super().prepare_batch(images, labels)

    run = tmp_path / "run"
    train(tiny_config("train.steps=2", "train.checkpoint_every=1"), out=str(run), progress=False, trainer=Meddling)
    assert seen["errors"] == 2 * [f"{run} is being trained by another process (pid {os.getpid()}) — wait for it to "
                                  "finish or stop it, or choose another --out or run.name"]
    assert [row["status"] for row in seen["runs"]] == [f"training now (pid {os.getpid()})"]
    assert [m["step"] for m in _metrics(run) if m["split"] == "train" and "bpd" in m] == [2]  # logged once
    assert [row["status"] for row in list_runs(tmp_path)] == ["finished"]  # the lock went with the run
    train(tiny_config("train.steps=3"), out=str(run), resume="auto", progress=False)


def test_a_run_whose_checkpoints_folder_cannot_be_written_is_refused_before_training(tiny_run, tmp_path,
                                                                                      monkeypatch):
    _, straight_dir, _ = tiny_run
    run = RunDir(tmp_path / "run")
    shutil.copytree(straight_dir, run.path)
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != run.checkpoints and access(path, mode))
    with pytest.raises(UserError, match=f"^cannot write to {run.checkpoints} \\(permission denied\\) — choose "
                                        "another --out or run.name, or make it writable$"):
        train(tiny_config("train.steps=8"), out=str(run.path), resume="auto", progress=False)
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(os, "access", access)
    shutil.rmtree(run.samples)
    run.samples.write_text("a file where the run keeps its grids")  # it failed at the first grid, steps later
    with pytest.raises(UserError, match=f"^{run.samples} is a file where the run keeps its samples/ folder — move "
                                        "it away, or choose another --out or run.name$"):
        train(tiny_config("train.steps=8"), out=str(run.path), resume="auto", progress=False)
    run.samples.unlink()
    run.samples.symlink_to(tmp_path / "gone")  # a link to a folder that is no more
    with pytest.raises(UserError, match=f"^{run.samples} is a link to nothing where the run keeps its samples/"):
        train(tiny_config("train.steps=8"), out=str(run.path), resume="auto", progress=False)
    died = RunDir(tmp_path / "died")  # a run that died before its first checkpoint: a fresh start moves its
    died.samples.mkdir(parents=True)  # folders aside, which needs only the run directory itself
    shutil.copy(run.config, died.config)  # as fit wrote it: a run of glowtrain's
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != died.samples and access(path, mode))
    assert prepare_run_dir(died, None) is None


def test_a_resume_on_another_process_count_says_how_the_global_batch_changes_only_when_it_does():
    class Context:
        world_size = 1

    trainer = Trainer.__new__(Trainer)
    trainer.ctx, trainer.notes = Context(), []
    for batch_size, said in ((16, "from 32 to 16 images per step"), (32, None)):  # --set batch_size=32 keeps it
        trainer.cfg = tiny_config(f"train.batch_size={batch_size}")
        trainer.state = TrainState(processes=2)
        trainer.trained_config = {"train": {"batch_size": 16, "grad_accum_steps": 1}}
        trainer.notes.clear()
        trainer._note_other_process_count()
        assert [note.rsplit(": ", 1)[1] for note in trainer.notes] == ([f"its global batch changes {said}"]
                                                                       if said else [])


def test_the_other_processes_of_a_job_see_their_own_jobs_lock_without_refusing(tmp_path):
    from glowtrain.runs import checkpoint_to_resume, prepare_run_dir, refuse_if_being_trained, training_lock

    run = RunDir(tmp_path / "run")
    with training_lock(run):  # taken by the job's first process
        assert prepare_run_dir(run, None) is None  # what every other rank checks: not refused by the lock
        with pytest.raises(UserError, match="is being trained by another process"):
            refuse_if_being_trained(run)  # what the first process of another fit checks
        with pytest.raises(UserError, match="is being trained by another process"):  # not "nothing to resume"
            checkpoint_to_resume("auto", run)  # --resume auto before the run's first checkpoint
    with pytest.raises(UserError, match="nothing to resume"):
        checkpoint_to_resume("auto", run)


def test_a_save_that_was_killed_leaves_no_temporary_file_once_the_run_is_trained_again(tmp_path):
    """A SIGKILL during a save left .last.pt.PID.ID.tmp in checkpoints/ (a model's size each), never removed."""
    from glowtrain.runs import training_lock

    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    for name, data in ((".last.pt.554.358c41c3.tmp", b""), (".best.pt.611.dda15268.tmp", b"partial"),
                       ("last.pt", b"saved"), ("mine.tmp", b"the user's")):
        (run.checkpoints / name).write_bytes(data)
    with training_lock(run):
        assert sorted(path.name for path in run.checkpoints.iterdir()) == ["last.pt", "mine.tmp"]


def test_a_command_on_a_run_being_trained_before_its_first_checkpoint_says_so(tmp_path):
    from glowtrain.runs import resolve_checkpoint, training_lock

    run = RunDir(tmp_path / "run")
    with training_lock(run):
        run.write_config(tiny_config())
        for args in (("info", "--run", run.path), ("eval", "--run", run.path, "--device", "cpu")):
            assert assert_one_line_error(invoke(*args), 2) == (
                f"error: {run.path} has no checkpoint yet: it is being trained (pid {os.getpid()}) — try again after "
                "its first checkpoint (every 3 steps)")  # TINY's train.checkpoint_every
    with pytest.raises(UserError, match="has no checkpoint \\(checkpoints/last.pt\\) — train it with"):
        resolve_checkpoint(str(run.path))  # the lock gone with its process


def _trained_to_4_with_step_2_kept(tmp_path, every: str) -> tuple:
    """(config, run, a copy of its step-2 checkpoint) of a run trained to step 2, then resumed to step 4."""
    cfg = apply_overrides(default_config(), NAN_RUN + ["train.steps=2", "train.checkpoint_every=2", every])
    run = RunDir(tmp_path / "run")
    train(cfg, out=str(run.path), progress=False)
    earlier = run.checkpoints / "at_step_2.pt"
    earlier.write_bytes(run.last.read_bytes())
    train(apply_overrides(cfg, ["train.steps=4"]), out=str(run.path), resume="auto", progress=False)
    return cfg, run, earlier


def test_going_back_to_an_earlier_checkpoint_keeps_the_later_last_and_best(tmp_path, capsys):
    cfg, run, earlier = _trained_to_4_with_step_2_kept(tmp_path, "train.eval_every=2")
    later_last, later_best = run.last.read_bytes(), run.best.read_bytes()
    assert torch.load(run.best, weights_only=True)["step"] == 4  # step 4 beat step 2
    metrics = run.metrics.read_bytes()
    train(cfg, out=str(run.path), resume=str(earlier), progress=False)  # at its train.steps: nothing to train
    assert (run.metrics.read_bytes(), run.last.read_bytes(), run.best.read_bytes()) == (metrics, later_last,
                                                                                      later_best)
    assert not run.metrics_discarded.exists() and not list(run.checkpoints.glob("discarded_*"))
    capsys.readouterr()
    train(apply_overrides(cfg, ["train.steps=3", "train.lr=1e-4"]), out=str(run.path), resume=str(earlier),
          progress=False)
    kept = {name: run.checkpoints / f"discarded_{name}_step0000004.pt" for name in ("last", "best")}
    assert kept["last"].read_bytes() == later_last and kept["best"].read_bytes() == later_best
    assert load_checkpoint(run.last)["step"] == 3
    assert f"they are kept as {kept['last']}, {kept['best']}" in capsys.readouterr().out
    train(apply_overrides(cfg, ["train.steps=4"]), out=str(run.path), resume="auto", progress=False)
    assert sorted(p.name for p in run.checkpoints.glob("discarded_*")) == sorted(p.name for p in kept.values())
    second = run.last.read_bytes()  # back to the first branch, also at step 4: both step-4 checkpoints are kept
    train(apply_overrides(cfg, ["train.steps=5"]), out=str(run.path), resume=str(kept["last"]), progress=False)
    assert kept["last"].read_bytes() == later_last != second and load_checkpoint(run.last)["step"] == 5
    assert (run.checkpoints / "discarded_last_step0000004_2.pt").read_bytes() == second


def test_going_back_keeps_the_sample_grids_the_training_it_gives_up_drew(tmp_path, capsys):
    cfg, run, earlier = _trained_to_4_with_step_2_kept(tmp_path, "train.sample_every=2")
    given_up = {path.name: path.read_bytes() for path in run.samples.glob("step0000004_*.png")}
    at_2 = {path.name: path.read_bytes() for path in run.samples.glob("step0000002_*.png")}
    assert given_up and at_2
    capsys.readouterr()
    train(apply_overrides(cfg, ["train.steps=4", "train.lr=1e-4"]), out=str(run.path), resume=str(earlier),
          progress=False)
    assert {name: (run.samples / f"discarded_{name}").read_bytes() for name in given_up} == given_up
    assert {name: (run.samples / name).read_bytes() for name in at_2} == at_2  # drawn before step 2: left
    assert all((run.samples / name).read_bytes() != grid for name, grid in given_up.items())  # the new branch's
    assert (f"note: {len(given_up)} sample grid(s) drawn after step 2 kept as {run.samples}/discarded_*.png"
            in capsys.readouterr().out)
    train(apply_overrides(cfg, ["train.steps=4", "train.lr=1e-3"]), out=str(run.path), resume=str(earlier),
          progress=False)  # a third branch: the second's grids kept beside the first's
    assert {name: (run.samples / f"discarded_{name}").read_bytes() for name in given_up} == given_up
    assert all((run.samples / f"discarded_2_{name}").exists() for name in given_up)


def test_a_resume_with_a_new_learning_rate_takes_over_from_the_rollbacks_halving(tmp_path, capsys):
    """After a rollback (lr halved, no second chance), the divergence message advises lowering train.lr and
    resuming: the new lr is then used as set, with a rollback allowed again."""
    poisoned = _poisoned(lambda call: call in (5, 6, 7))
    cfg = apply_overrides(default_config(), NAN_RUN)
    train(cfg, out=str(tmp_path / "run"), progress=False, trainer=poisoned)
    assert load_checkpoint(RunDir(tmp_path / "run").last)["train_state"]["lr_scale"] == 0.5
    same = train(apply_overrides(cfg, ["train.steps=11"]), out=str(tmp_path / "run"), resume="auto", progress=False)
    state = load_checkpoint(RunDir(same.run_dir).last)["train_state"]
    assert (state["lr_scale"], state["n_rollbacks"]) == (0.5, 1)
    capsys.readouterr()
    train(apply_overrides(cfg, ["train.steps=12", "train.lr=1e-3"]), out=str(tmp_path / "run"), resume="auto",
          progress=False)
    assert "train.lr changed since the rollback" in capsys.readouterr().out
    state = load_checkpoint(RunDir(tmp_path / "run").last)["train_state"]
    assert (state["lr_scale"], state["n_rollbacks"]) == (1.0, 0)
    logged = [m for m in _metrics(tmp_path / "run") if m["step"] == 12 and "lr" in m]
    assert logged[-1]["lr"] == pytest.approx(1e-3)


def test_resuming_keeps_this_runs_fused_adam_whatever_the_checkpoint_says(tmp_path):
    cfg = apply_overrides(default_config(), NAN_RUN + ["train.optimizer=adam", "train.steps=3"])
    out = tmp_path / "run"
    train(cfg, out=str(out), progress=False)
    last = RunDir(out).last
    state = torch.load(last, weights_only=True)
    assert all(group["fused"] for group in state["optimizer"]["param_groups"])
    for group in state["optimizer"]["param_groups"]:  # as an unfused Adam (an older glowtrain) wrote it
        group["fused"] = None
    torch.save(state, last)
    result = train(apply_overrides(cfg, ["train.steps=5"]), out=str(out), resume="auto", progress=False)
    assert result.step == 5
    assert all(group["fused"] for group in load_checkpoint(last)["optimizer"]["param_groups"])


@OPTIMIZERS
def test_a_second_divergence_stops_the_run_naming_step_and_cause(tmp_path, monkeypatch, optimizer):
    from glowtrain.train import TrainingDiverged

    poisoned = _poisoned(lambda call: call >= 5)
    cfg = apply_overrides(default_config(), NAN_RUN + [f"train.optimizer={optimizer}"])
    with pytest.raises(TrainingDiverged, match=r"up to step 9 .*learning rate.*did not help"):
        train(cfg, out=str(tmp_path / "run"), progress=False, trainer=poisoned)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 8  # skipped steps 7-8 left the weights finite, so the save at step 8 went ahead
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_divergence_before_any_checkpoint_says_there_is_nothing_to_roll_back_to(tmp_path, monkeypatch):
    from glowtrain.train import TrainingDiverged

    poisoned = _poisoned(lambda call: call >= 1)
    cfg = apply_overrides(default_config(), NAN_RUN + ["train.checkpoint_every=100"])
    with pytest.raises(TrainingDiverged, match="no checkpoint to roll back to"):
        train(cfg, out=str(tmp_path / "run"), progress=False, trainer=poisoned)


def test_training_from_python_takes_if_any_and_a_finished_run_returns_its_last_evaluation(tiny_run, tmp_path):
    cfg, straight_dir, straight = tiny_run
    out = tmp_path / "run"
    shutil.copytree(straight_dir, out)
    again = train(cfg, out=str(out), resume="if-any", progress=False)  # resumed: already at train.steps
    assert again.step == 6 and again.test == straight.test and again.test["bpd"] == straight.best_test_bpd
    fresh = train(tiny_config("train.steps=2", "train.eval_every=2"), out=str(tmp_path / "new"), resume="if-any",
                  progress=False)  # nothing to resume: a fresh start
    assert fresh.step == 2 and fresh.test["step"] == 2


def test_a_resume_with_nothing_to_train_from_an_earlier_checkpoint_returns_that_steps_evaluation(tmp_path):
    out = tmp_path / "run"
    first = train(tiny_config("train.steps=3"), out=str(out), progress=False)
    shutil.copy(RunDir(out).last, RunDir(out).checkpoints / "step3.pt")
    later = train(tiny_config("train.steps=6"), out=str(out), resume="auto", progress=False)
    assert later.test["step"] == 6
    back = train(tiny_config("train.steps=3"), out=str(out), resume=str(RunDir(out).checkpoints / "step3.pt"),
                 progress=False)  # its own steps=3: nothing to train
    assert back.step == 3 and back.test == first.test and back.test["step"] == 3  # not step 6's, left behind


def test_a_new_run_refuses_a_seed_the_cpu_generator_cannot_tell_apart(tmp_path):
    with pytest.raises(UserError, match=r"run.seed=4294967296 is not allowed — use an integer from 0 to 2\*\*32 - 1"):
        train(tiny_config(f"run.seed={2**32}"), out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_an_interruption_is_a_keyboard_interrupt_that_says_where_to_go_on():
    from glowtrain.train import Interrupted

    stopped = Interrupted(46, "runs/x")
    assert isinstance(stopped, KeyboardInterrupt) and not isinstance(stopped, Exception)
    assert str(stopped) == "interrupted at step 46; checkpoint saved in runs/x — go on with train(cfg, out='runs/x', " \
                           "resume='auto')"
    assert stopped.args == (46, "runs/x")  # what the CLI reads


SMALL = ["run.device=cpu", *GLOW_LAYERS, "model.n_levels=2", "model.n_steps=2", "model.hidden_channels=16",
         "train.batch_size=16", "train.init_batch_size=32", "train.eval_batch_size=300", "train.steps=4",
         "train.warmup_steps=2",
         "train.log_every=1", "train.eval_every=4", "train.sample_every=4", "train.n_samples=1",
         "train.sample_temperatures=[0]"]


def test_memory_saving_training_matches_standard_and_logs_reconstruction_drift(tmp_path):
    runs = {}
    for flag in ("false", "true"):
        cfg = apply_overrides(default_config(), SMALL + [f"train.memory_saving={flag}"])
        train(cfg, out=str(tmp_path / flag), progress=False)
        runs[flag] = [json.loads(line) for line in (tmp_path / flag / "metrics.jsonl").read_text().splitlines()]
    standard = [m["bpd"] for m in runs["false"] if m["split"] == "train"]
    saving = [m["bpd"] for m in runs["true"] if m["split"] == "train" and "bpd" in m]
    assert len(standard) == len(saving) == 4
    assert max(abs(a - b) for a, b in zip(standard, saving)) < 1e-4
    drift = [m for m in runs["true"] if m["split"] == "reconstruction"]
    assert drift and all(0 <= drift[0][f"max_error_level{i}"] < 1e-3 for i in range(2))


def test_bf16_coupling_networks_stay_within_0_01_bpd_of_float32_on_a_trained_model(tmp_path):
    cfg = apply_overrides(default_config(), SMALL + ["train.steps=30", "train.lr=3e-3", "train.eval_every=30",
                                                     "train.sample_every=30"])
    train(cfg, out=str(tmp_path / "run"), progress=False)
    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"))
    test_set = build_dataset(cfg.data, "test")
    full = evaluate(model, test_set, cfg, torch.device("cpu"))["bpd"]
    bf16 = evaluate(model.set_amp(torch.bfloat16), test_set, cfg, torch.device("cpu"))["bpd"]
    assert full != bf16  # the bf16 path really ran
    assert abs(full - bf16) < 0.01


def test_bf16_training_runs_and_learns(tmp_path):
    cfg = apply_overrides(default_config(), SMALL + ["train.amp=bf16", "train.steps=20", "train.lr=3e-3",
                                                     "train.eval_every=20", "train.sample_every=20"])
    with pytest.warns(UserWarning, match="bf16 convolutions are much slower"):
        result = train(cfg, out=str(tmp_path / "run"), progress=False)
    assert math.isfinite(result.test["bpd"]) and result.test["bpd"] < 4.2


@pytest.mark.filterwarnings("ignore:train.amp=bf16 on a CPU")
def test_bf16_with_memory_saving_warns_about_the_rebuild_drift_and_logs_it(tmp_path):
    cfg = apply_overrides(default_config(), SMALL + ["train.amp=bf16", "train.memory_saving=true"])
    with pytest.warns(UserWarning, match="drift by about 3e-3"):
        train(cfg, out=str(tmp_path / "run"), progress=False)
    logged = [m for m in read_metrics(tmp_path / "run") if m["split"] == "reconstruction"]
    assert logged and all(0 < value < 0.1 for m in logged for key, value in m.items() if key.startswith("max_error"))


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    def broken_compile(module, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no compiler backend here")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = apply_overrides(default_config(), SMALL + ["train.compile=true"])
    with pytest.warns(UserWarning, match="torch.compile failed .*no compiler backend here"):
        result = train(cfg, out=str(tmp_path / "run"), progress=False)
    assert result.step == 4


def test_a_batch_larger_than_the_dataset_fails_before_anything_is_written(tmp_path):
    cfg = apply_overrides(default_config(), SMALL + ["train.batch_size=2000"])
    with pytest.raises(UserError, match=r"needs 2000 images .* dataset has 1500; lower train.batch_size"):
        train(cfg, out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_temperature_listed_twice_is_sampled_once(tmp_path, monkeypatch):
    import glowtrain.train as train_module

    drawn, original = [], train_module.sample_images
    monkeypatch.setattr(train_module, "sample_images", lambda model, n, t, *rest: drawn.append(t) or
                        original(model, n, t, *rest))
    train(apply_overrides(default_config(), [*SMALL, "train.sample_temperatures=[0.7,1,0.7]"]),
          out=str(tmp_path / "run"), progress=False)
    assert drawn == [0.7, 1.0]  # once, at the last step


def test_a_run_without_a_checkpoint_starts_afresh_and_keeps_its_old_logs(tmp_path):
    run_dir = tmp_path / "run"

    class DiesAtStepTwo(Trainer):
        def prepare_batch(self, images, labels):
            if self.state.step == 1:
                raise RuntimeError("the machine went away")
            return super().prepare_batch(images, labels)

    checkpoints, died, died_best = run_dir / "checkpoints", [], []
    for seed in (0, 1):  # it dies twice: the second start keeps the first's logs, the third both
        with pytest.raises(RuntimeError, match="went away"):  # after step 1's evaluation wrote a best.pt
            train(apply_overrides(default_config(), [*SMALL, "train.eval_every=1", "train.sample_every=1",
                                                     f"run.seed={seed}"]),
                  out=str(run_dir), progress=False, trainer=DiesAtStepTwo)
        assert not (checkpoints / "last.pt").exists() and (checkpoints / "best.pt").is_file()
        died.append((run_dir / "metrics.jsonl").read_text())
        died_best.append((checkpoints / "best.pt").read_bytes())
        assert died[-1] and (run_dir / "tb").is_dir()
    assert died[0] != died[1]
    train(apply_overrides(default_config(), [*SMALL, "train.eval_every=1000"]), out=str(run_dir), progress=False)
    assert [(run_dir / name).read_text() for name in ("metrics.jsonl.old", "metrics.jsonl.old_2")] == died
    assert (run_dir / "tb.old").is_dir() and (run_dir / "tb.old_2").is_dir()
    assert [p.name for p in (run_dir / "samples.old").iterdir()] == ["step0000001_t0p00.png"]  # SMALL's temperature
    assert (run_dir / "samples.old_2").is_dir()  # not written over by the next start's grids of the same name
    # The new run's best.pt is its own (its final evaluation): the dead runs' are kept aside, not passed off as it.
    assert [(checkpoints / name).read_bytes() for name in ("best.pt.old", "best.pt.old_2")] == died_best
    assert torch.load(checkpoints / "best.pt", weights_only=True)["step"] == 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]  # the new run's alone


def test_a_config_yaml_edited_since_fit_wrote_it_is_kept_not_replaced(tmp_path):
    first, copied = tmp_path / "first", tmp_path / "copied"
    ok(invoke("fit", "--out", first, "--no-progress", *sets(*SMALL)))
    copied.mkdir()
    notes = (first / "config.yaml").read_text() + "# my notes: the lr sweep's third point\n"
    (copied / "config.yaml").write_text(notes)
    fresh = ok(invoke("fit", "--config", copied / "config.yaml", "--out", copied, "--no-progress"))
    assert f"note: {copied / 'config.yaml'} had been edited since fit wrote it; kept as " in fresh.stdout
    assert (copied / "config.edited.yaml").read_text() == notes
    assert (copied / "config.yaml").read_text() == (first / "config.yaml").read_text()  # the same settings

    resumed = ok(invoke("fit", "--out", first, "--resume", "auto", "--no-progress", *sets("train.steps=5")))
    assert "had been edited" not in resumed.stdout and not (first / "config.edited.yaml").exists()  # as fit wrote it
    edits = {"config.edited.yaml": lambda text: text.replace(b"  lr: ", b"  lr:  "),  # a value retouched by hand
             "config.edited_2.yaml": lambda text: text + b"# tried lr 3e-4 first\n",
             "config.edited_3.yaml": lambda text: b"\xef\xbb\xbf" + text,  # saved by an editor that adds a BOM
             "config.edited_4.yaml": lambda text: text + b"# r\xe9sum\xe9 of the sweep\n"}  # ... or writes Latin-1
    for n, (name, edit) in enumerate(edits.items(), start=6):
        text = edit((first / "config.yaml").read_bytes())
        (first / "config.yaml").write_bytes(text)
        resumed = ok(invoke("fit", "--out", first, "--resume", "auto", "--no-progress", *sets(f"train.steps={n}")))
        assert (first / name).read_bytes() == text
        assert "does not use the edits" not in resumed.stdout  # the same settings: nothing went unused
    assert RunDir(first).config_origin() == "fit" and load_config(first / "config.yaml").train.steps == 9


@pytest.mark.parametrize("theirs", [["config.yaml"], ["data.json", "samples/step1.png"], ["tb/events"]])
def test_a_new_run_refuses_a_folder_whose_run_files_no_run_wrote_and_changes_nothing(tmp_path, theirs):
    folder = tmp_path / "project"
    for name in [*theirs, "notes.txt"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"the user's own {name}\n")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    result = invoke("fit", "--out", folder, "--no-progress", *sets(*SMALL))
    assert_one_line_error(result, 2, f"{folder} holds {theirs[0].split('/')[0]}", "choose another --out")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_new_run_may_go_into_a_folder_of_unrelated_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    train(apply_overrides(default_config(), SMALL), out=str(tmp_path), progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine\n" and (tmp_path / "checkpoints" / "last.pt").is_file()


def test_weights_that_became_non_finite_are_never_saved_over_a_checkpoint(tmp_path, monkeypatch):
    from glowtrain.train import TrainingDiverged

    cfg = apply_overrides(default_config(), NAN_RUN + ["train.steps=6"])
    real_step = GatedAdamax.step
    calls = {"n": 0}

    def step_then_break_a_weight(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # after step 3, between the checkpoints at 2 and 4
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(GatedAdamax, "step", step_then_break_a_weight)
    with pytest.raises(TrainingDiverged, match="the weights hold NaN or inf at step 4; not saving them"):
        train(cfg, out=str(tmp_path / "run"), progress=False)
    saved = load_checkpoint(RunDir(tmp_path / "run").last)
    assert saved["step"] == 2 and all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


ACCUMULATION = ["run.device=cpu", *GLOW_LAYERS, "model.n_levels=2", "model.n_steps=2", "model.hidden_channels=16",
                "train.init_batch_size=64", "train.eval_batch_size=300", "train.steps=20", "train.warmup_steps=5",
                "train.log_every=5", "train.eval_every=10", "train.sample_every=100", "train.checkpoint_every=10",
                "train.n_samples=1", "train.sample_temperatures=[0]", "data.hflip=true"]


@pytest.mark.parametrize("memory_saving", [False, True])
def test_accumulated_micro_batches_train_like_one_big_batch(tmp_path, memory_saving):
    runs = {}
    for name, batch in (("big", ["train.batch_size=64"]), ("accumulated", ["train.batch_size=32",
                                                                             "train.grad_accum_steps=2"])):
        cfg = apply_overrides(default_config(), ACCUMULATION + batch + [f"train.memory_saving={memory_saving}"])
        train(cfg, out=str(tmp_path / name), progress=False)
        runs[name] = (read_metrics(tmp_path / name), load_checkpoint(RunDir(tmp_path / name).last))
    (big_metrics, big), (acc_metrics, acc) = runs["big"], runs["accumulated"]
    assert [(m["step"], m["split"]) for m in big_metrics] == [(m["step"], m["split"]) for m in acc_metrics]
    for a, b in zip(big_metrics, acc_metrics):
        if "bpd" in a:
            assert abs(a["bpd"] - b["bpd"]) < 1e-5, (a, b)
        if "grad_norm" in a:  # the summed micro-batch gradients are the big batch's mean gradient
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for name, tensor in big["model"].items():
        assert torch.allclose(tensor, acc["model"][name], rtol=1e-4, atol=1e-5), name
    assert len([m for m in acc_metrics if m["split"] == "train"]) == 4  # 20 steps, not 40 micro-batches


# ---------------------------------------------------------------------------- a new loss term: objective.py alone

Z_L2_WEIGHT = 0.5


def _latent_mean_square(objective: Objective, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per image, the mean of z**2 over all its latents: a made-up loss term with a gradient for every layer."""
    zs, _ = objective.model.encode(objective.dequantizer(images, noise)[0])
    return torch.cat([z.flatten(1) for z in zs], 1).pow(2).mean(1)


def _add_a_latent_penalty(monkeypatch):
    """Objective.forward with one more term, as objective.py would add it: named in `terms`, weighted into `loss`.
    Nothing else is changed. Returns the plain forward."""
    plain = Objective.forward

    def forward(self, images, labels, noise):
        output = plain(self, images, labels, noise)
        z_l2 = _latent_mean_square(self, images, noise)
        return ObjectiveOutput(output.loss + Z_L2_WEIGHT * z_l2.mean(), {**output.terms, "z_l2": z_l2})

    monkeypatch.setattr(Objective, "forward", forward)
    return plain


def test_a_term_added_to_the_objective_alone_is_in_the_trainers_gradient(tmp_path, monkeypatch):
    plain = _add_a_latent_penalty(monkeypatch)
    cfg = tiny_config("train.grad_clip=0")  # no clipping: the step leaves the backward's gradients as they were
    data = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    trainer = Trainer(cfg, Context(device=torch.device("cpu")), RunDir(tmp_path / "run"), datasets=data,
                      progress=False)
    images, labels = next(trainer.batches)
    batch = trainer.prepare_batch(images, labels)
    reference = copy.deepcopy(trainer.objective)
    params = list(reference.parameters())
    without = torch.autograd.grad(plain(reference, *batch).loss, params)
    penalty = _latent_mean_square(reference, batch[0], batch[2]).mean()
    expected = torch.autograd.grad(plain(reference, *batch).loss + Z_L2_WEIGHT * penalty, params)
    metrics = trainer.train_step(images, labels)
    got = [p.grad for p in trainer.objective.parameters()]
    assert all(torch.allclose(g, e, rtol=1e-5, atol=1e-7) for g, e in zip(got, expected, strict=True))
    assert not all(torch.allclose(w, e, rtol=1e-3, atol=1e-5) for w, e in zip(without, expected))  # it mattered
    assert metrics.terms["z_l2"] == pytest.approx(penalty.item(), rel=1e-6)


def test_a_term_added_to_the_objective_alone_is_logged_and_evaluated(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain = _add_a_latent_penalty(monkeypatch)
    cfg = tiny_config("train.grad_accum_steps=2", "train.batch_size=8")
    result = train(cfg, out=str(tmp_path / "run"), progress=False)
    records = [r for r in read_metrics(tmp_path / "run") if "bpd" in r]
    assert [r["step"] for r in records if "z_l2" in r] == [r["step"] for r in records] == [2, 3, 4, 6, 6]
    assert all(math.isfinite(r["z_l2"]) and r["z_l2"] > 0 for r in records)
    assert result.test["z_l2"] == records[-1]["z_l2"]
    events = EventAccumulator(str(RunDir(tmp_path / "run").tb), size_guidance={"scalars": 0})
    events.Reload()
    for split in ("train", "test"):
        logged = [r["z_l2"] for r in records if r["split"] == split]
        assert [s.value for s in events.Scalars(f"{split}/z_l2")] == pytest.approx(logged, rel=1e-6)
    lines = [line for line in capsys.readouterr().out.splitlines() if "train bpd" in line]
    assert len(lines) == 3 and all(", z_l2 " in line for line in lines)
    # Evaluation: the term's mean over the test split, each image with its own evaluation noise; bpd as before.
    objective = Trainer(cfg, Context(device=torch.device("cpu")), RunDir(tmp_path / "fresh"), progress=False).objective
    test_set = build_dataset(cfg.data, "test")
    evaluated = evaluate(objective, test_set, cfg, torch.device("cpu"))
    images, _ = next(make_eval_batches(test_set, len(test_set)))
    noise = per_image_noise(list(range(len(test_set))), tuple(images.shape[1:]), EVAL_NOISE_SEED, torch.device("cpu"))
    with torch.no_grad():
        direct = _latent_mean_square(objective, images, noise).double().mean().item()
    assert evaluated["z_l2"] == pytest.approx(direct, rel=1e-6)
    monkeypatch.setattr(Objective, "forward", plain)
    assert evaluate(objective, test_set, cfg, torch.device("cpu")) == {k: v for k, v in evaluated.items()
                                                                        if k != "z_l2"}


# ---------------------------------------------------------------------------- resuming with other keys (issue 14)


@pytest.mark.parametrize("override", ["data.n_bits=3", "model.hidden_channels=8", "data.hflip=true",
                                      "data.test_fraction=0.2"])
def test_resume_refuses_keys_that_change_what_is_modelled_and_changes_nothing(tiny_run, tmp_path, override):
    from helpers import assert_one_line_error, invoke, sets

    _, straight_dir, _ = tiny_run
    out = tmp_path / "run"
    shutil.copytree(straight_dir, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    key = override.split("=")[0]
    with pytest.raises(UserError, match=f"^{key} cannot change when resuming .* start a new run"):
        fit_config(None, [override, "train.steps=8"], str(out), "auto")
    result = invoke("fit", "--resume", "auto", "--out", out, "--no-progress", *sets(override, "train.steps=8"))
    assert_one_line_error(result, 2, key, "start a new run")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_with_a_config_that_leaves_a_model_key_at_its_default_says_to_resume_without_it(tiny_run, tmp_path):
    from helpers import assert_one_line_error, invoke

    _, straight_dir, _ = tiny_run
    out = tmp_path / "run"
    shutil.copytree(straight_dir, out)
    partial = tmp_path / "longer.yaml"
    partial.write_text("train:\n  steps: 8\n")  # model.n_steps etc. fall back to their defaults
    line = assert_one_line_error(invoke("fit", "--resume", "auto", "--out", out, "--config", partial), 2)
    assert "cannot change when resuming" in line
    assert line.endswith("; or resume without --config: the run's own config is used, and --set changes its run.* "
                         "and train.* keys")


def test_resume_allows_keys_that_leave_the_model_and_data_as_they_are(tiny_run):
    cfg, straight_dir, _ = tiny_run
    safe = ["train.steps=9", "train.log_every=1", "train.eval_every=2", "train.lr=0.001", "data.n_workers=2",
            "data.root=elsewhere", "run.name=other"]
    resumed = fit_config(None, safe, str(straight_dir), "auto")
    assert (resumed.train.steps, resumed.train.log_every, resumed.data.n_workers) == (9, 1, 2)
    assert resumed.model == cfg.model and resumed.data.n_bits == cfg.data.n_bits


def test_images_per_s_counts_training_steps_only(tmp_path, monkeypatch):
    """On a clock where a step takes 1 s and the data workers' start, evaluations, samples and saves take
    100 s each, every logged window says exactly one batch per second, also after a resume."""
    import glowtrain.train as training

    clock = [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock[0])

    def taking(seconds, method):
        def timed(*args, **kwargs):
            clock[0] += seconds
            return method(*args, **kwargs)
        return timed

    for name, seconds in (("train_step", 1.0), ("evaluate", 100.0), ("write_samples", 100.0), ("save", 100.0)):
        monkeypatch.setattr(Trainer, name, taking(seconds, getattr(Trainer, name)))
    batches_from = Trainer._batches_from

    def slow_to_start(self, step):
        batches = batches_from(self, step)

        def started_late():
            clock[0] += 100.0  # the data workers start with the first batch
            yield from batches
        return started_late()

    monkeypatch.setattr(Trainer, "_batches_from", slow_to_start)
    out = tmp_path / "run"
    train(tiny_config("train.steps=4"), out=str(out), progress=False)
    train(tiny_config(), out=str(out), resume="auto", progress=False)
    rates = [r["images_per_s"] for r in read_metrics(out) if r["split"] == "train"]
    assert rates == [16.0] * 3  # steps 2, 4 and, after the resume at 4, 6


def test_images_per_s_reads_the_clock_once_a_gpu_has_done_the_work_queued_and_only_when_due(monkeypatch, tmp_path):
    """The host queues GPU steps without waiting: the window's clock waits for the device, at log steps and at the
    steps that evaluate, sample or save (a pause), and never at the steps between them."""
    from glowtrain import train as training

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    window = training._Throughput(2, torch.device("cuda", 1))  # no CUDA work is made
    window.add(8)
    with window.paused():
        pass
    assert window.restart() > 0 and waited == 3 * [torch.device("cuda", 1)]
    with training._Throughput(1).paused():  # a CPU's clock waits for nothing
        pass
    assert len(waited) == 3
    steps_begun, paused_at = [], []
    real_paused = training._Throughput.paused

    def paused(self):
        paused_at.append(len(steps_begun))
        return real_paused(self)

    class Counting(Trainer):
        def prepare_batch(self, images, labels):
            steps_begun.append(self.state.step)
            return super().prepare_batch(images, labels)

    monkeypatch.setattr(training._Throughput, "paused", paused)
    train(tiny_config(), out=str(tmp_path / "run"), progress=False, trainer=Counting)
    assert paused_at == [3, 6]  # TINY evaluates, samples and saves at steps 3 and 6
