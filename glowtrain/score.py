"""`glowtrain score`: per-image likelihood scores of your own images, and out-of-distribution detection.

Every score is in bits/dim and grows as an image looks less like the training data:
- `bpd`: the model's bits/dim (the `eval` bound, same dequantisation noise; for a class-conditional model the
  class marginal, where `eval` gives the labels), averaged over --n-dequant draws, with each level's prior and
  log-det terms (`bpd` = n_bits + their sum for uniform dequantisation);
- `last_level_bpd`: the top level's two terms alone, and `last_level_share`: their share of `bpd`;
- `typicality`: |bpd - H|, H the mean bits/dim of the training split (Nalisnick et al. 2019, "Detecting
  out-of-distribution inputs to deep generative models using typicality");
- `complexity`: bpd - `png_bpd`, the PNG-compressed bits/dim of the same quantised image (Serra et al. 2020,
  "Input complexity and out-of-distribution detection with likelihood-based generative models");
- `ratio`: bpd - `reference_bpd`, a likelihood ratio against a second model (Ren et al. 2019; Schirrmeister
  et al. 2020).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from glowtrain.analysis import run_dataset
from glowtrain.checkpoint import LoadedRun
from glowtrain.config import FIXED_CHANNELS
from glowtrain.data import DATASETS, build_dataset, image_shape, training_crop
from glowtrain.data import read_images as read_image_files
from glowtrain.dequantization import UniformDequantizer
from glowtrain.errors import MissingData, UserError
from glowtrain.evaluation import EVAL_NOISE_SEED, mean_text, per_image_noise
from glowtrain.files import atomic_write, missing_folders, read_json, remove_if_empty
from glowtrain.folders import (
    IMAGE_EXTENSIONS,
    describe_ignored,
    each_file_once,
    find_images,
    ignored_counts,
    refuse_output_among_images,
    refuse_output_among_training_images,
)
from glowtrain.images import histogram_picture, save_image
from glowtrain.loaders import make_eval_batches
from glowtrain.logs import strict_json
from glowtrain.losses import reduce_bits
from glowtrain.objective import Objective
from glowtrain.ood_metrics import OOD_METRICS, ood_metrics, typicality_test
from glowtrain.precision import full_float32
from glowtrain.run_data import run_data_changed_warning
from glowtrain.runs import RunDir, check_writable, checked_files, run_folder_holding

TRAIN_CACHE = "score_train_bpd.json"  # in the run directory: the training split's bits/dim for typicality
TRAIN_CACHE_ENTRIES = 4  # typical sets kept there (checkpoints, --n-dequant values): switching back reuses one


@dataclass(frozen=True)
class ScoreOptions:
    n_dequant: int = 1
    batch_size: int = 256
    batch_test: bool = False
    n_bootstrap: int = 10_000
    max_train_images: int = 10_000
    on_bad_image: str = ""  # '' = the run's data.on_bad_image
    progress: bool = True
    overwrite: bool = False  # replace an earlier score in the output folder instead of refusing

    def check(self) -> None:
        for name, value in (("--n-dequant", self.n_dequant), ("--batch-size", self.batch_size),
                            ("--n-bootstrap", self.n_bootstrap)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.on_bad_image not in ("", "skip", "error"):
            raise UserError(f"--on-bad-image must be 'skip' or 'error', got {self.on_bad_image!r}")


class Batch(NamedTuple):
    """Images read together: where each sits in its set's names, the key of its dequantisation noise, the pixels."""

    indices: list[int]
    noise_keys: list[int]  # its place among the images that could be read, as in `glowtrain eval` of the folder
    images: torch.Tensor  # uint8


@dataclass
class ImageSet:
    """Images to score, read lazily: a name per image and batches of them."""

    role: str
    names: list[str]
    batches: Callable[[int], Iterator[Batch]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    not_read: list[str] = field(default_factory=list)  # in its folders: hidden folders, files hidden or not images
    converted: Counter = field(default_factory=Counter)  # what giving the files the run's image shape did to them
    source: dict = field(default_factory=dict)  # what was asked for: {"files": [...]} or {"dataset": ..., "split": ...}


# --- where the images come from ----------------------------------------------------------------


def image_paths(sources: list[str], option: str = "--images", not_read: list[str] | None = None) -> list[str]:
    """Image files named directly, and every image under each folder named (sorted); a file named twice (a folder
    and a file in it, or two spellings of one folder) counts once, where it first came. What the folders hold
    besides images (hidden folders, files hidden or not images) is added to `not_read`."""
    paths: list[str] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            try:
                paths += find_images(str(path), not_read)[1]
            except UserError:
                raise UserError(f"no images under {path}; {option} needs image files ending in "
                                f"{', '.join(IMAGE_EXTENSIONS)} or a folder of them") from None
        elif path.is_file():
            paths.append(str(path.absolute()))  # as find_images gives a folder's files: one form in scores.csv
        elif any(mark in source for mark in "*?["):  # quoted, so the shell left the pattern to us
            raise UserError(f"{option} {source}: no such file or folder, and patterns are not expanded here — pass "
                            f"the files' folder, or each file after its own {option}")
        else:
            raise UserError(f"{option} {source}: no such file or folder — pass image files or a folder of images")
    return each_file_once(paths)


def file_set(role: str, sources: list[str], loaded: LoadedRun, on_bad_image: str) -> ImageSet:
    """Image files preprocessed as the run's training data was, decoded a batch at a time."""
    not_read: list[str] = []
    paths = image_paths(sources, "--images" if role == "images" else "--against", not_read)
    image_set = ImageSet(role, paths, lambda batch_size: iter(()), not_read=sorted(set(not_read)),
                         source={"files": [os.path.abspath(os.path.expanduser(given)) for given in sources]})
    policy = on_bad_image or loaded.cfg.data.on_bad_image

    def batches(batch_size: int) -> Iterator[Batch]:
        images = read_image_files(paths, loaded.cfg.data, policy, image_set.skipped, "pass --on-bad-image skip",
                                  training_crop(loaded.cfg.data, loaded.run_dir), image_set.converted)
        indices, noise_keys, pending, n_read = [], [], [], 0
        for index, image in enumerate(images):
            if image is not None:
                indices.append(index)
                noise_keys.append(n_read)  # its place among the images read: a skipped file takes none
                n_read += 1
                pending.append(image)
            if len(pending) == batch_size:
                yield Batch(indices, noise_keys, torch.stack(pending))
                indices, noise_keys, pending = [], [], []
        if pending:
            yield Batch(indices, noise_keys, torch.stack(pending))

    image_set.batches = batches
    return image_set


def warn_of_shared_files(images: list[str], against: list[str]) -> None:
    """A file in both sets makes the out-of-distribution scores compare it with itself: say so in one line."""
    mine = {os.path.realpath(path) for path in images}
    shared = [path for path in against if os.path.realpath(path) in mine]
    if shared:
        warnings.warn(f"--images and --against share {len(shared):,} of {len(against):,} file(s) (such as "
                      f"{shared[0]}): the out-of-distribution scores compare those with themselves", stacklevel=2)


def dataset_set(role: str, name: str, split: str, loaded: LoadedRun) -> ImageSet:
    """A built-in dataset's split, at the run's image size and n_bits (the run's cache if it is the same set)."""
    if split not in ("test", "train"):
        raise UserError(f"--split must be 'test' or 'train', got {split!r}")
    built_in = [d for d in DATASETS if d != "folder"]
    own = loaded.cfg.data.dataset
    if name not in built_in and name != own:  # the run's own folder: its split, as eval reads it
        also = "" if own in built_in else f", the run's own {own}"
        raise UserError(f"--dataset {name!r} is not a built-in set; choose one of {', '.join(built_in)}{also}, "
                        "or pass a folder with --images")
    data = loaded.cfg.data
    if name != data.dataset:
        data = replace(data, dataset=name, cache="", channels=FIXED_CHANNELS.get(name, data.channels))
    try:
        shape = image_shape(data)
    except UserError:
        shape = None
    if shape != loaded.model.image_shape:
        raise UserError(f"--dataset {name} does not come in this model's {'x'.join(map(str, loaded.model.image_shape))}"
                        " images — save the images to a folder and pass it with --images")
    try:
        # The run's own data as eval reads it (its labels checked against the classes the model learnt).
        dataset = run_dataset(loaded, split) if data == loaded.cfg.data else build_dataset(data, split)
        if data == loaded.cfg.data:
            _warn_if_changed(loaded, split, dataset)
    except MissingData as e:
        if name == loaded.cfg.data.dataset:
            raise  # the run's own data: --data says where it is now
        raise UserError(f"--dataset {name}: {e.problem} — put its files there, or pass a folder of its images "
                        "with --images") from None

    def batches(batch_size: int) -> Iterator[Batch]:
        start = 0
        for images, _ in make_eval_batches(dataset, batch_size):
            indices = list(range(start, start + len(images)))
            yield Batch(indices, indices, images)
            start += len(images)

    files = getattr(dataset, "paths", None)  # a folder's: each image named by its file
    names = list(files) if files is not None else [f"{name}/{split}/{i}" for i in range(len(dataset))]
    return ImageSet(role, names, batches, source={"dataset": name, "split": split})


# --- the scores ----------------------------------------------------------------------------------


def _idat_bytes(png: bytes) -> int:
    """Bytes of compressed image data in a PNG file (its IDAT chunks), headers and other chunks left out."""
    position, total = 8, 0  # after the signature; each chunk: length, type, data, CRC
    while position < len(png):
        length = int.from_bytes(png[position:position + 4], "big")
        if png[position + 4:position + 8] == b"IDAT":
            total += length
        position += 12 + length
    return total


def png_bits_per_dim(images: torch.Tensor, n_bits: int) -> np.ndarray:
    """Per image, 8 x the PNG's compressed data bytes (level 9) / dimensions, of its n_bits bin values."""
    bins = reduce_bits(images.cpu(), n_bits).to(torch.uint8).numpy()
    n_dims = bins[0].size
    result = np.empty(len(bins))
    for index, image in enumerate(bins):
        buffer = io.BytesIO()
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(
            buffer, format="PNG", compress_level=9)
        result[index] = 8.0 * _idat_bytes(buffer.getvalue()) / n_dims
    return result


@torch.inference_mode()
@full_float32()  # bits/dim must not depend on the GPU generation (precision.py)
def dequantized_terms(objective: Objective, images: torch.Tensor, noise_keys: list[int], n_dequant: int,
                      labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Objective.level_terms averaged over n_dequant draws of `glowtrain eval`'s noise (keyed by noise_keys); a
    class-conditional model's class marginal unless `labels` are given."""
    device = objective.model.top_prior.device
    images = images.to(device)
    labels = labels.to(device) if labels is not None else None
    totals: dict[str, torch.Tensor] = {}
    for draw in range(n_dequant):
        noise = per_image_noise(noise_keys, tuple(images.shape[1:]), EVAL_NOISE_SEED + draw, device)
        for key, value in objective.level_terms(images, noise, labels).items():
            totals[key] = totals[key] + value if key in totals else value
    return {key: (value / n_dequant).double().cpu().numpy() for key, value in totals.items()}


class Scorer:
    """Every per-image score of uint8 batches under a run, its training entropy and an optional reference run."""

    def __init__(self, loaded: LoadedRun, n_dequant: int = 1, entropy_bpd: float | None = None,
                 reference: LoadedRun | None = None):
        # The runs' own objectives: a learned dequantiser's log q is part of each bits/dim.
        self.objective = loaded.objective.eval()
        self.reference = reference.objective.eval() if reference else None
        self.n_bits, self.n_dequant, self.entropy_bpd = loaded.cfg.data.n_bits, n_dequant, entropy_bpd
        self.learned_dequantizer = not isinstance(self.objective.dequantizer, UniformDequantizer)

    def __call__(self, images: torch.Tensor, noise_keys: list[int]) -> dict[str, np.ndarray]:
        terms = dequantized_terms(self.objective, images, noise_keys, self.n_dequant)
        bpd, prior, logdet = terms["bpd"], terms["prior"], terms["logdet"]
        columns = {"bpd": bpd}
        for level in range(prior.shape[1]):
            columns[f"level{level + 1}_prior_bpd"] = prior[:, level]
            columns[f"level{level + 1}_logdet_bpd"] = logdet[:, level]
        if self.learned_dequantizer:  # then bpd = n_bits + this + the levels' terms
            columns["dequantizer_bpd"] = terms["dequantizer"]
        columns["last_level_bpd"] = prior[:, -1] + logdet[:, -1]
        # Of bpd, which bounds -log2 P(x) per dimension and stays well above 0; the levels' sum alone is a continuous
        # density's and passes through 0 as a model improves, where a share of it is meaningless.
        columns["last_level_share"] = columns["last_level_bpd"] / bpd
        columns["png_bpd"] = png_bits_per_dim(images, self.n_bits)
        columns["complexity"] = bpd - columns["png_bpd"]
        if self.entropy_bpd is not None:
            columns["typicality"] = np.abs(bpd - self.entropy_bpd)
        if self.reference is not None:
            columns["reference_bpd"] = dequantized_terms(self.reference, images, noise_keys, self.n_dequant)["bpd"]
            columns["ratio"] = bpd - columns["reference_bpd"]
        return columns


# --- the typical set: the training split's bits/dim, computed once and kept in the run ---------------


def training_bpd(loaded: LoadedRun, use_ema: bool, options: ScoreOptions) -> np.ndarray:
    """Per-image bits/dim of (up to max_train_images of) the training split, from the run's cache when it was
    made for this checkpoint file as saved (its size and time), step, weights, n_dequant and training images."""
    saved = loaded.checkpoint.stat()  # a resume from an earlier checkpoint saves other weights at the same step
    key = {"checkpoint": loaded.checkpoint.name, "step": loaded.step, "ema": use_ema,
           "saved": f"{saved.st_size}:{saved.st_mtime_ns}", "n_dequant": options.n_dequant,
           "max_images": options.max_train_images}
    cache = loaded.run_dir / TRAIN_CACHE if loaded.run_dir is not None else None
    entries = _cached_typical_sets(cache)
    try:
        dataset = build_dataset(loaded.cfg.data, "train", checked_files(loaded.run_dir))
    except MissingData:
        # Not on this machine (a run copied without its data): a typical set cached for these weights still serves.
        if (hit := _cached_bpd(entries, key, ignoring="train_images")) is not None:
            return hit
        raise
    _warn_if_changed(loaded, "train", dataset)  # the typical set is then not the one the run learnt
    # The images too: another folder given with --data, or the run's own changed since, is another typical set.
    key["train_images"] = getattr(getattr(dataset, "report", None), "fingerprint", None)
    if (hit := _cached_bpd(entries, key)) is not None:
        return hit
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:options.max_train_images]
    chosen = sorted(chosen.tolist())
    objective = loaded.objective.eval()
    values = []
    bar = tqdm(total=len(chosen), desc="typical set (training split, once)", unit="img", disable=not options.progress)
    for start in range(0, len(chosen), options.batch_size):
        indices = chosen[start:start + options.batch_size]
        images = torch.stack([dataset[i][0] for i in indices])
        values.append(dequantized_terms(objective, images, indices, options.n_dequant)["bpd"])
        bar.update(len(indices))
    bar.close()
    bpd = np.concatenate(values)
    if cache is not None:
        _cache_typical_set(cache, entries, key, bpd)
    return bpd


def _cached_bpd(entries: list[dict], key: dict, ignoring: str = "") -> np.ndarray | None:
    """The cached typical set made under `key` (`ignoring` one of its parts), or None."""
    def made_under(entry: dict) -> bool:
        return {k: v for k, v in entry["key"].items() if k != ignoring} == key

    hit = next((entry for entry in entries if made_under(entry)), None)
    return None if hit is None else np.asarray(hit["bpd"], float)


def _cache_typical_set(cache: Path, entries: list[dict], key: dict, bpd: np.ndarray) -> None:
    """Keep the newest typical set first, with up to TRAIN_CACHE_ENTRIES - 1 others."""
    newest = {"key": key, "entropy_bpd": float(bpd.mean()), "bpd": bpd.tolist()}
    kept = [newest] + [entry for entry in entries if entry["key"] != key][:TRAIN_CACHE_ENTRIES - 1]
    text = json.dumps({"entries": kept})
    try:
        atomic_write(cache, lambda f: f.write(text.encode()), durable=False)
    except OSError as e:  # a read-only run directory: score on, computing the typical set again next time
        tqdm.write(f"warning: cannot cache the typical set in {cache} ({e.strerror or e}); "
                   "it is computed again on every score", file=sys.stderr)


def _warn_if_changed(loaded: LoadedRun, split: str, dataset) -> None:
    """eval's warning when a split of the run's own data holds other files than the run recorded (one line, once,
    however many of score's sets read that split)."""
    if changed := run_data_changed_warning(loaded.run_dir, split, dataset):
        warnings.warn(changed.removeprefix("warning: "), stacklevel=2)


def _cached_typical_sets(cache: Path | None) -> list[dict]:
    """The typical sets kept in the run, newest first (a file of one, as written before, or none when missing or
    damaged: recomputed)."""
    stored = read_json(cache) if cache is not None else None
    if not isinstance(stored, dict):
        return []
    entries = stored.get("entries", [stored])
    return [entry for entry in entries if isinstance(entry, dict) and "key" in entry and "bpd" in entry]


# --- the command ---------------------------------------------------------------------------------


def _stream(image_set: ImageSet, scorer: Scorer, writer, options: ScoreOptions) -> dict[str, np.ndarray]:
    """Score a set batch by batch, writing its CSV rows as they come; returns every score's values."""
    columns: dict[str, list[np.ndarray]] = {}
    bar = tqdm(total=len(image_set.names), desc=f"scoring {image_set.role}", unit="img",
               disable=not options.progress)
    done = 0
    for indices, noise_keys, images in image_set.batches(options.batch_size):
        scores = scorer(images, noise_keys)
        if writer.fieldnames is None:
            writer.fieldnames = ["set", "path", *scores]
            writer.writeheader()
        for row, index in enumerate(indices):
            writer.writerow({"set": image_set.role, "path": image_set.names[index],
                             **{name: f"{values[row]:.6f}" for name, values in scores.items()}})
        for name, values in scores.items():
            columns.setdefault(name, []).append(values)
        bar.update(indices[-1] + 1 - done)
        done = indices[-1] + 1
    bar.close()
    if not columns:  # the skip warnings are printed with the results, so the first reason goes in the error
        raise UserError(f"none of the {len(image_set.names)} {image_set.role} could be read"
                        f"{_first_skipped(image_set.skipped)}; nothing to score")
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def _first_skipped(skipped: list[tuple[str, str]]) -> str:
    """' (a.png: why; 3 more)' for the files skipped, or '' when none were."""
    if not skipped:
        return ""
    more = f"; {len(skipped) - 1:,} more" if len(skipped) > 1 else ""
    return f" ({skipped[0][0]}: {skipped[0][1]}{more})"


def _mean_stderr(values: np.ndarray) -> dict[str, float | None]:
    stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None  # none from one image
    return {"mean": float(values.mean()), "stderr": stderr}


def earlier_score(out_dir: Path) -> list[Path]:
    """The summary.json an earlier score wrote in out_dir and the histograms it lists (its scores.csv is replaced
    whole); files of the same names that no score wrote are not counted, and never removed."""
    summary = read_json(out_dir / "summary.json")
    if summary is None or not isinstance(summary.get("files"), dict):
        return []
    histograms = summary["files"].get("histograms", {})
    names = {"summary.json", *(Path(path).name for path in (histograms.values() if isinstance(histograms, dict)
                                                              else []))}
    return sorted(out_dir / name for name in names if (out_dir / name).is_file())


def _refuse_to_overwrite(out_dir: Path, options: ScoreOptions) -> None:
    replaced = [out_dir / name for name in ("scores.csv", "summary.json") if (out_dir / name).exists()]
    if replaced and not options.overwrite:
        raise UserError(f"{out_dir} holds an earlier score (scores.csv, summary.json): give this one its own "
                        "--out DIR, or pass --overwrite to replace it")


def _write_outputs(out_dir: Path, scores: dict[str, dict[str, np.ndarray]], summary: dict) -> dict[str, str]:
    """summary.json and a histogram PNG per score (overlaid when there are two sets); returns what was written."""
    for stale in earlier_score(out_dir):  # only with --overwrite: no histogram of the earlier score stays behind
        stale.unlink()
    written = {}
    for name in scores["images"]:
        picture = histogram_picture({role: values[name] for role, values in scores.items()}, name)
        written[name] = str(save_image(picture, out_dir / f"hist_{name}.png"))
    summary["files"] = {"csv": str(out_dir / "scores.csv"), "summary": str(out_dir / "summary.json"),
                        "histograms": written}
    text = json.dumps(strict_json(summary), indent=2) + "\n"
    atomic_write(out_dir / "summary.json", lambda f: f.write(text.encode()), durable=False)
    return written


def _score_into_csv(sets: list[ImageSet], scorer: Scorer, out_dir: Path, options: ScoreOptions) -> dict:
    """Each set's scores by name, streamed into out_dir/scores.csv, which appears only once complete."""
    partial = out_dir / "scores.csv.partial"
    try:
        # surrogateescape: a file name that is not UTF-8 is written as its own bytes, so it names the file.
        with open(partial, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=None)
            scores = {image_set.role: _stream(image_set, scorer, writer, options) for image_set in sets}
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out_dir / "scores.csv")
    return scores


def score_sets(loaded: LoadedRun, sets: list[ImageSet], out_dir: Path, options: ScoreOptions,
               use_ema: bool = True, reference: LoadedRun | None = None) -> dict:
    """Score every set into out_dir/scores.csv (streamed), then summary.json, histograms and OOD metrics."""
    options.check()
    check_writable(out_dir, "the output folder", "another --out")
    _refuse_to_overwrite(out_dir, options)
    if reference is not None and reference.model.image_shape != loaded.model.image_shape:
        raise UserError(f"--reference-run takes {reference.model.image_shape} images but the run takes "
                        f"{loaded.model.image_shape}; train the reference at the same size and channels")
    if reference is not None and reference.checkpoint.resolve() == loaded.checkpoint.resolve():
        warnings.warn("--reference-run is the scored checkpoint itself: its likelihood ratio is 0 for every image "
                      "(pass a run trained on other data, or a smaller model)", stacklevel=2)
    if reference is not None and reference.cfg.data.n_bits != loaded.cfg.data.n_bits:
        bits = loaded.cfg.data.n_bits  # bits/dim of other quantisations differ by about their n_bits alone
        raise UserError(f"--reference-run models {reference.cfg.data.n_bits}-bit pixels but the run {bits}-bit: "
                        f"their bits/dim do not compare; train the reference with data.n_bits={bits}")
    try:
        train_bpd = training_bpd(loaded, use_ema, options)
    except UserError as e:
        reason = e.for_run() if isinstance(e, MissingData) else str(e)
        if options.batch_test:
            raise UserError(f"--batch-test needs the training split to estimate the typical set: {reason}") from None
        tqdm.write(f"warning: no typicality score: the training split cannot be read here ({reason})",
                   file=sys.stderr)
        train_bpd = None
    entropy = float(train_bpd.mean()) if train_bpd is not None else None
    scorer = Scorer(loaded, options.n_dequant, entropy, reference)
    made = missing_folders(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        scores = _score_into_csv(sets, scorer, out_dir, options)
    except BaseException:
        remove_if_empty(made)  # a score that failed leaves no empty --out behind
        raise
    # Which weights scored: a run trained without EMA (train.ema_decay=0) has only the raw ones.
    summary = {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "ema": loaded.used_ema,
               "n_dequant": options.n_dequant, "entropy_bpd": entropy, "sets": {}}
    if reference is not None:
        summary["reference"] = {"checkpoint": str(reference.checkpoint), "step": reference.step,
                                "ema": reference.used_ema}
    for image_set in sets:
        values = scores[image_set.role]
        hidden_folders, other_files = ignored_counts(image_set.not_read)
        summary["sets"][image_set.role] = {"source": image_set.source, "n_images": len(values["bpd"]),
                                           "skipped": image_set.skipped,
                                           "n_nan": {name: int(np.isnan(v).sum()) for name, v in values.items()
                                                     if name in _LIKELIHOODS},
                                           "converted": dict(image_set.converted.most_common()),
                                           "not_read": {"hidden_folders": hidden_folders, "other_files": other_files},
                                           "scores": {n: _mean_stderr(v) for n, v in values.items()}}
    if "against" in scores:
        inliers, outliers = scores["images"], scores["against"]
        summary["ood"] = {name: {"higher_is_ood": ood_metrics(inliers[name], outliers[name]),
                                 "lower_is_ood": ood_metrics(-inliers[name], -outliers[name])}
                          for name in inliers}
    if options.batch_test:
        summary["batch_test"] = {role: typicality_test(values["bpd"], train_bpd, options.n_bootstrap)
                                 for role, values in scores.items()}
    _write_outputs(out_dir, scores, summary)
    return summary


def default_out_dir(loaded: LoadedRun) -> Path:
    return (loaded.run_dir or loaded.checkpoint.parent) / "score"


def ood_table(summary: dict) -> str:
    """The OOD metrics of every score in both directions, as a fixed-width text table."""
    header = f"{'score':<22} {'OOD when':<8} {'AUROC':>7} {'AUPR-in':>8} {'AUPR-out':>9} {'FPR@95':>7}"
    lines = [header, "-" * len(header)]
    for name, directions in summary["ood"].items():
        for direction, label in (("higher_is_ood", "higher"), ("lower_is_ood", "lower")):
            auroc, aupr_in, aupr_out, fpr = (_figure(directions[direction][key]) for key in OOD_METRICS)
            lines.append(f"{name:<22} {label:<8} {auroc:>7} {aupr_in:>8} {aupr_out:>9} {fpr:>7}")
    return "\n".join(lines)


# The scores a model computes, which a diverged one leaves NaN (the others follow from them): whose they are, and
# which results then have no value.
_LIKELIHOODS = {"bpd": ("the model's", "the OOD metrics and typicality test"),
                "reference_bpd": ("the reference run's", "the reference_bpd and ratio OOD metrics")}


def _scored_with(summary: dict) -> str:
    """The line that says which model scored (and, for the likelihood ratio, against which)."""
    def described(part: dict) -> str:
        return f"{part['checkpoint']} at step {part['step']:,} ({'EMA' if part['ema'] else 'raw'} weights)"

    line = f"model: {described(summary)}"
    return line + (f"; reference: {described(summary['reference'])}" if "reference" in summary else "")


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def score_command(loaded: LoadedRun, images: list[str], dataset: str | None, split: str | None, against: list[str],
                  reference: LoadedRun | None, out: str | None, options: ScoreOptions, use_ema: bool = True) -> dict:
    """`glowtrain score`: resolve the sets (--images or --dataset, and --against), then score_sets."""
    options.check()
    if bool(images) == bool(dataset):
        raise UserError("give the images to score with --images DIR_OR_FILE (repeatable) or --dataset NAME, "
                        "not both and not neither")
    if images and split not in (None, "test"):  # it would be ignored: the files are scored as they are
        raise UserError("--split chooses a split of --dataset; --images are scored as given — leave out --split")
    if options.n_bootstrap != ScoreOptions.n_bootstrap and not options.batch_test:
        warnings.warn(f"--n-bootstrap {options.n_bootstrap} has no effect without --batch-test", stacklevel=2)
    if dataset:
        sets = [dataset_set("images", dataset, split or "test", loaded)]
    else:
        sets = [file_set("images", images, loaded, options.on_bad_image)]
    if against:
        sets.append(file_set("against", against, loaded, options.on_bad_image))
        if not dataset:
            warn_of_shared_files(sets[0].names, sets[1].names)
    out_dir = Path(out) if out else default_out_dir(loaded)
    if loaded.run_dir is not None and out_dir.resolve() == Path(loaded.run_dir).resolve():
        raise UserError(f"--out {out} is the run directory, where the scores would lie among the run's own files — "
                        "leave out --out (the default is <run>/score) or name a folder of their own")
    _refuse_another_runs_folder(out_dir)
    for given in [*images, *against]:  # its histograms (PNG) would be among the images the next score reads
        refuse_output_among_images(out_dir, given, "the image folder given to score")
    refuse_output_among_training_images(out_dir, loaded.cfg.data)
    return score_sets(loaded, sets, out_dir, options, use_ema, reference)


def _refuse_another_runs_folder(out_dir: Path) -> None:
    """Scores among another run's files (its directory, or its checkpoints/, samples/ or tb/) would be taken for
    that run's."""
    what = "a run directory" if RunDir(out_dir).is_run() else "a run's folder" if run_folder_holding(out_dir) else ""
    if what:
        raise UserError(f"--out {out_dir} is {what}, where the scores would lie among that run's own files — leave "
                        "out --out (the default is the scored run's score folder) or name a folder of their own")


def report(summary: dict) -> tuple[list[str], list[str]]:
    """(lines for stdout: the model, each set's bpd, the OOD table, batch tests, files written; lines for stderr:
    skips)."""
    lines, warnings = [_scored_with(summary)] if "checkpoint" in summary else [], []
    for role, part in summary["sets"].items():
        warnings += [f"warning: skipped unreadable image {path} ({reason})" for path, reason in part["skipped"]]
        bpd = part["scores"]["bpd"]
        n, not_read = part["n_images"], part["not_read"]
        for name, count in part.get("n_nan", {}).items():
            if not count:
                continue
            whose, what = _LIKELIHOODS[name]
            warnings.append(f"warning: {count:,} of {n:,} images in the {role} set have a {name} of NaN ({whose} "
                            f"likelihood broke down there: a diverged checkpoint?); {what} that would count them "
                            "are n/a")
        ignored = describe_ignored(not_read["hidden_folders"], not_read["other_files"])
        converted = ", ".join(f"{count:,} {what}" for what, count in part.get("converted", {}).items())
        lines.append(f"{role}: {n:,} image{'s' * (n != 1)}{ignored}, bpd {mean_text(bpd['mean'], bpd['stderr'])}"
                     + (f"; converted to the run's images: {converted}" if converted else ""))
    if "ood" in summary:
        n_in, n_out = (summary["sets"][role]["n_images"] for role in ("images", "against"))
        lines.append(f"out-of-distribution metrics from {n_in:,} --images and {n_out:,} --against image"
                     f"{'s' * (n_out != 1)}:")  # a figure from a handful of images is a rough one
        lines.append(ood_table(summary))
    for role, test in summary.get("batch_test", {}).items():
        if test["p_value"] is None:
            why = ("a bits/dim is NaN" if test["entropy_bpd"] is not None else
                   "the training split's mean bits/dim, H, is not finite")
            lines.append(f"typicality test, {role} as a whole: n/a ({why})")
            continue
        lines.append(f"typicality test, {role} as a whole: |mean bpd - H| = {test['statistic']:.4f}, "
                     f"p = {test['p_value']:.4g} ({test['n_bootstrap']} bootstrap draws)")
    files = summary["files"]
    return lines + [files["csv"], files["summary"], *files["histograms"].values()], warnings
