"""Turning uint8 batches into model inputs, and bits/dim over a whole split."""

from __future__ import annotations

import math

import torch

from glowtrain.config import Config
from glowtrain.data import make_eval_batches
from glowtrain.distributed import Context
from glowtrain.flows import widest_float
from glowtrain.losses import bits_per_dim, reduce_bits
from glowtrain.precision import full_float32

EVAL_NOISE_SEED = 12345  # fixed, so every evaluation of a checkpoint sees the same dequantisation


def prepare_batch(images: torch.Tensor, cfg: Config, device: torch.device, generator: torch.Generator | None,
                  flip: bool = False, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """uint8 batch -> dequantised float batch on the device (noise and flips from `generator`).

    With several ranks, each draws the noise of the whole global batch and keeps its own slice, so
    the job sees exactly the noise one process with the global batch would see."""
    images = images.to(device, non_blocking=True)
    n = images.shape[0]
    mine = slice(rank * n, (rank + 1) * n)
    if flip:
        flips = torch.rand(n * world_size, device=device, generator=generator)[mine] < 0.5
        images = torch.where(flips[:, None, None, None], images.flip(3), images)
    noise = torch.rand((n * world_size, *images.shape[1:]), generator=generator, device=device)[mine]
    return (reduce_bits(images, cfg.data.n_bits).float() + noise) / cfg.data.n_bins - 0.5


def _per_image_noise(indices: list[int], shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Dequantisation noise keyed by each image's index in the split: the same however the split is batched
    or sharded over ranks."""
    draws = [torch.rand(shape, generator=torch.Generator(device=device).manual_seed(seed * 1_000_003 + index),
                        device=device) for index in indices]
    return torch.stack(draws)


@torch.inference_mode()
@full_float32()  # bits/dim must not depend on the GPU generation (precision.py)
def evaluate(model: torch.nn.Module, dataset, cfg: Config, device: torch.device, seed: int = EVAL_NOISE_SEED,
             ctx: Context | None = None) -> dict:
    """bits/dim over the whole split (mean of per-image bpd), plus accuracy for class-conditional models.

    Under torchrun each rank scores its share and the sums are all-reduced."""
    ctx = ctx or Context(device=device)
    was_training = model.training
    model.eval()
    wide = widest_float(device)
    sums = torch.zeros(4, dtype=wide, device=device)  # bpd, bpd^2, correct, images
    mine = list(range(ctx.rank, len(dataset), ctx.world_size))
    batch_size = cfg.train.eval_batch_size
    batches = make_eval_batches(dataset, batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                pin_memory=device.type == "cuda")
    for start, (images, labels) in zip(range(0, len(mine), batch_size), batches):
        images, labels = images.to(device), labels.to(device)
        noise = _per_image_noise(mine[start : start + len(images)], tuple(images.shape[1:]), seed, device)
        x = (reduce_bits(images, cfg.data.n_bits).float() + noise) / cfg.data.n_bins - 0.5
        log_prob, logits = model(x, labels if cfg.model.n_classes > 0 else None)
        bpd = bits_per_dim(log_prob, model.n_dims, cfg.data.n_bits).to(wide)
        sums[0] += bpd.sum()
        sums[1] += (bpd**2).sum()
        if logits is not None:
            sums[2] += (logits.argmax(1) == labels).sum()
        sums[3] += images.shape[0]
    model.train(was_training)
    total_bpd, total_sq, n_correct, n_images = ctx.sum_(sums).tolist()
    n_images = int(n_images)
    mean = total_bpd / n_images
    variance = max(0.0, total_sq / n_images - mean**2)
    result = {"bpd": mean, "bpd_stderr": math.sqrt(variance / max(1, n_images - 1)), "n_images": n_images}
    if cfg.model.n_classes > 0:
        result["accuracy"] = n_correct / n_images
    return result
