"""`glowtrain prepare`: decode a dataset's two splits once into a uint8 cache directory that runs train from.

The cache is a directory: index.json, {split}.npy uint8 (N, C, H, W), {split}_labels.npy int64 (N,); data.py reads it
(`data.cache`) and refuses one whose recorded content keys differ from the config's."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glowtrain.data import (
    CACHE_FORMAT,
    ImageFiles,
    build_uncached,
    data_summary,
    image_shape,
    refuse_misplaced_celeba_layout,
    skipped_warning,
)
from glowtrain.errors import UserError
from glowtrain.folders import fingerprint_differs, is_prepared_cache, prepared_index
from glowtrain.loaders import make_eval_batches

if TYPE_CHECKING:
    from glowtrain.config import DataConfig


def prepare_cache(data_cfg: DataConfig, out_path: str, progress: bool = True, overwrite: bool = False) -> dict:
    """Decode both splits once into a uint8 cache directory at out_path; returns its index.

    The cache is built in a hidden folder beside out_path and swapped in only when complete, so a
    failed or interrupted prepare leaves an existing cache exactly as it was. An existing cache of
    other settings (which runs may train from) is replaced only with `overwrite`."""
    shape = image_shape(data_cfg)
    out = Path(os.path.abspath(Path(out_path).expanduser()))  # '.' and '..' have no name to build beside
    _check_cache_target(out)
    refuse_misplaced_celeba_layout(replace(data_cfg, cache=""))  # prepare reads the images whatever data.cache says
    if not overwrite:
        _refuse_other_settings(out, data_cfg)
    # Both splits are found (and the config checked) before anything is written.
    splits = {split: build_uncached(data_cfg, split) for split in ("train", "test")}
    index = {"format": CACHE_FORMAT, "dataset": data_cfg.dataset, "summary": data_summary(data_cfg, *splits.values()),
             "warning": skipped_warning(*splits.values()),
             "root": str(Path(data_cfg.root).expanduser().resolve()), "image_size": shape[1],
             "channels": shape[0], "image_shape": list(shape), "n_classes": splits["train"].n_classes, "splits": {},
             "fingerprints": {split: ds.report.fingerprint for split, ds in splits.items()},
             "class_names": getattr(splits["train"], "class_names", None),  # labels' meaning, for runs to check
             # What the data line says of the files, so a run from the cache says what prepare said.
             "reports": {split: {"skipped": [list(pair) for pair in ds.report.skipped],  # as JSON gives it back
                                 "conversions": dict(ds.report.conversions), "ignored": list(ds.report.ignored)}
                         for split, ds in splits.items()},
             "keys": _content_keys(data_cfg, *splits.values())}
    if isinstance(splits["train"], ImageFiles):  # runs trained from the cache record it (training_crop)
        index["crop"] = splits["train"].crop
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        building.mkdir()
        for split, ds in splits.items():
            index["splits"][split] = _write_split(ds, building, split, shape, data_cfg.n_workers, progress)
        (building / "index.json").write_text(json.dumps(index, indent=2) + "\n")  # marks a complete cache
        _swap_in(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return index


def replaced_note(out: str | Path, before: dict | None, index: dict) -> str | None:
    """What a prepare that replaced a cache (`before`: its index) with one of other images (`index`) says: runs that
    trained from it now read these (a cache whose own folder is gone is not refused, as the folder may have
    moved: see _refuse_other_settings)."""
    old = (before or {}).get("fingerprints") or {}
    if not any(fingerprint_differs(old.get(split), index["fingerprints"].get(split)) for split in old):
        return None
    n_images = sum(n for n in (before.get("splits") or {}).values() if isinstance(n, int))
    return (f"note: {out} held a cache of {n_images:,} other images (prepared from {before.get('root')}); runs that "
            "trained from it now read these")


def _content_keys(data_cfg, train, test) -> dict:
    """The data.* keys besides the dataset and image shape that decide which images a cache holds (not data.root:
    a cache often moves to a machine whose images live elsewhere, or nowhere; not n_bits: it holds 8 bits)."""
    names = []
    if getattr(train, "split_scheme", None):  # a folder split by path hash
        names += ["test_fraction", "split_seed", "labels"]
    if train.report.skipped or test.report.skipped:  # with data.on_bad_image: error they would have stopped it
        names.append("on_bad_image")
    return {name: getattr(data_cfg, name) for name in names}


def _refuse_other_settings(out: Path, data_cfg) -> None:
    """Refuse to replace a cache prepared with other settings: runs that train from it would then fail (or, at the
    same shape, train on other images). Preparing again with the same settings (new images) replaces it."""
    index = prepared_index(out)
    if index is None:
        return
    recorded = {"dataset": index.get("dataset"), "image_shape": list(index.get("image_shape", [])),
                **{f"data.{name}": value for name, value in index.get("keys", {}).items()}}
    current = {"dataset": data_cfg.dataset, "image_shape": list(image_shape(data_cfg)),
               **{f"data.{name}": getattr(data_cfg, name) for name in index.get("keys", {})}}
    differ = [f"{key} {recorded[key]}, not {current[key]}" for key in recorded if recorded[key] != current[key]]
    # Another image folder is other images too, when the one it came from is still here (a folder that is gone was
    # moved, and preparing from where it is now is the same images). A torchvision set is the same anywhere.
    source, root = index.get("root"), str(Path(data_cfg.root).expanduser().resolve())
    other_folder = isinstance(source, str) and source != root and Path(source).is_dir()
    if data_cfg.reads_image_files and other_folder:
        differ.append(f"images from {source}, not {root}")
    if differ:
        raise UserError(f"{out} holds a cache of other settings ({'; '.join(differ)}) that runs may train from — "
                        "choose another --out, or pass --overwrite to replace it")


def _check_cache_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write a cache to {out}: it is a file — choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_prepared_cache(out):
        what = "an index.json that is not a cache's" if (out / "index.json").exists() else "no index.json"
        raise UserError(f"{out} holds files but no glowtrain cache ({what}); choose another --out "
                        "so that nothing of yours is replaced")


def _write_split(ds, folder: Path, split: str, shape: tuple[int, int, int], n_workers: int, progress: bool) -> int:
    from tqdm import tqdm

    n = len(ds)
    images = np.lib.format.open_memmap(folder / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(n, *shape))
    labels = np.empty(n, dtype=np.int64)
    start = 0
    bar = tqdm(total=n, desc=f"caching {split}", unit="img", disable=not progress)
    for x, y in make_eval_batches(ds, 256, n_workers=n_workers):
        images[start:start + len(x)] = x.numpy()
        labels[start:start + len(x)] = y.numpy()
        start += len(x)
        bar.update(len(x))
    bar.close()
    images.flush()
    del images
    np.save(folder / f"{split}_labels.npy", labels)
    return n


def _swap_in(building: Path, out: Path) -> None:
    """Replace out by the complete cache at building: the old cache is moved aside, anything else the folder
    held (notes, a .DS_Store) moves into the new one, and only the old cache's own files are removed."""
    if not out.exists():
        os.replace(building, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(building, out)
    except OSError:
        os.replace(old, out)  # put the previous cache back before reporting the failure
        raise
    own = {entry.name for entry in out.iterdir()}
    for entry in old.iterdir():
        if entry.name not in own:
            os.replace(entry, out / entry.name)
    for name in own:
        (old / name).unlink(missing_ok=True)
    old.rmdir()
