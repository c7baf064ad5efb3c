"""What training minimises and evaluation reports: dequantise -> log-likelihood -> named loss terms.

Training and evaluation both call `Objective`, so bits/dim is computed in one place. The
dequantiser (dequantization.py) is a submodule: a learned one (variational dequantisation) is
trained with the flow, and the optimiser, EMA, DDP and checkpoints pick it up through the objective.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from glowtrain.config import Config
from glowtrain.dequantization import UniformDequantizer, make_dequantizer
from glowtrain.losses import bits_per_dim
from glowtrain.model import Glow

__all__ = ["Objective", "ObjectiveOutput", "UniformDequantizer", "batch_noise", "build_objective"]


class ObjectiveOutput(NamedTuple):
    """One forward pass: what training minimises, and the named terms that training and evaluation report.

    A new loss term is added here alone: put it in `terms` (under its own name) and into `loss` with its
    weight. Training then logs its batch mean (metrics.jsonl, TensorBoard, the progress line) and evaluation
    its mean over the split, with no change elsewhere."""

    loss: torch.Tensor  # () what the optimiser minimises
    terms: dict[str, torch.Tensor]  # name -> floating (N,) per image or () for the batch; "bpd" always first


class Objective(nn.Module):
    """uint8 images (+ labels, + uniform noise) -> ObjectiveOutput: the loss, and the terms "bpd" (per image)
    and, for class-conditional models, "class_ce" (the batch's mean) and "accuracy" (per image, 0 or 1)."""

    def __init__(self, model: Glow, n_bits: int, class_weight: float = 0.0, dequantizer: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.dequantizer = dequantizer if dequantizer is not None else UniformDequantizer(n_bits)
        self.n_bits = n_bits
        self.class_weight = class_weight

    @torch.no_grad()
    def initialize(self, images: torch.Tensor, labels: torch.Tensor | None, noise: torch.Tensor) -> Objective:
        """Data-dependent init (ActNorm) of the flow, and of a learned dequantiser's networks, from one batch."""
        x, _ = self.dequantizer(images, noise)
        self.model.initialize(x, labels)
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor) -> ObjectiveOutput:
        x, log_q = self.dequantizer(images, noise)
        conditional = self.model.n_classes > 0
        log_prob, logits = self.model(x, labels if conditional else None)
        # The discrete model's bits/dim bound: E[-log p(x + u) + log q(u | x)] per dimension.
        bpd = bits_per_dim(log_prob - log_q, self.model.n_dims, self.n_bits)
        terms, loss = {"bpd": bpd}, bpd.mean()
        if logits is not None:
            terms["class_ce"] = F.cross_entropy(logits, labels)
            terms["accuracy"] = (logits.argmax(1) == labels).to(bpd.dtype)
            loss = loss + self.class_weight * terms["class_ce"]
        return ObjectiveOutput(loss, terms)

    def compile_regions(self) -> list[nn.Module]:
        """What `train.compile_scope: steps` compiles one by one: a learned dequantiser whole, and every flow step."""
        learned = [self.dequantizer] if any(True for _ in self.dequantizer.parameters()) else []
        return learned + self.model.flow_steps()

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


def build_objective(model: Glow, cfg: Config) -> Objective:
    """The objective `cfg` describes around `model`: its dequantisation and class weight."""
    m = cfg.model
    dequantizer = make_dequantizer(m.dequantization, cfg.image_shape, cfg.data.n_bits, n_steps=m.dequant_steps,
                                   hidden_channels=m.dequant_hidden_channels, coupling=m.dequant_coupling,
                                   spline_bins=m.spline_bins, spline_bound=m.spline_bound)
    return Objective(model, cfg.data.n_bits, cfg.train.class_weight, dequantizer)
