"""`glowtrain sample`: grids of samples at temperatures (and per class), as PNG files and in TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from glowtrain.checkpoint import open_run
from glowtrain.errors import UserError
from glowtrain.images import (
    check_tensorboard,
    display_upscale,
    image_grid,
    labelled_rows,
    sample_images,
    save_image,
    save_png,
    temperature_name,
    write_to_tensorboard,
)


def class_labels(classes: list[int] | None, n: int, n_classes: int, device) -> torch.Tensor | None:
    """Labels for n images: each requested class in turn, in equal consecutive blocks."""
    if not classes:
        return None
    if n_classes == 0:
        raise UserError("--class needs a class-conditional model (model.n_classes > 0); this one is unconditional")
    bad = [k for k in classes if not 0 <= k < n_classes]
    if bad:
        raise UserError(f"--class {bad[0]} is out of range: this model has classes 0..{n_classes - 1}")
    per_class = math.ceil(n / len(classes))
    return torch.tensor(classes, device=device).repeat_interleave(per_class)[:n]


def sample_command(run: str | None, checkpoint: str | None, temperatures: list[float], n: int, seed: int,
                   out: str | None, device: torch.device, use_ema: bool = True, classes: list[int] | None = None,
                   batch_size: int = 256, grid: bool = False, individual: bool = False,
                   tensorboard: bool = False) -> list[Path]:
    """`glowtrain sample`: a PNG grid per temperature (or one labelled figure); returns the paths written."""
    bad = [t for t in temperatures if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise UserError(f"temperatures must be >= 0 and finite, got {bad[0]} — use --temp 0.7 or another value >= 0")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    loaded = open_run(run, checkpoint, device, use_ema)
    check_tensorboard(loaded.run_dir, tensorboard)
    cfg, model = loaded.cfg, loaded.model
    labels = class_labels(classes, n, cfg.model.n_classes, device)
    out_dir = Path(out) if out else (loaded.run_dir or loaded.checkpoint.parent) / "samples"
    upscale = display_upscale(cfg.data.image_size)
    n_columns = math.ceil(n / len(classes)) if classes else None
    stem = f"sample_step{loaded.step:07d}"
    written, pictures = [], []
    for temperature in temperatures:
        generator = torch.Generator(device=device).manual_seed(seed)
        images = sample_images(model, n, temperature, cfg.data.n_bits, generator, labels, batch_size)
        pictures.append(image_grid(images, n_columns))
        name = f"{stem}_{temperature_name(temperature)}_seed{seed}"
        if not grid:
            written.append(save_png(pictures[-1], out_dir / f"{name}.png", upscale))
        if individual:
            for index, image in enumerate(images):
                written.append(save_png(image, out_dir / name / f"{index:04d}.png", upscale))
    if grid:
        figure = labelled_rows(pictures, [f"T={t:g}" for t in temperatures], upscale)
        written.append(save_image(figure, out_dir / f"{stem}_grid_seed{seed}.png"))
    if tensorboard:
        tagged = {f"sample/T={t:g}": p for t, p in zip(temperatures, pictures)}
        write_to_tensorboard(loaded.run_dir, loaded.step, tagged)
    return written
