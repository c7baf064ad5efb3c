"""Variational dequantisation: exact log q(u|x), a valid and tightening bound, training, resume and eval with it."""

import math
from itertools import product

import numpy as np
import pytest
import torch
from helpers import assert_same_training_state, invoke, perturb, sets

from glowtrain.analysis import info_summary
from glowtrain.checkpoint import load_checkpoint, open_run
from glowtrain.config import apply_overrides, default_config
from glowtrain.dequantization import UniformDequantizer, VariationalDequantizer, make_dequantizer
from glowtrain.evaluation import importance_weighted_bpd
from glowtrain.model import Glow
from glowtrain.objective import Objective, build_objective
from glowtrain.runs import RunDir
from glowtrain.train import train

LOG_2PI = math.log(2 * math.pi)


def _dequantizer(shape=(1, 4, 4), n_bits=3, seed=0, scale=0.05, **options):
    torch.manual_seed(seed)
    dequantizer = VariationalDequantizer(shape, n_bits, **{"n_steps": 3, "hidden_channels": 8, **options})
    images = torch.randint(0, 256, (8, *shape), dtype=torch.uint8)
    dequantizer(images, torch.rand(images.shape, dtype=torch.get_default_dtype()))  # ActNorm init
    perturb(dequantizer, scale, seed)
    return dequantizer


def _brute_force_noise_logdet(dequantizer, images, eps):
    values = []
    for image, sample in zip(images, eps):
        jac = torch.autograd.functional.jacobian(
            lambda e, image=image: dequantizer.noise_flow(image.unsqueeze(0), e.unsqueeze(0))[0].flatten(), sample)
        values.append(torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))[1])
    return torch.stack(values)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_log_q_matches_the_gaussian_minus_the_brute_force_jacobian_of_the_noise_flow(coupling):
    dequantizer = _dequantizer(coupling=coupling, seed=1)
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(2))
    x, log_q = dequantizer(images, noise)
    eps = torch.special.ndtri(noise)
    expected = (-0.5 * (eps**2 + LOG_2PI)).flatten(1).sum(1) - _brute_force_noise_logdet(dequantizer, images, eps)
    assert torch.allclose(log_q, expected, atol=1e-8, rtol=0)
    # x stays inside each pixel's bin, and the noise really depends on the image and the draw
    bins = torch.div(images.long(), 32, rounding_mode="floor")
    u = (x + 0.5) * 8 - bins
    assert ((u > 0) & (u < 1)).all()
    assert (u - torch.special.ndtr(eps)).abs().max() > 1e-3


def test_untrained_variational_dequantizer_is_exactly_uniform_noise():
    """Zero-initialised couplings and the normal CDF: u = Phi(e) is the uniform draw itself and log q = 0."""
    torch.manual_seed(0)
    dequantizer = VariationalDequantizer((1, 4, 4), 3, n_steps=2, hidden_channels=8)
    images = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8)
    noise = torch.rand(images.shape)
    x, log_q = dequantizer(images, noise)
    assert (x - UniformDequantizer(3)(images, noise)[0]).abs().max() <= 1e-6
    assert log_q.abs().max() <= 1e-4


def test_dequantizer_round_trips_its_noise_flow_in_float32():
    dequantizer = _dequantizer(seed=2)
    images = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8)
    eps = torch.randn(4, 1, 4, 4)
    context = dequantizer._context(images, eps.dtype)
    z, _ = dequantizer.squeeze(eps)
    h = z
    for coupling in dequantizer.couplings:
        h, _ = coupling(h, context)
    for coupling in reversed(dequantizer.couplings):
        h = coupling.reverse(h, context)
    assert (h - z).abs().max() <= 1e-5


def test_the_smallest_uniform_draw_gives_finite_noise():
    dequantizer = _dequantizer()
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    x, log_q = dequantizer(images, torch.zeros(images.shape))
    assert torch.isfinite(x).all() and torch.isfinite(log_q).all()


# ---------------------------------------------------------------------------- a tiny discrete distribution

# 1x2x2 images at 1 bit: 16 possible images, each bin a 4-D cube of side 1/2 in x.
TINY_SHAPE, TINY_BITS, N_DIMS = (1, 2, 2), 1, 4


def _all_tiny_images() -> torch.Tensor:
    values = torch.tensor(list(product([0, 128], repeat=N_DIMS)), dtype=torch.uint8)
    return values.view(16, *TINY_SHAPE)


def _exact_log_probs(model: Glow, images: torch.Tensor, n_nodes: int = 8) -> torch.Tensor:
    """log P(image) = log of the model's density integrated over the image's bin (Gauss-Legendre, float64)."""
    nodes, weights = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(n_nodes))
    side = 0.5
    offsets = (nodes + 1) / 2 * side  # within a bin
    grid = torch.stack(torch.meshgrid(*[offsets] * N_DIMS, indexing="ij"), -1).reshape(-1, N_DIMS)
    grid_weights = torch.stack(torch.meshgrid(*[weights * side / 2] * N_DIMS, indexing="ij"), -1).prod(-1).flatten()
    results = []
    with torch.no_grad():
        for image in images:
            low = torch.div(image.long(), 128, rounding_mode="floor").flatten() * side - 0.5
            x = (low + grid).view(-1, *TINY_SHAPE)
            log_density = model.log_prob(x)
            results.append(torch.logsumexp(log_density + grid_weights.log(), 0))
    return torch.stack(results)


def _draw_bpds(objective: Objective, images: torch.Tensor, n_draws: int, seed: int = 0) -> torch.Tensor:
    """(n_draws, N) single-draw bounds in bits/dim, through the objective itself."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for _ in range(n_draws // 256):
            repeated = images.repeat(256, 1, 1, 1)
            noise = torch.rand(repeated.shape, generator=generator)
            rows.append(objective(repeated, torch.zeros(len(repeated)), noise).terms["bpd"].view(256, -1))
    return torch.cat(rows)


def _log_p_from_bpd(bpd: torch.Tensor) -> torch.Tensor:
    return -bpd * N_DIMS * math.log(2.0)


@pytest.fixture(scope="module")
def tiny_discrete():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(3)
    model = Glow(TINY_SHAPE, n_levels=1, n_steps=2, hidden_channels=8, coupling="affine")
    model.initialize(torch.rand(64, *TINY_SHAPE) - 0.5)
    perturb(model, 0.05, seed=3)
    images = _all_tiny_images()
    exact = _exact_log_probs(model, images)
    variational = make_dequantizer("variational", TINY_SHAPE, TINY_BITS, n_steps=2, hidden_channels=8)
    variational(images, torch.rand(images.shape))  # ActNorm init
    perturb(variational, 0.05, seed=3)
    objectives = {"uniform": Objective(model, TINY_BITS),
                  "variational": Objective(model, TINY_BITS, dequantizer=variational)}
    draws = {name: _draw_bpds(objective, images, 4096) for name, objective in objectives.items()}
    yield exact, draws
    torch.set_default_dtype(previous)


def test_exact_discrete_probabilities_are_proper(tiny_discrete):
    exact, _ = tiny_discrete
    # The 16 bins cover [-0.5, 0.5]^4 only: the density's mass outside makes the sum fall short of 1.
    assert 0.5 < exact.exp().sum() <= 1.0


@pytest.mark.parametrize("dequantization", ["uniform", "variational"])
def test_single_draw_bound_is_below_the_exact_log_probability_of_every_value(tiny_discrete, dequantization):
    exact, draws = tiny_discrete
    log_w = _log_p_from_bpd(draws[dequantization])  # (S, 16) single-draw log weights
    bound, stderr = log_w.mean(0), log_w.std(0) / math.sqrt(len(log_w))
    assert (bound + 4 * stderr < exact).all(), (bound - exact, stderr)
    assert bound.exp().sum() <= 1.0


def test_uniform_importance_estimate_is_the_integral_of_the_density_over_the_bin(tiny_discrete):
    # E_u[w] is the probability itself. (For a perturbed variational q the weights p/q can have no finite
    # variance near the bin's faces, so their mean is no test at this sample size.)
    exact, draws = tiny_discrete
    weights = _log_p_from_bpd(draws["uniform"]).exp()
    estimate, spread = weights.mean(0), weights.std(0) / math.sqrt(len(weights))
    assert ((estimate - exact.exp()).abs() < 4 * spread).all()


@pytest.mark.parametrize("dequantization", ["uniform", "variational"])
def test_importance_weighted_bound_approaches_the_exact_log_probability(tiny_discrete, dequantization):
    exact, draws = tiny_discrete
    bpd = draws[dequantization]  # (4096, 16)
    gaps = []
    for n_samples in (1, 16, 256):
        groups = bpd.view(n_samples, -1, 16).transpose(0, 1)  # (4096 / S groups, S, 16)
        iw = torch.stack([importance_weighted_bpd(group, N_DIMS) for group in groups]).mean(0)
        gaps.append(exact - _log_p_from_bpd(iw))  # >= 0 in expectation, shrinking with S
    assert (gaps[0] > gaps[1]).all() and (gaps[1] > gaps[2]).all()
    # 16 groups of 256 draws: a little noise, more for q's heavier-tailed weights
    assert (gaps[2] < 0.6 * gaps[0]).all() and (gaps[2] > -0.06).all()
    assert (exact - gaps[2]).exp().sum() <= 1.0


def test_importance_weighted_bpd_of_one_draw_is_that_draw_and_of_equal_draws_is_their_value():
    bpd = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    assert torch.allclose(importance_weighted_bpd(bpd, 64), bpd[0])
    assert torch.allclose(importance_weighted_bpd(bpd.repeat(5, 1), 64), bpd[0])
    spread = torch.tensor([[2.0], [2.5]], dtype=torch.float64)
    # log-mean-exp of the weights beats their mean log: below the mean bpd, above the best draw
    assert 2.0 < importance_weighted_bpd(spread, 1).item() < 2.25


# ---------------------------------------------------------------------------- training, resume, eval, info

TINY_VARIATIONAL = [
    "run.device=cpu", "model.coupling=affine", "model.n_levels=2", "model.n_steps=2", "model.hidden_channels=16",
    "model.dequantization=variational", "model.dequant_steps=2", "model.dequant_hidden_channels=8",
    "train.batch_size=16", "train.init_batch_size=32", "train.eval_batch_size=300",
    "train.steps=6", "train.log_every=2", "train.eval_every=3", "train.sample_every=3",
    "train.checkpoint_every=3", "train.n_samples=4", "train.warmup_steps=5",
]


def _variational_config(*extra: str):
    return apply_overrides(default_config(), [*TINY_VARIATIONAL, *extra])


def test_uniform_objective_from_config_is_parameter_free_uniform_noise():
    cfg = apply_overrides(default_config(), ["model.dequantization=uniform"])
    objective = build_objective(Glow((1, 8, 8), n_levels=2, n_steps=1, hidden_channels=4), cfg)
    assert isinstance(objective.dequantizer, UniformDequantizer) and not list(objective.dequantizer.parameters())


@pytest.fixture(scope="module")
def variational_runs(tmp_path_factory):
    """A 6-step variational run straight through, and one stopped at 3 and resumed to 6."""
    root = tmp_path_factory.mktemp("variational")
    cfg = _variational_config("model.dequant_coupling=spline")
    train(cfg, out=str(root / "straight"), progress=False)
    train(apply_overrides(cfg, ["train.steps=3"]), out=str(root / "split"), progress=False)
    train(cfg, out=str(root / "split"), resume="auto", progress=False)
    return root


def test_variational_dequantizer_is_trained_averaged_saved_and_resumed_exactly(variational_runs):
    straight, resumed = (load_checkpoint(RunDir(variational_runs / name).last) for name in ("straight", "split"))
    assert straight["step"] == resumed["step"] == 6
    assert_same_training_state(straight, resumed, ("objective", "ema_objective", "model", "ema"))
    # The dequantiser learned (its zero-initialised last layers moved) and its EMA differs from it.
    weights = straight["objective"]
    last_layers = [name for name in weights if name.endswith("conv_out.conv.weight") and "couplings" in name]
    assert last_layers and all(weights[name].abs().max() > 0 for name in last_layers)
    assert any(not torch.equal(weights[name], straight["ema_objective"][name]) for name in weights
               if weights[name].is_floating_point())


def test_eval_reports_the_importance_weighted_bound_next_to_the_single_draw_bound(variational_runs):
    run = variational_runs / "straight"
    one = _json(invoke("eval", "--run", run, "--device", "cpu"))
    assert "bpd_iw" not in one
    final = [line for line in RunDir(run).metrics.read_text().splitlines() if '"test"' in line][-1]
    assert one["bpd"] == pytest.approx(__import__("json").loads(final)["bpd"], abs=1e-9)  # the EMA dequantiser too
    many = _json(invoke("eval", "--run", run, "--device", "cpu", "--n-dequant", "8"))
    assert many["n_dequant"] == 8 and 0 < many["bpd_iw_stderr"] < 0.2
    assert many["bpd_iw"] < many["bpd"]  # tighter than the single-draw bound averaged over the same draws


def test_open_run_restores_the_learned_dequantizer(variational_runs):
    loaded = open_run(str(variational_runs / "straight"), None, "cpu", use_ema=False)
    saved = load_checkpoint(RunDir(variational_runs / "straight").last)["objective"]
    state = loaded.objective.state_dict()
    assert any(name.startswith("dequantizer.") for name in saved)  # the noise flow's weights are among them
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())


def test_info_counts_the_noise_flows_parameters_and_multiply_adds():
    cfg = _variational_config("model.dequant_coupling=affine")
    summary = info_summary(cfg)
    dequantizer = build_objective(Glow.from_config(cfg), cfg).dequantizer
    assert summary["parameters_dequantizer"] == sum(p.numel() for p in dequantizer.parameters())
    # By hand: the context net's two 3x3 convolutions on (4, 4, 4), then per coupling a CouplingNet on
    # (2 kept + 8 context) channels: 3x3 to 8, 1x1 8 to 8, zero 3x3 to 2 changed x 2 affine parameters.
    pixels = 4 * 4
    context = pixels * 9 * (4 * 8 + 8 * 8)
    coupling = pixels * (9 * 10 * 8 + 8 * 8 + 9 * 8 * 4)
    assert summary["multiply_adds_dequantizer_per_image"] == context + 2 * coupling
    assert "parameters_dequantizer" not in info_summary(apply_overrides(cfg, ["model.dequantization=uniform"]))


def test_cli_trains_with_spline_couplings_and_variational_dequantisation(tmp_path):
    result = invoke("fit", "--out", tmp_path / "run", "--no-progress",
                    *sets(*TINY_VARIATIONAL, "model.coupling=spline", "train.steps=3", "train.eval_every=3"))
    assert result.exit_code == 0, result.output
    assert "test bpd" in result.output


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return __import__("json").loads(result.stdout)


def test_info_on_a_variational_run_lists_its_noise_flow(variational_runs):
    result = invoke("info", "--run", variational_runs / "straight")
    assert result.exit_code == 0, result.output
    saved = load_checkpoint(RunDir(variational_runs / "straight").last)["objective"]
    n_saved = sum(t.numel() for name, t in saved.items() if "initialized" not in name)
    assert f"parameters_dequantizer: {n_saved:,}" in result.stdout
