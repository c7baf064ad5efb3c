"""The multi-scale Glow model: levels of flow steps, split priors, log-likelihood and sampling.

Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018), with the
multi-scale architecture of Dinh et al., "Density estimation using Real NVP" (2017).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from glowtrain.flows import Conditioner, FlowSequence, Squeeze, ZeroConv2d, check_kinds, flow_step
from glowtrain.reversible import is_initialized, reconstruction_error, reversible_chain

if TYPE_CHECKING:
    from glowtrain.config import Config

LOG_2PI = math.log(2 * math.pi)


def _log_normal(z: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + 2.0 * logs + (z - mean) ** 2 * torch.exp(-2.0 * logs))


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dimension of log N(z; mean, exp(logs)^2)."""
    return _log_normal(z, mean, logs).flatten(1).sum(1)


def _check_architecture(image_shape, n_levels, n_steps, hidden_channels, coupling, conv, n_classes) -> None:
    if len(image_shape) != 3 or any(int(d) < 1 for d in image_shape):
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    for name, value, low in (("n_levels", n_levels, 1), ("n_steps", n_steps, 1),
                             ("hidden_channels", hidden_channels, 1), ("n_classes", n_classes, 0)):
        if int(value) < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    _, height, width = image_shape
    factor = 2**n_levels
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by 2**n_levels = {factor}: "
            f"use a size that is a multiple of {factor} or fewer levels"
        )
    check_kinds(coupling, conv)


class Glow(nn.Module):
    """L levels of (squeeze, K flow steps, split); the split-off halves and the top get Gaussian priors."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        n_levels: int = 3,
        n_steps: int = 32,
        hidden_channels: int = 512,
        coupling: str = "affine",
        conv: str = "lu",
        learn_top: bool = True,
        n_classes: int = 0,
        memory_saving: bool = False,
        spline_bins: int = 8,
        spline_bound: float = 3.0,
    ):
        super().__init__()
        _check_architecture(image_shape, n_levels, n_steps, hidden_channels, coupling, conv, n_classes)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.n_levels = n_levels
        self.n_classes = n_classes
        # A way of computing gradients, not part of the architecture: from_config leaves it off, so a
        # model rebuilt from a checkpoint's config starts without it and the trainer switches it on.
        self.memory_saving = bool(memory_saving)
        self.squeeze = Squeeze()
        self.levels = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        channels, height, width = self.image_shape
        for level in range(n_levels):
            channels, height, width = channels * 4, height // 2, width // 2  # squeeze
            steps = [flow_step(channels, hidden_channels, coupling, conv, spline_bins=spline_bins,
                               spline_bound=spline_bound) for _ in range(n_steps)]
            self.levels.append(FlowSequence(steps))
            if level < n_levels - 1:
                n_kept = channels // 2
                # The split-off half's mean and log-scale are predicted from the kept half.
                self.split_priors.append(ZeroConv2d(n_kept, 2 * (channels - n_kept)))
                self.latent_shapes.append((channels - n_kept, height, width))
                channels = n_kept
        self.latent_shapes.append((channels, height, width))
        top = torch.zeros(1, 2 * channels, height, width)
        if learn_top:
            self.top_prior = nn.Parameter(top)
        else:
            self.register_buffer("top_prior", top)
        if n_classes > 0:
            self.label_prior = nn.Linear(n_classes, 2 * channels)
            self.classifier = nn.Linear(channels, n_classes)
            for layer in (self.label_prior, self.classifier):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, cfg: Config) -> Glow:
        """The model that `cfg` (a glowtrain.config.Config) describes, untrained."""
        m = cfg.model
        return cls(cfg.image_shape, n_levels=m.n_levels, n_steps=m.n_steps, hidden_channels=m.hidden_channels,
                   coupling=m.coupling, conv=m.conv, learn_top=m.learn_top, n_classes=m.n_classes,
                   spline_bins=m.spline_bins, spline_bound=m.spline_bound)

    def flow_steps(self) -> list[FlowSequence]:
        """Every flow step (ActNorm, mixing, coupling), level by level; a level's steps share one shape."""
        return [step for level in self.levels for step in level.layers]

    def _conditioners(self) -> list[Conditioner]:
        return [module for module in self.modules() if isinstance(module, Conditioner)]

    def set_amp(self, dtype: torch.dtype | None) -> Glow:
        """Run the coupling conditioners in `dtype` (e.g. torch.bfloat16) or None for full precision.

        ActNorm, the 1x1 convolutions, log-dets and priors stay in the model's own precision."""
        for conditioner in self._conditioners():
            conditioner.amp_dtype = dtype
        return self

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The dtype the coupling conditioners run in (set by set_amp), or None for full precision."""
        # Read from the conditioners themselves, so it cannot disagree with what they will do.
        conditioners = self._conditioners()
        return conditioners[0].amp_dtype if conditioners else None

    def set_memory_saving(self, enabled: bool) -> Glow:
        """Constant-memory training: backward rebuilds each flow step's input by inverting the step
        instead of storing the activations, so memory no longer grows with n_steps (about one extra
        forward pass of compute). Gradients are those of the standard path up to the reconstruction's
        rounding (see `reconstruction_errors`). Forwards without autograd are unaffected."""
        self.memory_saving = bool(enabled)
        return self

    @property
    def n_dims(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    # --- the bijection -------------------------------------------------------------------------

    def _flow(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Run the flow; return the latents, the kept halves that condition the split priors, log|det|, and
        log|det| level by level (one function, not two nested: each frame around memory saving's eager chain
        is one more compiled graph)."""
        self._check_images(x)
        logdet = x.new_zeros(x.shape[0])
        zs, kept_halves, level_logdets = [], [], []
        h = x
        for index, level in enumerate(self.levels):
            h, _ = self.squeeze(h)  # (N, 4C, H/2, W/2)
            h, level_logdet = self._run_level(level, h)
            logdet = logdet + level_logdet
            level_logdets.append(level_logdet)
            if index < self.n_levels - 1:
                n_kept = h.shape[1] // 2
                h, z = h[:, :n_kept], h[:, n_kept:]
                zs.append(z)
                kept_halves.append(h)
        zs.append(h)
        return zs, kept_halves, logdet, level_logdets

    def _check_images(self, x: torch.Tensor) -> None:
        """Refuse what is not a batch of this model's continuous images: uint8 pixels were scored as values up to
        255 (a log-likelihood of millions of nats), a wrong shape failed deep in a layer."""
        if not x.is_floating_point() or x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"Glow takes float images of shape (N, {', '.join(map(str, self.image_shape))}) in about "
                             f"[-0.5, 0.5] (dequantised pixels, as in glowtrain.losses.dequantize), got {x.dtype} "
                             f"{tuple(x.shape)}; glowtrain.load_run(...) takes pixels as they are")

    def _run_level(self, level: FlowSequence, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            self.memory_saving
            and torch.is_grad_enabled()
            and (h.requires_grad or any(p.requires_grad for p in level.parameters()))
            # A not yet initialised ActNorm initialises from this very batch: the standard path does it.
            and is_initialized(level)
        ):
            return reversible_chain(level, h)
        return level(h)

    @torch.no_grad()
    def reconstruction_errors(self, x: torch.Tensor) -> list[float]:
        """Per level, the largest |input - input rebuilt from the output| over its flow steps' inputs.

        The memory-saving backward evaluates gradients at these rebuilt inputs; this measures how far
        they drift from the true ones (a debugging check, not part of training)."""
        errors = []
        h = x
        for index, level in enumerate(self.levels):
            h, _ = self.squeeze(h)
            error, h = reconstruction_error(level, h)
            errors.append(error)
            if index < self.n_levels - 1:
                h = h[:, : h.shape[1] // 2]
        return errors

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x -> (latents from each split then the top latent, log|det dz/dx| per sample).

        The bijection does not depend on labels (they only shape the prior), so it takes none."""
        zs, _, logdet, _ = self._flow(x)
        return zs, logdet

    def decode(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """The exact inverse of encode."""
        if len(zs) != self.n_levels:
            raise ValueError(f"decode needs {self.n_levels} latents (one per level), got {len(zs)}")
        h = zs[-1]
        for index in reversed(range(self.n_levels)):
            if index < self.n_levels - 1:
                h = torch.cat([h, zs[index]], 1)
            h = self.squeeze.reverse(self.levels[index].reverse(h))
        return h

    # --- priors --------------------------------------------------------------------------------

    def _top_params(self, n: int, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.top_prior.expand(n, -1, -1, -1)
        if self.n_classes > 0 and y is not None:
            h = h + self.label_prior(self._one_hot(y, h.dtype))[:, :, None, None]
        return h.chunk(2, dim=1)

    def _split_params(self, index: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_priors[index](kept).chunk(2, dim=1)

    def _one_hot(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        y = torch.as_tensor(y, device=self.top_prior.device)
        if y.dtype.is_floating_point:  # already a (N, n_classes) distribution
            return y.to(dtype)
        in_range = ((y >= 0) & (y < self.n_classes)).all()
        if y.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(in_range):
                raise ValueError(f"labels must lie in 0..{self.n_classes - 1}, got {y.tolist()}")
        else:
            # Checked on the device: reading the verdict here would stall a GPU and split a compiled graph.
            torch._assert_async(in_range, f"labels must lie in 0..{self.n_classes - 1}")
        # A comparison rather than F.one_hot, which reads the labels' range on the host.
        return (y.long().unsqueeze(-1) == torch.arange(self.n_classes, device=y.device)).to(dtype)

    def _top_log_density(self, z_top: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.n_classes == 0 or y is not None:
            return gaussian_log_density(z_top, *self._top_params(z_top.shape[0], y))
        # No label: the exact marginal over a uniform class prior, log (1/K) sum_k p(z | k).
        labels = torch.arange(self.n_classes, device=z_top.device)
        mean, logs = self._top_params(self.n_classes, labels)  # (K, C, H, W) each
        z, mean, logs = z_top.unsqueeze(1), mean.unsqueeze(0), logs.unsqueeze(0)  # (N, 1, ...), (1, K, ...)
        per_class = _log_normal(z, mean, logs).flatten(2).sum(2)  # (N, K)
        return torch.logsumexp(per_class, 1) - math.log(self.n_classes)

    def prior_log_density(self, zs: list[torch.Tensor], kept_halves: list[torch.Tensor], y=None) -> torch.Tensor:
        """Sum of the log-densities of every latent under its prior."""
        total = self._top_log_density(zs[-1], y)
        for index, (z, kept) in enumerate(zip(zs[:-1], kept_halves)):
            total = total + gaussian_log_density(z, *self._split_params(index, kept))
        return total

    def level_log_densities(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x) split by level, in nats: (log-prior of each level's latent, log|det| of each level's flow
        steps), each (N, L), level 0 first; the top prior is the last column. Their total is log_prob(x, y)."""
        zs, kept_halves, _, level_logdets = self._flow(x)
        priors = [gaussian_log_density(z, *self._split_params(index, kept))
                  for index, (z, kept) in enumerate(zip(zs[:-1], kept_halves))]
        priors.append(self._top_log_density(zs[-1], y))
        return torch.stack(priors, 1), torch.stack(level_logdets, 1)

    # --- what users and the trainer call -------------------------------------------------------

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log p(x) in nats per sample, class logits or None); the trainer's single entry point."""
        zs, kept_halves, logdet, _ = self._flow(x)
        log_prob = self.prior_log_density(zs, kept_halves, y) + logdet
        logits = self.classifier(zs[-1].mean(dim=(2, 3))) if self.n_classes > 0 else None
        return log_prob, logits

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) in nats per sample; for a class-conditional model without `y`, marginal over classes."""
        return self.forward(x, y)[0]

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_classes == 0:
            raise ValueError("this model is not class-conditional (n_classes = 0)")
        return self.forward(x)[1]

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Glow:
        """Data-dependent ActNorm initialisation from a batch; layers already initialised keep their values."""
        self.forward(x, y)
        return self

    @property
    def is_initialized(self) -> bool:
        return all(bool(buf) for name, buf in self.named_buffers() if name.endswith("initialized"))

    @torch.inference_mode()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """n images from the prior with every standard deviation scaled by `temperature` (0: the means)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self.top_prior.device
        if self.n_classes > 0 and y is None:
            y = torch.randint(self.n_classes, (n,), generator=generator, device=device)
        elif y is not None:
            y = torch.as_tensor(y, device=device)
            if y.shape[0] != n:
                raise ValueError(f"got {y.shape[0]} labels for {n} samples")

        def draw(mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
            if temperature == 0:
                return mean  # not mean + 0 * exp(logs) * noise, which is NaN wherever exp(logs) overflows
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
            return mean + temperature * torch.exp(logs) * noise

        h = draw(*self._top_params(n, y))
        for index in reversed(range(self.n_levels)):
            if index < self.n_levels - 1:
                h = torch.cat([h, draw(*self._split_params(index, h))], 1)
            h = self.squeeze.reverse(self.levels[index].reverse(h))
        return h
