"""GatedAdamax: torch's Adamax when a step is finite, no change at all when it is skipped, no host reads."""

import copy
import gc
import importlib.util
import weakref
from pathlib import Path

import pytest
import torch
from helpers import GLOW_LAYERS, TEST_DEVICE, HostReads, assert_same_training_state

from glowtrain.checkpoint import load_checkpoint, model_from_checkpoint, objective_from_checkpoint
from glowtrain.config import apply_overrides, default_config
from glowtrain.optim import GatedAdamax, build_optimizer, load_optimizer_state, skips_on_device
from glowtrain.runs import RunDir
from glowtrain.train import train

_BENCH_SPEC = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(_BENCH_SPEC)
_BENCH_SPEC.loader.exec_module(bench)


@pytest.fixture
def gated_on_cpu(monkeypatch):
    """The gated update that accelerators run, here on the CPU (which normally reads the flag instead)."""
    monkeypatch.setattr(GatedAdamax, "gate_on_cpu", True)


def _params(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((3, 4), (5,), (2, 2, 3))
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in shapes]


def _set_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


def _step_both(gated: GatedAdamax, plain: torch.optim.Optimizer, n_steps: int) -> None:
    """n finite steps of both optimisers on the same gradients."""
    for step in range(n_steps):
        for optimizer in (gated, plain):
            _set_grads(optimizer.param_groups[0]["params"], step)
        gated.found_inf = torch.zeros(())
        gated.step()
        plain.step()


@pytest.mark.usefixtures("gated_on_cpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_steps_match_torchs_adamax(dtype):
    ours, reference = _params(dtype=dtype), _params(dtype=dtype)
    gated = GatedAdamax(ours, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    plain = torch.optim.Adamax(reference, lr=0.01, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    _step_both(gated, plain, 20)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(gated.state[a]["exp_inf"], plain.state[b]["exp_inf"], rtol=0, atol=0)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "cpu"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("n_steps_before", [0, 3])  # a skipped first step must not divide 0 by 0
def test_a_flagged_step_leaves_weights_moments_and_counts_bit_for_bit(bad, n_steps_before, gated, monkeypatch):
    monkeypatch.setattr(GatedAdamax, "gate_on_cpu", gated)
    params = _params()
    optimizer = GatedAdamax(params, lr=0.01)
    for step in range(n_steps_before):
        _set_grads(params, step)
        optimizer.step()
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy({i: optimizer.state[p] for i, p in enumerate(params)})
    _set_grads(params, 99)
    params[1].grad[2] = bad
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    for p, old in zip(params, before_params):
        assert torch.equal(p, old)
    for i, p in enumerate(params):
        state = optimizer.state[p]
        if not before_state[i]:  # no state yet: still none, or zeros
            assert not state or (float(state["step"]) == 0 and not state["exp_avg"].any()
                                 and not state["exp_inf"].any())
            continue
        for key in ("step", "exp_avg", "exp_inf"):
            assert torch.equal(state[key], before_state[i][key]), key
    optimizer.found_inf = torch.zeros(())  # and the next good step is an ordinary one
    _set_grads(params, 100)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert {float(optimizer.state[p]["step"]) for p in params} == {n_steps_before + 1.0}


@pytest.mark.usefixtures("gated_on_cpu")
def test_a_step_reads_nothing_back_on_the_host():
    params = [torch.nn.Parameter(p.detach().to(TEST_DEVICE)) for p in _params()]  # a GPU's copies count there
    optimizer = GatedAdamax(params, lr=0.01)
    _set_grads(params, 0)
    for p in params:
        p.grad = p.grad.to(TEST_DEVICE)
    optimizer.found_inf = torch.zeros((), device=TEST_DEVICE)
    optimizer.step()  # creates the state
    with HostReads() as host:
        for flag in (0.0, 1.0, 0.0):
            optimizer.found_inf = torch.tensor(flag, device=TEST_DEVICE)
            optimizer.step()
    assert host.reads == []


def test_host_reads_count_a_copy_from_a_device_into_host_memory_and_not_one_within_the_host():
    """Judged by the copy's ends (a meta tensor stands in for a GPU's here; no copy runs)."""
    on_device, on_host = torch.empty(4, device="meta"), torch.empty(4)
    to_copy, copy_ = torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default
    assert HostReads.waits(to_copy, (on_device,), {"device": torch.device("cpu")})  # t.cpu(), t.to("cpu")
    assert HostReads.waits(copy_, (on_host, on_device), {})  # host_buffer.copy_(t)
    assert not HostReads.waits(to_copy, (on_host,), {"device": torch.device("cpu")})
    # From host memory to a device: a blocking copy waits for the work queued there, a non_blocking one does not.
    assert HostReads.waits(copy_, (on_device, on_host), {}) and HostReads.waits(to_copy, (on_host,), {"device": "meta"})
    assert not HostReads.waits(copy_, (on_device, on_host, True), {})
    assert not HostReads.waits(to_copy, (on_host,), {"device": torch.device("meta"), "non_blocking": True})
    assert HostReads.waits(torch.ops.aten._foreach_copy_.default, ([on_device, on_device], [on_device, on_host]), {})
    assert not HostReads.waits(to_copy, (on_device,), {"dtype": torch.float64})  # stays where it is


def test_host_reads_catch_a_tensor_made_from_host_data_onto_a_device_and_not_one_made_on_the_host():
    with HostReads() as host:
        torch.tensor([1, 2], device="meta")
        torch.as_tensor(torch.arange(2), device="meta")  # dispatched: seen as the copy it is
        torch.asarray([1.0], device="meta"), torch.empty(2, device="meta").new_tensor(3)  # evaluation's old count
        torch.tensor([1, 2]), torch.as_tensor([1, 2]), torch.as_tensor(torch.empty(2, device="meta"))
        torch.empty(2).new_tensor(3), torch.asarray([1.0])
    assert [what for _, what, _ in host.reads] == ["tensor onto meta", "_to_copy.default", "asarray onto meta",
                                                   "new_tensor onto meta"]
    assert "creating" not in torch.tensor.__name__ + torch.Tensor.new_tensor.__name__  # put back on leaving
    with HostReads(device_reads_only=True) as device_only:  # where meta stands for the GPU, host memory waits for
        torch.arange(3.0)[0].item(), torch.arange(3.0).tolist()  # nothing
        torch.tensor([1, 2], device="meta")
    assert [what for _, what, _ in device_only.reads] == ["tensor onto meta"]


def test_gated_adamax_copies_nothing_from_host_memory_onto_its_device_from_the_first_step():
    """On the H200 the first step waited once: the flat state's sizes were copied from host memory. A meta
    tensor stands in for the GPU (its ops check shapes and run no kernels); resumed from torch's Adamax too."""
    params = [torch.nn.Parameter(torch.empty(n, device="meta")) for n in (3, 500, 7)]
    for p in params:
        p.grad = torch.empty_like(p)
    fresh = GatedAdamax(params, lr=0.01)
    fresh.found_inf = torch.zeros((), device="meta")
    with HostReads(device_reads_only=True) as first_steps:
        fresh.step()
        fresh.step()
    host_params = [torch.nn.Parameter(torch.randn(p.shape)) for p in params]
    for p in host_params:
        p.grad = torch.randn_like(p)
    saved = torch.optim.Adamax(host_params, lr=0.01)
    saved.step()
    resumed = GatedAdamax(params, lr=0.01)
    resumed.load_state_dict(saved.state_dict())  # torch's load puts moments on the device, step counts on the host
    resumed.found_inf = torch.zeros((), device="meta")
    with HostReads(device_reads_only=True) as resumed_step:
        resumed.step()
    assert first_steps.reads == [] and resumed_step.reads == []


def test_host_reads_pass_a_repeat_interleave_told_its_output_size_and_catch_one_that_is_not():
    repeats = torch.tensor([2, 3], dtype=torch.int32)
    with HostReads() as sized:
        torch.repeat_interleave(repeats, output_size=5)
    with HostReads() as unsized:  # on a GPU this waits to learn the total
        torch.repeat_interleave(repeats)
    assert sized.reads == [] and [what for _, what, _ in unsized.reads] == ["repeat_interleave.Tensor"]


@pytest.mark.parametrize(("what", "read"), [
    ("item", lambda t: t[0].item()), ("bool", lambda t: bool(t[0])), ("equal", lambda t: torch.equal(t, t)),
    ("allclose", lambda t: torch.allclose(t, t)), ("mask index", lambda t: t[t > 1]),
    ("mask assignment", lambda t: t.clone().index_put_((t > 1,), torch.tensor(0.0))),
    ("bincount", lambda t: torch.bincount(t.long())), ("tolist", lambda t: t.tolist()),
    ("a number where a binding takes one", lambda t: torch._foreach_add_([t.clone()], t[0])),
])
def test_host_reads_catch_every_kind_of_read(what, read):
    values = torch.arange(4.0)
    with HostReads() as host:
        read(values)
    assert len(host.reads) >= 1, what


def test_host_reads_leave_ops_alone_that_do_not_wait():
    values = torch.arange(4.0)
    with HostReads() as host:
        torch.nonzero_static(values, size=2)  # a fixed size: no read (a name match would flag it)
        torch.where(values > 1, values, torch.zeros(()))
        torch._foreach_mul_([values.clone()], values[0])  # mul's binding takes the 0-d tensor as a tensor
        values.to("cpu")
    assert host.reads == []


@pytest.mark.usefixtures("gated_on_cpu")
def test_state_dicts_load_both_ways_with_torchs_adamax():
    """Checkpoints written with torch.optim.Adamax (every run before GatedAdamax) resume, and the reverse."""
    params = _params()
    plain = torch.optim.Adamax(params, lr=0.01)
    for step in range(3):
        _set_grads(params, step)
        plain.step()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    gated = GatedAdamax(twin, lr=0.01)
    load_optimizer_state(gated, copy.deepcopy(plain.state_dict()))  # as from a file: no shared tensors
    for step in range(3, 6):
        _set_grads(params, step)
        _set_grads(twin, step)
        plain.step()
        gated.step()
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    back = torch.optim.Adamax([torch.nn.Parameter(p.detach().clone()) for p in twin], lr=0.01)
    back.load_state_dict(gated.state_dict())
    assert float(back.state_dict()["state"][0]["step"]) == 6


def test_both_configured_optimisers_skip_on_the_device():
    for name in ("adam", "adamax"):
        cfg = apply_overrides(default_config(), [f"train.optimizer={name}"])
        assert skips_on_device(build_optimizer(cfg, _params()))
    assert not skips_on_device(torch.optim.Adam(_params(), lr=0.1))


def test_on_a_cpu_a_finite_step_is_torchs_own_adamax_bit_for_bit():
    ours, reference = _params(), _params()
    gated, plain = GatedAdamax(ours, lr=0.01), torch.optim.Adamax(reference, lr=0.01, foreach=False)
    _step_both(gated, plain, 5)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


# ---------------------------------------------------------------------------- the flat buffers


@torch.no_grad()
def _reference_step(params, states, found_inf, lr, betas, eps):
    """GatedAdamax's gated update as it was before its flat buffers: ~20 foreach ops over the parameters with
    a 0-d step count each. The new form must match it bit for bit."""
    stepped = [i for i, p in enumerate(params) if p.grad is not None]
    for i in stepped:
        states.setdefault(i, {"step": torch.zeros((), device=params[i].device), "exp_avg": torch.zeros_like(params[i]),
                              "exp_inf": torch.zeros_like(params[i])})
    params, grads = [params[i] for i in stepped], [params[i].grad for i in stepped]
    steps = [states[i]["step"] for i in stepped]
    exp_avgs, exp_infs = [states[i]["exp_avg"] for i in stepped], [states[i]["exp_inf"] for i in stepped]
    beta1, beta2 = betas
    go = 1.0 - found_inf.reshape(())
    go_flag = go > 0
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = torch.where(go_flag, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    grads = [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)]
    go = go.to(params[0].dtype)
    delta = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(delta, (1.0 - beta1) * go)
    torch._foreach_add_(exp_avgs, delta)
    torch._foreach_mul_(exp_infs, torch.where(go_flag, torch.full_like(go, beta2), torch.ones_like(go)))
    magnitude = torch._foreach_abs(grads)
    torch._foreach_add_(magnitude, eps)
    torch._foreach_mul_(magnitude, go)
    torch._foreach_maximum_(exp_infs, magnitude)
    torch._foreach_add_(steps, [go.float()] * len(steps))
    step_sizes = torch._foreach_pow(beta1, torch._foreach_clamp_min([s.to(go.dtype) for s in steps], 1.0))
    torch._foreach_sub_(step_sizes, 1.0)
    torch._foreach_reciprocal_(step_sizes)
    torch._foreach_mul_(step_sizes, lr * go)
    update = torch._foreach_div(exp_avgs, torch._foreach_clamp_min(exp_infs, eps))
    torch._foreach_mul_(update, step_sizes)
    torch._foreach_add_(params, update)


_SHAPES = ((3, 4), (5,), (2, 2, 3), (), (1,), (7, 1, 3), (40,))


def _loaded_state(params, seed=1):
    """A torch.optim.Adamax-format state with a different step count and random moments for each parameter.

    The next counts, 31 + 2i, take in 37 and 39, where with beta1 = 0.99 an x86 CPU's SIMD pow and its scalar
    one give step sizes a bit apart (in float64 and float32 respectively)."""
    generator = torch.Generator().manual_seed(seed)
    return {i: {"step": torch.tensor(30.0 + 2 * i), "exp_avg": 0.1 * torch.randn(p.shape, generator=generator,
                                                                                   dtype=p.dtype),
                "exp_inf": torch.rand(p.shape, generator=generator, dtype=p.dtype) + 0.01}
            for i, p in enumerate(params)}


@pytest.mark.usefixtures("gated_on_cpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("start", ["fresh", "loaded"])
def test_the_flat_update_is_bit_for_bit_the_per_parameter_one(dtype, start):
    """10 steps over 21 parameters of 7 shapes, some flagged (the first of a fresh run too), some with a
    parameter without gradient, from no state or from a loaded one with a different count per parameter
    (on the CPU, as from a checkpoint). On the test device: on a GPU, foreach kernels against single ones."""
    generator = torch.Generator().manual_seed(0)
    # A loaded run starts from zero weights, which the first step's update then shows unrounded.
    ours = [torch.nn.Parameter((torch.randn(_SHAPES[i % len(_SHAPES)], generator=generator, dtype=dtype)
                                * (start == "fresh")).to(TEST_DEVICE)) for i in range(21)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizer, states = GatedAdamax(ours, lr=0.01, betas=(0.99, 0.999), eps=1e-8), {}
    if start == "loaded":
        saved = _loaded_state(ours)
        groups = optimizer.state_dict()["param_groups"]
        optimizer.load_state_dict({"state": copy.deepcopy(saved), "param_groups": groups})
        states = {i: {key: value.to(TEST_DEVICE) for key, value in state.items()} for i, state in saved.items()}
    flagged, no_grad = {0, 4, 5}, {6: [2], 7: [2, 9]}
    for step in range(10):
        for i, (a, b) in enumerate(zip(ours, reference)):
            grad = torch.randn(a.shape, generator=generator, dtype=dtype).to(TEST_DEVICE)
            if step in flagged and i == 3:
                grad.fill_(float("nan"))
            a.grad, b.grad = (None, None) if i in no_grad.get(step, ()) else (grad.clone(), grad.clone())
        found_inf = torch.tensor(float(step in flagged), device=TEST_DEVICE)
        optimizer.found_inf = found_inf
        optimizer.step()
        _reference_step(reference, states, found_inf, lr=0.01, betas=(0.99, 0.999), eps=1e-8)
        for i, (a, b) in enumerate(zip(ours, reference)):
            assert torch.equal(a, b), (step, i)
            for key in ("step", "exp_avg", "exp_inf"):
                assert optimizer.state[a][key].shape == states[i][key].shape
                assert torch.equal(optimizer.state[a][key], states[i][key]), (step, i, key)


@pytest.mark.usefixtures("gated_on_cpu")
def test_the_state_is_views_of_one_buffer_per_kind_and_nothing_else_is_kept():
    params = _params()
    optimizer = GatedAdamax(params, lr=0.01)
    saved = {"state": _loaded_state(params), "param_groups": optimizer.state_dict()["param_groups"]}
    load_optimizer_state(optimizer, saved)
    loaded = [weakref.ref(t) for state in saved["state"].values() for t in state.values()]
    del saved
    _set_grads(params, 0)
    optimizer.step()
    gc.collect()
    assert all(ref() is None for ref in loaded)  # copied into the flat buffers, then let go
    for key in ("step", "exp_avg", "exp_inf"):
        views = [optimizer.state[p][key] for p in params]
        assert len({id(view._base) for view in views}) == 1 and views[0]._base is not None, key
        assert [v.shape for v in views] == [torch.Size(()) if key == "step" else p.shape for p in params]
    old_buffer = weakref.ref(optimizer.state[params[0]]["exp_avg"]._base)
    _set_grads(params, 1)
    params[1].grad = None  # stepped without it: its state becomes its own, and the old buffers go
    before = {key: optimizer.state[params[1]][key].clone() for key in ("step", "exp_avg", "exp_inf")}
    optimizer.step()
    gc.collect()
    assert old_buffer() is None
    own = optimizer.state[params[1]]
    assert all(torch.equal(own[key], before[key]) and own[key]._base is None for key in before)
    assert optimizer.state[params[0]]["exp_avg"]._base is optimizer.state[params[2]]["exp_avg"]._base
    assert float(own["step"]) == 33 and float(optimizer.state[params[0]]["step"]) == 32


def _gated_step_ops(n_params: int):
    """LaunchCount of one gated step (after the first, which builds the state) over n small parameters."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(_SHAPES[i % len(_SHAPES)], generator=generator)) for i in range(n_params)]
    optimizer = GatedAdamax(params, lr=0.01)
    _set_grads(params, 0)
    optimizer.found_inf = torch.zeros(())
    optimizer.step()
    with bench.LaunchCount() as count:
        optimizer.step()
    return count


@pytest.mark.usefixtures("gated_on_cpu")
def test_a_gated_step_launches_as_many_kernels_for_1000_parameters_as_for_10():
    with bench.LaunchCount() as count:  # the estimate itself: a foreach op launches once per 48 tensors
        torch._foreach_add_([torch.zeros(2) for _ in range(100)], 1.0)
        torch.zeros(3).add_(1.0)
    assert (count.foreach_ops, count.other_ops, count.launches) == (1, 102, 105)  # 101 zeros, 1 add_
    few, many = _gated_step_ops(10), _gated_step_ops(1000)
    assert (many.foreach_ops, many.other_ops) == (few.foreach_ops, few.other_ops)
    assert many.foreach_ops == 1 and many.launches == few.launches + 20  # only the final add grows: 1 -> 21


@pytest.mark.usefixtures("gated_on_cpu")
def test_a_gated_run_resumes_from_its_checkpoint_exactly_as_an_uninterrupted_run(tmp_path):
    cfg = apply_overrides(default_config(), [
        "run.device=cpu", *GLOW_LAYERS, "model.n_levels=2", "model.n_steps=1", "model.hidden_channels=8",
        "train.batch_size=16", "train.init_batch_size=32", "train.eval_batch_size=300", "train.steps=6",
        "train.warmup_steps=0", "train.log_every=3", "train.eval_every=100", "train.sample_every=100",
        "train.checkpoint_every=3", "train.n_samples=1", "train.optimizer=adamax"])
    train(cfg, out=str(tmp_path / "straight"), progress=False)
    train(apply_overrides(cfg, ["train.steps=3"]), out=str(tmp_path / "split"), progress=False)
    train(cfg, out=str(tmp_path / "split"), resume="auto", progress=False)
    straight, resumed = (load_checkpoint(RunDir(tmp_path / name).last) for name in ("straight", "split"))
    assert_same_training_state(straight, resumed)
    # Per-parameter tensors of each parameter's shape, which torch's own Adamax takes up.
    model, _ = model_from_checkpoint(resumed, use_ema=False)
    params = list(objective_from_checkpoint(resumed, model, cfg, use_ema=False).parameters())
    saved = resumed["optimizer"]["state"]
    assert len(saved) == len(params)
    assert all(saved[i]["exp_avg"].shape == saved[i]["exp_inf"].shape == p.shape for i, p in enumerate(params))
    plain = torch.optim.Adamax(params, lr=cfg.train.lr)
    plain.load_state_dict(resumed["optimizer"])
    _set_grads(params, 0)
    plain.step()
    assert {float(state["step"]) for state in plain.state.values()} == {7.0}
