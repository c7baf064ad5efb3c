"""`glowtrain.load_run`: a trained run in a notebook, with the preprocessing, bits/dim and sampling of the CLI."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glowtrain.analysis import run_dataset
from glowtrain.checkpoint import open_run
from glowtrain.config import SEED_LIMIT, Config
from glowtrain.data import preprocess_image, relocated, training_crop
from glowtrain.distributed import resolve_device
from glowtrain.errors import UserError
from glowtrain.folders import PIL_DECODE_ERRORS
from glowtrain.images import count_not_finite, sample_images
from glowtrain.loaders import make_eval_batches
from glowtrain.losses import dequantize, to_uint8
from glowtrain.model import Glow
from glowtrain.objective import Objective
from glowtrain.precision import full_float32
from glowtrain.sample import class_labels, class_names, class_numbers
from glowtrain.score import dequantized_terms

ACCEPTED = "paths, PIL images, uint8 arrays (H, W) or (H, W, C), or uint8 tensors (C, H, W) — one or a list"
_CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA


def _as_sources(images, channels: int) -> list:
    """One image or many -> a list of paths, PIL images or (H, W[, C]) uint8 arrays. Arrays are HWC like PIL,
    tensors CHW like torch; an image laid out the other way is refused with the call that turns it, since it
    would otherwise be read as several grey images or fail deep inside PIL."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, torch.Tensor):
        return _tensor_sources(images)
    if isinstance(images, np.ndarray):
        return _array_sources(images, channels)
    # Any iterable of images (a list, a generator such as Path.glob's, a Series), but not a mapping or bytes.
    _require(isinstance(images, Iterable) and not isinstance(images, (bytes, dict)),
             f"cannot read {type(images).__name__} as images; pass {ACCEPTED}")
    return [item for image in images for item in _as_sources(image, channels)]


def _tensor_sources(images: torch.Tensor) -> list:
    shape = tuple(images.shape)
    fix = ("; for floats in [0, 1] pass (x * 255).round().to(torch.uint8)" if images.is_floating_point() else
           "; for one grey image (H, W) pass x[None]" if images.dim() == 2 else "")
    _require(images.dtype == torch.uint8 and images.dim() in (3, 4),
             f"image tensors must be uint8, shaped (C, H, W) or (N, C, H, W), got {images.dtype} {shape}{fix}")
    turn = "2, 0, 1" if images.dim() == 3 else "0, 3, 1, 2"
    _require(shape[-3] in _CHANNEL_COUNTS or shape[-1] not in _CHANNEL_COUNTS,
             f"image tensors are channels-first like torch's, (C, H, W) or (N, C, H, W), but {shape} has its "
             f"channels last — pass x.permute({turn})")
    batch = images.unsqueeze(0) if images.dim() == 3 else images
    return list(batch.permute(0, 2, 3, 1).cpu().numpy())  # (N, H, W, C)


def _array_sources(images: np.ndarray, channels: int) -> list:
    shape = images.shape
    fix = ("; for floats in [0, 1] pass (x * 255).round().astype(np.uint8)" if np.issubdtype(images.dtype, np.floating)
           else "; for values 0..255 pass x.astype(np.uint8), for 16-bit ones (x // 257).astype(np.uint8)"
           if np.issubdtype(images.dtype, np.integer) and images.dtype != np.uint8 else "")
    _require(images.dtype == np.uint8 and images.ndim in (2, 3, 4),
             f"image arrays must be uint8, shaped (H, W), (H, W, C), (N, H, W) or (N, H, W, C), got {images.dtype} "
             f"{shape}{fix}")
    channels_first = images.ndim >= 3 and shape[-3] in _CHANNEL_COUNTS and shape[-1] not in _CHANNEL_COUNTS
    # (3, H, W) is also three grey images (N, H, W): for a colour run it is far likelier a channels-first picture.
    _require(not channels_first or (images.ndim == 3 and not (channels == 3 and shape[0] > 1)),
             f"image arrays are channels-last like PIL's, (H, W, C) or (N, H, W, C), and {shape} looks channels-first"
             f" — pass x.transpose({'1, 2, 0' if images.ndim == 3 else '0, 2, 3, 1'})"
             + (", or a list of (H, W) arrays for grey images" if images.ndim == 3 else ""))
    single = images.ndim == 2 or (images.ndim == 3 and shape[-1] in _CHANNEL_COUNTS)
    return [images] if single else list(images)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's integers too


def _is_class(value) -> bool:
    """A class as the API takes one: its number or its name."""
    return _whole(value) or isinstance(value, str)


def _as_list(value) -> list:
    """One item or a sequence of them (a list, tuple, range, array or tensor) -> a list; anything else -> [value]."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple, range)) else [value]


def _to_pil(source) -> str | Path | Image.Image:
    if isinstance(source, np.ndarray):
        return Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source)
    return source


@dataclass
class Run:
    """A trained model with its config, step and checkpoint; images in, bits/dim, samples and latents out."""

    model: Glow
    cfg: Config
    step: int
    checkpoint: Path
    run_dir: Path | None
    device: torch.device
    objective: Objective  # the model with the run's dequantiser (uniform, or the learned one)
    ema: bool = True  # the EMA weights (False: the raw ones)

    def __repr__(self) -> str:  # the dataclass's would print the whole module tree
        model, data = self.cfg.model, self.cfg.data
        shape = "x".join(str(side) for side in self.model.image_shape)
        classes = f", {model.n_classes} classes" if model.n_classes else ""
        # Which weights, where they are not the default's: another checkpoint of the run, or the raw ones.
        weights = f", {self.checkpoint.name}" if self.run_dir and self.checkpoint.name != "last.pt" else ""
        weights += "" if self.ema else ", raw weights"
        return (f"Run({str(self.run_dir or self.checkpoint)!r}, step {self.step:,}{weights}, {data.dataset} {shape} "
                f"{data.n_bits}-bit, L={model.n_levels} K={model.n_steps} {model.coupling}{classes}, "
                f"device {self.device})")

    @property
    def n_bits(self) -> int:
        return self.cfg.data.n_bits

    @property
    def class_names(self) -> list[str]:
        """What its class labels mean (class folders' or a built-in set's names); empty when unnamed."""
        return class_names(self.run_dir, self.cfg.data) if self.cfg.model.n_classes else []

    def preprocess(self, images) -> torch.Tensor:
        """Paths, PIL images, uint8 arrays or tensors (one or a list) -> uint8 (N, C, H, W) on the run's device:
        channels, crop and resize as training read its images, and the pixels reduced to the run's n_bits (shown
        on the full 0..255 scale, like samples). The model sees exactly these pixels' bins."""
        sources = _as_sources(images, self.model.image_shape[0])
        _require(len(sources) > 0, f"no images given; pass {ACCEPTED}")
        crop = training_crop(self.cfg.data, self.run_dir)
        pixels = []
        for index, source in enumerate(sources):
            try:
                image = _to_pil(source)
                if isinstance(image, Image.Image) and 0 in image.size:  # resizing would fail deep inside torch
                    raise ValueError(f"it has no pixels: {image.width}x{image.height}")
                pixels.append(preprocess_image(image, self.cfg.data, crop))
            except (*PIL_DECODE_ERRORS, TypeError) as e:  # TypeError: PIL's word for an array of an unknown layout
                which = source if isinstance(source, (str, os.PathLike)) else f"image {index} of {len(sources)}"
                raise UserError(f"cannot read {which} ({e}); pass {ACCEPTED}") from None
        return to_uint8(dequantize(torch.stack(pixels), self.n_bits, 0.5), self.n_bits).to(self.device)

    def split(self, name: str = "test", data: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's train or test split as training read it: (uint8 images (N, C, H, W), int64 labels (N,), -1
        where unlabelled), in the order `glowtrain eval` scores them, so bits_per_dim(images, labels=labels) (labels
        for a class-conditional run) averages to eval's figure. `data`: where the run's images are on this machine,
        as eval's --data. Every image is decoded into memory."""
        _require(name in ("train", "test"), f"split must be 'train' or 'test', got {name!r}")
        data_cfg = relocated(self.cfg.data, str(data), self.run_dir) if data is not None else self.cfg.data
        dataset = run_dataset(self, name, replace(self.cfg, data=data_cfg))  # as eval reads it, classes checked
        parts = list(make_eval_batches(dataset, 256, n_workers=data_cfg.n_workers))
        if not parts:  # a split with no images
            return torch.empty(0, *self.model.image_shape, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def bits_per_dim(self, images, n_dequant: int = 1, batch_size: int = 256,
                     labels: int | str | Iterable[int | str] | None = None) -> torch.Tensor:
        """bits/dim of each image (float64, on the CPU), with `glowtrain eval`'s dequantisation noise keyed by the
        image's position in `images`, averaged over n_dequant draws (what `glowtrain score` reports). A
        class-conditional run scores the class marginal, or with `labels` (a class number or name per image, or one
        for all) each image's class-given bits/dim, as `glowtrain eval` does."""
        _require(_whole(n_dequant) and n_dequant >= 1, f"n_dequant must be a whole number >= 1, got {n_dequant!r}")
        _require(_whole(batch_size) and batch_size >= 1, f"batch_size must be a whole number >= 1, got {batch_size!r}")
        pixels = self.preprocess(images)
        given = self._labels(labels, len(pixels))
        objective = self.objective.eval()
        parts = [dequantized_terms(objective, pixels[start:start + batch_size],
                                   list(range(start, min(start + batch_size, len(pixels)))), n_dequant,
                                   None if given is None else given[start:start + batch_size])["bpd"]
                 for start in range(0, len(pixels), batch_size)]
        return torch.from_numpy(np.concatenate(parts))

    def _labels(self, labels, n: int) -> torch.Tensor | None:
        """`labels` for n images as class numbers (None: none given)."""
        if labels is None:
            return None
        wanted = _as_list(labels)
        _require(len(wanted) in (1, n) and all(map(_is_class, wanted)),
                 f"labels must be a class number or name, or one per image ({n}), got {labels!r}")
        numbers = self._class_numbers(wanted, "labels")
        return torch.tensor(numbers * n if len(numbers) == 1 else numbers, dtype=torch.int64)

    def _class_numbers(self, wanted: list, option: str) -> list[int]:
        """Class numbers or names (each passed _is_class) as the numbers this run's model has; errors name `option`."""
        return class_numbers([k if isinstance(k, str) else int(k) for k in wanted], self.class_names,
                             self.cfg.model.n_classes, option)

    def sample(self, n: int, temperature: float = 0.7, seed: int = 0,
               classes: int | str | list[int | str] | None = None) -> torch.Tensor:
        """n uint8 images (N, C, H, W) on the CPU; the same seed gives the same images (as `glowtrain sample`).

        `classes` (a class number or name, or a list; class-conditional runs) draws each in turn, in equal
        consecutive blocks, as `glowtrain sample --class`; without it a conditional run draws random classes."""
        _require(_whole(n) and n >= 1, f"n must be a whole number >= 1, got {n!r}")
        _require(math.isfinite(temperature) and temperature >= 0,
                 f"temperature must be a finite number >= 0 (0.7 is usual), got {temperature!r}")
        _require(_whole(seed) and 0 <= seed < SEED_LIMIT,
                 f"seed must be a whole number from 0 to 2**32 - 1 (torch's CPU generator reads 32 bits), got "
                 f"{seed!r}")
        wanted = [] if classes is None else _as_list(classes)
        _require(classes is None or (len(wanted) > 0 and all(map(_is_class, wanted))),
                 f"classes must be a class number or name, or a non-empty list of them, got {classes!r}")
        numbers = self._class_numbers(wanted, "classes")
        labels = class_labels(numbers, int(n), self.device, "n=")
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        return sample_images(self.model, int(n), temperature, self.n_bits, generator, labels)

    @torch.no_grad()  # not inference mode: its tensors could not be changed in place, as a user's may be
    @full_float32()
    def encode(self, images) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images at their bin centres -> (a latent per level, log|det dz/dx| per image), as Glow.encode."""
        return self.model.encode(dequantize(self.preprocess(images), self.n_bits, 0.5))

    @torch.no_grad()
    @full_float32()
    def decode(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """Latents (one per level, on any device) -> uint8 images (N, C, H, W) on the run's device."""
        shapes = [tuple(shape) for shape in self.model.latent_shapes]
        given = [(tuple(z.shape[1:]), z.dtype) if isinstance(z, torch.Tensor) else (None, None) for z in zs]
        _require(len(given) == len(shapes) and all(shape == want for (shape, _), want in zip(given, shapes))
                 and all(dtype == self.model.top_prior.dtype for _, dtype in given),
                 f"decode takes the latents encode gives: {len(shapes)} {self.model.top_prior.dtype} tensors shaped "
                 f"(N, *s) for s in {shapes}, got {[(shape, str(dtype)) for shape, dtype in given]}")
        x = self.model.decode([z.to(self.device) for z in zs])
        not_finite = int(count_not_finite(x))
        if not_finite:  # as sample says: black or white pixels that are a picture of nothing
            warnings.warn(f"{not_finite:,} of {len(x):,} decoded images are not finite (the latents or the model's "
                          "inverse overflowed), so their pixels mean nothing", RuntimeWarning, stacklevel=2)
        return to_uint8(x, self.n_bits)


def load_run(path: str | Path, device: str = "auto", ema: bool = True) -> Run:
    """A run directory (its checkpoints/last.pt) or a checkpoint file, with the model on `device`."""
    path = Path(path)
    _require(isinstance(ema, bool), f"ema must be True or False, got {ema!r}")  # 'no' would be taken as True
    _require(path.exists(), f"no run directory or checkpoint at {path}; pass a folder made by 'glowtrain fit' or a "
                            ".pt file")
    resolved = resolve_device(str(device), "device")
    loaded = open_run(str(path), None, resolved, ema) if path.is_dir() else open_run(None, str(path), resolved, ema)
    return Run(loaded.model, loaded.cfg, loaded.step, loaded.checkpoint, loaded.run_dir, resolved, loaded.objective,
               ema)
