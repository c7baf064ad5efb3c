"""Checkpoints: atomic saves, safe and explained loads, rebuilding models, finding the run a command means."""

import copy
import os
import pathlib
import pickle
from collections import OrderedDict, namedtuple

import pytest
import torch
from helpers import GLOW_LAYERS, perturb

from glowtrain.checkpoint import (
    checkpoint_state,
    gather_to_host,
    host_copy,
    load_checkpoint,
    load_state_checked,
    model_from_checkpoint,
    open_run,
    plan_buckets,
    save_checkpoint,
)
from glowtrain.config import apply_overrides, config_to_dict, default_config, save_config
from glowtrain.errors import UserError
from glowtrain.model import Glow
from glowtrain.optim import build_optimizer, load_optimizer_state
from glowtrain.precision import full_float32
from glowtrain.runs import RunDir, latest_run, resolve_checkpoint

TINY = [*GLOW_LAYERS, "model.n_levels=2", "model.n_steps=2", "model.hidden_channels=8"]


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
    (-model.log_prob(torch.rand(4, *cfg.image_shape) - 0.5).mean()).backward()
    optimizer.step()  # moments and step counts: the largest part of a real checkpoint
    return checkpoint_state(model=model, ema=ema, optimizer=optimizer, cfg_dict=config_to_dict(cfg),
                            train_state={"step": 7, "best_test_bpd": 3.5})


@pytest.fixture(scope="module")
def state():
    return tiny_state()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


# ---------------------------------------------------------------------------- atomic saves


def test_save_checkpoint_writes_a_loadable_file_and_leaves_no_temporary_files(tmp_path, state):
    path = tmp_path / "deep" / "checkpoints" / "last.pt"
    save_checkpoint(state, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["best_test_bpd"] == 3.5 and loaded["config"] == state["config"]
    assert_same_tensors(loaded["model"], state["model"])
    assert_same_tensors(loaded["ema"], state["ema"])
    raw = torch.load(path, weights_only=True)  # where each tensor was stored (a GPU's are copied to the CPU)
    assert {t.device.type for t in _tensors(raw)} == {"cpu"} and len(list(_tensors(raw))) == len(list(_tensors(state)))
    assert raw["model"]._metadata == state["model"]._metadata  # module versions, which load_state_dict reads
    assert raw["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    # One generator state per GPU (none on a CPU): a list of tensors, compared one by one.
    assert len(raw["rng"]["cuda"]) == len(state["rng"]["cuda"]) == torch.cuda.device_count()
    assert all(map(torch.equal, raw["rng"]["cuda"], state["rng"]["cuda"]))
    assert torch.equal(raw["rng"]["torch"], state["rng"]["torch"])
    # Overwriting is atomic too and leaves one file.
    save_checkpoint({**state, "step": 8}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["step"] == 8


def test_failed_save_keeps_the_previous_checkpoint_and_says_why_in_one_line(tmp_path, state, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(state, path)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    def disk_full_as_torch_says_it(obj, f, *args, **kwargs):
        try:
            disk_full(obj, f)
        except OSError:  # torch's zip writer reports it so, the OSError only its context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 190848 vs 190784") from None

    for failing in (disk_full, disk_full_as_torch_says_it):
        monkeypatch.setattr(torch, "save", failing)
        with pytest.raises(UserError) as refused:
            save_checkpoint({**state, "step": 8}, path)
        assert str(refused.value) == (f"cannot write {path} (No space left on device); the previous last.pt is kept "
                                      "— free space or make it writable, or choose another --out")
        monkeypatch.undo()
        assert path.read_bytes() == before
        assert load_checkpoint(path)["step"] == 7
        assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    import glowtrain.files as files

    replace = files.os.replace

    def replaced_then_full(source, target):  # the new file is in place when the disk fills (the folder's fsync)
        replace(source, target)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", replaced_then_full)
    with pytest.raises(UserError) as refused:
        save_checkpoint({**state, "step": 9}, path)
    assert "No space left on device" in str(refused.value) and "is kept" not in str(refused.value)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", lambda *args: (_ for _ in ()).throw(RuntimeError("a bug of ours")))
    with pytest.raises(RuntimeError, match="a bug of ours"):  # not every failure is the disk's
        save_checkpoint({**state, "step": 8}, path)


# ---------------------------------------------------------------------------- copying to the host
# `on_device=lambda t: True` sends CPU tensors through the bucketed path a GPU's tensors take (join, copy, split).


def every_kind_of_tensor() -> list[torch.Tensor]:
    """Each dtype a checkpoint holds, in every shape that needs care: 0-dim, empty, transposed, sliced."""
    wide = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    return [
        torch.tensor([1.5, -0.0, float("nan"), float("-inf")]),  # bit for bit: -0.0 and NaN compare oddly
        torch.linspace(-1, 1, 20, dtype=torch.float64).reshape(4, 5).t(),  # non-contiguous
        torch.tensor(7, dtype=torch.int64),  # 0-dim, like an optimiser's step
        torch.tensor([True, False, True]),
        torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
        torch.zeros(0, 3),
        wide[2:5],  # contiguous, inside a larger storage
        wide[:, 1],  # strided, inside a larger storage
        torch.full((2, 2), 3.0, requires_grad=True),
        torch.arange(5, dtype=torch.int64).reshape(5, 1).expand(5, 3),  # stride 0
        torch.ones(40, dtype=torch.float64),  # larger than the bucket on its own
    ]


def _bits(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().contiguous().reshape(-1).view(torch.uint8).tolist())


def assert_exact_compact_copies(copies: list[torch.Tensor], originals: list[torch.Tensor]) -> None:
    assert len(copies) == len(originals)
    for index, (copy_, original) in enumerate(zip(copies, originals)):
        assert copy_.device.type == "cpu" and copy_.dtype == original.dtype and copy_.shape == original.shape, index
        assert _bits(copy_) == _bits(original), index
        assert copy_.is_contiguous() and not copy_.requires_grad, index
        # torch.save writes a tensor's whole storage: a piece of a bucket must not carry the rest of it.
        assert copy_.untyped_storage().nbytes() == copy_.numel() * copy_.element_size(), index


def test_gather_to_host_copies_every_dtype_and_shape_bit_for_bit_in_buckets(monkeypatch):
    tensors = every_kind_of_tensor()
    joined = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda pieces, *a, **k: joined.append(len(pieces)) or real_cat(pieces, *a, **k))
    copies = gather_to_host(tensors, bucket_bytes=48, on_device=lambda t: True)
    monkeypatch.undo()
    assert_exact_compact_copies(copies, tensors)
    plan = plan_buckets(tensors, 48, lambda t: True)
    # One join per bucket of several tensors (a lone tensor is copied as it is), each of every tensor in it.
    assert joined == [len(bucket) for bucket in plan if len(bucket) > 1] and sum(joined) > len(joined)


def test_plan_buckets_groups_by_device_and_dtype_and_keeps_each_bucket_within_the_limit():
    f32 = [torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(20), torch.zeros(1)]  # 16, 16, 16, 80, 4 bytes
    tensors = [f32[0], torch.zeros(2, dtype=torch.float64), *f32[1:], torch.zeros(0, dtype=torch.float64)]
    assert plan_buckets(tensors, 32, lambda t: True) == [[0, 2], [3], [4], [5], [1, 6]]
    # The limit holds for every bucket of several tensors across all the kinds; each tensor is in one bucket.
    mixed = every_kind_of_tensor()
    for limit in (1, 16, 48, 10_000):
        plan = plan_buckets(mixed, limit, lambda t: True)
        assert sorted(i for bucket in plan for i in bucket) == list(range(len(mixed)))
        for bucket in plan:
            assert len({(mixed[i].device, mixed[i].dtype) for i in bucket}) == 1
            assert len(bucket) == 1 or sum(mixed[i].numel() * mixed[i].element_size() for i in bucket) <= limit
    assert len(plan_buckets(mixed, 10_000, lambda t: True)) == len({t.dtype for t in mixed})
    # By default only CUDA tensors are bucketed: these, on the CPU, are copied one by one.
    assert plan_buckets(mixed, 48) == []


def _pinned_handouts(device: torch.device) -> int:
    """Pinned host blocks torch's caching host allocator has handed out so far (it keeps them for good)."""
    return torch.cuda.host_memory_stats().get("active_requests.allocated", 0) if device.type == "cuda" else 0


def test_gather_to_host_copies_tensors_on_the_test_device_without_pinned_memory(device):
    originals = every_kind_of_tensor()
    on_device = [t.to(device) for t in originals]
    pinned_before = _pinned_handouts(device)
    copies = gather_to_host(on_device, bucket_bytes=48)
    assert _pinned_handouts(device) == pinned_before
    assert [_bits(c) for c in copies] == [_bits(t) for t in originals]
    if device.type == "cuda":  # CPU tensors are returned as they are, views of a larger storage included
        assert_exact_compact_copies(copies, originals)


Moments = namedtuple("Moments", ["mean", "scale", "count"])


def test_host_copy_keeps_the_shape_of_the_tree_and_detaches_every_tensor():
    weights = OrderedDict(weight=torch.ones(2, 3, requires_grad=True), bias=torch.zeros(3))
    weights._metadata = OrderedDict({"": {"version": 2}})
    tree = {"model": weights, "moments": Moments(torch.full((3,), 0.5, requires_grad=True), [torch.ones(1)], 4),
            "pair": (torch.tensor(1), "name"), "nested": [{"deep": (torch.arange(3),)}, None, 2.5],
            "shape": torch.Size([2, 3])}
    for kwargs in ({}, {"bucket_bytes": 8, "on_device": lambda t: True}):
        copied = host_copy(tree, **kwargs)
        assert type(copied["model"]) is OrderedDict and copied["model"]._metadata == weights._metadata
        assert list(copied["model"]) == ["weight", "bias"]
        assert type(copied["moments"]) is Moments and copied["moments"].count == 4
        assert type(copied["moments"].scale) is list and type(copied["pair"]) is tuple
        assert copied["pair"][1] == "name" and copied["nested"][1:] == [None, 2.5]
        assert type(copied["shape"]) is torch.Size and copied["shape"] == (2, 3)
        pairs = [(copied["model"]["weight"], weights["weight"]), (copied["model"]["bias"], weights["bias"]),
                 (copied["moments"].mean, tree["moments"].mean), (copied["moments"].scale[0], tree["moments"].scale[0]),
                 (copied["pair"][0], tree["pair"][0]), (copied["nested"][0]["deep"][0], tree["nested"][0]["deep"][0])]
        for copy_, original in pairs:
            assert copy_ is not original and not copy_.requires_grad and torch.equal(copy_, original.detach())


def test_host_copy_of_a_whole_checkpoint_through_buckets_keeps_every_tensor(state):
    copied = host_copy(state, bucket_bytes=1024, on_device=lambda t: True)
    originals, copies = list(_tensors(state)), list(_tensors(copied))
    assert len(copies) == len(originals) > 2 * len(state["model"])  # model, EMA and RNG states
    assert_exact_compact_copies(copies, originals)
    assert copied["model"]._metadata == state["model"]._metadata
    assert copied["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert copied["optimizer"]["state"].keys() == state["optimizer"]["state"].keys()
    assert len(state["optimizer"]["state"]) == len(state["optimizer"]["param_groups"][0]["params"]) > 0  # moments


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
    run = tmp_path / "run" / "checkpoints"  # a run's cut last.pt points to its best.pt, saved at other times
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    (run / "best.pt").write_bytes(data)
    with pytest.raises(UserError) as info:
        load_checkpoint(run / "last.pt")
    assert str(info.value) == (f"{run / 'last.pt'} is not a readable glowtrain checkpoint (truncated or another "
                               f"format) — {run / 'best.pt'} may be intact: pass it instead")


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


# ---------------------------------------------------------------------------- moving between devices
# On the CPU (GLOWTRAIN_TEST_DEVICE unset) these move cpu -> cpu; with cuda they cross between the two.


def _stepped_on(device: torch.device):
    """(config, model, optimizer) of a tiny model after one real optimiser step on `device`."""
    cfg = apply_overrides(default_config(), TINY)
    torch.manual_seed(0)
    model = Glow.from_config(cfg)
    model.initialize(torch.rand(16, *cfg.image_shape) - 0.5)
    perturb(model, 0.05)
    model = model.to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    (-model.log_prob(_batch(cfg).to(device)).mean()).backward()
    optimizer.step()
    return cfg, model, optimizer


def _batch(cfg) -> torch.Tensor:
    return torch.rand(8, *cfg.image_shape, generator=torch.Generator().manual_seed(1)) - 0.5


def _optimizer_tensors(optimizer_state: dict) -> dict:
    return {f"{index}.{name}": torch.as_tensor(value) for index, param_state in optimizer_state["state"].items()
            for name, value in param_state.items()}


def test_a_checkpoint_saved_from_a_model_on_the_test_device_loads_on_the_cpu(tmp_path, device):
    cfg, model, optimizer = _stepped_on(device)
    ema = copy.deepcopy(model)
    perturb(ema, 0.05, seed=1)
    path = tmp_path / "last.pt"
    save_checkpoint(checkpoint_state(model=model, ema=ema, optimizer=optimizer, cfg_dict=config_to_dict(cfg),
                                     train_state={"step": 1, "best_test_bpd": 4.0}), path)
    loaded = load_checkpoint(path)
    saved_moments = _optimizer_tensors(loaded["optimizer"])
    assert saved_moments and all(t.device.type == "cpu" for t in saved_moments.values())
    assert all(t.device.type == "cpu" for key in ("model", "ema") for t in loaded[key].values())
    on_cpu = {key: {name: t.cpu() for name, t in module.state_dict().items()} for key, module in
              (("model", model), ("ema", ema))}
    assert_same_tensors(loaded["model"], on_cpu["model"])
    assert_same_tensors(loaded["ema"], on_cpu["ema"])
    assert_same_tensors(saved_moments, {k: t.cpu() for k, t in _optimizer_tensors(optimizer.state_dict()).items()})
    # The CPU model rebuilt from it computes what the device model computes (full float32 on both).
    rebuilt, _ = model_from_checkpoint(loaded)
    x = _batch(cfg)
    with torch.no_grad(), full_float32():
        expected = ema.eval().log_prob(x.to(device)).cpu()
        assert torch.allclose(rebuilt.log_prob(x), expected, rtol=1e-5, atol=0)


def test_a_checkpoint_saved_on_the_cpu_loads_and_keeps_training_on_the_test_device(tmp_path, device):
    cfg, cpu_model, cpu_optimizer = _stepped_on(torch.device("cpu"))
    path = tmp_path / "last.pt"
    save_checkpoint(checkpoint_state(model=cpu_model, ema=None, optimizer=cpu_optimizer, cfg_dict=config_to_dict(cfg),
                                     train_state={"step": 1, "best_test_bpd": 4.0}), path)
    cpu_weights = {name: t.clone() for name, t in cpu_model.state_dict().items()}
    assert all(t.device == device for t in load_checkpoint(path, map_location=device)["model"].values())
    # Inference commands: the model rebuilt on the device, every weight and buffer there, the weights unchanged.
    loaded = open_run(None, str(path), device=device)
    assert all(t.device == device for t in loaded.model.state_dict().values())
    assert_same_tensors({name: t.cpu() for name, t in loaded.model.state_dict().items()}, cpu_weights)
    # A resume: the CPU-saved moments move to the device with the weights, and the next step there is the
    # step the CPU run takes (full float32 on both, so only the order of float32 sums differs).
    state = load_checkpoint(path)
    model = Glow.from_config(cfg).to(device)
    load_state_checked(model, state["model"], str(path))
    optimizer = build_optimizer(cfg, model.parameters())
    load_optimizer_state(optimizer, state["optimizer"])
    with full_float32():
        for module, opt, where in ((model, optimizer, device), (cpu_model, cpu_optimizer, torch.device("cpu"))):
            opt.zero_grad()
            (-module.log_prob(_batch(cfg).to(where)).mean()).backward()
            opt.step()
    moved_state, cpu_state = optimizer.state_dict()["state"], cpu_optimizer.state_dict()["state"]
    assert cpu_state and moved_state.keys() == cpu_state.keys()
    for index, stayed in cpu_state.items():
        assert float(moved_state[index]["step"]) == float(stayed["step"]) == 2  # the CPU step was counted
        for name in ("exp_avg", "exp_inf"):
            moved = moved_state[index][name]
            assert moved.device == device
            assert (moved.cpu() - stayed[name]).abs().max() <= 1e-4 * stayed[name].abs().max(), (index, name)
    # Adamax divides each gradient by its own size, so where a gradient is nearly zero the order of float32 sums
    # alone can visibly change that one element's step; the step as a whole is the CPU run's.
    moved_step = torch.cat([(p.detach().cpu() - cpu_weights[n]).flatten() for n, p in model.named_parameters()])
    cpu_step = torch.cat([(p.detach() - cpu_weights[n]).flatten() for n, p in cpu_model.named_parameters()])
    assert cpu_step.norm() > 0 and (moved_step - cpu_step).norm() <= 1e-4 * cpu_step.norm()


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
    with pytest.raises(UserError, match=r"^runs is a folder of runs, not a run — pass one of them: runs/r$"):
        resolve_checkpoint(run="runs")
    (tmp_path / "faces" / "a").mkdir(parents=True)
    (tmp_path / "faces" / "a" / "0001.JPG").write_bytes(b"")
    with pytest.raises(UserError, match=r"^faces is a folder of images, not a run — pass --run a directory made by "
                                        r"'glowtrain fit' \(and a run's images on this machine with --data\)$"):
        resolve_checkpoint(run="faces")
    for option in ("run", "checkpoint"):  # an unset $RUN in a script: it sampled the most recent run instead
        with pytest.raises(UserError, match=rf"^--{option} was given an empty path — .* leave --{option} out for "
                                            "the most recent run under runs/$"):
            resolve_checkpoint(**{option: ""})


def test_a_resumes_config_is_read_without_reading_the_checkpoints_tensors(tmp_path, state, monkeypatch):
    """`fit --resume` chooses its config before the trainer loads the checkpoint: reading every tensor for that
    doubled the load of a paper-size checkpoint (1.6 GB: 1.1 s warm, far more from a network disk)."""
    import glowtrain.checkpoint as checkpoint

    save_checkpoint(state, tmp_path / "last.pt")
    loaded = []

    def recording(*args, **kwargs):
        loaded.append(load_checkpoint(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(checkpoint, "load_checkpoint", recording)
    cfg = checkpoint.resume_config(tmp_path / "last.pt", None, ["train.lr=1e-4"])
    assert cfg.train.lr == 1e-4 and cfg.model.n_steps == 2
    maps = pathlib.Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps here to see where tensors live")
    file_pages = [tuple(int(end, 16) for end in line.split()[0].split("-")) for line in maps.read_text().splitlines()
                  if line.endswith(str(tmp_path / "last.pt"))]
    tensors = list(_tensors(loaded[0]["model"]))
    assert tensors and all(any(start <= t.data_ptr() < end for start, end in file_pages) for t in tensors)


def test_a_checkpoint_on_a_disk_that_cannot_map_files_is_read_whole(tmp_path, state, monkeypatch):
    """Some network and FUSE mounts cannot mmap: the resume was refused as 'truncated or another format'."""
    import glowtrain.checkpoint as checkpoint

    save_checkpoint(state, tmp_path / "last.pt")
    load = torch.load

    def no_maps(*args, mmap=None, **kwargs):
        if mmap:
            raise RuntimeError("mmap not supported on this file system")
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", no_maps)
    assert checkpoint.resume_config(tmp_path / "last.pt", None, []).model.n_steps == 2
    (tmp_path / "cut.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:1000])
    with pytest.raises(UserError, match=r"cut\.pt is not a readable glowtrain checkpoint \(truncated or another "):
        checkpoint.resume_config(tmp_path / "cut.pt", None, [])
    # What `glowtrain runs` shows, and the step that decides whether a resume from another checkpoint keeps this
    # one (saved_step None: "nothing to keep", and the run's last.pt was overwritten unkept).
    from glowtrain.runs import list_runs, saved_step

    assert saved_step(tmp_path / "last.pt") == state["step"]
    (tmp_path / "runs" / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "last.pt").rename(tmp_path / "runs" / "r" / "checkpoints" / "last.pt")
    [row] = list_runs(tmp_path / "runs")
    assert row["step"] == state["step"] and row["status"] != "unreadable checkpoint", row
