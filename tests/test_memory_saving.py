"""Memory-saving (reversible) backward: same gradients as the standard path, far fewer saved tensors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import perturb

from glowtrain.config import apply_overrides, default_config
from glowtrain.data import build_dataset
from glowtrain.flows import make_coupling
from glowtrain.losses import bits_per_dim, dequantize
from glowtrain.model import Glow


def _random_glow(shape=(3, 8, 8), seed=0, dtype=torch.float64, scale=0.05, device="cpu", **kwargs):
    """Built, initialised and perturbed on the CPU (the same weights on every device), then moved to `device`."""
    torch.manual_seed(seed)
    kwargs = {"n_levels": 2, "n_steps": 3, "hidden_channels": 8, **kwargs}
    model = Glow(shape, **kwargs).to(dtype)
    model.initialize(torch.rand(16, *shape, dtype=dtype) - 0.5)
    perturb(model, scale, seed)
    return model.to(device)


def _gradients(model, x, labels=None, memory_saving=False, input_grad=False):
    """Gradients of a loss with log-likelihood (so log-dets) and, if conditional, classification terms."""
    model.set_memory_saving(memory_saving).zero_grad()
    x = x.clone().requires_grad_(input_grad)
    log_prob, logits = model(x, labels)
    loss = -log_prob.mean()
    if logits is not None:
        loss = loss + F.cross_entropy(logits, labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    if input_grad:
        grads["<input>"] = x.grad.clone()
    return grads


def _uses_reversible_chain(output: torch.Tensor) -> bool:
    """Whether the autograd graph behind `output` runs through the memory-saving Function."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "ReversibleChain" in type(node).__name__:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _assert_same_gradients(standard, saving, rtol=1e-8, atol=1e-12):
    assert standard.keys() == saving.keys()
    for name, expected in standard.items():
        assert torch.allclose(saving[name], expected, rtol=rtol, atol=atol), name


CASES = [("additive", "lu"), ("additive", "plain"), ("affine", "lu"), ("affine", "plain"), ("affine", "shuffle"),
         ("spline", "lu")]


@pytest.mark.parametrize("n_classes", [0, 3])
@pytest.mark.parametrize("coupling,conv", CASES)
def test_memory_saving_gradients_equal_standard_on_every_parameter(coupling, conv, n_classes, device):
    model = _random_glow(coupling=coupling, conv=conv, n_classes=n_classes, device=device)
    x = (torch.rand(4, 3, 8, 8, dtype=torch.float64) - 0.5).to(device)
    labels = torch.tensor([0, 2, 1, 2], device=device) if n_classes else None
    standard = _gradients(model, x, labels, memory_saving=False)
    saving = _gradients(model, x, labels, memory_saving=True)
    assert _uses_reversible_chain(model(x, labels)[0])
    assert all(g.abs().max() > 0 for g in standard.values())  # every parameter is really exercised
    _assert_same_gradients(standard, saving)


def test_memory_saving_input_gradient_equals_standard(device):
    model = _random_glow((1, 8, 8), seed=1, coupling="affine", conv="lu", device=device)
    x = (torch.rand(3, 1, 8, 8, dtype=torch.float64) - 0.5).to(device)
    standard = _gradients(model, x, memory_saving=False, input_grad=True)
    saving = _gradients(model, x, memory_saving=True, input_grad=True)
    assert standard["<input>"].abs().max() > 0
    _assert_same_gradients(standard, saving)


def test_memory_saving_gradients_with_bf16_coupling_networks_match_standard(device):
    model = _random_glow((3, 8, 8), seed=2, dtype=torch.float32, device=device).set_amp(torch.bfloat16)
    x = (torch.rand(4, 3, 8, 8) - 0.5).to(device)
    standard = _gradients(model, x, memory_saving=False)
    saving = _gradients(model, x, memory_saving=True)
    # The rebuilt inputs differ from the true ones by float32 rounding, which bf16 casts can amplify
    # in a few elements; each gradient must still agree to well within bf16 precision overall.
    for name, expected in standard.items():
        error = (saving[name] - expected).norm() / expected.norm().clamp_min(1e-12)
        assert error < 1e-2, (name, error.item())


def test_memory_saving_forward_initializes_actnorm_via_standard_path():
    torch.manual_seed(3)
    model = Glow((1, 8, 8), n_levels=2, n_steps=2, hidden_channels=8, memory_saving=True)
    reference = copy.deepcopy(model).set_memory_saving(False)
    x = torch.rand(8, 1, 8, 8) - 0.5
    log_prob = model.log_prob(x)
    assert not _uses_reversible_chain(log_prob)
    log_prob.mean().backward()
    assert model.is_initialized and _uses_reversible_chain(model.log_prob(x))
    assert torch.equal(log_prob, reference.log_prob(x))
    # Now initialised, the next forward takes the memory-saving path and agrees with the standard one.
    _assert_same_gradients(_gradients(reference, x), _gradients(model, x, memory_saving=True), rtol=1e-4, atol=1e-6)


def test_set_memory_saving_round_trip_and_no_effect_without_autograd(device):
    model = _random_glow((1, 8, 8), seed=4, device=device)
    assert model.memory_saving is False
    # A way of computing gradients, not architecture: a model rebuilt from a config starts without it.
    assert not Glow.from_config(apply_overrides(default_config(), ["train.memory_saving=true"])).memory_saving
    x = (torch.rand(5, 1, 8, 8, dtype=torch.float64) - 0.5).to(device)
    with torch.no_grad():
        before = model.log_prob(x)
        assert model.set_memory_saving(True) is model and model.memory_saving
        during = model.log_prob(x)
    # With autograd on, the forward values are the standard path's, bit for bit.
    recorded = model.log_prob(x)
    assert _uses_reversible_chain(recorded)
    assert not model.set_memory_saving(False).memory_saving
    assert not _uses_reversible_chain(model.log_prob(x))
    assert torch.equal(before, during) and torch.equal(before, recorded.detach())


def test_coupling_reverse_and_recompute_matches_reverse_and_forward(device):
    torch.manual_seed(5)
    for kind in ("affine", "additive", "spline"):
        layer = make_coupling(kind, 6, 8).double()
        perturb(layer, 0.2 if kind != "spline" else 0.05, seed=5)
        layer = layer.to(device)
        x = torch.randn(3, 6, 4, 4, dtype=torch.float64).to(device)
        y, logdet = layer(x)
        with torch.enable_grad():
            parts, y_again, logdet_again = layer.reverse_and_recompute(y)
        assert all(p.requires_grad and p.is_leaf for p in parts)
        assert torch.equal(torch.cat(parts, 1), layer.reverse(y))
        assert torch.allclose(y_again, y, atol=1e-12) and torch.allclose(logdet_again, logdet, atol=1e-12)
        with torch.enable_grad():
            parts, y_again, _ = layer.reverse_and_recompute(y, input_grad=False)
        assert not any(p.requires_grad for p in parts) and y_again.requires_grad  # parameters still need it


def _saved_numel(model, x) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.log_prob(x).sum()
    return total


def test_memory_saving_stores_activations_independent_of_n_steps():
    x = torch.rand(4, 3, 8, 8) - 0.5
    saved = {}
    for n_steps in (8, 16):
        model = _random_glow((3, 8, 8), dtype=torch.float32, n_steps=n_steps, hidden_channels=16)
        saved[n_steps] = (_saved_numel(model.set_memory_saving(False), x),
                          _saved_numel(model.set_memory_saving(True), x))
    (standard_8, saving_8), (standard_16, saving_16) = saved[8], saved[16]
    assert standard_16 > 1.8 * standard_8  # the standard path keeps every step's activations
    assert saving_16 == saving_8  # only each level's output and the priors' inputs
    assert saving_16 < 0.1 * standard_16


def test_reconstruction_errors_are_one_small_number_per_level():
    # Small moves off the identity: larger random ones make untrained deep levels chaotic, and the
    # check then duly reports drift far above 1e-4 (which is what it is for).
    model = _random_glow((3, 8, 8), seed=6, dtype=torch.float32, scale=0.01, n_levels=3, n_steps=4,
                         hidden_channels=16)
    x = torch.rand(8, 3, 8, 8) - 0.5
    errors = model.reconstruction_errors(x)
    assert len(errors) == 3 and all(isinstance(e, float) for e in errors)
    assert all(0 <= e < 1e-4 for e in errors) and max(errors) > 0
    # The drift is rounding: in float64 the same model rebuilds its inputs a billion times closer.
    assert max(model.double().reconstruction_errors(x.double())) < 1e-12


def test_float32_training_with_memory_saving_tracks_standard_losses_for_50_steps():
    data_cfg = default_config().data
    dataset = build_dataset(data_cfg, "train")
    shape = tuple(dataset[0][0].shape)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(50):
        index = torch.randint(len(dataset), (32,), generator=generator)
        images, _ = dataset.get_batch(index)
        batches.append(dequantize(images, data_cfg.n_bits, generator=generator))
    torch.manual_seed(7)
    standard = Glow(shape, n_levels=2, n_steps=4, hidden_channels=16).initialize(batches[0])
    saving = copy.deepcopy(standard).set_memory_saving(True)
    optimizers = [torch.optim.Adamax(m.parameters(), lr=2e-3) for m in (standard, saving)]
    worst, history = 0.0, []
    for x in batches:
        losses = []
        for model, optimizer in zip((standard, saving), optimizers):
            optimizer.zero_grad()
            loss = bits_per_dim(model.log_prob(x), model.n_dims, data_cfg.n_bits).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(losses[0])
        worst = max(worst, abs(losses[0] - losses[1]))
        assert worst < 1e-4, (len(history), losses)
    assert history[-1] < history[0] - 0.3  # it really trained, so the two runs had room to drift apart
