import dataclasses
import math
import re
from typing import Literal, get_args, get_origin, get_type_hints

import pytest
import torch
from helpers import brute_force_logdet, perturb

from glowtrain.config import ModelConfig, apply_overrides, default_config
from glowtrain.flows import Conditioner
from glowtrain.model import Glow
from glowtrain.objective import build_objective
from glowtrain.precision import full_float32

pytestmark = pytest.mark.usefixtures("float64_default")


def _random_glow(shape, seed=0, scale=0.05, device="cpu", **kwargs):
    """Built, initialised and perturbed on the CPU (the same weights on every device), then moved to `device`."""
    torch.manual_seed(seed)
    kwargs = {"n_levels": 2, "n_steps": 2, "hidden_channels": 8, **kwargs}
    model = Glow(shape, **kwargs)
    model.initialize(torch.rand(16, *shape) - 0.5)
    perturb(model, scale, seed)
    return model.to(device)


def _flat_latents(model, x):
    zs, _ = model.encode(x)
    return torch.cat([z.flatten(1) for z in zs], 1)


GRID = [(c, v) for c in ("additive", "affine") for v in ("lu", "plain", "shuffle")]


@pytest.mark.parametrize("n_classes", [0, 3])
@pytest.mark.parametrize("coupling,conv", GRID)
@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 8, 8)])
def test_model_logdet_matches_brute_force_jacobian(shape, coupling, conv, n_classes, device):
    model = _random_glow(shape, coupling=coupling, conv=conv, n_classes=n_classes, device=device)
    x = (torch.rand(2, *shape) - 0.5).to(device)
    _, logdet = model.encode(x)
    assert logdet.device == device
    expected = brute_force_logdet(lambda s: _flat_latents(model, s), x)
    assert torch.allclose(logdet, expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("coupling,conv", GRID + [("affine", "reverse")])
def test_decode_inverts_encode_in_float64(coupling, conv, device):
    model = _random_glow((3, 8, 8), seed=3, coupling=coupling, conv=conv, n_levels=3, device=device)
    x = (torch.rand(4, 3, 8, 8) - 0.5).to(device)
    zs, _ = model.encode(x)
    assert (model.decode(zs) - x).abs().max() <= 1e-10


def test_deep_float32_model_round_trips_within_1e_4(device):
    torch.set_default_dtype(torch.float32)
    # Every parameter moved off its initial value; larger random moves make 96 untrained steps chaotic.
    model = _random_glow((3, 16, 16), seed=5, scale=0.01, n_levels=3, n_steps=32, hidden_channels=16,
                         device=device).eval()
    x = (torch.rand(4, 3, 16, 16) - 0.5).to(device)
    # full_float32: CUDA runs float32 convolutions in TF32 by default, and glowtrain's own encode/decode
    # (evaluation, sampling, reconstructions) run in full float32 (precision.py); 1e-4 is that policy's bound.
    with torch.no_grad(), full_float32():
        zs, _ = model.encode(x)
        coupling_output = model.levels[0].layers[5].layers[2].net(zs[0])
        assert coupling_output.abs().max() > 0.01  # the couplings really act
        assert (model.decode(zs) - x).abs().max() <= 1e-4


def test_log_prob_integrates_to_one():
    # Importance sampling: E_q[p(x) / q(x)] = 1 for a normalised p and any q covering its mass; q is a
    # diagonal Gaussian twice as wide as the model's samples, so nothing here trusts log_prob itself.
    model = _random_glow((1, 2, 2), seed=2, scale=0.05, n_levels=1, coupling="affine")
    generator = torch.Generator().manual_seed(0)
    samples = model.sample(4000, generator=generator).flatten(1)
    q_mean, q_std = samples.mean(0), 2 * samples.std(0)
    x = q_mean + q_std * torch.randn(400_000, 4, generator=generator)
    log_q = (-0.5 * ((x - q_mean) / q_std) ** 2 - torch.log(q_std) - 0.5 * math.log(2 * math.pi)).sum(1)
    with torch.no_grad():
        ratio = torch.exp(model.log_prob(x.view(-1, 1, 2, 2)) - log_q)
    estimate, stderr = ratio.mean().item(), ratio.std().item() / math.sqrt(len(ratio))
    assert stderr < 0.01
    assert abs(estimate - 1.0) < 5 * stderr


def test_log_prob_is_prior_plus_logdet():
    model = _random_glow((1, 4, 4), seed=4)
    x = torch.rand(3, 1, 4, 4) - 0.5
    zs, logdet = model.encode(x)
    # A standard-normal reference model: with every prior at N(0, 1), log p = sum log N(z) + logdet.
    standard = Glow((1, 4, 4), n_levels=2, n_steps=2, hidden_channels=8, learn_top=False)
    standard.load_state_dict({k: v for k, v in model.state_dict().items() if "split_priors" not in k}, strict=False)
    standard.top_prior.zero_()
    flat = torch.cat([z.flatten(1) for z in standard.encode(x)[0]], 1)
    expected = (-0.5 * flat**2 - 0.5 * math.log(2 * math.pi)).sum(1) + standard.encode(x)[1]
    assert torch.allclose(standard.log_prob(x), expected, atol=1e-10)
    assert torch.allclose(logdet, standard.encode(x)[1], atol=1e-12)


@pytest.mark.parametrize("n_classes,labelled", [(0, False), (3, False), (3, True)])
def test_level_log_densities_add_up_to_log_prob(n_classes, labelled):
    model = _random_glow((1, 8, 8), seed=7, n_levels=3, n_classes=n_classes)
    x = torch.rand(4, 1, 8, 8) - 0.5
    y = torch.tensor([0, 1, 2, 1]) if labelled else None
    prior, logdet = model.level_log_densities(x, y)
    assert prior.shape == logdet.shape == (4, 3)
    assert torch.allclose(prior.sum(1) + logdet.sum(1), model.log_prob(x, y), atol=1e-10)
    assert torch.allclose(logdet.sum(1), model.encode(x)[1], atol=1e-12)


def test_each_level_prior_is_the_log_density_of_that_levels_latent():
    # With every prior at N(0, 1) (zero split priors, a fixed zero top), each level's term is sum log N(z_i; 0, 1).
    model = _random_glow((1, 8, 8), seed=8, learn_top=False)
    for split_prior in model.split_priors.parameters():
        split_prior.data.zero_()
    model.top_prior.zero_()
    x = torch.rand(3, 1, 8, 8) - 0.5
    prior, _ = model.level_log_densities(x)
    zs, _ = model.encode(x)
    expected = torch.stack([(-0.5 * z.flatten(1) ** 2 - 0.5 * math.log(2 * math.pi)).sum(1) for z in zs], 1)
    assert torch.allclose(prior, expected, atol=1e-10)


def test_marginal_log_prob_of_conditional_model_averages_over_classes():
    model = _random_glow((1, 4, 4), seed=6, scale=0.05, n_classes=3)
    x = torch.rand(5, 1, 4, 4) - 0.5
    per_class = torch.stack([model.log_prob(x, torch.full((5,), k)) for k in range(3)], 1)
    expected = torch.logsumexp(per_class, 1) - math.log(3)
    assert torch.allclose(model.log_prob(x), expected, atol=1e-10)
    assert not torch.allclose(per_class[:, 0], per_class[:, 1])
    assert model.class_logits(x).shape == (5, 3)


def test_sample_shapes_and_latent_shapes():
    model = _random_glow((3, 8, 8), n_levels=3)
    assert model.sample(5).shape == (5, 3, 8, 8)
    assert model.latent_shapes == [(6, 4, 4), (12, 2, 2), (48, 1, 1)]
    zs, _ = model.encode(torch.rand(2, 3, 8, 8))
    assert [tuple(z.shape[1:]) for z in zs] == model.latent_shapes


def test_sample_at_temperature_zero_returns_the_prior_means():
    model = _random_glow((1, 8, 8), seed=7, scale=0.05, n_levels=2)
    x = model.sample(4, temperature=0.0)
    assert torch.allclose(x, x[:1].expand_as(x), atol=1e-12)
    zs, _ = model.encode(x)
    top_mean, _ = model._top_params(4, None)
    assert torch.allclose(zs[-1], top_mean, atol=1e-9)
    _, kept_halves, _, _ = model._flow(x)
    split_mean, _ = model._split_params(0, kept_halves[0])
    assert torch.allclose(zs[0], split_mean, atol=1e-9)


@pytest.mark.parametrize("n_classes", [0, 3])  # with classes, the labels are drawn from the generator too
def test_same_generator_seed_gives_same_samples(device, n_classes):
    model = _random_glow((1, 8, 8), seed=8, n_classes=n_classes, device=device)
    # The generator lives where the noise is drawn: on the model's device.
    a, b, c = (model.sample(3, 0.7, generator=torch.Generator(device=device).manual_seed(seed))
               for seed in (11, 11, 12))
    assert a.device == device
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_sampling_runs_in_inference_mode_and_its_cached_inverses_serve_later_work(monkeypatch):
    from glowtrain.flows import Squeeze

    model = _random_glow((1, 8, 8), seed=3).eval()
    modes = []
    real_reverse = Squeeze.reverse
    monkeypatch.setattr(Squeeze, "reverse", lambda self, y: modes.append(torch.is_inference_mode_enabled())
                        or real_reverse(self, y))
    model.sample(2, 0.7)
    assert modes and all(modes)
    # The inverse weights cached during sampling serve later work, gradients through decode included.
    x = torch.rand(3, 1, 8, 8) - 0.5
    zs = [z.detach().requires_grad_() for z in model.encode(x)[0]]
    decoded = model.decode(zs)
    assert torch.allclose(decoded, x, atol=1e-10)
    decoded.sum().backward()
    assert all(z.grad is not None for z in zs)
    model.train()
    model.log_prob(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_temperature_scales_latent_spread():
    model = _random_glow((1, 8, 8), seed=9, scale=0.05)
    spread = []
    for temperature in (0.5, 1.0):
        x = model.sample(400, temperature, generator=torch.Generator().manual_seed(0))
        zs, _ = model.encode(x)
        top_mean, top_logs = model._top_params(400, None)
        spread.append(((zs[-1] - top_mean) / top_logs.exp()).std().item())
    assert spread[0] == pytest.approx(0.5, rel=0.1) and spread[1] == pytest.approx(1.0, rel=0.1)


def test_conditional_sampling_honours_labels():
    model = _random_glow((1, 8, 8), seed=10, scale=0.05, n_classes=4)
    labels = torch.tensor([0, 1, 2, 3, 2])
    x = model.sample(5, temperature=0.0, y=labels)
    zs, _ = model.encode(x)
    top_mean, _ = model._top_params(5, labels)
    assert torch.allclose(zs[-1], top_mean, atol=1e-9)
    assert torch.allclose(x[2], x[4], atol=1e-12) and not torch.allclose(x[0], x[1])
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        model.sample(1, y=torch.tensor([4]))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.sample(1, temperature=-0.1)


def test_sample_stays_finite_at_extreme_temperature():
    model = _random_glow((3, 8, 8), seed=11, scale=0.5, n_levels=2).float()
    x = model.sample(4, temperature=1e4)
    assert torch.isfinite(x).all()


def test_initialize_sets_every_actnorm_once_and_survives_state_dict():
    model = Glow((1, 8, 8), n_levels=2, n_steps=2, hidden_channels=8)
    assert not model.is_initialized
    model.initialize(torch.rand(16, 1, 8, 8) - 0.5)
    assert model.is_initialized
    copy = Glow((1, 8, 8), n_levels=2, n_steps=2, hidden_channels=8)
    copy.load_state_dict(model.state_dict())
    assert copy.is_initialized
    x = torch.rand(4, 1, 8, 8) * 3
    assert torch.equal(copy.log_prob(x), model.log_prob(x))


def test_from_config_builds_the_architecture_the_config_describes():
    cfg = apply_overrides(default_config(), [
        "data.dataset=cifar10", "data.channels=3", "data.image_size=16", "model.n_levels=3", "model.n_steps=2",
        "model.hidden_channels=6", "model.coupling=additive", "model.conv=shuffle", "model.learn_top=false",
        "model.n_classes=4"])
    torch.manual_seed(0)
    model = Glow.from_config(cfg)
    torch.manual_seed(0)
    expected = Glow((3, 16, 16), n_levels=3, n_steps=2, hidden_channels=6, coupling="additive", conv="shuffle",
                    learn_top=False, n_classes=4)
    assert model.image_shape == cfg.image_shape == (3, 16, 16) and model.latent_shapes == expected.latent_shapes
    assert model.n_classes == 4 and "top_prior" not in dict(model.named_parameters())
    assert model.levels[0].layers[0].layers[2].transform.params_per_channel == 1
    mine, theirs = model.state_dict(), expected.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


# Small, so that every key's change builds quickly; 16x16 RGB lets n_levels grow.
_SMALL = ["data.dataset=cifar10", "data.channels=3", "data.image_size=16", "model.n_steps=1",
          "model.hidden_channels=4", "model.dequant_steps=1", "model.dequant_hidden_channels=4"]


def _another_value(hint, value) -> str:
    """An allowed value of a config key other than `value`, as a --set override writes it."""
    if get_origin(hint) is Literal:
        return next(choice for choice in get_args(hint) if choice != value)
    if hint is bool:
        return str(not value).lower()
    return str(value + 1 if hint is int else value * 2)


def _fingerprint(module: torch.nn.Module, run) -> tuple:
    """What a key can change: parameter and buffer names and shapes, and outputs once weights are perturbed."""
    torch.manual_seed(0)
    perturb(module, 0.1, seed=0)
    with torch.no_grad():
        outputs = run(module)
    return tuple((k, tuple(v.shape)) for k, v in module.state_dict().items()), [o.tolist() for o in outputs]


def _built(cfg) -> tuple[tuple, tuple]:
    """Fingerprints of the flow that Glow.from_config builds and of the dequantiser build_objective adds."""
    torch.manual_seed(0)
    objective = build_objective(Glow.from_config(cfg), cfg)
    x = torch.rand(2, *cfg.image_shape, generator=torch.Generator().manual_seed(1)) - 0.5
    images = torch.randint(0, 2**cfg.data.n_bits, (2, *cfg.image_shape), generator=torch.Generator().manual_seed(2))
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(3))
    objective.model.initialize(x)
    return (_fingerprint(objective.model, lambda model: [model.log_prob(x)]),
            _fingerprint(objective.dequantizer, lambda dequantizer: dequantizer(images, noise)))


@pytest.mark.parametrize("key", [field.name for field in dataclasses.fields(ModelConfig)])
def test_every_model_key_changes_what_from_config_builds(key):
    """A model.* key set to another allowed value changes the flow Glow.from_config builds (the dequantisation
    keys, model.dequant*, the objective's noise model instead): a key that from_config forgets fails here."""
    base = apply_overrides(default_config(), _SMALL)
    value = _another_value(get_type_hints(ModelConfig)[key], getattr(base.model, key))
    changed = apply_overrides(base, [f"model.{key}={value}"])
    (flow, noise), (changed_flow, changed_noise) = _built(base), _built(changed)
    if key.startswith("dequant"):
        assert changed_noise != noise and changed_flow == flow, (key, value)
    else:
        assert changed_flow != flow, (key, value)


def test_amp_dtype_reports_what_set_amp_set_on_every_conditioner():
    model = Glow((1, 8, 8), n_levels=2, n_steps=2, hidden_channels=4)
    conditioners = [m for m in model.modules() if isinstance(m, Conditioner)]
    assert len(conditioners) == 4 and model.amp_dtype is None
    assert model.set_amp(torch.bfloat16) is model and model.amp_dtype is torch.bfloat16
    assert all(c.amp_dtype is torch.bfloat16 for c in conditioners)
    model.set_amp(None)
    assert model.amp_dtype is None and all(c.amp_dtype is None for c in conditioners)
    with pytest.raises(AttributeError):
        model.amp_dtype = torch.float16  # read-only: set_amp is the one way to change it


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"image_shape": (3, 30, 30), "n_levels": 2}, "not divisible by 2\\*\\*n_levels = 4"),
        ({"image_shape": (3, 8, 8), "n_levels": 4}, "not divisible"),
        ({"image_shape": (3, 8), "n_levels": 1}, "image_shape must be"),
        ({"image_shape": (3, 8, 8), "n_levels": 0}, "n_levels must be at least 1"),
        ({"image_shape": (3, 8, 8), "n_steps": 0}, "n_steps must be at least 1"),
        ({"image_shape": (3, 8, 8), "coupling": "quadratic"}, "unknown coupling"),
        ({"image_shape": (3, 8, 8), "conv": "dense"}, "unknown conv"),
        ({"image_shape": (3, 8, 8), "n_classes": -1}, "n_classes must be at least 0"),
    ],
)
def test_impossible_architectures_raise_clear_value_errors(kwargs, message):
    kwargs = {"n_levels": 1, "n_steps": 1, "hidden_channels": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        Glow(**kwargs)


def test_pixels_or_another_shape_are_refused_naming_what_the_model_takes():
    """uint8 pixels were scored as values up to 255 (millions of nats); glowtrain.Glow is the model, as DESIGN says."""
    import glowtrain

    model = glowtrain.Glow((1, 8, 8), n_levels=2, n_steps=1, hidden_channels=8)
    assert model.log_prob(torch.rand(2, 1, 8, 8) - 0.5).shape == (2,)
    for images, got in ((torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "torch.uint8 (2, 1, 8, 8)"),
                        (torch.zeros(2, 3, 8, 8, dtype=torch.float32), "torch.float32 (2, 3, 8, 8)"),
                        (torch.zeros(1, 8, 8, dtype=torch.float32), "torch.float32 (1, 8, 8)")):
        for method in (model.log_prob, model.encode, model.initialize):
            with pytest.raises(ValueError, match=rf"^Glow takes float images of shape \(N, 1, 8, 8\) in about "
                                                 rf"\[-0.5, 0.5\] .*, got {re.escape(got)}; glowtrain.load_run"):
                method(images)
