"""Turning uint8 batches into model inputs, and bits/dim over a whole split."""

from __future__ import annotations

import math

import torch

from glowtrain.config import Config
from glowtrain.data import make_eval_batches
from glowtrain.losses import bits_per_dim, dequantize

EVAL_NOISE_SEED = 12345  # fixed, so every evaluation of a checkpoint sees the same dequantisation


def prepare_batch(images: torch.Tensor, cfg: Config, device: torch.device, generator: torch.Generator | None,
                  flip: bool = False) -> torch.Tensor:
    """uint8 batch -> dequantised float batch on the device (noise and flips from `generator`)."""
    images = images.to(device, non_blocking=True)
    if flip:
        flips = torch.rand(images.shape[0], device=device, generator=generator) < 0.5
        images = torch.where(flips[:, None, None, None], images.flip(3), images)
    return dequantize(images, cfg.data.n_bits, generator=generator)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, cfg: Config, device: torch.device, seed: int = EVAL_NOISE_SEED) -> dict:
    """bits/dim over the whole split (mean of per-image bpd), plus accuracy for class-conditional models."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    total_bpd = torch.zeros((), dtype=torch.float64, device=device)
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    n_correct = torch.zeros((), dtype=torch.long, device=device)
    n_images = 0
    for images, labels in make_eval_batches(dataset, cfg.train.eval_batch_size, pin_memory=device.type == "cuda"):
        x = prepare_batch(images, cfg, device, generator)
        labels = labels.to(device)
        y = labels if cfg.model.n_classes > 0 else None
        log_prob, logits = model(x, y)
        bpd = bits_per_dim(log_prob, model.n_dims, cfg.data.n_bits).double()
        total_bpd += bpd.sum()
        total_sq += (bpd**2).sum()
        if logits is not None:
            n_correct += (logits.argmax(1) == labels).sum()
        n_images += images.shape[0]
    model.train(was_training)
    mean = (total_bpd / n_images).item()
    variance = max(0.0, (total_sq / n_images).item() - mean**2)
    result = {"bpd": mean, "bpd_stderr": math.sqrt(variance / max(1, n_images - 1)), "n_images": n_images}
    if cfg.model.n_classes > 0:
        result["accuracy"] = n_correct.item() / n_images
    return result
