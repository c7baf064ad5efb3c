"""Monotonic rational-quadratic splines (Durkan et al., "Neural Spline Flows", 2019), elementwise.

Each element has its own spline on [-bound, bound] made of K bins: K widths, K heights and K - 1
interior derivatives (the two boundary derivatives are 1), so that outside the interval the map
is the identity and the whole map is continuously differentiable. Inputs outside the interval
never enter the spline arithmetic: they are replaced by 0 before and selected out after, which keeps
NaN values and NaN gradients out of the tails even when every element of a batch lies there.
The inverse solves the bin's quadratic with whichever form of its root has no cancellation for the sign of b.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus(DERIVATIVE_SHIFT) = 1 - MIN_DERIVATIVE: a zero raw derivative gives derivative 1, so zero
# raw parameters (a zero-initialised conditioner) make every spline the identity.
DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def spline_params(raw: torch.Tensor, n_bins: int, bound: float, raw_scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Raw parameters (..., 3K - 1) -> (width knots (..., K+1), height knots (..., K+1), derivatives (..., K+1)).

    Widths and heights are min + (1 - K min) softmax(raw * raw_scale); interior derivatives
    min + softplus(raw + DERIVATIVE_SHIFT); the outermost knots sit exactly at -bound and bound.
    """
    raw_widths, raw_heights, raw_derivatives = raw[..., :n_bins], raw[..., n_bins : 2 * n_bins], raw[..., 2 * n_bins :]
    x_knots = _knots(raw_widths * raw_scale, MIN_BIN_WIDTH, bound)
    y_knots = _knots(raw_heights * raw_scale, MIN_BIN_HEIGHT, bound)
    interior = MIN_DERIVATIVE + F.softplus(raw_derivatives + DERIVATIVE_SHIFT)
    one = torch.ones_like(raw_widths[..., :1])
    return x_knots, y_knots, torch.cat([one, interior, one], -1)


def _knots(raw: torch.Tensor, minimum: float, bound: float) -> torch.Tensor:
    n_bins = raw.shape[-1]
    sizes = minimum + (1 - minimum * n_bins) * torch.softmax(raw, -1)
    knots = F.pad(torch.cumsum(sizes, -1), (1, 0))  # (..., K + 1) from 0 to (about) 1
    knots = 2 * bound * knots - bound
    # Exact ends, so an input exactly at +-bound lands on the last knot (cumsum may miss 1 by an ulp).
    return torch.cat([torch.full_like(knots[..., :1], -bound), knots[..., 1:-1],
                      torch.full_like(knots[..., :1], bound)], -1)


def _bin_of(values: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """The bin k with knots[k] <= value (< knots[k + 1]); a value on an interior knot starts that knot's bin."""
    return (values.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1, keepdim=True)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return tensor.gather(-1, index).squeeze(-1)


def _bin_parts(index: torch.Tensor, x_knots, y_knots, derivatives) -> tuple[torch.Tensor, ...]:
    """(x_k, width, y_k, height, slope, derivative at the left knot, at the right knot) of each element's bin."""
    x_k, y_k = _gather(x_knots, index), _gather(y_knots, index)
    width = _gather(x_knots, index + 1) - x_k
    height = _gather(y_knots, index + 1) - y_k
    return x_k, width, y_k, height, height / width, _gather(derivatives, index), _gather(derivatives, index + 1)


def _inside(x: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of elements in [-bound, bound], x with 0 put in place of the others).

    Not x.clamp: its gradient vanishes at the clamp's limits, and inputs exactly on +-bound are inside."""
    inside = (x >= -bound) & (x <= bound)
    return inside, torch.where(inside, x, torch.zeros_like(x))


def rq_spline_forward(x: torch.Tensor, raw: torch.Tensor, n_bins: int, bound: float,
                      raw_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, log dy/dx) elementwise; `raw` is x's shape plus a last axis of 3K - 1 raw parameters."""
    inside, x_in = _inside(x, bound)
    x_knots, y_knots, derivatives = spline_params(raw, n_bins, bound, raw_scale)
    x_k, width, y_k, height, slope, d_left, d_right = _bin_parts(_bin_of(x_in, x_knots), x_knots, y_knots,
                                                                 derivatives)
    # Not clamped into [0, 1]: a clamp would zero the gradient on the bin edges themselves.
    xi = (x_in - x_k) / width
    xi_1m = xi * (1 - xi)
    denominator = slope + (d_right + d_left - 2 * slope) * xi_1m
    y = y_k + height * (slope * xi**2 + d_left * xi_1m) / denominator
    derivative_numerator = slope**2 * (d_right * xi**2 + 2 * slope * xi_1m + d_left * (1 - xi) ** 2)
    log_derivative = torch.log(derivative_numerator) - 2 * torch.log(denominator)
    # Rounding can carry y a step past +-bound, where the inverse would take it for a tail (identity) input.
    # Not y.clamp: its gradient vanishes on the bound itself, where y lands exactly for x = +-bound.
    y = torch.where(y.abs() > bound, torch.copysign(torch.full_like(y, bound), y), y)
    return torch.where(inside, y, x), torch.where(inside, log_derivative, torch.zeros_like(log_derivative))


def rq_spline_inverse(y: torch.Tensor, raw: torch.Tensor, n_bins: int, bound: float,
                      raw_scale: float = 1.0) -> torch.Tensor:
    """The x with rq_spline_forward(x, raw, ...)[0] == y, elementwise."""
    inside, y_in = _inside(y, bound)
    x_knots, y_knots, derivatives = spline_params(raw, n_bins, bound, raw_scale)
    x_k, width, y_k, height, slope, d_left, d_right = _bin_parts(_bin_of(y_in, y_knots), x_knots, y_knots,
                                                                 derivatives)
    offset = y_in - y_k
    curvature = d_right + d_left - 2 * slope
    b = height * d_left - offset * curvature
    a = height * slope - b  # = height (slope - d_left) + offset * curvature, and > 0 by construction where b < 0
    c = -slope * offset
    discriminant = (b**2 - 4 * a * c).clamp(min=0)
    # The root in [0, 1] is 2c / (-b - sqrt(D)) = (-b + sqrt(D)) / 2a. The first (Durkan et al., eq. 29) has no
    # 1 / a, which vanishes where a bin is nearly linear, but for b < 0 (a steep right end, far enough up the bin)
    # -b and sqrt(D) cancel and the root loses up to 3 digits in float32; there a > height * slope > 0 and the
    # second form is exact to rounding. q = -(b + sign(b) sqrt(D)) / 2 sums two terms of one sign in both.
    b_negative = b < 0
    q = -0.5 * (b + torch.where(b_negative, -1.0, 1.0) * torch.sqrt(discriminant))
    # The branch not taken gets a harmless divisor, so neither its value nor its gradient is inf or NaN.
    xi = torch.where(b_negative, q / torch.where(b_negative, a, 1.0), c / torch.where(b_negative, 1.0, q))
    return torch.where(inside, x_k + xi.clamp(0, 1) * width, y)
