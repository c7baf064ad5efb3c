"""TF32 emulated on the CPU: float32 operands of convolutions and matrix products rounded to 10 mantissa bits.

CUDA rounds the operands of float32 convolutions (when torch.backends.cudnn.allow_tf32) and matrix
products (when the float32 matmul precision is not "highest") to TF32 and accumulates in float32.
Rounding the operands here, reading the same flags at call time, reproduces that arithmetic closely
enough to test a precision policy on a machine without a GPU.
"""

import contextlib

import torch
import torch.nn.functional as F

from glowtrain import precision


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest value with a 10-bit mantissa (ties to even); gradients pass straight through."""
    bits = x.detach().contiguous().view(torch.int32)
    lowest_kept = (bits >> 13) & 1
    rounded = ((bits + 0xFFF + lowest_kept) & -0x2000).view(torch.float32)
    return x + (rounded - x).detach()


def _conv_uses_tf32(*tensors) -> bool:
    return torch.backends.cudnn.allow_tf32 and all(t.dtype == torch.float32 for t in tensors)


def _matmul_uses_tf32(*tensors) -> bool:
    return torch.get_float32_matmul_precision() != "highest" and all(t.dtype == torch.float32 for t in tensors)


@contextlib.contextmanager
def emulated_tf32(monkeypatch):
    """Within the block, F.conv2d, F.linear, torch.matmul/mm/bmm and `@` behave as their CUDA TF32 versions would."""
    real_conv2d, real_linear = F.conv2d, F.linear
    calls = {"rounded": 0, "exact": 0}

    def count(rounded: bool) -> None:
        calls["rounded" if rounded else "exact"] += 1

    def conv2d(input, weight, bias=None, *args, **kwargs):
        tf32 = _conv_uses_tf32(input, weight)
        count(tf32)
        if tf32:
            input, weight = round_to_tf32(input), round_to_tf32(weight)
        return real_conv2d(input, weight, bias, *args, **kwargs)

    def linear(input, weight, bias=None):
        tf32 = _matmul_uses_tf32(input, weight)
        count(tf32)
        if tf32:
            input, weight = round_to_tf32(input), round_to_tf32(weight)
        return real_linear(input, weight, bias)

    def product(real):
        def emulated(a, b, *args, **kwargs):
            tf32 = _matmul_uses_tf32(a, b)
            count(tf32)
            if tf32:
                a, b = round_to_tf32(a), round_to_tf32(b)
            return real(a, b, *args, **kwargs)
        return emulated

    with monkeypatch.context() as patch:
        patch.setattr(F, "conv2d", conv2d)
        patch.setattr(F, "linear", linear)
        for name in ("matmul", "mm", "bmm"):
            patch.setattr(torch, name, product(getattr(torch, name)))
        patch.setattr(torch.Tensor, "__matmul__", product(torch.Tensor.__matmul__))
        yield calls


# TF32 flags as glowtrain sets them on CUDA (precision.configure), restored afterwards.
cuda_flags = precision.tf32
