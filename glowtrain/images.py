"""Pictures: uint8 samples from a model, grids, labelled figures, PNG files and TensorBoard images."""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from glowtrain.errors import UserError
from glowtrain.files import atomic_write
from glowtrain.losses import to_uint8
from glowtrain.model import Glow
from glowtrain.precision import full_float32
from glowtrain.runs import RunDir, check_writable


def progress_bar(total: int, what: str, progress: bool, unit: str = "img") -> tqdm:
    """A command's progress bar on stderr, quiet for work done within a second."""
    return tqdm(total=total, desc=what, unit=unit, leave=False, file=sys.stderr, disable=not progress, delay=1,
                dynamic_ncols=True)


@torch.no_grad()  # not inference mode: the images it returns are ordinary tensors, editable in place
@full_float32()
def sample_images(model: Glow, n: int, temperature: float, n_bits: int, generator: torch.Generator,
                  y: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
    """n uint8 images (N, C, H, W), drawn in batches of batch_size."""
    return torch.cat(list(sample_batches(model, n, temperature, n_bits, generator, y, batch_size)))


def sample_batches(model: Glow, n: int, temperature: float, n_bits: int, generator: torch.Generator,
                   y: torch.Tensor | None = None, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """n uint8 images as batches (B, C, H, W) on the CPU, one at a time, so memory stays bounded for any n.
    Images the inverse overflowed in (inf or NaN, drawn as meaningless pixels) are counted, and said at the end."""
    not_finite = 0
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        labels = None if y is None else y[start : start + count]
        with torch.inference_mode(), full_float32():
            x = model.sample(count, temperature, y=labels, generator=generator)
            overflowed = count_not_finite(x)
            batch = to_uint8(x, n_bits).cpu()  # waits for the batch, so reading the count below costs nothing
        not_finite += int(overflowed)
        yield batch  # outside the contexts: the caller's code between batches runs under its own settings
    if not_finite:
        fix = "use a lower temperature, like 0.7" if temperature > 1 else \
            "the weights may have diverged: try an earlier checkpoint"
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # no temperature helps then
            fix = "the model's weights are not finite (the run diverged): try an earlier checkpoint"
        warnings.warn(f"{not_finite:,} of {n:,} images sampled at temperature {temperature:g} are not finite (the "
                      f"model's inverse overflowed), so their pixels mean nothing — {fix}", RuntimeWarning,
                      stacklevel=2)


def count_not_finite(images: torch.Tensor) -> torch.Tensor:
    """How many images (the first axis) hold a NaN or inf: the model's inverse overflowed in them. On the
    images' device, so that a caller reads it only when it waits for them anyway."""
    return (~torch.isfinite(images)).flatten(1).any(1).sum()


def image_grid(images: torch.Tensor, n_columns: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> one uint8 (C, H', W') picture, square-ish by default."""
    n, channels, height, width = images.shape
    if channels == 1:  # grey pictures are saved and shown as RGB, as torchvision's make_grid made them
        images, channels = images.expand(n, 3, height, width), 3
    if n == 1:
        return images[0].contiguous()
    n_columns = min(n, n_columns or math.ceil(math.sqrt(n)))
    n_rows = math.ceil(n / n_columns)
    cells = images.new_zeros(n_rows * n_columns, channels, height + 1, width + 1)  # each image, a line below/right
    cells[:n, :, :height, :width] = images
    rows = cells.view(n_rows, n_columns, channels, height + 1, width + 1).permute(2, 0, 3, 1, 4)
    picture = images.new_zeros(channels, n_rows * (height + 1) + 1, n_columns * (width + 1) + 1)
    picture[:, 1:, 1:] = rows.reshape(channels, n_rows * (height + 1), n_columns * (width + 1))
    return picture


def save_png(picture: torch.Tensor, path: Path, upscale: int = 1) -> Path:
    """Write a uint8 (C, H, W) picture; tiny images (8x8 digits) are enlarged to be seen."""
    return save_image(_to_pil(picture, upscale), path)


def refuse_existing(targets: list[Path], overwrite: bool, alternative: str = "choose another --out") -> None:
    """Never replace earlier pictures silently, nor find out after the work that their folder cannot be written:
    every target and its folder are checked before anything is computed."""
    for folder in dict.fromkeys(target.parent for target in targets):
        check_writable(folder, "the output folder", "another --out")
    for target in targets:
        if target.suffix and target.is_dir():  # a picture's name, taken by a folder: the write would fail at the end
            raise UserError(f"{target} is a folder, where this command writes a picture — move it, or {alternative}")
    existing = [t for t in targets if t.exists() and (t.is_file() or any(t.iterdir()))]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists — pass --overwrite to replace it, or {alternative}")


def display_upscale(image_size: int) -> int:
    """Enlarge small images to at least 64 pixels a side in saved grids."""
    return max(1, 64 // image_size)


def temperature_name(temperature: float) -> str:
    """t0p70 for 0.7; a temperature that two decimals do not hold keeps its shortest exact form (t0p705, t1e+30),
    so two temperatures never share a file name."""
    temperature = float(temperature) + 0.0  # -0.0 is 0.0's name, not t-0p00
    two_decimals = f"{temperature:.2f}"
    exact = two_decimals if temperature < 1e4 and float(two_decimals) == temperature else repr(temperature)
    return "t" + exact.replace(".", "p")


def exact_text(value: float) -> str:
    """0.7, 1e-07, 0.10000001: short, yet never the same for two numbers (labels and file names tell them apart)."""
    value = float(value) + 0.0  # -0.0 is 0.0's
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def temperature_label(temperature: float) -> str:
    """T=0.7 for grids and TensorBoard tags: short, yet never the same for two temperatures (T=0.7000001)."""
    return f"T={exact_text(temperature)}"


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


def labelled_columns(picture: torch.Tensor, labels: list[list[str]], cell_width: int, upscale: int = 1,
                     title: str = "") -> Image.Image:
    """A uint8 (C, H, W) grid of image_grid's layout (cells `cell_width` pixels wide, a 1-pixel line each) with a
    label centred above each column: each label's forms from the longest, and all columns take the longest form
    that fits every column (the last form is drawn whatever its width). A title goes on a line above them."""
    image = _to_pil(picture, upscale)
    font = ImageFont.load_default()
    line = 16
    band = line * (2 if title else 1)
    canvas = Image.new("RGB", (image.width, image.height + band), "white")
    canvas.paste(image.convert("RGB"), (0, band))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((3, 3), title, fill="black", font=font)
    room = (cell_width + 1) * upscale - 4
    n_forms = min(len(forms) for forms in labels)
    form = next((i for i in range(n_forms) if all(draw.textlength(f[i], font=font) <= room for f in labels)),
                n_forms - 1)
    for column, forms in enumerate(labels):
        centre = (1 + column * (cell_width + 1) + cell_width / 2) * upscale
        draw.text((centre - draw.textlength(forms[form], font=font) / 2, band - line + 3), forms[form], fill="black",
                  font=font)
    return canvas


def _to_pil(picture: torch.Tensor, upscale: int = 1) -> Image.Image:
    array = picture.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return image


def save_image(image: Image.Image, path: Path) -> Path:
    """Write a PIL image as PNG atomically (no half-written file if interrupted)."""
    # Not flushed to the disk: a picture is cheap to redo, and `sample --individual` writes thousands.
    return atomic_write(path, lambda f: image.save(f, format="PNG"), durable=False)


def check_tensorboard(run_dir: Path | None, tensorboard: bool) -> None:
    """--tensorboard writes into a run directory, so a loose checkpoint file cannot take it."""
    if tensorboard and run_dir is None:
        raise UserError("--tensorboard needs a run directory: pass --run DIR (not a loose checkpoint file)")
    if tensorboard:  # before any drawing: TensorBoard's writer fails in a thread of its own, with a traceback
        check_writable(RunDir(run_dir).tb, "the run's TensorBoard folder", "another run, or leave out --tensorboard")


def picture_tag(path: Path) -> str:
    """The TensorBoard tag of a command's picture: its file name without the step, which TensorBoard shows
    itself. Calls with other options get cards of their own; the same options at later checkpoints share one."""
    return re.sub(r"_step\d+", "", path.stem)


def write_to_tensorboard(run_dir: Path | None, step: int, pictures: dict[str, torch.Tensor]) -> None:
    """Add uint8 (C, H, W) pictures to the run's TensorBoard log."""
    check_tensorboard(run_dir, True)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(RunDir(run_dir).tb)) as writer:
        for tag, picture in pictures.items():
            writer.add_image(tag, picture, step)


HISTOGRAM_COLOURS = ((60, 110, 200), (230, 120, 30), (60, 160, 80))


def histogram_picture(values: dict[str, np.ndarray], title: str, n_bins: int = 40,
                      size: tuple[int, int] = (520, 300)) -> Image.Image:
    """Overlaid histograms (each set's share of its images per bin) of one score, with a legend, the score's ends
    and middle, and the share of the tallest bar."""
    finite = {name: np.asarray(v, float)[np.isfinite(v)] for name, v in values.items()}
    pooled = np.concatenate([v for v in finite.values()] or [np.zeros(1)])
    low, high = (float(pooled.min()), float(pooled.max())) if pooled.size else (0.0, 1.0)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, n_bins + 1)
    shares = {name: np.histogram(v, edges)[0] / max(1, v.size) for name, v in finite.items()}
    tallest = max([s.max() for s in shares.values()] + [1e-12])
    width, height = size
    left, right, top, bottom = 40, 10, 24, 36
    canvas = Image.new("RGBA", size, "white")
    font = ImageFont.load_default()
    bar_width = (width - left - right) / n_bins
    for share, colour in zip(shares.values(), HISTOGRAM_COLOURS):
        layer = Image.new("RGBA", size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        for index, value in enumerate(share):
            if value > 0:
                x0 = left + index * bar_width
                y0 = height - bottom - value / tallest * (height - top - bottom)
                draw.rectangle([x0, y0, x0 + bar_width - 1, height - bottom], fill=(*colour, 110), outline=colour)
        canvas = Image.alpha_composite(canvas, layer)
    draw = ImageDraw.Draw(canvas)
    draw.line([left, height - bottom, width - right, height - bottom], fill="black")
    draw.line([left, top, left, height - bottom], fill="black")  # shares of each set's images, 0 to the tallest
    draw.text((left, 6), title, fill="black", font=font)
    for text, y in ((f"{tallest:.0%}", top), ("0", height - bottom - 10)):
        draw.text((left - 4 - draw.textlength(text, font=font), y), text, fill="black", font=font)
    for value, align in ((low, 0.0), ((low + high) / 2, 0.5), (high, 1.0)):  # the axis's ends and middle
        text = f"{value:.4g}"
        x = left + align * (width - right - left) - align * draw.textlength(text, font=font)
        draw.text((x, height - bottom + 6), text, fill="black", font=font)
    for row, (name, colour) in enumerate(zip(finite, HISTOGRAM_COLOURS)):
        draw.text((width - right - 160, 6 + 12 * row), f"{name} (n={finite[name].size})", fill=colour, font=font)
    return canvas.convert("RGB")
