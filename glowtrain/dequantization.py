"""Dequantisation: from integer pixels to continuous x, with the log-density log q(u | x) of the noise.

Uniform noise (q = 1) is what Glow uses. Variational dequantisation (Ho et al., "Flow++", 2019)
learns q instead: the bound log P(k) >= E_{u~q(.|k)}[log p(k + u) - log q(u | k)] is tight when q
is the model's own posterior over the bin, and uniform noise is the special case q = 1. Here q is a
small conditional flow: Gaussian noise e, squeezed to (4C, H/2, W/2), through a few couplings whose
networks also see features of the image (a shallow CNN), then the normal CDF onto (0, 1)^D:
log q(u | k) = log N(e) - log|det du/de|. Flow++ ends with a sigmoid; the normal CDF makes the
zero-initialised flow (with spline couplings, which start as the identity; affine ones start at
scale sigmoid(2)) start as exactly uniform noise (u = Phi(e), log q = 0), so training starts from
Glow's bound and only tightens it (with a sigmoid it started about 1.5 nats per image looser).

Both take the uniform draws the objective already gets (so evaluation's fixed per-image noise,
resume and DDP slicing work unchanged): the variational one turns them into e by the normal
quantile function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glowtrain.flows import CouplingNet, Squeeze, check_kinds, make_transform
from glowtrain.losses import dequantize, reduce_bits

LOG_2PI = math.log(2 * math.pi)
# Uniform draws are multiples of 2**-24 in [0, 1) (float32): 0 itself would map to e = -inf.
SMALLEST_DRAW = 2.0**-25


class UniformDequantizer(nn.Module):
    """x = (bin + u) / n_bins - 0.5 with u ~ U[0, 1) given: q(u | x) = 1, so log q = 0."""

    def __init__(self, n_bits: int):
        super().__init__()
        self.n_bits = n_bits

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(continuous x, log q(u | x) per image in nats)."""
        return dequantize(images, self.n_bits, noise), images.new_zeros(images.shape[0], dtype=torch.float32)


class ContextNet(nn.Module):
    """Features of the image for the noise flow: conv3x3, ReLU, conv3x3, ReLU on the squeezed bin centres."""

    def __init__(self, in_channels: int, hidden_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv_out(F.relu(self.conv_in(x))))

    def multiply_adds(self, shape: tuple[int, int, int]) -> int:
        """Multiply-adds of forward on one input of `shape` (C, H, W)."""
        pixels = shape[1] * shape[2]
        return sum(pixels * conv.out_channels * conv.in_channels * 9 for conv in (self.conv_in, self.conv_out))


class ConditionalCoupling(nn.Module):
    """A coupling whose network sees the kept half and the image's features; the channels are reversed
    after it, so consecutive couplings change alternate halves."""

    def __init__(self, kind: str, channels: int, context_channels: int, hidden_channels: int, **options):
        super().__init__()
        self.transform = make_transform(kind, hidden_channels, **options)
        self.n_kept = channels // 2
        n_params = (channels - self.n_kept) * self.transform.params_per_channel
        self.net = CouplingNet(self.n_kept + context_channels, n_params, hidden_channels)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, changed = z[:, : self.n_kept], z[:, self.n_kept :]
        changed, logdet = self.transform.forward(changed, self.net(torch.cat([kept, context], 1)))
        return torch.cat([kept, changed], 1).flip(1), logdet

    def reverse(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        z = z.flip(1)
        kept, changed = z[:, : self.n_kept], z[:, self.n_kept :]
        return torch.cat([kept, self.transform.inverse(changed, self.net(torch.cat([kept, context], 1)))], 1)


class VariationalDequantizer(nn.Module):
    """u ~ q(u | image) by a conditional flow of Gaussian noise and the normal CDF; x = (bin + u) / n_bins - 0.5."""

    def __init__(self, image_shape: tuple[int, int, int], n_bits: int, n_steps: int = 4, hidden_channels: int = 32,
                 coupling: str = "spline", **options):
        super().__init__()
        channels, height, width = image_shape
        if height % 2 or width % 2:
            raise ValueError(f"variational dequantisation squeezes the image: {height}x{width} must be even")
        check_kinds(coupling, "lu")
        self.n_bits = n_bits
        self.squeeze = Squeeze()
        self.context = ContextNet(4 * channels, hidden_channels)
        self.couplings = nn.ModuleList(
            ConditionalCoupling(coupling, 4 * channels, hidden_channels, hidden_channels, **options)
            for _ in range(n_steps))

    def _context(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        centres = dequantize(images, self.n_bits, 0.5).to(dtype)  # the image the noise is conditioned on
        return self.context(self.squeeze(centres)[0])

    def noise_flow(self, images: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u in (0, 1), log|det du/de| per image) for Gaussian noise `eps` shaped like the images."""
        context = self._context(images, eps.dtype)
        z, logdet = self.squeeze(eps)
        for coupling in self.couplings:
            z, step_logdet = coupling(z, context)
            logdet = logdet + step_logdet
        z = self.squeeze.reverse(z)
        # log Phi'(z) = log N(z), finite where Phi(z) itself rounds to 0 or 1.
        log_cdf_derivative = -0.5 * (z**2 + LOG_2PI)
        return torch.special.ndtr(z), logdet + log_cdf_derivative.flatten(1).sum(1)

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(continuous x, log q(u | x) per image in nats) from uniform draws `noise` shaped like the images."""
        eps = torch.special.ndtri(noise.clamp(min=SMALLEST_DRAW))
        u, logdet = self.noise_flow(images, eps)
        log_normal = (-0.5 * (eps**2 + LOG_2PI)).flatten(1).sum(1)
        bins = reduce_bits(images, self.n_bits).to(u.dtype)
        return (bins + u) / 2**self.n_bits - 0.5, log_normal - logdet


def make_dequantizer(kind: str, image_shape: tuple[int, int, int], n_bits: int, **options) -> nn.Module:
    """`uniform` or `variational` (options: n_steps, hidden_channels, coupling, spline_bins, spline_bound)."""
    if kind == "uniform":
        return UniformDequantizer(n_bits)
    if kind == "variational":
        return VariationalDequantizer(image_shape, n_bits, **options)
    raise ValueError(f"unknown dequantization {kind!r}: use uniform or variational")
