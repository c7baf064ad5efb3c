"""`glowtrain sample`: grids of samples at temperatures (and per class), as PNG files and in TensorBoard."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from glowtrain.checkpoint import LoadedRun, open_run
from glowtrain.config import GRID_LIMIT, DataConfig
from glowtrain.data import BUILTIN_CLASS_NAMES
from glowtrain.errors import Stopped, UserError
from glowtrain.folders import refuse_output_among_training_images
from glowtrain.images import (
    check_tensorboard,
    display_upscale,
    image_grid,
    labelled_rows,
    progress_bar,
    refuse_existing,
    sample_batches,
    sample_images,  # noqa: F401 - re-exported: tests and notebooks import it from here
    save_image,
    save_png,
    temperature_label,
    temperature_name,
    write_to_tensorboard,
)
from glowtrain.runs import recorded_data_of, refuse_another_runs_folder

DEFAULT_N, DEFAULT_BATCH_SIZE = 64, 256  # the CLI's defaults, left out of file names


def class_names(run_dir: Path | None, data_cfg: DataConfig) -> list[str]:
    """What a run's class labels mean: its class folders' names (data.json), a built-in set's names, or none."""
    recorded = recorded_data_of(run_dir)
    return list((recorded or {}).get("class_names") or BUILTIN_CLASS_NAMES.get(data_cfg.dataset, ()))


def class_number(value: int | str, names: list[str], n_classes: int, option: str = "--class") -> int:
    """A class given by number (3) or by name (cats, case aside). A number that is also another class's name is
    refused, as either reading could be meant. The caller checks the range."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    named = [i for i, name in enumerate(names) if name == text] or \
        [i for i, name in enumerate(names) if name.casefold() == text.casefold()]
    if len(named) > 1:
        raise UserError(f"{option} {text!r} could name classes {' or '.join(repr(names[i]) for i in named)} — "
                        "give the name as written")
    if re.fullmatch(r"[+-]?[0-9]+", text):  # not str.isdigit: "+-1" and "²" are no numbers int() reads
        number = int(text)
        if named and named[0] != number and 0 <= number < n_classes:
            raise UserError(f"{option} {text} could mean class {number} ({names[number]}) or the class named "
                            f"{text} (class {named[0]}) — give the one you mean by name: "
                            f"{names[number]!r} or {names[named[0]]!r}")
        return named[0] if named else number
    if named:
        return named[0]
    if not names:
        raise UserError(f"{option} {text!r} is not a class number, and this run's classes have no names — give a "
                        f"number from 0 to {n_classes - 1}")
    raise UserError(f"{option} {text!r} names no class of this run — give a number or a name: {class_list(names)}")


def class_list(names: list[str]) -> str:
    """0 birds, 1 cats, 2 dogs."""
    return ", ".join(f"{i} {name}" for i, name in enumerate(names))


def class_numbers(values: list[int | str] | None, names: list[str], n_classes: int,
                  option: str = "--class") -> list[int]:
    """Classes asked for by number or name, repeated or comma-separated (3,5 as --temp takes temperatures; a class
    whose own name holds a comma is taken whole), as numbers the model has; errors name `option`."""
    if not values:
        return []
    if n_classes == 0:
        raise UserError(f"{option} needs a class-conditional model (model.n_classes > 0); this one is unconditional")
    numbers = [class_number(value, names, n_classes, option) for value in _listed(values, names, option)]
    for k in numbers:
        check_class_range(k, names, n_classes, option, "this model has")
    return numbers


def check_class_range(k: int, names: list[str], n_classes: int, option: str, whose: str) -> None:
    """A class number `option` gave must be one of the n_classes (`whose`: "this model has", ...)."""
    if not 0 <= k < n_classes:
        which = f" ({class_list(names)})" if names else ""
        raise UserError(f"{option} {k} is out of range: {whose} classes 0..{n_classes - 1}{which}")


def _listed(values: list[int | str], names: list[str], option: str) -> list[int | str]:
    """Each comma-separated item as a value of its own, but a class's own name whole ("cats, big")."""
    folded = {name.casefold() for name in names}
    listed = []
    for value in values:
        whole = not isinstance(value, str) or value.strip().casefold() in folded
        if not whole and re.search(r"[^,\s]\s*,[\s,]*,\s*[^,\s]", value):  # 3,,5: as --temp and --alphas say it
            raise UserError(f"{option} has an empty item in {value!r} (a class left out?) — give classes like "
                            f"{option} 3,5")
        listed += [value] if whole else [part for part in value.split(",") if part.strip()]
    if not listed:
        raise UserError(f"{option} got no class ({' '.join(map(str, values))!r}); give one by number or name, like "
                        f"{option} 3 or {option} 3,5")
    return listed


def class_labels(classes: list[int] | None, n: int, device, n_option: str = "--n ") -> torch.Tensor | None:
    """Labels for n images: each class (checked by class_numbers) in turn, in equal consecutive blocks.
    Errors write the count as `n_option` + number: "--n 3" for the CLI, "n=3" for the Python API."""
    if not classes:
        return None
    per_class = math.ceil(n / len(classes))
    if per_class * (len(classes) - 1) >= n:  # the last block would be empty: a class asked for, never drawn
        raise UserError(f"{n_option}{n} leaves class {classes[-1]} without an image (blocks of {per_class} per "
                        f"class, a row each) — pass {n_option}{per_class * len(classes)}, or fewer classes")
    return torch.tensor(classes, device=device).repeat_interleave(per_class)[:n]


def options_tag(n: int, classes: list[int] | None, batch_size: int, use_ema: bool) -> str:
    """The options that change the images, for file names: two runs with other options never share a name."""
    parts = [f"n{n}"] if n != DEFAULT_N else []
    if classes:
        parts.append("class" + "-".join(str(k) for k in classes))
    if batch_size != DEFAULT_BATCH_SIZE:  # noise is drawn batch by batch, so other batches give other images
        parts.append(f"b{batch_size}")
    if not use_ema:
        parts.append("raw")
    return "".join(f"_{part}" for part in parts)


def _check_options(temperatures: list[float], n: int, batch_size: int, grid: bool, no_grid: bool,
                   individual: bool) -> None:
    bad = [t for t in temperatures if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise UserError(f"temperatures must be >= 0 and finite, got {bad[0]} — use --temp 0.7 or another value >= 0")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if no_grid and (grid or not individual):
        raise UserError("--no-grid writes no grid, so it needs --individual (and not --grid)")
    if n > GRID_LIMIT and not individual:  # the images past a grid's end would be drawn for nothing
        raise UserError(f"--n {n:,} is more images than a grid holds ({GRID_LIMIT:,}), and without --individual only "
                        f"grids are written — use --n {GRID_LIMIT} or less, or add --individual to write every image")


def sample_command(run: str | None, checkpoint: str | None, temperatures: list[float], n: int, seed: int,
                   out: str | None, device: torch.device, use_ema: bool = True, classes: list[int | str] | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, grid: bool = False, individual: bool = False,
                   tensorboard: bool = False, no_grid: bool = False, overwrite: bool = False,
                   say: Callable[[str], None] | None = None, progress: bool = False) -> list[Path]:
    """`glowtrain sample`: a PNG grid per temperature (or one labelled figure, or none), and with `individual`
    every image as its own PNG at the model's resolution, written batch by batch into a folder per temperature;
    returns the grids and folders written.
    `progress`: a bar on stderr over the images of every temperature, gone when done."""
    temperatures = list(dict.fromkeys(temperatures))  # one asked for twice is drawn and written once
    _check_options(temperatures, n, batch_size, grid, no_grid, individual)
    loaded = open_run(run, checkpoint, device, use_ema)
    check_tensorboard(loaded.run_dir, tensorboard)
    cfg, model = loaded.cfg, loaded.model
    names_of_classes = class_names(loaded.run_dir, cfg.data)
    classes = class_numbers(classes, names_of_classes, cfg.model.n_classes)
    labels = class_labels(classes, n, device)
    out_dir = picture_folder(loaded, out)
    stem, tag = f"sample_step{loaded.step:07d}", options_tag(n, classes, batch_size, use_ema)
    names = {t: f"{stem}_{temperature_name(t)}_seed{seed}{tag}" for t in temperatures}
    figure = out_dir / f"{stem}_grid_{'-'.join(temperature_name(t) for t in temperatures)}_seed{seed}{tag}.png"
    grids = [] if no_grid else [figure] if grid else [out_dir / f"{names[t]}.png" for t in temperatures]
    refuse_existing(grids + ([out_dir / names[t] for t in temperatures] if individual else []), overwrite,
                    "choose another --out or --seed")
    if n > GRID_LIMIT and not no_grid and say:
        say(f"note: grids show the first {GRID_LIMIT:,} of the {n:,} images per temperature (--individual writes "
            "them all)")
    per_class = math.ceil(n / len(classes)) if classes else None
    titles = [class_title(k, names_of_classes) for k in classes]
    upscale = display_upscale(cfg.data.image_size)
    written, pictures, rows = [], [], []
    with progress_bar(n * len(temperatures), "sampling", progress) as bar:
        for temperature in temperatures:
            generator = torch.Generator(device=device).manual_seed(seed)
            batches = sample_batches(model, n, temperature, cfg.data.n_bits, generator, labels, batch_size)
            shown = _stream(batches, out_dir / names[temperature] if individual else None, n, bar)
            picture, strips = class_grid(shown, per_class) if per_class else (image_grid(shown), [])
            pictures.append(picture)
            strips = strips or [picture]
            label = temperature_label(temperature)  # in --grid's figure, each class's strip: T=0.7, 3 cat
            rows += [(strip, f"{label}, {title}" if title else label) for strip, title in zip(strips, titles or [""])]
            if not (grid or no_grid):
                path = out_dir / f"{names[temperature]}.png"
                written.append(save_image(labelled_rows(strips, titles, upscale), path) if per_class
                               else save_png(pictures[-1], path, upscale))
            if individual:  # the folder, not its --n files: 50,000 lines for an FID set
                written.append(out_dir / names[temperature])
    if grid:
        written.append(save_image(labelled_rows(*map(list, zip(*rows)), upscale), figure))
    if tensorboard:
        # Beside training's samples/T=... cards, and apart from them: its seed and options are not this call's.
        tagged = {f"samples/{temperature_label(t)} sample seed{seed}{tag}": p for t, p in zip(temperatures, pictures)}
        write_to_tensorboard(loaded.run_dir, loaded.step, tagged)
    return written


def class_blocks(images: torch.Tensor, per_class: int) -> tuple[torch.Tensor, int]:
    """(images with blank cells added, columns) for a grid where each class's block of `per_class` images starts a
    row: each block takes as many rows as make the whole grid about square."""
    per_class = min(per_class, len(images))  # a grid shows the first GRID_LIMIT of a larger draw
    n_blocks = math.ceil(len(images) / per_class)
    rows = max(1, round(math.sqrt(per_class / n_blocks)))
    width = math.ceil(per_class / rows)
    blocks = [torch.cat([b, b.new_zeros(-len(b) % width, *b.shape[1:])]) for b in images.split(per_class)]
    return torch.cat(blocks), width


def class_grid(shown: torch.Tensor, per_class: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the grid of class_blocks, that grid cut between its classes' blocks of rows to be labelled one by one): the
    strips stacked give the grid back; a grid showing fewer blocks than classes gives fewer strips."""
    laid_out, width = class_blocks(shown, per_class)
    picture = image_grid(laid_out, width)
    blocks = shown.split(min(per_class, len(shown)))
    if len(blocks) == 1 or len(shown) == 1:
        return picture, [picture]
    row_height = shown.shape[-2] + 1  # each image and the line below it
    ends = [1 + sum(math.ceil(len(b) / width) for b in blocks[: k + 1]) * row_height for k in range(len(blocks))]
    return picture, list(picture.tensor_split(ends[:-1], dim=1))


def class_title(k: int, names: list[str]) -> str:
    """A class as a figure names it: its number, and its name where the run has names (3 cat)."""
    return f"{k} {names[k]}" if k < len(names) else f"class {k}"


def _stream(batches, folder: Path | None, n: int, bar: tqdm) -> torch.Tensor:
    """Write each batch's images to `folder` (if any) as they come; keep only the first GRID_LIMIT for the grid."""
    shown, singles, index = [], [], 0
    try:
        for batch in batches:
            shown.append(batch[: max(0, GRID_LIMIT - index)])
            if folder is not None:
                _write_individual(batch, folder, index, n, singles)
            index += len(batch)
            bar.update(len(batch))
    except KeyboardInterrupt:
        if folder is None or not singles:
            raise
        # Counted, not globbed: under --overwrite the folder also holds the earlier call's images.
        raise Stopped(f"interrupted: {len(singles):,} of the {n:,} images written to {folder}; the same command "
                      "with --overwrite writes them all") from None
    return torch.cat(shown)


def _write_individual(batch: torch.Tensor, folder: Path, start: int, n: int, written: list[Path]) -> None:
    """Each image as its own PNG at the model's resolution (what FID-style metrics need), not enlarged; each path
    joins `written` once saved."""
    width = max(4, len(str(n - 1)))
    for i, image in enumerate(batch):
        written.append(save_png(image, folder / f"{start + i:0{width}d}.png"))


def picture_folder(loaded: LoadedRun, out: str | None) -> Path:
    """Where a command that draws pictures of a run writes them: --out, else the run's samples folder; refused
    inside the images the run trains on, or among another run's own files (both would be read as what they are not)."""
    own = (loaded.run_dir or loaded.checkpoint.parent) / "samples"
    folder = Path(out).expanduser() if out else own
    refuse_output_among_training_images(folder, loaded.cfg.data)
    if out:  # the default is this run's (or, for a loose checkpoint, beside it), wherever that lies
        refuse_another_runs_folder(folder, "the pictures", "leave out --out (the default is the run's samples folder) "
                                   "or name a folder of their own", own)
    return folder
