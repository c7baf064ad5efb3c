"""Drawing from a trained model: sampling at temperatures, image grids, PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from glowtrain.checkpoint import open_run
from glowtrain.errors import UserError
from glowtrain.losses import to_uint8
from glowtrain.model import Glow
from glowtrain.precision import full_float32


@torch.inference_mode()
@full_float32()
def sample_images(model: Glow, n: int, temperature: float, n_bits: int, generator: torch.Generator,
                  y: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
    """n uint8 images (N, C, H, W), drawn in batches so memory stays bounded for any n."""
    images = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        labels = None if y is None else y[start : start + count]
        images.append(to_uint8(model.sample(count, temperature, y=labels, generator=generator), n_bits).cpu())
    return torch.cat(images)


def image_grid(images: torch.Tensor, n_columns: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> one uint8 (C, H', W') picture, square-ish by default."""
    n_columns = n_columns or max(1, math.ceil(math.sqrt(images.shape[0])))
    return make_grid(images, nrow=n_columns, padding=1, pad_value=0)


def save_png(picture: torch.Tensor, path: Path, upscale: int = 1) -> Path:
    """Write a uint8 (C, H, W) picture; tiny images (8x8 digits) are enlarged to be seen."""
    return save_image(_to_pil(picture, upscale), path)


def display_upscale(image_size: int) -> int:
    """Enlarge small images to at least 64 pixels a side in saved grids."""
    return max(1, 64 // image_size)


def temperature_name(temperature: float) -> str:
    return f"t{temperature:.2f}".replace(".", "p")


def labelled_rows(pictures: list[torch.Tensor], labels: list[str], upscale: int = 1) -> Image.Image:
    """Stack uint8 (C, H, W) pictures vertically, each with its label in a margin on the left."""
    images = [_to_pil(p, upscale) for p in pictures]
    font = ImageFont.load_default()
    margin = 8 + max(int(ImageDraw.Draw(images[0]).textlength(text, font=font)) for text in labels)
    width = margin + max(image.width for image in images)
    canvas = Image.new("RGB", (width, sum(image.height for image in images)), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for image, text in zip(images, labels):
        canvas.paste(image.convert("RGB"), (margin, top))
        draw.text((4, top + image.height // 2 - 5), text, fill="black", font=font)
        top += image.height
    return canvas


def _to_pil(picture: torch.Tensor, upscale: int = 1) -> Image.Image:
    array = picture.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return image


def save_image(image: Image.Image, path: Path) -> Path:
    """Write a PIL image as PNG atomically (no half-written file if interrupted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


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
        write_to_tensorboard(loaded.run_dir, loaded.step, {f"sample/T={t:g}": p for t, p in zip(temperatures, pictures)})
    return written


def check_tensorboard(run_dir: Path | None, tensorboard: bool) -> None:
    """--tensorboard writes into a run directory, so a loose checkpoint file cannot take it."""
    if tensorboard and run_dir is None:
        raise UserError("--tensorboard needs a run directory: pass --run DIR (not a loose checkpoint file)")


def write_to_tensorboard(run_dir: Path | None, step: int, pictures: dict[str, torch.Tensor]) -> None:
    """Add uint8 (C, H, W) pictures to the run's TensorBoard log."""
    check_tensorboard(run_dir, True)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(run_dir / "tb")) as writer:
        for tag, picture in pictures.items():
            writer.add_image(tag, picture, step)
