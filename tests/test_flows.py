import math
from typing import get_args, get_type_hints

import pytest
import torch
import torch.nn.functional as F
from helpers import brute_force_logdet, perturb

from glowtrain import flows
from glowtrain.config import ModelConfig
from glowtrain.flows import (
    ActNorm,
    Coupling,
    CouplingNet,
    CouplingTransform,
    FlowLayer,
    InvConv2d,
    Permute,
    Squeeze,
    flow_step,
    make_coupling,
)

pytestmark = pytest.mark.usefixtures("float64_default")


def _layer(kind: str, channels: int):
    """A layer by its name in LAYERS: "actnorm", "squeeze", "conv:<CONV_KINDS name>", "coupling:<COUPLING_KINDS
    name>", or "<coupling>+<conv>" for a whole flow step."""
    if kind == "actnorm":
        return ActNorm(channels)
    if kind == "squeeze":
        return Squeeze()
    if kind.startswith("conv:"):
        return flows.CONV_KINDS[kind.removeprefix("conv:")](channels)
    if kind.startswith("coupling:"):
        return make_coupling(kind.removeprefix("coupling:"), channels, 8)
    coupling, conv = kind.split("+")
    return flow_step(channels, 8, coupling, conv)


# From the registries, so that a newly registered coupling or conv kind is checked against brute force too.
LAYERS = (["actnorm", "squeeze"] + [f"conv:{v}" for v in flows.CONV_KINDS]
          + [f"coupling:{c}" for c in flows.COUPLING_KINDS]
          + [f"{c}+{v}" for c in flows.COUPLING_KINDS for v in flows.CONV_KINDS])


def _ready_layer(kind, shape, seed=0, scale=0.2, device="cpu"):
    """A layer built, initialised and perturbed on the CPU (the same values on every device), and an input."""
    torch.manual_seed(seed)
    layer = _layer(kind, shape[0]).double()
    x = torch.randn(6, *shape)
    layer(x)  # data-dependent init happens here
    # Perturbed as much as an affine coupling, a spline gets bins with derivatives near 1e-7, where float64
    # rounding of y alone moves the inverse by 1e-9 (its error times the derivative stays ~10 ulps); a quarter
    # of the perturbation keeps it as well conditioned as the other layers.
    perturb(layer, scale / 4 if "spline" in kind else scale, seed)
    return layer.to(device), torch.randn(3, *shape).to(device)


@pytest.mark.parametrize("shape", [(2, 4, 4), (4, 4, 4)])
@pytest.mark.parametrize("kind", LAYERS)
def test_layer_logdet_matches_brute_force_jacobian(kind, shape, device):
    layer, x = _ready_layer(kind, shape, device=device)
    _, logdet = layer(x)
    assert logdet.shape == (3,) and logdet.device == device
    expected = brute_force_logdet(lambda s: layer(s)[0], x)
    assert torch.allclose(logdet, expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("kind", LAYERS)
def test_layer_reverse_inverts_forward(kind, device):
    layer, x = _ready_layer(kind, (4, 4, 4), seed=1, scale=0.1, device=device)
    y, _ = layer(x)
    assert (layer.reverse(y) - x).abs().max() <= 1e-10
    assert (layer(layer.reverse(x))[0] - x).abs().max() <= 1e-10


def test_volume_preserving_layers_report_zero_logdet_per_sample():
    x = torch.randn(5, 4, 4, 4)
    for layer in (Permute(4, "shuffle"), Squeeze(), make_coupling("additive", 4, 8)):
        logdet = layer(x)[1]
        assert logdet.shape == (5,) and torch.all(logdet == 0)


def test_actnorm_initialises_to_zero_mean_unit_variance():
    layer = ActNorm(3)
    x = torch.randn(64, 3, 5, 5) * torch.tensor([0.1, 2.0, 7.0]).view(1, 3, 1, 1) + 3.0
    y, _ = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-10)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)


def test_actnorm_init_leaves_the_scale_of_a_channel_without_spread_at_one():
    """One value per channel (one image of a 1x1 level), or a constant channel, would otherwise be scaled by 1e6."""
    single = ActNorm(3)
    single.initialize(torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))
    assert torch.equal(single.logs, torch.zeros(1, 3, 1, 1))
    assert torch.equal(single.bias.flatten(), torch.tensor([-1.0, 2.0, -0.5]))
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 1] = 0.25  # constant channel
    layer = ActNorm(3)
    layer.initialize(x)
    assert layer.logs[0, 1].item() == 0.0
    y, _ = layer(x)
    for channel in (0, 2):
        assert abs(y[:, channel].std(unbiased=False).item() - 1) < 1e-4


def test_a_glow_initialised_on_one_image_with_a_1x1_top_level_gives_finite_likelihoods():
    from glowtrain.model import Glow

    torch.manual_seed(0)
    model = Glow((1, 8, 8), n_levels=3, n_steps=2, hidden_channels=8)
    model.initialize(torch.rand(1, 1, 8, 8) - 0.5)
    log_prob = model.log_prob(torch.rand(16, 1, 8, 8) - 0.5)
    assert torch.isfinite(log_prob).all()
    assert (-log_prob / (64 * math.log(2))).max() < 20  # bits/dim of the order of the data's, not 1e7


def test_actnorm_does_not_reinitialise_after_state_dict_round_trip():
    layer = ActNorm(3)
    layer(torch.randn(32, 3, 4, 4) * 5)
    restored = ActNorm(3)
    restored.load_state_dict(layer.state_dict())
    other_batch = torch.randn(32, 3, 4, 4) + 10
    assert torch.equal(restored(other_batch)[0], layer(other_batch)[0])
    assert torch.equal(restored.bias, layer.bias)


def test_actnorm_initialises_only_once():
    layer = ActNorm(2)
    layer(torch.randn(16, 2, 3, 3))
    bias = layer.bias.clone()
    layer(torch.randn(16, 2, 3, 3) * 9 + 4)
    assert torch.equal(layer.bias, bias)


def test_lu_logdet_equals_slogdet_of_reconstructed_weight(device):
    conv = InvConv2d(6, lu=True)
    perturb(conv, 0.3)
    conv = conv.to(device)
    expected = torch.linalg.slogdet(conv.matrix())[1]
    assert torch.allclose(conv.log_abs_det(), expected, atol=1e-12)
    x = torch.randn(2, 6, 3, 5).to(device)
    assert torch.allclose(conv(x)[1], expected * 15 * torch.ones(2, device=device), atol=1e-10)


def test_float32_lu_weight_is_the_float64_product_of_its_factors_rounded_once():
    conv = InvConv2d(12, lu=True)
    perturb(conv, 0.3)
    conv = conv.float()
    lower, upper = (f.double() for f in conv._lu_factors())
    assert torch.equal(conv.matrix(), (conv.perm.double() @ lower @ upper).float())


def test_invconv_starts_as_a_rotation():
    for lu in (True, False):
        weight = InvConv2d(5, lu=lu).matrix().detach()
        assert torch.allclose(weight @ weight.T, torch.eye(5), atol=1e-6)


@pytest.mark.parametrize("lu", [True, False])
def test_cached_inverse_is_reused_in_eval_and_invalidated_when_weights_change(lu):
    # Seeded, and a step small enough to keep W well conditioned: whatever ran before, 1e-10 must hold.
    generator = torch.Generator().manual_seed(0)
    conv = InvConv2d(4, lu=lu).eval()
    first = conv.inverse_matrix()
    assert conv.inverse_matrix() is first
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.01)
    conv(torch.randn(2, 4, 3, 3, generator=generator))[0].square().sum().backward()
    optimizer.step()
    second = conv.inverse_matrix()
    assert second is not first
    assert torch.allclose(second @ conv.matrix().detach(), torch.eye(4), atol=1e-10)
    reloaded = InvConv2d(4, lu=lu).eval()
    reloaded.inverse_matrix()
    reloaded.load_state_dict(conv.state_dict())
    assert torch.allclose(reloaded.inverse_matrix(), second, atol=1e-12)


@pytest.mark.parametrize("lu", [True, False])
def test_forward_matrix_is_cached_only_where_no_gradient_can_need_it(lu):
    conv = InvConv2d(4, lu=lu)
    perturb(conv, 0.05)
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():  # under autograd the product may round its last bit differently
        expected = conv(x)[0]
    conv.eval()
    with torch.inference_mode():
        first = conv._forward_matrix()
        before = first.clone()
        assert conv._forward_matrix() is first and torch.equal(conv(x)[0], expected)
    with torch.no_grad():
        assert conv._forward_matrix() is first
    # With gradients on (in eval mode too) W is built afresh, so the parameters get theirs.
    conv(x)[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())
    torch.optim.SGD(conv.parameters(), lr=0.1).step()
    with torch.no_grad():
        moved = conv._forward_matrix()
        assert not torch.equal(moved, before) and torch.equal(moved, conv._wide_matrix())
    conv.train()
    conv._cache.clear()
    with torch.no_grad():
        conv(x)
    assert conv._cache == {}  # training never caches


@pytest.mark.parametrize("lu", [True, False])
def test_float32_inverse_is_computed_in_float64(lu, device):
    """Within a few float32 roundings of the exact inverse, where a float32 inversion is ~10x further (measured on
    seeds 0-5: 3e-8 to 9e-8 against 7e-7 to 1.3e-6 of the largest entry; round trips 3e-7 against 2e-6 to 5e-6)."""
    torch.manual_seed(0)
    conv = InvConv2d(48, lu=lu)
    perturb(conv, 0.05)
    conv = conv.float().to(device)
    weight = conv.matrix().detach()
    exact = torch.linalg.inv(weight.double())
    bound = 2.5e-7 * exact.abs().max()
    assert (conv.inverse_matrix().double() - exact).abs().max() < bound
    float32_inverse = torch.linalg.inv(weight.cpu()).double().to(device)  # (a CPU's, as measured above)
    assert (float32_inverse - exact).abs().max() > bound  # the bound tells a float32 inversion apart
    # mix_channels multiplies in float64, which has no TF32 form: the same bound holds on a GPU.
    x = torch.randn(2, 48, 4, 4, dtype=torch.float32).to(device)
    assert (conv.reverse(conv(x)[0]) - x).abs().max() < 1e-6


def test_affine_coupling_reverse_stays_finite_when_scale_saturates():
    coupling = make_coupling("affine", 4, 8).float()
    with torch.no_grad():
        coupling.net.conv_out.conv.bias.fill_(-1e4)  # sigmoid(h + 2) underflows to 0
    y = torch.randn(3, 4, 4, 4, dtype=torch.float32) * 1e3
    x = coupling.reverse(y)
    assert torch.isfinite(x).all()
    assert torch.isfinite(coupling(x)[1]).all()


def test_zero_initialised_coupling_starts_as_identity():
    x = torch.randn(2, 4, 4, 4)
    for affine in (True, False):
        coupling = make_coupling("affine" if affine else "additive", 4, 8)
        y, logdet = coupling(x)
        # sigmoid(2) is the starting scale of the affine coupling's changed half
        expected_scale = torch.sigmoid(torch.tensor(2.0)) * (1 - 1e-4) + 1e-4 if affine else 1.0
        assert torch.allclose(y[:, :2], x[:, :2]) and torch.allclose(y[:, 2:], x[:, 2:] * expected_scale)


def _unfolded_net(net: CouplingNet, x: torch.Tensor) -> torch.Tensor:
    """The coupling network written out layer by layer, as the reference defines it."""
    h = F.relu((net.conv_in(x) + net.norm_in.bias) * torch.exp(net.norm_in.logs))
    h = F.relu((net.conv_mid(h) + net.norm_mid.bias) * torch.exp(net.norm_mid.logs))
    return net.conv_out.conv(h) * torch.exp(3 * net.conv_out.logs)


def test_coupling_network_with_actnorm_folded_into_convolutions_is_the_reference_network():
    torch.manual_seed(0)
    net = CouplingNet(3, 6, 16)
    net(torch.randn(8, 3, 5, 5))  # data-dependent init through the unfolded path
    perturb(net, 0.1)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    folded = net(x)
    assert folded.is_contiguous()  # callers slice channels; channels-last stays inside the network
    reference = _unfolded_net(net, x)
    assert torch.allclose(folded, reference, atol=1e-12, rtol=1e-12)
    weights = torch.randn_like(reference)
    grads = torch.autograd.grad((folded * weights).sum(), [x, *net.parameters()])
    reference_grads = torch.autograd.grad((reference * weights).sum(), [x, *net.parameters()])
    for got, expected in zip(grads, reference_grads):
        assert torch.allclose(got, expected, atol=1e-11, rtol=1e-11)


def test_actnorm_fold_into_a_convolution_equals_normalizing_its_output():
    torch.manual_seed(1)
    norm = ActNorm(5)
    norm.initialize(torch.randn(4, 5, 3, 3))
    perturb(norm, 0.5)
    x, weight, bias = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(5)
    folded = F.conv2d(x, *norm.fold_into(weight, bias), padding=1)
    assert torch.allclose(folded, norm.normalize(F.conv2d(x, weight, bias, padding=1)), atol=1e-12, rtol=0)
    assert torch.allclose(F.conv2d(x, *norm.fold_into(weight)), norm.normalize(F.conv2d(x, weight)), atol=1e-12)


def test_squeeze_moves_each_2x2_block_into_channels():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y, _ = Squeeze()(x)
    assert y.shape == (1, 4, 2, 2)
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert torch.equal(Squeeze().reverse(y), x)


def test_unknown_layer_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown coupling"):
        flow_step(4, 8, "quadratic", "lu")
    with pytest.raises(ValueError, match="unknown conv"):
        flow_step(4, 8, "affine", "dense")
    with pytest.raises(ValueError, match="at least 2 channels"):
        make_coupling("affine", 1, 8)


def test_config_offers_exactly_the_registered_coupling_and_conv_kinds():
    # config.py cannot import the torch-heavy registry, so its Literal types repeat the names.
    hints = get_type_hints(ModelConfig)
    assert get_args(hints["coupling"]) == get_args(hints["dequant_coupling"]) == tuple(flows.COUPLING_KINDS)
    assert get_args(hints["conv"]) == tuple(flows.CONV_KINDS)


class _ToyTransform(CouplingTransform):
    """y = (x + b) * exp(tanh(a)) + c: three parameters per channel, to exercise the grouped layout."""

    params_per_channel = 3

    def forward(self, x, params):
        a, b, c = self.split_params(params)
        return (x + b) * torch.exp(torch.tanh(a)) + c, torch.tanh(a).flatten(1).sum(1)

    def inverse(self, y, params):
        a, b, c = self.split_params(params)
        return (y - c) * torch.exp(-torch.tanh(a)) - b


def test_a_registered_coupling_kind_works_in_a_flow_step_and_a_whole_glow(monkeypatch):
    from glowtrain.model import Glow

    monkeypatch.setitem(flows.COUPLING_KINDS, "toy", _ToyTransform)
    layer, x = _ready_layer("toy+lu", (5, 4, 4))
    coupling = layer.layers[2]
    assert isinstance(coupling.transform, _ToyTransform) and coupling.net.out_channels == 3 * 3
    y, logdet = layer(x)
    assert torch.allclose(logdet, brute_force_logdet(lambda s: layer(s)[0], x), atol=1e-8, rtol=0)
    assert (layer.reverse(y) - x).abs().max() <= 1e-10
    torch.manual_seed(1)
    model = Glow((1, 4, 4), n_levels=2, n_steps=2, hidden_channels=8, coupling="toy", conv="shuffle")
    model.initialize(torch.rand(8, 1, 4, 4) - 0.5)
    perturb(model, 0.1, seed=1)
    images = torch.rand(2, 1, 4, 4) - 0.5
    zs, logdet = model.encode(images)
    expected = brute_force_logdet(lambda s: torch.cat([z.flatten(1) for z in model.encode(s)[0]], 1), images)
    assert torch.allclose(logdet, expected, atol=1e-8, rtol=0)
    assert (model.decode(zs) - images).abs().max() <= 1e-10


class _Gained(_ToyTransform):
    """The toy with an option of its own."""

    def __init__(self, gain: float):
        self.gain = gain

    @classmethod
    def from_options(cls, hidden_channels, toy_gain=1.0, **other_kinds_options):
        return cls(toy_gain)


def test_each_coupling_kind_takes_its_own_options_and_leaves_the_other_kinds(monkeypatch):
    """make_coupling hands every option to every kind: a new kind's option broke the spline (a TypeError)."""
    monkeypatch.setitem(flows.COUPLING_KINDS, "gained", _Gained)
    options = dict(spline_bins=4, spline_bound=2.0, toy_gain=0.5)
    assert make_coupling("gained", 4, 8, **options).transform.gain == 0.5
    spline = make_coupling("spline", 4, 8, **options).transform
    assert (spline.n_bins, spline.bound) == (4, 2.0)
    assert type(make_coupling("affine", 4, 8, **options).transform) is flows.AffineTransform
    with pytest.raises(TypeError, match="no coupling kind takes the option"):  # a misspelt option is not ignored
        make_coupling("spline", 4, 8, spline_bin=4)


def test_coupling_refuses_a_conditioner_whose_outputs_do_not_fit_its_transform():
    with pytest.raises(ValueError, match="not a multiple of the 3 parameters"):
        Coupling(_ToyTransform(), CouplingNet(2, 4, 8))


class _Shift(FlowLayer):
    """y = x + p: a layer with a parameter and no reverse_and_recompute of its own."""

    def __init__(self, channels):
        super().__init__()
        self.p = torch.nn.Parameter(torch.randn(1, channels, 1, 1))

    def forward(self, x):
        return x + self.p, (self.p.sum() * x[0, 0].numel()).expand(x.shape[0])

    def reverse(self, y):
        return y - self.p


@pytest.mark.parametrize("make", [lambda: _Shift(4), lambda: InvConv2d(4), lambda: ActNorm(4)])
def test_default_reverse_and_recompute_rebuilds_the_input_and_redoes_forward_under_autograd(make):
    torch.manual_seed(2)
    layer = make()
    x = torch.randn(3, 4, 2, 2)
    layer(x)  # ActNorm initialises here
    perturb(layer, 0.2, seed=2)
    y, logdet = layer(x)
    with torch.enable_grad():
        parts, y_again, logdet_again = layer.reverse_and_recompute(y.detach())
        assert len(parts) == 1 and parts[0].is_leaf and parts[0].requires_grad
        assert torch.allclose(parts[0], layer.reverse(y).detach(), atol=1e-12, rtol=0)
        assert torch.allclose(y_again, y, atol=1e-12) and torch.allclose(logdet_again, logdet, atol=1e-12)
        weights = torch.randn_like(y)
        got = torch.autograd.grad((y_again * weights).sum() + logdet_again.sum(), [parts[0], *layer.parameters()])
        x_leaf = x.clone().requires_grad_()
        y_direct, logdet_direct = layer(x_leaf)
        expected = torch.autograd.grad((y_direct * weights).sum() + logdet_direct.sum(), [x_leaf, *layer.parameters()])
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-10)
    assert not layer.reverse_and_recompute(y, input_grad=False)[0][0].requires_grad


def test_every_layer_kind_is_a_flow_layer():
    assert all(isinstance(_layer(kind, 4), FlowLayer) for kind in LAYERS)


def test_coupling_net_counts_its_three_convolutions():
    net = CouplingNet(3, 6, 16)
    assert net.multiply_adds((3, 5, 7)) == 35 * (16 * 3 * 9 + 16 * 16 + 6 * 16 * 9)
