"""From pixels to the objective: bit reduction, uniform dequantisation and bits per dimension.

Images of n_bins = 2**n_bits levels become x = (k + u) / n_bins - 0.5 with u ~ U[0, 1), so a
density p on x gives a discrete model of k with bpd = (-log p(x) + D ln n_bins) / (D ln 2).
"""

from __future__ import annotations

import math

import torch


def reduce_bits(images: torch.Tensor, n_bits: int) -> torch.Tensor:
    """uint8 pixels 0..255 -> integer bins 0..2**n_bits - 1 (as int64)."""
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must lie in 1..8, got {n_bits}")
    return torch.div(images.long(), 2 ** (8 - n_bits), rounding_mode="floor")


def dequantize(
    images: torch.Tensor,
    n_bits: int,
    noise: torch.Tensor | float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 pixels -> continuous float32 x in [-0.5, 0.5): x = (bin + u) / n_bins - 0.5.

    `noise` is u: a tensor of uniform draws in [0, 1) shaped like `images`, or one number for every
    pixel (0.5: the bin centres); when None, u is drawn here from `generator`. Uniform dequantisation:
    training, evaluation and every command come through here or through the learned dequantiser's noise
    (dequantization.py), both called by objective.py.
    """
    bins = reduce_bits(images, n_bits).float()
    if noise is None:
        noise = torch.rand(bins.shape, generator=generator, device=bins.device)
    return (bins + noise) / 2**n_bits - 0.5


def bits_per_dim(log_prob: torch.Tensor, n_dims: int, n_bits: int) -> torch.Tensor:
    """Discrete bits per dimension from the continuous log-density (nats) of dequantised data."""
    n_bins = 2**n_bits
    return (-log_prob + n_dims * math.log(n_bins)) / (n_dims * math.log(2.0))


def to_uint8(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Continuous x (any range; clamped) -> displayable uint8 pixels on the full 0..255 scale."""
    n_bins = 2**n_bits
    bins = torch.floor((x.float() + 0.5) * n_bins).clamp(0, n_bins - 1)
    # Spread the bins over 0..255 so a 4-bit image is not drawn almost black.
    return torch.round(bins * (255.0 / max(n_bins - 1, 1))).to(torch.uint8)
