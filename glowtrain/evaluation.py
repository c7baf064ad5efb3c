"""Bits/dim over a whole split, with dequantisation noise fixed per image so every evaluation agrees."""

from __future__ import annotations

import math

import torch

from glowtrain.config import Config, derived_seed
from glowtrain.data import make_eval_batches
from glowtrain.distributed import Context
from glowtrain.flows import widest_float
from glowtrain.model import Glow
from glowtrain.objective import Objective
from glowtrain.precision import full_float32

EVAL_NOISE_SEED = 12345  # fixed, so every evaluation of a checkpoint sees the same dequantisation


def per_image_noise(indices: list[int], shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Dequantisation noise keyed by each image's index in the split: the same however the split is batched
    or sharded over ranks."""
    generators = [torch.Generator(device=device).manual_seed(derived_seed(seed, index)) for index in indices]
    draws = [torch.rand(shape, generator=generator, device=device) for generator in generators]
    return torch.stack(draws)


@torch.inference_mode()
@full_float32()  # bits/dim must not depend on the GPU generation (precision.py)
def evaluate(model: Glow | Objective, dataset, cfg: Config, device: torch.device, seed: int = EVAL_NOISE_SEED,
             ctx: Context | None = None) -> dict:
    """bits/dim over the whole split (mean of per-image bpd), plus accuracy for class-conditional models.

    Under torchrun each rank scores its share and the sums are all-reduced."""
    ctx = ctx or Context(device=device)
    objective = model if isinstance(model, Objective) else Objective(model, cfg.data.n_bits)
    was_training = objective.training
    objective.eval()
    wide = widest_float(device)
    sums = torch.zeros(4, dtype=wide, device=device)  # bpd, bpd^2, correct, images
    mine = list(range(ctx.rank, len(dataset), ctx.world_size))
    batch_size = cfg.train.eval_batch_size
    batches = make_eval_batches(dataset, batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                n_workers=cfg.data.n_workers, pin_memory=device.type == "cuda")
    for start, (images, labels) in zip(range(0, len(mine), batch_size), batches):
        images, labels = images.to(device), labels.to(device)
        noise = per_image_noise(mine[start : start + len(images)], tuple(images.shape[1:]), seed, device)
        terms = objective(images, labels, noise)
        bpd = terms["bpd"].to(wide)
        sums[0] += bpd.sum()
        sums[1] += (bpd**2).sum()
        if "correct" in terms:
            sums[2] += terms["correct"].sum()
        sums[3] += images.shape[0]
    objective.train(was_training)
    total_bpd, total_sq, n_correct, n_images = ctx.sum_(sums).tolist()
    n_images = int(n_images)
    mean = total_bpd / n_images
    variance = max(0.0, total_sq / n_images - mean**2)
    result = {"bpd": mean, "bpd_stderr": math.sqrt(variance / max(1, n_images - 1)), "n_images": n_images}
    if cfg.model.n_classes > 0:
        result["accuracy"] = n_correct / n_images
    return result
