"""Parameter count and reconstruction error of a paper-size Glow at random, non-identity weights.

    .venv/bin/python scripts/invertibility_check.py            # CIFAR-10 shape: L=3, K=32, width 512

Every parameter is moved by scale * N(0, 1) after the ActNorm data-dependent init; larger moves make
an untrained 96-step flow chaotic (its own Jacobian is then ill-conditioned, in any precision).
"""

import argparse

import torch

from glowtrain.model import Glow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32))
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--coupling", default="affine")
    parser.add_argument("--scales", type=float, nargs="+", default=(0.001, 0.003))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Glow(tuple(args.shape), args.levels, args.steps, args.width, args.coupling)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    x = torch.rand(8, *args.shape) - 0.5
    model.initialize(x)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for scale in args.scales:
        model.float().load_state_dict(initial)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=generator))
            model.eval()
            zs, _ = model.encode(x)
            error32 = (model.decode(zs) - x).abs().max().item()
            model.double()
            zs, _ = model.encode(x.double())
            error64 = (model.decode(zs) - x.double()).abs().max().item()
        print(f"weights moved by {scale}: max |decode(encode(x)) - x| = {error32:.2e} (float32), "
              f"{error64:.2e} (float64)")


if __name__ == "__main__":
    main()
