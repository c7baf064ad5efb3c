"""The invertible layers of Glow (Kingma & Dhariwal 2018) and their exact log-determinants.

Every layer is a `FlowLayer`: `forward(x) -> (y, logdet)` with `logdet` of shape (N,) holding
log|det dy/dx| per sample, `reverse(y) -> x` its exact inverse, and `reverse_and_recompute(y)` for
the memory-saving backward (reversible.py). Layers know nothing of priors or pixels.

A coupling is a transform times a conditioner, as in nflows' CouplingTransform and zuko's general
coupling: the conditioner (a network, `CouplingNet` here) maps the kept half of the channels to
parameters, and the transform (`AdditiveTransform`, NICE; `AffineTransform`, RealNVP;
`SplineTransform`, rational-quadratic splines of Neural Spline Flows) applies an elementwise
bijection to the other half with them. `COUPLING_KINDS` and `CONV_KINDS` register the
couplings and channel mixings (1x1 convolutions, permutations) that `flow_step` builds by name;
adding a kind is one entry there (and its name in config.py's Literal, which a test compares).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from glowtrain.splines import MIN_BIN_WIDTH, rq_spline_forward, rq_spline_inverse

# The affine coupling's scale lives in (SCALE_FLOOR, 1): reverse divides by it, and a floor keeps
# that division bounded however the network saturates (sigmoid(h + 2) alone reaches 0 in float32).
SCALE_FLOOR = 1e-4
# Reverse clamps coupling outputs here so that extreme temperatures saturate instead of overflowing
# to inf and then NaN; in-distribution activations are many orders of magnitude smaller.
REVERSE_BOUND = 1e6


def _sum_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def widest_float(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has not: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _widest(x: torch.Tensor) -> torch.Tensor:
    return x.to(widest_float(x.device))


class FlowLayer(nn.Module):
    """The layer protocol: `forward(x) -> (y, logdet[N])`, `reverse(y) -> x`, and a rebuild for backward."""

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reverse_and_recompute(
        self, y: torch.Tensor, input_grad: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Rebuild the input of `forward` from its output and redo `forward` under autograd, for backward.

        Returns (parts, y, logdet): `parts` are fresh leaves (requiring grad if `input_grad`) whose
        concatenation along channels is the rebuilt input; `y` and `logdet` are forward's outputs as
        functions of them. This default reverses then runs forward; a layer with a cheaper combined
        form overrides it (Coupling). Call under torch.enable_grad().
        """
        with torch.no_grad():
            x = self.reverse(y)
        x = x.detach().requires_grad_(input_grad)
        y, logdet = self(x)
        return [x], y, logdet


MIN_INIT_STD = 1e-4  # below this spread, ActNorm's init leaves a channel's scale at 1


class ActNorm(FlowLayer):
    """Per-channel affine map y = (x + bias) * exp(logs), initialised from the first batch."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # A buffer, so a loaded state dict carries it and a restored model never re-initialises.
        self.register_buffer("initialized", torch.tensor(False))
        # Mirrors a True buffer so the hot path never reads a (possibly GPU) tensor on the host.
        self._known_initialized = False

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set bias and scale so that this batch comes out with zero mean and unit variance."""
        x = x.detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x.detach()
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        # A channel with one value in the batch (one image of a 1x1 level), or the same value everywhere, says
        # nothing about its scale: it keeps scale 1 instead of the 1e6 that -log(0 + 1e-6) would give it.
        informative = std > MIN_INIT_STD
        self.logs.copy_(torch.where(informative, -torch.log(std + 1e-6), torch.zeros_like(std)))
        self.initialized.fill_(True)
        self._known_initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Read the loaded flag now, once, rather than lazily in forward: a host read there would split a
        # compiled graph at every ActNorm of a resumed (or rolled back) model.
        self._known_initialized = bool(self.initialized)

    @property
    def is_initialized(self) -> bool:
        """Whether the data-dependent init has run (read from the buffer at most once while it is True)."""
        if not self._known_initialized and bool(self.initialized):
            self._known_initialized = True
        return self._known_initialized

    def _ensure_initialized(self, x: torch.Tensor) -> None:
        if not self.is_initialized:
            self.initialize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The map alone, for use inside coupling networks where no log-det is needed."""
        self._ensure_initialized(x)
        return (x + self.bias) * torch.exp(self.logs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.normalize(x)
        logdet = self.logs.sum() * (x.shape[2] * x.shape[3])
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias

    def fold_into(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of a convolution whose output already passed through this (initialised) map.

        (conv(x, w) + c + bias) * s = conv(x, w * s) + (c + bias) * s: scaling the small weight
        replaces two passes over the large activation, forwards and backwards.
        """
        scale = torch.exp(self.logs).flatten()
        shift = self.bias.flatten() if bias is None else bias + self.bias.flatten()
        return weight * scale.view(-1, *([1] * (weight.dim() - 1))), shift * scale


class InvConv2d(FlowLayer):
    """Invertible 1x1 convolution; `lu=True` parametrises W = P L (U + diag(sign * exp(log_s)))."""

    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        self.lu = lu
        dtype = torch.get_default_dtype()
        rotation = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        if lu:
            perm, lower, upper = torch.linalg.lu(rotation)
            diag = torch.diagonal(upper)
            self.register_buffer("perm", perm.to(dtype))
            self.register_buffer("sign_s", torch.sign(diag).to(dtype))
            self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels, dtype=dtype), -1))
            self.register_buffer("eye", torch.eye(channels, dtype=dtype))
            self.lower = nn.Parameter(lower.to(dtype))
            self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
            self.log_s = nn.Parameter(torch.log(torch.abs(diag)).to(dtype))
        else:
            self.weight = nn.Parameter(rotation.to(dtype))
        # kind -> (parameters' identity and versions, the matrix in the widest float, in the parameters' dtype)
        self._cache: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def _lu_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def _wide_matrix(self) -> torch.Tensor:
        """W in the widest float: a TF32 or bf16 product would make W drift from the factors its log-det
        is read from."""
        if not self.lu:
            return _widest(self.weight)
        lower, upper = (_widest(f) for f in self._lu_factors())
        return _widest(self.perm) @ lower @ upper

    def matrix(self) -> torch.Tensor:
        """The (C, C) weight W, in the parameters' dtype."""
        return self.weight if not self.lu else self._wide_matrix().to(self.lower.dtype)

    def log_abs_det(self) -> torch.Tensor:
        """log|det W| for one pixel."""
        if self.lu:
            return self.log_s.sum()
        return torch.linalg.slogdet(_widest(self.weight))[1].to(self.weight.dtype)

    def _compute_inverse(self) -> torch.Tensor:
        # float64 throughout: a float32 inverse drifts visibly once 100 of them are chained.
        if self.lu:
            lower, upper = (_widest(f) for f in self._lu_factors())
            eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
            # W^-1 = U^-1 L^-1 P^T by two triangular solves.
            lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
            inverse = torch.linalg.solve_triangular(upper, lower_inv, upper=True) @ _widest(self.perm).T
        else:
            inverse = torch.linalg.inv(_widest(self.weight))
        return inverse

    def _inverses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W^-1 in the widest float, W^-1 in the parameters' dtype), cached in eval mode until any
        parameter changes (in place or replaced)."""
        if self.training:
            self._cache.clear()
            inverse = self._compute_inverse()
            return inverse, inverse.to(self._param_dtype())
        return self._cached("inverse", self._compute_inverse)

    def _forward_matrix(self) -> torch.Tensor:
        """W in the widest float; cached where nothing needs its gradient (evaluation, scoring), as building
        it from the LU factors is a dozen small kernels per layer and batch, more than the product itself."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._wide_matrix()
        return self._cached("matrix", self._wide_matrix)[0]

    def _param_dtype(self) -> torch.dtype:
        return (self.lower if self.lu else self.weight).dtype

    def _cached(self, kind: str, compute) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        cached = self._cache.get(kind)
        if cached is None or cached[0] != key:
            # Outside inference mode even when called from it (sampling): an inference tensor in the
            # cache would make any later reverse under autograd fail.
            with torch.inference_mode(False), torch.no_grad():
                wide = compute()
                cached = self._cache[kind] = (key, wide, wide.to(self._param_dtype()))
        return cached[1], cached[2]

    def inverse_matrix(self) -> torch.Tensor:
        """W^-1 in the parameters' dtype (cached in eval mode)."""
        return self._inverses()[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = mix_channels(self._forward_matrix(), x)
        logdet = self.log_abs_det() * (x.shape[2] * x.shape[3])
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return mix_channels(self._inverses()[0], y)

    def multiply_adds(self, shape: tuple[int, int, int]) -> int:
        """Multiply-adds of forward on one input of `shape` (C, H, W): C x C at every pixel."""
        channels, height, width = shape
        return channels * channels * height * width


def mix_channels(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W x at every pixel of x (N, C, H, W), multiplied in the widest float and rounded once to x's dtype.

    CUDA runs float32 convolutions and matrix products in TF32 (10 mantissa bits) by default, and
    glowtrain wants that speed for the coupling networks; here it would break invertibility, because
    a rounded W is not the W whose log-det the model uses. Measured on an H200 at the paper's CIFAR
    size: decode(encode(x)) off by 2.7e-3 with TF32 here, 1.4e-4 without. float64 has no TF32 form, and
    this product is a tiny share of a step (C of at most a few hundred channels against 512-wide
    coupling networks).
    """
    n, c, h, w = x.shape
    wide = torch.matmul(weight.to(widest_float(x.device)), x.reshape(n, c, h * w).to(widest_float(x.device)))
    return wide.reshape(n, c, h, w).to(x.dtype)


class Permute(FlowLayer):
    """Fixed channel permutation, `reverse` (RealNVP) or seeded `shuffle`; volume-preserving."""

    def __init__(self, channels: int, mode: str = "reverse"):
        super().__init__()
        if mode == "reverse":
            order = torch.arange(channels - 1, -1, -1)
        elif mode == "shuffle":
            order = torch.randperm(channels)
        else:
            raise ValueError(f"unknown permutation {mode!r}: use 'reverse' or 'shuffle'")
        self.register_buffer("order", order)
        self.register_buffer("inverse_order", torch.argsort(order))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.order], x.new_zeros(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.inverse_order]


def _conv_multiply_adds(conv: nn.Conv2d, output_pixels: int) -> int:
    return output_pixels * conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size)


class ZeroConv2d(nn.Module):
    """3x3 convolution starting at exactly zero, with a learned output scale exp(3 * logs)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The output scale folded into the convolution: one pass over the output instead of two.
        scale = torch.exp(self.logs * 3).flatten()
        return F.conv2d(x, self.conv.weight * scale.view(-1, 1, 1, 1), self.conv.bias * scale, padding=1)

    def multiply_adds(self, shape: tuple[int, int, int]) -> int:
        """Multiply-adds of forward on one input of `shape` (C, H, W); padding keeps H x W."""
        return _conv_multiply_adds(self.conv, shape[1] * shape[2])


def _conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as one matrix product over pixels (channels-last input needs no copy)."""
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


class Conditioner(nn.Module):
    """A coupling's network: kept half (N, in_channels, H, W) -> transform parameters (N, out_channels, H, W).

    It owns its precision: `amp_dtype` (set by Glow.set_amp; None is full precision) is the autocast
    dtype it computes in, and its output is returned in its input's dtype. `multiply_adds` counts
    its work for `glowtrain info`.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.amp_dtype: torch.dtype | None = None

    def multiply_adds(self, shape: tuple[int, int, int]) -> int:
        """Multiply-adds of forward on one input of `shape` (C, H, W)."""
        raise NotImplementedError


class CouplingNet(Conditioner):
    """The reference conditioner: conv3x3, ActNorm, ReLU, conv1x1, ActNorm, ReLU, zero conv3x3."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int):
        super().__init__(in_channels, out_channels)
        self.conv_in = nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False)
        self.norm_in = ActNorm(hidden_channels)
        self.conv_mid = nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False)
        self.norm_mid = ActNorm(hidden_channels)
        self.conv_out = ZeroConv2d(hidden_channels, out_channels)
        nn.init.normal_(self.conv_in.weight, std=0.05)
        nn.init.normal_(self.conv_mid.weight, std=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The result is widened back to x's dtype; because reverse evaluates the same network on the
        # same input, the coupling stays exactly invertible whatever amp_dtype is.
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            if not (self.norm_in.is_initialized and self.norm_mid.is_initialized):
                h = F.relu(self.norm_in.normalize(self.conv_in(x)))
                h = F.relu(self.norm_mid.normalize(self.conv_mid(h)))
                return self.conv_out(h).to(x.dtype)
            # Channels-last inside the network: the 1x1 convolution becomes a plain matrix product
            # and the 3x3 ones run faster; only the thin input and output change layout.
            h = x.contiguous(memory_format=torch.channels_last)
            h = F.relu(F.conv2d(h, *self.norm_in.fold_into(self.conv_in.weight), padding=1))
            h = F.relu(_conv1x1(h, *self.norm_mid.fold_into(self.conv_mid.weight)))
            out = self.conv_out(h)
        return out.to(x.dtype).contiguous()

    def multiply_adds(self, shape: tuple[int, int, int]) -> int:
        # ActNorm is folded into the convolutions' weights, so only the three convolutions count.
        _, height, width = shape
        pixels = height * width
        hidden = (self.conv_in.out_channels, height, width)
        return (_conv_multiply_adds(self.conv_in, pixels) + _conv_multiply_adds(self.conv_mid, pixels)
                + self.conv_out.multiply_adds(hidden))


class CouplingTransform:
    """An elementwise bijection of a coupling's changed channels, with parameters from the conditioner.

    `params` holds `params_per_channel` (P) channels per changed channel, grouped: changed channel c
    reads params channels c*P ... c*P + P - 1 (`split_params`). Transforms hold no state of their
    own; everything learned lives in the conditioner.
    """

    params_per_channel: int = 1

    @classmethod
    def from_options(cls, hidden_channels: int, **options) -> CouplingTransform:
        """The transform for a coupling whose conditioner is `hidden_channels` wide; most need no options.

        Every kind is handed every kind's options (the model passes its config's): take yours by name, leave the
        rest in `**options`."""
        return cls()

    def split_params(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """P tensors shaped like the changed half: the j-th parameter of every changed channel."""
        p = self.params_per_channel
        return tuple(params[:, j::p] for j in range(p))

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, log|det dy/dx| per sample) for the changed half x."""
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The x with forward(x, params)[0] == y."""
        raise NotImplementedError


class AdditiveTransform(CouplingTransform):
    """y = x + shift (NICE): volume-preserving."""

    params_per_channel = 1

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + params, x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return y - params


class AffineTransform(CouplingTransform):
    """y = (x + shift) * scale (RealNVP) with scale = sigmoid(raw + 2), floored, as the reference Glow."""

    params_per_channel = 2

    def _shift_and_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Interleaved channels, as the reference splits them ("cross").
        shift, raw = self.split_params(params)
        # Half-precision network outputs are widened: the log-det must not be computed in bf16.
        raw = raw.float() if raw.dtype in (torch.float16, torch.bfloat16) else raw
        return shift, torch.sigmoid(raw + 2.0) * (1 - SCALE_FLOOR) + SCALE_FLOOR

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale = self._shift_and_scale(params)
        return (x + shift) * scale, _sum_per_sample(torch.log(scale))

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        shift, scale = self._shift_and_scale(params)
        return y / scale - shift


class SplineTransform(CouplingTransform):
    """A monotonic rational-quadratic spline per changed element (Durkan et al. 2019; splines.py).

    K bins on [-bound, bound], identity outside. Raw widths and heights are scaled by
    1/sqrt(hidden_channels) before their softmax, as Durkan et al. do, so that a wide conditioner's
    outputs do not saturate it; zero raw parameters give the identity.
    """

    def __init__(self, n_bins: int = 8, bound: float = 3.0, hidden_channels: int = 1):
        if n_bins < 2 or n_bins * MIN_BIN_WIDTH >= 1 or bound <= 0:
            raise ValueError(f"a spline needs 2 <= bins < {1 / MIN_BIN_WIDTH:.0f} and bound > 0, "
                             f"got {n_bins} bins on [-{bound}, {bound}]")
        self.n_bins, self.bound = n_bins, bound
        self.raw_scale = 1.0 / math.sqrt(hidden_channels)
        self.params_per_channel = 3 * n_bins - 1

    @classmethod
    def from_options(cls, hidden_channels: int, spline_bins: int = 8, spline_bound: float = 3.0,
                     **other_kinds_options) -> SplineTransform:
        return cls(spline_bins, spline_bound, hidden_channels)

    def _raw(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """(N, C*P, H, W) grouped parameters -> (N, C, H, W, P), widened out of half precision."""
        n, c, h, w = x.shape
        # Contiguous: the spline's softmax, cumsum, comparisons and gathers all run along the last axis, which
        # movedim leaves strided; one copy made the digits default's forward and backward 7% faster on one CPU
        # thread (a whole training step on two, 3%), with the same numbers.
        raw = params.reshape(n, c, self.params_per_channel, h, w).movedim(2, -1).contiguous()
        # The spline arithmetic runs in float32 or wider whatever precision the conditioner used.
        return raw.float() if raw.dtype in (torch.float16, torch.bfloat16) else raw

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, log_derivative = rq_spline_forward(x, self._raw(x, params), self.n_bins, self.bound, self.raw_scale)
        return y.to(x.dtype), _sum_per_sample(log_derivative)

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return rq_spline_inverse(y, self._raw(y, params), self.n_bins, self.bound, self.raw_scale).to(y.dtype)


class Coupling(FlowLayer):
    """The first `conditioner.in_channels` channels pass unchanged and set the transform of the rest."""

    def __init__(self, transform: CouplingTransform, conditioner: Conditioner):
        super().__init__()
        if conditioner.out_channels % transform.params_per_channel:
            raise ValueError(f"the conditioner's {conditioner.out_channels} output channels are not a multiple "
                             f"of the {transform.params_per_channel} parameters per channel its transform needs")
        self.transform = transform
        self.n_kept = conditioner.in_channels
        self.net = conditioner  # named `net` in every checkpoint's parameter names

    def extra_repr(self) -> str:
        return f"transform={type(self.transform).__name__}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_kept, x_changed = x[:, : self.n_kept], x[:, self.n_kept :]
        y_changed, logdet = self.transform.forward(x_changed, self.net(x_kept))
        return torch.cat([x_kept, y_changed], 1), logdet

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y_kept, y_changed = y[:, : self.n_kept], y[:, self.n_kept :]
        x_changed = self.transform.inverse(y_changed, self.net(y_kept))
        return torch.cat([y_kept, x_changed.clamp(-REVERSE_BOUND, REVERSE_BOUND)], 1)

    def reverse_and_recompute(
        self, y: torch.Tensor, input_grad: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """As FlowLayer's, with parts (kept half, changed half) and one conditioner evaluation.

        The kept half passes through unchanged, so the conditioner's input is the same in both
        directions: one evaluation under autograd serves the reconstruction and the recomputed
        forward alike (reverse then forward would run it twice).
        """
        x_kept = y[:, : self.n_kept].detach().requires_grad_(input_grad)
        params = self.net(x_kept)
        with torch.no_grad():
            x_changed = self.transform.inverse(y[:, self.n_kept :].detach(), params)
            x_changed = x_changed.clamp(-REVERSE_BOUND, REVERSE_BOUND)
        x_changed.requires_grad_(input_grad)
        y_changed, logdet = self.transform.forward(x_changed, params)
        return [x_kept, x_changed], torch.cat([x_kept, y_changed], 1), logdet


class Squeeze(FlowLayer):
    """Space-to-depth: (N, C, H, W) -> (N, 4C, H/2, W/2); volume-preserving."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        y = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(n, c * 4, h // 2, w // 2), x.new_zeros(n)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        n, c, h, w = y.shape
        x = y.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c // 4, h * 2, w * 2)


class FlowSequence(FlowLayer):
    """Layers composed in order; log-dets add, and reverse runs the layers backwards."""

    def __init__(self, layers: list[FlowLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, layer_logdet = layer(x)
            logdet = logdet + layer_logdet
        return x, logdet

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.reverse(y)
        return y


# The registries that flow_step, Glow and the config's tests read: a new kind is one entry here.
# Coupling kinds name a transform class (built by its `from_options`; its conditioner is a CouplingNet),
# conv kinds a channel mixing built from the number of channels.
COUPLING_KINDS: dict[str, type[CouplingTransform]] = {
    "spline": SplineTransform,
    "affine": AffineTransform,
    "additive": AdditiveTransform,
}
CONV_KINDS: dict[str, Callable[[int], FlowLayer]] = {
    "lu": partial(InvConv2d, lu=True),
    "plain": partial(InvConv2d, lu=False),
    "shuffle": partial(Permute, mode="shuffle"),
    "reverse": partial(Permute, mode="reverse"),
}


def _registered(what: str, kind: str, registry: dict) -> Callable:
    if kind not in registry:
        raise ValueError(f"unknown {what} {kind!r}: use one of {', '.join(registry)}")
    return registry[kind]


def check_kinds(coupling: str, conv: str) -> None:
    """Refuse a coupling or conv name that has no registry entry, listing those that have."""
    _registered("coupling", coupling, COUPLING_KINDS)
    _registered("conv", conv, CONV_KINDS)


def make_transform(kind: str, hidden_channels: int, **options) -> CouplingTransform:
    """The registered coupling `kind`'s transform. Every kind is handed the options of all (spline_bins,
    spline_bound, ...) and takes its own; one that no kind takes is a mistake, not an option to ignore."""
    known = {name for registered in COUPLING_KINDS.values()
             for name, parameter in inspect.signature(registered.from_options).parameters.items()
             if parameter.kind is not parameter.VAR_KEYWORD}
    if unknown := sorted(set(options) - known):
        raise TypeError(f"no coupling kind takes the option(s) {', '.join(unknown)}")
    return _registered("coupling", kind, COUPLING_KINDS).from_options(hidden_channels, **options)


def make_coupling(kind: str, channels: int, hidden_channels: int, **options) -> Coupling:
    """A coupling of registered `kind` on `channels` channels, conditioned by a CouplingNet; `options` as
    make_transform takes them."""
    transform = make_transform(kind, hidden_channels, **options)
    if channels < 2:
        raise ValueError(f"a coupling layer needs at least 2 channels, got {channels}")
    n_kept = channels // 2
    n_params = (channels - n_kept) * transform.params_per_channel
    return Coupling(transform, CouplingNet(n_kept, n_params, hidden_channels))


def flow_step(channels: int, hidden_channels: int, coupling: str = "affine", conv: str = "lu",
              **options) -> FlowSequence:
    """One Glow step: ActNorm, then a channel mixing (1x1 conv or permutation), then a coupling."""
    check_kinds(coupling, conv)
    mixing = CONV_KINDS[conv](channels)
    return FlowSequence([ActNorm(channels), mixing, make_coupling(coupling, channels, hidden_channels, **options)])
