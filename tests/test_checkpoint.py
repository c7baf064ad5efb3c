"""Checkpoints: atomic saves, safe and explained loads, rebuilding models, finding the run a command means."""

import copy
import os
import pathlib
import pickle

import pytest
import torch
from helpers import perturb

from glowtrain.checkpoint import (
    checkpoint_state,
    load_checkpoint,
    load_state_checked,
    model_from_checkpoint,
    save_checkpoint,
)
from glowtrain.config import apply_overrides, config_to_dict, default_config, save_config
from glowtrain.errors import UserError
from glowtrain.model import Glow
from glowtrain.runs import RunDir, latest_run, resolve_checkpoint

TINY = ["model.n_levels=2", "model.n_steps=2", "model.hidden_channels=8"]


def tiny_state(*extra: str, seed: int = 0) -> dict:
    """A complete checkpoint dict for a tiny initialised, perturbed model (EMA = a different perturbation)."""
    cfg = apply_overrides(default_config(), [*TINY, *extra])
    torch.manual_seed(seed)
    model = Glow.from_config(cfg)
    model.initialize(torch.rand(16, *cfg.image_shape) - 0.5)
    ema = copy.deepcopy(model)
    perturb(model, 0.05, seed)
    perturb(ema, 0.05, seed + 1)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    return checkpoint_state(model=model, ema=ema, optimizer=optimizer, cfg_dict=config_to_dict(cfg),
                            train_state={"step": 7, "best_test_bpd": 3.5})


@pytest.fixture(scope="module")
def state():
    return tiny_state()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------- atomic saves


def test_save_checkpoint_writes_a_loadable_file_and_leaves_no_temporary_files(tmp_path, state):
    path = tmp_path / "deep" / "checkpoints" / "last.pt"
    save_checkpoint(state, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["best_test_bpd"] == 3.5 and loaded["config"] == state["config"]
    assert_same_tensors(loaded["model"], state["model"])
    assert_same_tensors(loaded["ema"], state["ema"])
    # Overwriting is atomic too and leaves one file.
    save_checkpoint({**state, "step": 8}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["step"] == 8


def test_failed_save_keeps_the_previous_checkpoint_and_propagates_the_error(tmp_path, state, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(state, path)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint({**state, "step": 8}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ---------------------------------------------------------------------------- loading bad files


def test_missing_checkpoint_is_a_user_error_naming_the_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="not found") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_truncated_checkpoint_is_a_user_error(tmp_path, state):
    good = tmp_path / "good.pt"
    save_checkpoint(state, good)
    data = good.read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable glowtrain checkpoint") as info:
        load_checkpoint(half)
    assert str(half) in str(info.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="not a readable glowtrain checkpoint"):
        load_checkpoint(empty)


@pytest.mark.parametrize("text", [
    pytest.param("{\"step\": 1}\n", id="json"),
    pytest.param("model: x\n", id="yaml-model"),
    pytest.param("hello world\nthis is not a checkpoint\n", id="prose"),
    pytest.param("abc", id="short"),
    pytest.param("config.yaml", id="config-yaml"),
])
def test_text_file_given_as_checkpoint_is_a_user_error(tmp_path, text):
    path = tmp_path / "not_a_checkpoint.pt"
    if text == "config.yaml":  # the likeliest mistake: `--checkpoint runs/x/config.yaml`
        save_config(default_config(), path)
    else:
        path.write_text(text)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "not a readable glowtrain checkpoint" in str(info.value) or "not a glowtrain checkpoint" in str(info.value)


def test_checkpoint_without_model_and_config_is_a_user_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="not a glowtrain checkpoint"):
        load_checkpoint(path)
    torch.save([torch.zeros(3)], path)
    with pytest.raises(UserError, match="not a glowtrain checkpoint"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": _Payload(marker), "config": {}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(UserError, match="refusing to load") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # The file really is a working exploit for an unsafe loader (so the check above means something).
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_refusal_message_is_plain_text(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload(tmp_path / "pwned"), "config": {}}, path)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\x1b" not in message and "two options" not in message


# ---------------------------------------------------------------------------- rebuilding models


def test_model_from_checkpoint_rebuilds_the_same_model_without_a_config_file(tmp_path, state):
    path = tmp_path / "last.pt"
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    ema_model, cfg = model_from_checkpoint(loaded)
    raw_model, _ = model_from_checkpoint(loaded, use_ema=False)
    assert cfg.model.hidden_channels == 8 and cfg.model.n_levels == 2
    assert not ema_model.training
    assert_same_tensors(ema_model.state_dict(), state["ema"])
    assert_same_tensors(raw_model.state_dict(), state["model"])

    # The same function as the saved model: equal log-likelihoods on a batch.
    original = Glow.from_config(cfg)
    original.load_state_dict(state["ema"])
    original.eval()
    x = torch.rand(8, *cfg.image_shape, generator=torch.Generator().manual_seed(1)) - 0.5
    with torch.no_grad():
        assert torch.equal(ema_model.log_prob(x), original.log_prob(x))
        assert not torch.allclose(raw_model.log_prob(x), ema_model.log_prob(x))


def test_model_from_checkpoint_without_ema_uses_the_raw_weights(state):
    model, _ = model_from_checkpoint({**state, "ema": None})
    assert_same_tensors(model.state_dict(), state["model"])


def test_loading_weights_into_another_architecture_names_the_tensor_and_both_shapes(state):
    cfg = apply_overrides(default_config(), [*TINY, "model.hidden_channels=16"])
    other = Glow.from_config(cfg)
    own = other.state_dict()
    name, tensor = next((n, t) for n, t in state["model"].items() if own[n].shape != t.shape)
    with pytest.raises(UserError) as info:
        load_state_checked(other, state["model"], "ckpt.pt")
    message = str(info.value)
    assert "ckpt.pt" in message and name in message
    assert str(tuple(tensor.shape)) in message and str(tuple(own[name].shape)) in message


def test_loading_weights_with_missing_or_extra_tensors_names_the_tensor(state):
    model = Glow.from_config(apply_overrides(default_config(), TINY))
    weights = dict(state["model"])
    dropped = next(iter(weights))
    del weights[dropped]
    with pytest.raises(UserError, match="missing") as info:
        load_state_checked(model, weights, "ckpt.pt")
    assert dropped in str(info.value)
    with pytest.raises(UserError, match="unexpected tensor 'extra.weight'"):
        load_state_checked(model, {**state["model"], "extra.weight": torch.zeros(1)}, "ckpt.pt")


# ---------------------------------------------------------------------------- finding runs


def make_run(root, name: str, mtime: float, best: bool = False) -> pathlib.Path:
    run = root / name
    for key in ("last", "best") if best else ("last",):
        path = getattr(RunDir(run), key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"stand-in")
        os.utime(path, (mtime, mtime))
    return run


def test_latest_run_is_the_one_whose_last_checkpoint_was_written_most_recently(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "a_old", 1_000_000)
    newest = make_run(runs, "b_new", 3_000_000)
    make_run(runs, "c_middle", 2_000_000)
    (runs / "d_unfinished" / "checkpoints").mkdir(parents=True)  # no last.pt: never a candidate
    assert latest_run(runs).path == newest
    os.utime(RunDir(runs / "a_old").last, (4_000_000, 4_000_000))
    assert latest_run(runs).path == runs / "a_old"


def test_resolve_checkpoint_with_neither_option_uses_the_latest_run_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(pathlib.Path("runs"), "one", 1_000_000)
    make_run(pathlib.Path("runs"), "two", 2_000_000, best=True)
    assert resolve_checkpoint() == RunDir(pathlib.Path("runs/two")).last
    assert resolve_checkpoint(which="best") == RunDir(pathlib.Path("runs/two")).best
    # A run without best.pt falls back to last.pt.
    assert resolve_checkpoint(run="runs/one", which="best") == RunDir(pathlib.Path("runs/one")).last


def test_resolve_checkpoint_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no finished run found under runs"):
        resolve_checkpoint()
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="no finished run found under runs"):
        resolve_checkpoint()
    with pytest.raises(UserError, match="no finished run"):
        latest_run(tmp_path / "runs")
    with pytest.raises(UserError, match="checkpoint not found: missing.pt"):
        resolve_checkpoint(checkpoint="missing.pt")
    run = make_run(tmp_path / "runs", "r", 1_000_000)
    with pytest.raises(UserError, match="either --run or --checkpoint, not both"):
        resolve_checkpoint(run=str(run), checkpoint=str(RunDir(run).last))
    with pytest.raises(UserError, match="run directory not found: nowhere"):
        resolve_checkpoint(run="nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(UserError, match="has no checkpoint"):
        resolve_checkpoint(run="bare")
