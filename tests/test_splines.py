"""The rational-quadratic spline coupling: exact log-dets, inverses, tails, bin edges, identity at init."""

import runpy
import sys
from pathlib import Path

import pytest
import torch
from helpers import brute_force_logdet, perturb

from glowtrain.flows import SplineTransform, flow_step, make_coupling
from glowtrain.model import Glow
from glowtrain.splines import rq_spline_forward, rq_spline_inverse, spline_params

BOUND = 3.0


def _spline_coupling(channels=4, bins=8, bound=BOUND, scale=0.05, seed=0):
    torch.manual_seed(seed)
    coupling = make_coupling("spline", channels, 8, spline_bins=bins, spline_bound=bound)
    coupling(torch.randn(6, channels, 4, 4, dtype=torch.get_default_dtype()))  # ActNorm init
    perturb(coupling, scale, seed)
    return coupling


def _inputs_everywhere(n=3, channels=4, bound=BOUND, seed=1):
    """Changed-half inputs inside, deep in both tails (x 100 the bound) and exactly on -bound, 0, bound."""
    x = torch.randn(n, channels, 4, 4, generator=torch.Generator().manual_seed(seed)) * bound
    changed = slice(channels // 2, channels)
    x[:, changed, 0, 0] = -100 * bound
    x[:, changed, 0, 1] = 100 * bound
    x[:, changed, 1, 0] = -bound
    x[:, changed, 1, 1] = bound
    x[:, changed, 2, 2] = 0.0
    return x


@pytest.mark.usefixtures("float64_default")
def test_spline_coupling_logdet_matches_brute_force_jacobian_in_tails_and_on_edges():
    coupling = _spline_coupling()
    x = _inputs_everywhere()
    y, logdet = coupling(x)
    expected = brute_force_logdet(lambda s: coupling(s)[0], x)
    assert torch.allclose(logdet, expected, atol=1e-8, rtol=0)
    # The tails are the identity: the changed half passes unchanged there.
    assert torch.equal(y[:, 2:, 0, :2], x[:, 2:, 0, :2])
    assert (coupling.reverse(y) - x).abs().max() <= 1e-10


@pytest.mark.usefixtures("float64_default")
def test_spline_logdet_and_inverse_at_every_interior_knot():
    """Inputs placed exactly on each bin edge: forward log-det against autograd, inverse back to the knot."""
    torch.manual_seed(3)
    bins = 6
    raw = torch.randn(5, 3 * bins - 1)
    x_knots, y_knots, _ = spline_params(raw, bins, BOUND)
    x = x_knots.clone().requires_grad_(True)  # (5, K + 1): every knot, both ends included
    y, log_derivative = rq_spline_forward(x, raw.unsqueeze(1).expand(5, bins + 1, -1), bins, BOUND)
    assert torch.allclose(y, y_knots, atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(log_derivative, grad.log(), atol=1e-10, rtol=0)
    back = rq_spline_inverse(y_knots, raw.unsqueeze(1).expand(5, bins + 1, -1), bins, BOUND)
    assert torch.allclose(back, x_knots, atol=1e-12, rtol=0)


@pytest.mark.usefixtures("float64_default")
def test_spline_coupling_in_a_whole_glow_matches_brute_force_jacobian_and_inverts():
    torch.manual_seed(4)
    model = Glow((1, 4, 4), n_levels=2, n_steps=2, hidden_channels=8, coupling="spline", spline_bins=5,
                 spline_bound=2.0)
    model.initialize(torch.rand(8, 1, 4, 4) - 0.5)
    perturb(model, 0.05, seed=4)
    x = torch.rand(3, 1, 4, 4) - 0.5
    x[0] *= 40  # reaches the tails of the first steps' splines
    zs, logdet = model.encode(x)
    expected = brute_force_logdet(lambda s: torch.cat([z.flatten(1) for z in model.encode(s)[0]], 1), x)
    assert torch.allclose(logdet, expected, atol=1e-8, rtol=0)
    assert (model.decode(zs) - x).abs().max() <= 1e-10


def test_a_batch_entirely_in_the_tails_has_finite_values_and_gradients():
    coupling = _spline_coupling(scale=1.0).float()
    x = torch.full((4, 4, 3, 3), 50.0)
    x[::2] *= -1
    x.requires_grad_(True)
    y, logdet = coupling(x)
    (y.sum() + logdet.sum()).backward()
    assert torch.equal(y.detach(), x.detach()) and torch.equal(logdet, torch.zeros(4))
    grads = [x.grad] + [p.grad for p in coupling.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(x.grad, torch.ones_like(x))  # identity: d(sum y)/dx = 1, and the log-det adds nothing


def test_float32_round_trip_at_32_bins_with_moderate_random_weights():
    coupling = _spline_coupling(channels=6, bins=32, seed=5).float()
    x = torch.randn(16, 6, 8, 8, generator=torch.Generator().manual_seed(5)) * 2
    y, logdet = coupling(x)
    raw = coupling.net(x[:, :3])
    assert 1 < raw.abs().max() < 20  # moderate: the splines really act, without saturating
    assert torch.isfinite(logdet).all() and (y - x).abs().max() > 0.1
    assert (coupling.reverse(y) - x).abs().max() <= 1e-4
    assert (coupling(coupling.reverse(x))[0] - x).abs().max() <= 1e-4


@pytest.mark.parametrize("raw_scale", [3.0, 5.0])  # sharp splines, where Durkan et al.'s root alone lost 2-3 digits
def test_float32_inverse_is_within_a_few_times_what_rounding_allows(raw_scale):
    # A round trip in float32 can be no better than the rounding of x and y, the latter magnified by dx/dy; the
    # root formula must not add to that (Durkan et al.'s form alone lost up to 3 digits where b < 0).
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(50_000, 3 * 8 - 1, generator=generator) * raw_scale
    x = (torch.rand(50_000, generator=generator, dtype=torch.float64) * 2 - 1) * BOUND
    _, log_derivative = rq_spline_forward(x, raw.double(), 8, BOUND)
    rounding = 2.0**-23 * BOUND * (1 + torch.exp(-log_derivative))
    y, _ = rq_spline_forward(x.float(), raw, 8, BOUND)
    error = (rq_spline_inverse(y, raw, 8, BOUND).double() - x).abs()
    assert (error / rounding).max() < 12


def test_the_precision_script_prints_a_row_per_scale(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["spline_precision.py", "--scales", "1", "3", "--n", "2000"])
    runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "spline_precision.py"),
                   run_name="__main__")
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[1:]]
    assert [float(row[0]) for row in rows] == [1.0, 3.0] and all(0 < float(row[1]) < 12 for row in rows)


def test_zero_initialised_spline_coupling_starts_as_the_identity():
    coupling = make_coupling("spline", 4, 16, spline_bins=8)
    x = torch.randn(5, 4, 4, 4) * 4
    y, logdet = coupling(x)
    assert (y - x).abs().max() <= 1e-5 and logdet.abs().max() <= 1e-4


def test_raw_widths_and_heights_are_scaled_by_one_over_sqrt_hidden():
    raw = torch.randn(7, 3 * 4 - 1)
    wide = SplineTransform(4, BOUND, hidden_channels=64)
    x = torch.randn(7, 1, 1, 1)
    y, _ = wide.forward(x, raw.view(7, -1, 1, 1))
    scaled = torch.cat([raw[:, :8] / 8, raw[:, 8:]], 1)  # widths and heights only, not the derivatives
    expected, _ = rq_spline_forward(x.view(7), scaled, 4, BOUND)
    assert torch.allclose(y.view(7), expected, atol=1e-6)


def test_spline_parameters_obey_the_minimums_and_span_the_interval():
    raw = torch.randn(100, 3 * 10 - 1) * 30
    x_knots, y_knots, derivatives = spline_params(raw, 10, 5.0)
    for knots in (x_knots, y_knots):
        assert (knots[:, 0] == -5.0).all() and (knots[:, -1] == 5.0).all()
        assert (knots.diff(dim=1) >= 1e-3 * 10 * 0.999).all()  # min 1e-3 of the width 2B = 10
    assert (derivatives[:, [0, -1]] == 1).all() and (derivatives >= 1e-3).all()


def test_spline_flow_step_works_with_bf16_conditioner_and_float32_spline():
    torch.manual_seed(6)
    step = flow_step(4, 8, "spline", "lu")
    x = torch.randn(4, 4, 4, 4)
    step(x)
    perturb(step, 0.05, seed=6)
    for module in step.modules():
        if hasattr(module, "amp_dtype"):
            module.amp_dtype = torch.bfloat16
    y, logdet = step(x)
    assert y.dtype == torch.float32 and logdet.dtype == torch.float32
    assert (step.reverse(y) - x).abs().max() <= 1e-4  # the same bf16 network output in both directions


def test_spline_options_are_refused_outside_their_range():
    for n_bins in (0, 1, 1000):
        with pytest.raises(ValueError, match="2 <= bins"):
            SplineTransform(n_bins)
    with pytest.raises(ValueError, match="bound > 0"):
        SplineTransform(8, 0.0)


def test_deep_float32_spline_model_round_trips_within_1e_4():
    # As test_model's affine check: L=3, K=32 steps, every parameter moved off its initial value.
    torch.manual_seed(7)
    model = Glow((3, 16, 16), n_levels=3, n_steps=32, hidden_channels=16, coupling="spline").eval()
    model.initialize(torch.rand(16, 3, 16, 16) - 0.5)
    perturb(model, 0.01, seed=7)
    x = torch.rand(4, 3, 16, 16) - 0.5
    with torch.no_grad():
        zs, _ = model.encode(x)
        assert (model.decode(zs) - x).abs().max() <= 1e-4
        coupling = model.levels[0].layers[5].layers[2]
        assert coupling.net(torch.randn(2, 6, 8, 8)).abs().max() > 0.01  # the couplings really act


def test_inputs_on_the_bound_map_inside_it_in_float32():
    """Rounding used to carry y = f(+-bound) one step past the bound, where the inverse takes it for a tail."""
    n_bins, bound = 8, 3.0
    raw = torch.randn(400, 3 * n_bins - 1, generator=torch.Generator().manual_seed(0)) * 2
    x = torch.tensor([bound, -bound]).repeat(200)
    y, _ = rq_spline_forward(x, raw, n_bins, bound)
    assert (y.abs() <= bound).all()
    assert (rq_spline_inverse(y, raw, n_bins, bound) - x).abs().max() < 1e-4


def test_the_spline_reads_its_parameters_from_a_contiguous_last_axis():
    """Softmax, cumsum, comparisons and gathers all run along the bins axis; strided (as movedim leaves it), the
    digits default's forward and backward took 7% longer on one CPU thread."""
    from glowtrain.flows import SplineTransform

    transform = SplineTransform(n_bins=4, bound=3.0)
    x = torch.randn(2, 3, 5, 5)
    params = torch.randn(2, 3 * transform.params_per_channel, 5, 5)
    raw = transform._raw(x, params)
    assert raw.shape == (2, 3, 5, 5, transform.params_per_channel) and raw.is_contiguous()
    assert torch.equal(raw[1, 2, 3, 4], params[1, 2 * transform.params_per_channel:][: transform.params_per_channel,
                                                                                        3, 4])
