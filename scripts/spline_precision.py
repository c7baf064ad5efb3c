"""How far the float32 spline inverse is from exact, against what the rounding of x and y allows.

    .venv/bin/python scripts/spline_precision.py            # raw-parameter scales 0.3, 1, 3, 5

For x uniform on [-B, B] and raw spline parameters scale * N(0, 1) (K=8 bins, B=3, no 1/sqrt(width)
scaling, so scale 3 is a sharp, trained-looking spline), y = forward(x) in float32, then x' = inverse(y)
in float32. A round trip can be no better than the rounding of x plus that of y magnified by dx/dy,
2^-23 B (1 + 1/|dy/dx|), with dy/dx from float64; the table gives the worst ratio of the error to that,
and the worst error where 0.1 <= dy/dx <= 10 (well-conditioned, so only the arithmetic can lose digits).
"""

import argparse

import torch

from glowtrain.splines import rq_spline_forward, rq_spline_inverse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=(0.3, 1.0, 3.0, 5.0))
    parser.add_argument("--n", type=int, default=200_000, help="elements per scale")
    args = parser.parse_args()
    bins, bound = 8, 3.0
    print("raw scale | worst error / rounding | worst error where 0.1 <= dy/dx <= 10")
    for scale in args.scales:
        generator = torch.Generator().manual_seed(0)
        raw = torch.randn(args.n, 3 * bins - 1, generator=generator) * scale
        x = (torch.rand(args.n, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        _, log_derivative = rq_spline_forward(x, raw.double(), bins, bound)
        derivative = log_derivative.exp()
        rounding = 2.0**-23 * bound * (1 + 1 / derivative)
        y, _ = rq_spline_forward(x.float(), raw, bins, bound)
        error = (rq_spline_inverse(y, raw, bins, bound).double() - x).abs()
        conditioned = (derivative >= 0.1) & (derivative <= 10)
        print(f"{scale:9} | {(error / rounding).max():22.1f} | {error[conditioned].max():.2e}")


if __name__ == "__main__":
    main()
