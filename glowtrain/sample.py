"""Drawing from a trained model: sampling at temperatures, image grids, PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from glowtrain.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from glowtrain.errors import UserError
from glowtrain.losses import to_uint8
from glowtrain.model import Glow


@torch.no_grad()
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
    array = picture.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def display_upscale(image_size: int) -> int:
    """Enlarge small images to at least 64 pixels a side in saved grids."""
    return max(1, 64 // image_size)


def temperature_name(temperature: float) -> str:
    return f"t{temperature:.2f}".replace(".", "p")


def sample_command(run: str | None, checkpoint: str | None, temperatures: list[float], n: int, seed: int,
                   out: str | None, device: str = "cpu", use_ema: bool = True) -> list[Path]:
    """`glowtrain sample`: one PNG grid per temperature; returns the paths written."""
    if any(t < 0 for t in temperatures):
        raise UserError(f"temperatures must be >= 0, got {temperatures}")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    path = resolve_checkpoint(run, checkpoint)
    state = load_checkpoint(path, map_location=device)
    model, cfg = model_from_checkpoint(state, use_ema=use_ema, source=str(path))
    model.to(device)
    out_dir = Path(out) if out else path.parent.parent / "samples"
    written = []
    for temperature in temperatures:
        generator = torch.Generator(device=device).manual_seed(seed)
        images = sample_images(model, n, temperature, cfg.data.n_bits, generator)
        name = f"sample_step{state['step']:07d}_{temperature_name(temperature)}_seed{seed}.png"
        written.append(save_png(image_grid(images), out_dir / name, display_upscale(cfg.data.image_size)))
    return written
