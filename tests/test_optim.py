"""GatedAdamax: torch's Adamax when a step is finite, no change at all when it is skipped, no host reads."""

import copy

import pytest
import torch
from helpers import HostReads

from glowtrain.config import apply_overrides, default_config
from glowtrain.optim import GatedAdamax, build_optimizer, load_optimizer_state, skips_on_device


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
    params = _params()
    optimizer = GatedAdamax(params, lr=0.01)
    _set_grads(params, 0)
    optimizer.found_inf = torch.zeros(())
    optimizer.step()  # creates the state
    with HostReads() as host:
        for flag in (0.0, 1.0, 0.0):
            optimizer.found_inf = torch.tensor(flag)
            optimizer.step()
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
