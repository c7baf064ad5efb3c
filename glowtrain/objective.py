"""What training minimises and evaluation reports: dequantise -> log-likelihood -> named loss terms.

Training and evaluation both call `Objective`, so bits/dim is computed in one place. The
dequantiser is a submodule: a learned one (variational dequantisation) would be trained with the
flow, and the optimiser, EMA, DDP and checkpoints pick it up through the objective.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glowtrain.losses import bits_per_dim, dequantize
from glowtrain.model import Glow


class UniformDequantizer(nn.Module):
    """x = (bin + u) / n_bins - 0.5 with u ~ U[0, 1) given: q(u | x) = 1, so log q = 0."""

    def __init__(self, n_bits: int):
        super().__init__()
        self.n_bits = n_bits

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(continuous x, log q(u | x) per image in nats)."""
        return dequantize(images, self.n_bits, noise), images.new_zeros(images.shape[0], dtype=torch.float32)


class Objective(nn.Module):
    """uint8 images (+ labels, + uniform noise) -> {"loss", "bpd" (per image), "class_ce", "correct"}."""

    def __init__(self, model: Glow, n_bits: int, class_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.dequantizer = UniformDequantizer(n_bits)
        self.n_bits = n_bits
        self.class_weight = class_weight

    def forward(self, images: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        x, log_q = self.dequantizer(images, noise)
        conditional = self.model.n_classes > 0
        log_prob, logits = self.model(x, labels if conditional else None)
        # The discrete model's bits/dim bound: E[-log p(x + u) + log q(u | x)] per dimension.
        bpd = bits_per_dim(log_prob - log_q, self.model.n_dims, self.n_bits)
        terms = {"bpd": bpd, "loss": bpd.mean()}
        if logits is not None:
            terms["class_ce"] = F.cross_entropy(logits, labels)
            terms["correct"] = logits.argmax(1) == labels
            terms["loss"] = terms["loss"] + self.class_weight * terms["class_ce"]
        return terms

    def level_terms(self, images: torch.Tensor, noise: torch.Tensor,
                    labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """forward()'s bits/dim per image, decomposed: "bpd" (N,) = n_bits + "dequantizer" (N,) + the sum over
        levels of "prior" and "logdet" (N, L), all in bits/dim (level 0 first, the top prior last).

        Without labels a class-conditional model scores the class marginal (labels of outside images are unknown)."""
        x, log_q = self.dequantizer(images, noise)
        prior, logdet = self.model.level_log_densities(x, labels)
        bpd = bits_per_dim(prior.sum(1) + logdet.sum(1) - log_q, self.model.n_dims, self.n_bits)
        bits = self.model.n_dims * math.log(2.0)  # nats of one image -> its bits/dim
        return {"bpd": bpd, "prior": -prior / bits, "logdet": -logdet / bits, "dequantizer": log_q / bits}


def batch_noise(images: torch.Tensor, generator: torch.Generator | None, flip: bool = False, part: int = 0,
                n_parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, possibly flipped; uniform dequantisation noise) for part `part` of a global batch.

    The global batch is `n_parts` equal parts (one per rank): each part draws the flips and noise of
    the whole global batch and keeps its own slice, so a batch split over processes sees exactly what
    one process with the whole batch would. Micro-batches are then slices of a rank's part.
    """
    n = images.shape[0]
    mine = slice(part * n, (part + 1) * n)
    device = images.device
    if flip:
        flips = torch.rand(n * n_parts, device=device, generator=generator)[mine] < 0.5
        images = torch.where(flips[:, None, None, None], images.flip(3), images)
    noise = torch.rand((n * n_parts, *images.shape[1:]), generator=generator, device=device)[mine]
    return images, noise
