"""Looking into a trained model: eval, reconstruct, interpolate, manipulate, info."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from glowtrain.checkpoint import LoadedRun
from glowtrain.config import GRID_LIMIT, Config, config_to_yaml
from glowtrain.data import build_dataset
from glowtrain.data import n_classes as data_classes
from glowtrain.errors import UserError
from glowtrain.evaluation import EVAL_NOISE_SEED, evaluate
from glowtrain.images import (
    check_tensorboard,
    count_not_finite,
    display_upscale,
    exact_text,
    image_grid,
    labelled_columns,
    picture_tag,
    progress_bar,
    refuse_existing,
    save_image,
    save_png,
    write_to_tensorboard,
)
from glowtrain.losses import dequantize, to_uint8
from glowtrain.model import Glow
from glowtrain.objective import build_objective
from glowtrain.precision import full_float32
from glowtrain.run_data import check_class_names, run_data_changed_warning
from glowtrain.runs import checked_files, recorded_data_of
from glowtrain.sample import check_class_range, class_names, class_number, picture_folder

PIXEL_LEVELS = 256  # "pixel units": one step of the 8-bit 0..255 scale; x spans [-0.5, 0.5)
# The CLI's defaults: a picture made with them has the plain name, other values are named in it.
RECONSTRUCT_N, INTERPOLATE_PAIRS, INTERPOLATE_STEPS, MANIPULATE_N = 16, 4, 8, 8
MANIPULATE_ALPHAS = [-1.0, 0.0, 1.0, 2.0]
ANALYSIS_BATCH = 64  # images encoded and decoded at once: the progress bar's step, and a bound on memory


def eval_command(loaded: LoadedRun, split: str, n_dequant: int, device: torch.device,
                 batch_size: int | None = None, progress: bool = False,
                 warn: Callable[[str], None] | None = None) -> dict:
    """Bits/dim over the whole split: the single-draw bound averaged over `n_dequant` dequantisation draws and,
    for n_dequant > 1, the importance-weighted bound over them (`bpd_iw`, tighter)."""
    if split not in ("test", "train"):
        raise UserError(f"--split must be 'test' or 'train', got {split!r}")
    if n_dequant < 1:
        raise UserError(f"--n-dequant must be at least 1, got {n_dequant}")
    cfg = loaded.cfg
    if batch_size is not None:
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        cfg = replace(cfg, train=replace(cfg.train, eval_batch_size=batch_size))
    dataset = run_dataset(loaded, split, cfg)
    changed = run_data_changed_warning(loaded.run_dir, split, dataset)
    if changed and warn is not None:
        warn(changed)  # before the evaluation's progress bar, not lost after it
    scored = evaluate(loaded.objective or loaded.model, dataset, cfg, device, seed=EVAL_NOISE_SEED,
                      n_dequant=n_dequant, progress=progress)
    result = {"bpd": scored["bpd"], "bpd_stderr": scored["bpd_stderr"], "n_images": scored["n_images"]}
    if n_dequant > 1:
        result.update(bpd_iw=scored["bpd_iw"], bpd_iw_stderr=scored["bpd_iw_stderr"])
    result.update(n_dequant=n_dequant, split=split, step=loaded.step, checkpoint=str(loaded.checkpoint),
                  ema=loaded.used_ema)
    result.update({name: value for name, value in scored.items() if name not in result})  # the objective's terms
    return result


def run_dataset(loaded: LoadedRun, split: str, cfg: Config | None = None):
    """A split of the run's data (`cfg`: the run's with its data found elsewhere), its labels checked against the
    classes the model learnt; image files the run already checked are not read again for the check."""
    data = (cfg or loaded.cfg).data
    dataset = build_dataset(data, split, checked_files(loaded.run_dir))
    _check_classes(loaded, dataset, data.cache or data.root, "classes" if data.cache else "class folders")
    return dataset


def _check_classes(loaded: LoadedRun, dataset, where: str, what: str) -> None:
    """The data's labels must mean the classes the model learnt: the same number, and the same folder names
    where the run recorded them (data.json)."""
    trained_on, found = loaded.model.n_classes, getattr(dataset, "n_classes", 0)
    recorded = recorded_data_of(loaded.run_dir)
    if trained_on and found != trained_on:  # its labels would name other classes, or none the model knows
        now, then = getattr(dataset, "class_names", None), (recorded or {}).get("class_names")
        raise UserError(f"{where} holds {found} {what}{_bracketed(now)} but this run was trained on {trained_on} "
                        f"classes{_bracketed(then)} — pass the folder it was trained on with --data DIR")
    if trained_on:
        check_class_names(recorded, dataset, where, "pass the folder it was trained on with --data DIR")


def _bracketed(names: list[str] | None) -> str:
    return f" ({', '.join(names)})" if names else ""


def _test_split(loaded: LoadedRun, n: int, per_unit: int = 1, option: str = "--n"):
    """The run's test split, refused when it holds fewer than n images (`option` asked for n / per_unit of them).
    Checked before a picture's size, so that the fix that check offers is one that can be taken."""
    dataset = run_dataset(loaded, "test")
    if n > len(dataset):
        raise UserError(f"asked for {n} test images but the test split has {len(dataset)} — use {option} "
                        f"{len(dataset) // per_unit} or less")
    return dataset


def _first_images(dataset, n: int, n_bits: int, device: torch.device):
    """The first n images of `dataset` at bin centres (no noise), with labels."""
    items = [dataset[i] for i in range(n)]
    images = torch.stack([image for image, _ in items]).to(device)
    labels = torch.tensor([label for _, label in items], device=device)
    return dequantize(images, n_bits, 0.5), labels


@torch.no_grad()
@full_float32()
def reconstruct_command(loaded: LoadedRun, n: int, device: torch.device, out: str | None,
                        tensorboard: bool = False, use_ema: bool = True, overwrite: bool = False,
                        progress: bool = False) -> dict:
    """Encode and decode real test images; report the error and write originals over reconstructions."""
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    test_split = _test_split(loaded, n)
    _refuse_oversized_grid(2 * n, f"--n {n} makes", "originals and reconstructions",
                           f"use --n {GRID_LIMIT // 2} or less")
    check_tensorboard(loaded.run_dir, tensorboard)
    target = _picture_path(loaded, out, "reconstruct", [f"n{n}"] * (n != RECONSTRUCT_N), use_ema, overwrite)
    cfg, model = loaded.cfg, loaded.model
    x, _ = _first_images(test_split, n, cfg.data.n_bits, device)
    decoded = []
    with progress_bar(n, "reconstructing", progress) as bar:
        for part in x.split(ANALYSIS_BATCH):
            decoded.append(model.decode(model.encode(part)[0]))
            bar.update(len(part))
    decoded = torch.cat(decoded)
    error = (decoded - x).abs() * PIXEL_LEVELS
    pairs = torch.cat([to_uint8(x, cfg.data.n_bits), to_uint8(decoded, cfg.data.n_bits)])
    picture = image_grid(pairs.cpu(), n)
    path = save_png(picture, target, display_upscale(cfg.data.image_size))
    if tensorboard:
        write_to_tensorboard(loaded.run_dir, loaded.step, {picture_tag(target): picture})
    return {"max_abs_error": error.max().item(), "mean_abs_error": error.mean().item(),
            "unit": "pixel levels (1/256 of the intensity range)", "n_images": n, "path": str(path)}


@torch.no_grad()
@full_float32()
def interpolate_command(loaded: LoadedRun, n_pairs: int, n_steps: int, device: torch.device, out: str | None,
                        tensorboard: bool = False, use_ema: bool = True, overwrite: bool = False,
                        progress: bool = False) -> Path:
    """Linear paths between the latents (every level) of pairs of test images; a row per pair."""
    if n_pairs < 1 or n_steps < 2:
        raise UserError(f"need --pairs >= 1 and --steps >= 2 (the two ends), got --pairs {n_pairs} and --steps "
                        f"{n_steps} — use --pairs 4 --steps 8, say")
    test_split = _test_split(loaded, 2 * n_pairs, per_unit=2, option="--pairs")
    fewer = f"use --steps {GRID_LIMIT // n_pairs} or less" if GRID_LIMIT // n_pairs >= 2 else \
        f"use --pairs {GRID_LIMIT // n_steps or 1} or less" + ", or fewer --steps" * (n_steps > 2)
    _refuse_oversized_grid(n_pairs * n_steps, f"--pairs {n_pairs} --steps {n_steps} make", "a row per pair", fewer)
    check_tensorboard(loaded.run_dir, tensorboard)
    named = [f"pairs{n_pairs}"] * (n_pairs != INTERPOLATE_PAIRS) + [f"steps{n_steps}"] * (n_steps != INTERPOLATE_STEPS)
    target = _picture_path(loaded, out, "interpolate", named, use_ema, overwrite)
    cfg, model = loaded.cfg, loaded.model
    x, _ = _first_images(test_split, 2 * n_pairs, cfg.data.n_bits, device)
    zs, _ = model.encode(x)
    weights = torch.linspace(0, 1, n_steps, device=device, dtype=x.dtype)
    rows = []
    with progress_bar(n_pairs, "interpolating", progress, unit="pair") as bar:
        for pair in range(n_pairs):
            start = [z[2 * pair : 2 * pair + 1] for z in zs]
            end = [z[2 * pair + 1 : 2 * pair + 2] for z in zs]
            path = [torch.lerp(a.expand(n_steps, *a.shape[1:]), b.expand(n_steps, *b.shape[1:]),
                               weights.view(-1, *[1] * (a.dim() - 1))) for a, b in zip(start, end)]
            rows.append(to_uint8(model.decode(path), cfg.data.n_bits).cpu())
            bar.update(1)
    picture = image_grid(torch.cat(rows), n_steps)
    if tensorboard:
        write_to_tensorboard(loaded.run_dir, loaded.step, {picture_tag(target): picture})
    return save_png(picture, target, display_upscale(cfg.data.image_size))


def _refuse_oversized_grid(n_images: int, options: str, layout: str, fix: str) -> None:
    """Analysis pictures are one grid, decoded at once: beyond a sample grid's size they would only exhaust
    memory or make a picture too large to look at."""
    if n_images > GRID_LIMIT:
        raise UserError(f"{options} {n_images:,} images ({layout}), more than a picture holds ({GRID_LIMIT:,}) "
                        f"— {fix}")


def _flat_latents(model: Glow, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.flatten(1) for z in model.encode(x)[0]], 1)


def _unflatten_latents(model: Glow, flat: torch.Tensor) -> list[torch.Tensor]:
    zs, start = [], 0
    for shape in model.latent_shapes:
        size = math.prod(shape)
        zs.append(flat[:, start : start + size].view(-1, *shape))
        start += size
    return zs


@torch.no_grad()
@full_float32()
def _mean_latent(model: Glow, dataset, indices: list[int], cfg: Config, device: torch.device, bar: tqdm,
                 batch_size: int = 256) -> torch.Tensor:
    total = None
    for start in range(0, len(indices), batch_size):
        images = torch.stack([dataset[i][0] for i in indices[start : start + batch_size]]).to(device)
        flat = _flat_latents(model, dequantize(images, cfg.data.n_bits, 0.5)).sum(0)
        total = flat if total is None else total + flat
        bar.update(len(images))
    return total / len(indices)


def _celeba_attributes(cfg: Config) -> tuple[list[str], dict[str, list[int]]]:
    """Attribute names and, per file name, its +1/-1 values from list_attr_celeba.txt."""
    root = Path(cfg.data.root).expanduser()  # as the images themselves are found (data.root: ~/data)
    for candidate in (root / "celeba" / "list_attr_celeba.txt", root / "list_attr_celeba.txt"):
        if candidate.is_file():
            lines = candidate.read_text().splitlines()
            names = lines[1].split()
            table = {parts[0]: [int(v) for v in parts[1:]] for parts in (line.split() for line in lines[2:]) if parts}
            return names, table
    raise UserError(f"--attribute needs list_attr_celeba.txt in {root}/celeba/ or {root}/ — or use "
                    "--from-class/--to-class on a labelled dataset")


@torch.no_grad()
@full_float32()
def _moved_along(model, flat: torch.Tensor, direction: torch.Tensor, alphas: list[float], n_bits: int) -> torch.Tensor:
    """Each image's latent moved by every alpha along `direction`, decoded: uint8 rows, one per image."""
    rows, not_finite = [], 0
    for latent in flat:
        decoded = model.decode(_unflatten_latents(model, torch.stack([latent + a * direction for a in alphas])))
        not_finite += int(count_not_finite(decoded))
        rows.append(to_uint8(decoded, n_bits).cpu())
    if not_finite:  # as sample says of overflowed images: their pixels are not a picture of anything
        warnings.warn(f"{not_finite:,} of {len(flat) * len(alphas):,} manipulated images are not finite (the model's "
                      "inverse overflowed), so their pixels mean nothing — use smaller --alphas", RuntimeWarning,
                      stacklevel=2)
    return torch.cat(rows)


def manipulate_command(loaded: LoadedRun, device: torch.device, out: str | None, alphas: list[float], n: int,
                       attribute: str | None = None, from_class: int | str | None = None,
                       to_class: int | str | None = None,
                       max_per_group: int = 2000, tensorboard: bool = False, use_ema: bool = True,
                       overwrite: bool = False, progress: bool = False) -> dict:
    """The Glow paper's semantic manipulation: move test latents along mean(z | with) - mean(z | without)."""
    cfg, model = loaded.cfg, loaded.model
    by_class = from_class is not None or to_class is not None
    if (attribute is not None and by_class) or (attribute is None and (from_class is None or to_class is None)):
        raise UserError("give either --attribute NAME or both --from-class A and --to-class B")
    if n < 1 or not alphas:
        raise UserError(f"need --n >= 1 and at least one value in --alphas, got --n {n} and {len(alphas)} alphas — use "
                        "--n 8 --alphas -1,0,1,2, say")
    if by_class:  # numbers from here on: a class by name and by number is one picture
        from_class, to_class = _direction_classes(loaded, from_class, to_class)
    test_split = _test_split(loaded, n)
    fewer = f"use --n {GRID_LIMIT // len(alphas)} or less" if GRID_LIMIT // len(alphas) else "give fewer --alphas"
    _refuse_oversized_grid(n * len(alphas), f"--n {n} with {len(alphas):,} alphas make", "a row per image", fewer)
    check_tensorboard(loaded.run_dir, tensorboard)
    named = [attribute or f"class{from_class}-{to_class}"]
    named += [f"a{','.join(exact_text(a) for a in alphas)}"] * (list(alphas) != MANIPULATE_ALPHAS)
    named += [f"n{n}"] * (n != MANIPULATE_N)
    target = _picture_path(loaded, out, "manipulate", named, use_ema, overwrite)
    train_set = run_dataset(loaded, "train")
    if attribute is not None:
        if not hasattr(train_set, "paths") and cfg.data.cache:  # a prepared cache keeps pixels, not file names
            raise UserError(f"--attribute reads CelebA's attribute list by file name, and this run trains from the "
                            f"prepared cache {cfg.data.cache} — pass its image folder with --data DIR")
        if not hasattr(train_set, "paths"):
            raise UserError(f"--attribute needs a dataset of image files (celeba), not {cfg.data.dataset}")
        names, table = _celeba_attributes(cfg)
        if attribute not in names:
            raise UserError(f"unknown attribute {attribute!r}; CelebA has: {', '.join(names)}")
        column = names.index(attribute)
        values = [table.get(Path(p).name, [0] * len(names))[column] for p in train_set.paths]
        with_, without = ([i for i, v in enumerate(values) if v == sign] for sign in (1, -1))
        label = attribute
    else:
        labels = torch.as_tensor(train_set.labels).tolist()  # without decoding every training image
        with_ = [i for i, y in enumerate(labels) if y == to_class]
        without = [i for i, y in enumerate(labels) if y == from_class]
        names = class_names(loaded.run_dir, cfg.data)
        label = " -> ".join(f"{k} ({names[k]})" if names else str(k) for k in (from_class, to_class))
        label = f"class {label}"
    if not with_ or not without:
        raise UserError(f"no training images on one side of {label}: cannot estimate a direction")
    with_, without = with_[:max_per_group], without[:max_per_group]
    with progress_bar(len(with_) + len(without), "direction", progress) as bar:  # encoding up to 4,000 training images
        direction = (_mean_latent(model, train_set, with_, cfg, device, bar)
                     - _mean_latent(model, train_set, without, cfg, device, bar))
    x, _ = _first_images(test_split, n, cfg.data.n_bits, device)
    picture = image_grid(_moved_along(model, _flat_latents(model, x), direction, alphas, cfg.data.n_bits),
                         len(alphas))
    if tensorboard:
        write_to_tensorboard(loaded.run_dir, loaded.step, {picture_tag(target): picture})
    path = _save_with_alphas(picture, alphas, cfg.data.image_size, target, label)
    return {"direction": label, "n_with": len(with_), "n_without": len(without), "alphas": alphas,
            "path": str(path)}


def _save_with_alphas(picture: torch.Tensor, alphas: list[float], image_size: int, target: Path,
                      direction: str) -> Path:
    """manipulate's grid under its direction (class 3 -> 5, Smiling) and each column's alpha (alpha 0: the test
    image as it is); shorter forms where a column is too narrow (images of 33-63 pixels)."""
    headings = [[f"alpha {exact_text(alpha)}", exact_text(alpha), f"{alpha:.2g}"] for alpha in alphas]
    return save_image(labelled_columns(picture, headings, image_size, display_upscale(image_size), direction), target)


def _direction_classes(loaded: LoadedRun, from_class: int | str, to_class: int | str) -> tuple[int, int]:
    """--from-class and --to-class as class numbers of the run's data (given by number or name), checked."""
    data = loaded.cfg.data
    n_classes = data_classes(data)
    if n_classes == 0:
        raise UserError(f"--from-class and --to-class need labelled data, and this run's {data.dataset} has "
                        "none — use --attribute on CelebA, or a run trained with labels")
    names = class_names(loaded.run_dir, data)
    if n_classes is None:  # subfolder labels: the folders the run recorded tell how many
        n_classes = len(names) or loaded.model.n_classes or getattr(run_dataset(loaded, "train"), "n_classes", 0)
    numbers = [class_number(k, names, n_classes, option) for option, k in (("--from-class", from_class),
                                                                          ("--to-class", to_class))]
    for option, k in zip(("--from-class", "--to-class"), numbers):
        check_class_range(k, names, n_classes, option, "this run's data has")
    if numbers[0] == numbers[1]:
        raise UserError(f"--from-class and --to-class are both {numbers[0]}: there is no direction between a class "
                        "and itself — give two different classes")
    return numbers[0], numbers[1]


def _picture_path(loaded: LoadedRun, out: str | None, what: str, named: list[str], use_ema: bool,
                  overwrite: bool) -> Path:
    """Where a command's picture goes: named by step and every option that changes it (`_raw`: --no-ema),
    refused before any work when it exists (unless `overwrite`)."""
    folder = picture_folder(loaded, out)
    parts = [*named, *([] if use_ema else ["raw"])]
    path = folder / (f"{what}_step{loaded.step:07d}" + "".join(f"_{part}" for part in parts) + ".png")
    refuse_existing([path], overwrite)
    return path


def _counting_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost modules that count their own multiply-adds (a count includes its children's)."""
    found, inside = [], None
    for name, module in model.named_modules():  # parents come before their children
        if inside is not None and name.startswith(inside):
            continue
        if callable(getattr(module, "multiply_adds", None)):
            found.append(module)
            inside = f"{name}."
    return found


def _counted_multiply_adds(module: nn.Module, probe, upscale: tuple[int, int] = (1, 1)) -> int:
    """Multiply-adds that the counting modules inside `module` report while `probe(module)` runs once, each at
    the (C, H, W) it saw with H and W multiplied by `upscale` (a probe image that much smaller than the real one)."""
    counts: list[int] = []

    def count(counted: nn.Module, inputs, output) -> None:
        channels, height, width = inputs[0].shape[1:]
        counts.append(counted.multiply_adds((channels, height * upscale[0], width * upscale[1])))

    hooks = [counted.register_forward_hook(count) for counted in _counting_modules(module)]
    try:
        with torch.no_grad():
            probe(module)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(counts)


def multiply_adds(model: Glow) -> int:
    """Multiply-adds of one forward pass for one image, as counted by each module that does the work.

    The convolutions run functionally (with ActNorm folded in), so counting nn.Conv2d calls would
    miss them: the layers and conditioners that own them (`multiply_adds(shape)`) count instead, at
    the input shape a probe image gives them. The probe is the smallest image the levels take (2**L
    pixels a side, 1x1 at the top); every layer sees the image shrunk by a power of two, so scaling the
    shapes it saw by image/probe gives the real ones, without the real image's work (minutes for 256x256).
    """
    model = copy.deepcopy(model)  # the probe below would initialise the ActNorms of an untrained model
    device = next(model.parameters()).device
    channels, height, width = model.image_shape
    side = 2**model.n_levels
    probe = torch.zeros(1, channels, side, side, device=device)
    model.image_shape = (channels, side, side)  # the copy takes the probe: the levels are convolutional
    return _counted_multiply_adds(model, lambda m: m.log_prob(probe), (height // side, width // side))


def dequantizer_multiply_adds(dequantizer: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Multiply-adds of a learned dequantiser drawing the noise of one image (its networks' convolutions)."""
    dequantizer = copy.deepcopy(dequantizer)
    device = next(dequantizer.parameters()).device
    images = torch.zeros(1, *image_shape, dtype=torch.uint8, device=device)
    return _counted_multiply_adds(dequantizer, lambda d: d(images, torch.full(images.shape, 0.5, device=device)))


def info_summary(cfg: Config, model: Glow | None = None, dequantizer: nn.Module | None = None) -> dict:
    """Parameters per level and in total, latent shapes, dimensionality, multiply-adds, resolved config.

    A learned dequantiser's parameters and multiply-adds are listed apart from the flow's."""
    if model is None:
        torch.manual_seed(0)
        model = Glow.from_config(cfg)
    per_level = [sum(p.numel() for p in level.parameters()) for level in model.levels]
    priors = sum(p.numel() for p in model.split_priors.parameters())
    priors += model.top_prior.numel() if isinstance(model.top_prior, nn.Parameter) else 0
    if model.n_classes > 0:
        priors += sum(p.numel() for m in (model.label_prior, model.classifier) for p in m.parameters())
    summary = {
        "parameters_per_level": per_level,
        "parameters_priors": priors,
        "parameters_total": sum(p.numel() for p in model.parameters()),
        "latent_shapes": [list(shape) for shape in model.latent_shapes],
        "dimensions": model.n_dims,
        "multiply_adds_per_image": multiply_adds(model),
    }
    dequantizer = dequantizer if dequantizer is not None else build_objective(model, cfg).dequantizer
    n_dequantizer = sum(p.numel() for p in dequantizer.parameters())
    if n_dequantizer:  # a learned dequantiser: training runs it on every image too
        summary["parameters_dequantizer"] = n_dequantizer
        summary["multiply_adds_dequantizer_per_image"] = dequantizer_multiply_adds(dequantizer, model.image_shape)
    return {**summary, "config": config_to_yaml(cfg)}
