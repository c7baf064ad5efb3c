"""The numerical precision policy: what may run in TF32 on CUDA, what never does, and determinism.

- Training: the coupling networks and the priors' convolutions use TF32 tensor cores on CUDA
  (`run.tf32`, default on) or bf16 (`train.amp`); the invertible 1x1 convolutions never do
  (`flows.mix_channels` multiplies in float64), so a step's inverse stays its inverse and the
  memory-saving backward rebuilds its inputs closely.
- Inference (evaluation, sampling, reconstructions): full float32 (`full_float32`), so bits/dim and
  round trips do not depend on the GPU generation. Measured on an H200 at the paper's CIFAR size:
  decode(encode(x)) is off by 1.7e-6 in full float32, 1.4e-4 with TF32 coupling networks, 2.7e-3
  when TF32 also reached the 1x1 convolutions.
- `run.deterministic`: deterministic kernels and no cuDNN autotuning, for bit-exact resumes on CUDA
  (on CPU they are bit-exact anyway).
"""

from __future__ import annotations

import contextlib
import os

import torch

from glowtrain.errors import UserError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.amp -> the coupling networks' dtype


def configure(device: torch.device, tf32: bool | None = True, deterministic: bool | None = None) -> None:
    """Set the process-wide math for `device`; None leaves that setting as it is.

    Call before the first CUDA matrix product: cuBLAS reads its workspace setting only once.
    """
    if deterministic is not None:
        if deterministic:
            # Repeatable cuBLAS reductions need a fixed workspace.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(deterministic)
    if device.type != "cuda":
        return
    if tf32 is not None:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
    if deterministic is not None:
        torch.backends.cudnn.deterministic = deterministic
    # Autotuning picks among algorithms by timing, which is not repeatable.
    torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic


def settings() -> dict:
    """The process-wide settings `configure` may change, for `restore`."""
    return {"matmul": torch.get_float32_matmul_precision(), "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_deterministic": torch.backends.cudnn.deterministic, "benchmark": torch.backends.cudnn.benchmark,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def restore(saved: dict) -> None:
    """Put back what `settings` returned, so that `train()` leaves a notebook's process as it found it."""
    torch.set_float32_matmul_precision(saved["matmul"])
    torch.backends.cudnn.allow_tf32 = saved["cudnn_tf32"]
    torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = saved["benchmark"]
    torch.use_deterministic_algorithms(saved["deterministic"], warn_only=saved["warn_only"])
    if saved["cublas"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved["cublas"]


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for float32 convolutions and matrix products on or off inside the block (restored after)."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def full_float32():
    """No TF32 inside the block, on every device (a context manager and a decorator)."""
    return tf32(False)


def check_amp(amp: str, device: torch.device, allow_emulated_bf16: bool = False,
              capability: tuple[int, int] | None = None) -> None:
    """Refuse a train.amp that `device` cannot run well: fp16 off CUDA, bf16 on GPUs without native bf16.

    `capability` (major, minor) defaults to the device's own; tests pass one in."""
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"train.amp=fp16 needs a CUDA GPU (float16 with a gradient scaler), not {device.type} — "
                        "use train.amp=off, or bf16")
    if amp != "bf16" or device.type != "cuda" or allow_emulated_bf16:
        return
    major, minor = capability or torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        raise UserError(f"train.amp=bf16: this GPU (compute capability {major}.{minor}) has no native bfloat16 and "
                        "would emulate it slowly — use train.amp=fp16, or set train.allow_emulated_bf16=true")
