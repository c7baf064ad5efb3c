"""Datasets: the bundled digits, torchvision sets, image folders and CelebA, and prepared uint8 caches (cache.py
writes them); how an image is read and preprocessed as training reads it; the one-line description of a run's data."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from glowtrain.config import CHANNEL_CHOICES, FIXED_CHANNELS
from glowtrain.config import Dataset as DatasetName
from glowtrain.errors import MissingData, UserError
from glowtrain.files import missing_folders, read_json, remove_if_empty
from glowtrain.folders import (
    CELEBA_IMAGES,
    CELEBA_PARTITION,
    PIL_DECODE_ERRORS,
    SPLIT_SCHEME,
    WIDE_GREY_MODES,
    check_images,
    describe_ignored,
    find_images,
    fingerprint,
    fingerprint_differs,
    header_conversions,
    ignored_counts,
    is_celeba_layout,
    is_prepared_cache,
    opened_image_conversions,
    relative,
    split_paths,
    unreadable_error,
    unsupported_mode,
)
from glowtrain.runs import recorded_data_of

if TYPE_CHECKING:
    from glowtrain.config import DataConfig

DATASETS = get_args(DatasetName)
DIGITS_N_TRAIN = 1500
DIGITS_SPLIT_SEED = 1234  # fixed so the digits test set never depends on run.seed
CELEBA_CROP = 148  # centre crop of the 178x218 aligned faces, as in RealNVP and Glow
CACHE_FORMAT = 1
SPLITS = ("train", "test")

# name -> (torchvision class, folder under root where its files must be, native side)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", 28),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", 28),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 32),
}
# What the labels of the built-in sets mean (torchvision's `classes`), so commands take --class cat as well as 3.
# Digits and MNIST are left out: their names are their numbers.
BUILTIN_CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def image_shape(data_cfg: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of the images `build_dataset` yields, without touching disk."""
    name, size = _check_name(data_cfg), int(data_cfg.image_size)
    if name == "digits":
        if size != 8:
            raise UserError(f"the digits dataset is 8x8 but data.image_size is {size}; set data.image_size: 8")
        return (1, 8, 8)
    if size < 1:
        raise UserError(f"data.image_size must be positive, got {size}")
    channels = FIXED_CHANNELS.get(name, data_cfg.channels)
    if channels not in CHANNEL_CHOICES:
        raise UserError(f"data.channels must be 1 or 3, got {data_cfg.channels!r}")
    return (int(channels), size, size)


def n_classes(data_cfg: DataConfig) -> int | None:
    """Number of class labels (0 when the dataset is unlabelled), without touching disk; None when only the
    files can tell (a folder labelled by its subfolders)."""
    _check_name(data_cfg)
    if data_cfg.reads_image_files:
        return None if data_cfg.labels == "subfolders" else 0
    return 10


def _check_name(data_cfg: DataConfig) -> str:
    if data_cfg.dataset not in DATASETS:
        raise UserError(f"unknown data.dataset {data_cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    return data_cfg.dataset


@dataclass
class SplitReport:
    """What building a split found: its fingerprint, the files found and skipped, the conversions applied."""

    fingerprint: dict = field(default_factory=dict)
    n_found: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    conversions: Counter = field(default_factory=Counter)
    check_records: dict = field(default_factory=dict)  # per file: what the check found (kept in the run)
    ignored: tuple[int, int] = (0, 0)  # (hidden folders, other files) in the folder that are not read


class TensorImages(Dataset):
    """Images held as one uint8 tensor (N, C, H, W) (in memory or memory-mapped) with int64 labels."""

    def __init__(self, images: Tensor, labels: Tensor | None = None, n_classes: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = torch.full((len(images),), -1, dtype=torch.int64) if labels is None else labels.long()
        self.image_shape = tuple(images.shape[1:])
        self.n_classes = n_classes
        self.report = SplitReport({"n_images": len(images), "digest": None}, len(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(images uint8 (B, C, H, W), labels int64 (B,)) in one gather: no per-item Python."""
        return self.images[indices], self.labels[indices]


class ImageFiles(Dataset):
    """Image files (checked when the split was built) decoded lazily with PIL: centre-cropped, resized to a
    square; labels -1, or the class of each file's first-level subfolder."""

    def __init__(self, paths: list[str], image_size: int, channels: int, crop: int | None = None,
                 labels: list[int] | None = None, n_classes: int = 0):
        self.paths, self.image_size, self.channels = paths, image_size, channels
        self.crop = crop  # None: the largest centred square
        self.image_shape = (channels, image_size, image_size)
        self.labels = labels if labels is not None else [-1] * len(paths)
        self.n_classes = n_classes
        self.report = SplitReport()

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn get a pickled copy: they need the files, not the check's records.
        return {**self.__dict__, "report": SplitReport()}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        try:
            return self._decode(self.paths[i]), self.labels[i]
        except PIL_DECODE_ERRORS as e:
            # Every file was read when the split was built: this one changed since.
            raise UserError(f"cannot read image {self.paths[i]} ({e}); it was readable when training started — "
                            "fix or restore it and resume") from None

    def _decode(self, path: str) -> Tensor:
        return square_image(read_image(path, self.channels), self.image_size, self.crop)


def read_image(source: str | Path | Image.Image, channels: int) -> Image.Image:
    """A file or PIL image, upright (EXIF rotation applied), in greyscale (channels 1) or RGB (3); 16-bit
    greyscale scaled to 8 bits."""
    if isinstance(source, Image.Image):
        return _normalised(source, channels)
    with Image.open(source) as img:
        return _normalised(img, channels)


def _normalised(img: Image.Image, channels: int) -> Image.Image:
    problem = unsupported_mode(img.mode)
    if problem:  # a decode error like any other: refused, or skipped under on_bad_image: skip
        raise ValueError(problem)
    img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
    return _to_8_bits(img).convert("RGB" if channels == 3 else "L")


def _to_8_bits(img: Image.Image) -> Image.Image:
    """16-bit greyscale as 8 bits: 0..65535 scaled to 0..255 with rounding (Pillow's own convert("L") clips
    everything above 255 to white). Pillow's 32-bit mode "I" holds either (older Pillow opens 16-bit PNGs
    in it, and 8-bit values arrive in it from Python): it is scaled only when a value exceeds 255, and clipped
    to 0..65535 first."""
    if img.mode not in WIDE_GREY_MODES:
        return img
    wide = np.asarray(img).astype(np.int64)
    if img.mode == "I" and wide.max(initial=0) <= 255:
        return img  # 8-bit values: convert() keeps them as they are
    wide = np.clip(wide, 0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))


def square_image(img: Image.Image, image_size: int | None, crop: int | None = None) -> Tensor:
    """Centre square (side `crop`, or the largest when None), bicubic-resized to image_size (None: kept):
    uint8 (C, H, W)."""
    w, h = img.size
    side = min(w, h) if crop is None else min(crop, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if image_size is not None and side != image_size:
        img = img.resize((image_size, image_size), Image.BICUBIC, reducing_gap=None)
    array = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, 3)
    if array.ndim == 2:
        return torch.from_numpy(array.copy()).unsqueeze(0)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # (3, H, W)


def preprocess_image(source: str | Path | Image.Image, data_cfg: DataConfig, crop: int | None = None) -> Tensor:
    """One image -> uint8 (C, H, W) as training reads this dataset's images: channels, crop and resize.

    Built-in sets: an image already at data.image_size (a sample of the run itself, say) as it is; any other
    size, the largest centred square at the set's native size (resized with antialiasing if needed), then the
    set's own path to data.image_size (MNIST's zero border, ...). Folders and CelebA: as ImageFiles, with the
    centre crop training used (`training_crop`; None: the largest square)."""
    channels, size, _ = image_shape(data_cfg)
    img = read_image(source, channels)
    name = data_cfg.dataset
    if name == "digits" or name in _TORCHVISION:
        if img.size == (size, size):
            return square_image(img, None)
        native = _native_side(name)
        square = square_image(img, None)
        if square.shape[-1] != native:
            square = _resize(square[None], native)[0]
        return _to_image_size(square[None], native, size)[0]
    return square_image(img, size, crop)


def _preprocessing_done(img: Image.Image, header: list[str], data_cfg: DataConfig, crop: int | None) -> list[str]:
    """What preprocess_image did to an image (`header`: header_conversions of it before it was loaded), in the
    words of a run's data line."""
    channels, size, _ = image_shape(data_cfg)
    name = data_cfg.dataset
    if (name != "digits" and name not in _TORCHVISION) or img.size == (size, size):
        return opened_image_conversions(img, header, channels, size, crop)
    native = _native_side(name)
    done = opened_image_conversions(img, header, channels, native, None)  # to the set's own square, then its way
    if size != native:
        done.append(_to_image_size_words(native, size))
    return done


def _native_side(name: str) -> int:
    """A built-in set's own image side: 8 for the digits, 28 for MNIST's, 32 for CIFAR-10."""
    return 8 if name == "digits" else _TORCHVISION[name][2]


def _to_image_size_words(native: int, size: int) -> str:
    """What _to_image_size does to a built-in set's images, in the words of a run's data line."""
    return f"{'zero-padded' if (native, size) == (28, 32) else 'resized'} {native}→{size}"


def relocated(data_cfg: DataConfig, where: str, run_dir: str | Path | None = None) -> DataConfig:
    """The run's data found at `where` on this machine (the stored paths say where it was trained): a prepared
    cache (a folder holding index.json), or what data.root names (an image folder or a dataset root). For a run
    trained on CelebA's official layout (its data.json says so), the folder holding that layout does too: read as
    data.root, it would be a plain folder, another split and crop."""
    path = Path(where).expanduser().absolute()
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "no such folder"
        raise UserError(f"--data {where}: {what} — pass the folder holding the run's images, its dataset root, or "
                        "its prepared cache")
    if is_prepared_cache(path):  # not any index.json: an image folder may hold one of the user's
        return replace(data_cfg, cache=str(path))
    if data_cfg.dataset == "digits":  # data.root means nothing to it: taking the folder would silently ignore it
        raise UserError(f"--data {where}: this run trained on the bundled digits, which are read from the package — "
                        "leave out --data (or pass a cache made by glowtrain prepare)")
    if (training_crop(data_cfg, run_dir) == CELEBA_CROP and is_celeba_layout(path)
            and not is_celeba_layout(path / "celeba")):
        path = path.parent
    return replace(data_cfg, root=str(path), cache="")


def training_crop(data_cfg: DataConfig, run_dir: str | Path | None) -> int | None:
    """The centre crop a run's training images had: from its data.json, else from what data.root holds now
    (CelebA's official layout is cropped to 148 pixels; any other folder to its largest square)."""
    if data_cfg.dataset != "celeba":
        return None
    recorded = recorded_data_of(run_dir)
    if recorded and "crop" in recorded:
        return recorded["crop"]
    return CELEBA_CROP if _celeba_official_root(data_cfg) else None


def read_images(paths: Iterable[str], data_cfg: DataConfig, on_bad_image: str, skipped: list[tuple[str, str]],
                fix: str = "set data.on_bad_image: skip", crop: int | None = None,
                converted: Counter | None = None) -> Iterator[Tensor | None]:
    """preprocess_image of each path in turn; an unreadable file raises a UserError naming `fix`, or with
    on_bad_image 'skip' yields None and is added to `skipped` as (path, reason). `converted` counts what was done
    to the images to give them the training shape, as a run's data line does (resized, colour→grey, ...)."""
    for path in paths:
        try:
            with Image.open(path) as img:
                header = header_conversions(img)  # before the load empties the image's tiles
                image = preprocess_image(img, data_cfg, crop)
                if converted is not None:
                    converted.update(_preprocessing_done(img, header, data_cfg, crop))
            yield image
        except PIL_DECODE_ERRORS as e:
            if on_bad_image != "skip":
                raise UserError(f"cannot read image {path} ({e}); fix or remove it, or {fix}") from None
            skipped.append((str(path), str(e)))
            yield None


def build_dataset(data_cfg: DataConfig, split: str, checked: dict | None = None) -> Dataset:
    """The train or test split of the configured dataset; items are (uint8 (C, H, W), int label).

    Image files are all checked here, before any training: `checked` is what an earlier check found
    (a run's data_check.json), so unchanged files are not read twice. The dataset's `report` says what
    was found, skipped and converted."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data_cfg.cache:
        return _load_cache(data_cfg, split)
    return build_uncached(data_cfg, split, checked)


def build_uncached(data_cfg, split: str, checked: dict | None = None) -> Dataset:
    shape = image_shape(data_cfg)  # validates the name and sizes first
    name = data_cfg.dataset
    if name == "digits":
        return _digits(split)
    if name in _TORCHVISION:
        return _torchvision_set(data_cfg, split, shape)
    ignored = []
    base, chosen, every = _image_files(data_cfg, split, ignored)
    if every is None:  # CelebA in torchvision's layout: its own split, its own crop
        _refuse_none_there(base, split, chosen)
        other = functools.partial(_celeba_official, base, "test" if split == "train" else "train")
        return _checked_files(data_cfg, split, base, chosen, CELEBA_CROP, checked, other)
    labels, class_names = _subfolder_labels(base, every) if data_cfg.labels == "subfolders" else (None, [])
    dataset = _checked_files(data_cfg, split, base, chosen, None, checked, lambda: sorted(set(every) - set(chosen)))
    dataset.report.ignored = ignored_counts(ignored)
    dataset.split_scheme = SPLIT_SCHEME
    if labels is not None:
        dataset.labels, dataset.n_classes = [labels[p] for p in dataset.paths], len(class_names)
        dataset.class_names = class_names
    return dataset


def _image_files(data_cfg, split: str, ignored: list[str] | None = None) -> tuple[Path, list[str], list[str] | None]:
    """(folder, the split's files, all the dataset's files) of a folder or CelebA dataset as they are now; all
    the files are None for CelebA in torchvision's layout, which lists each split itself. What a folder holds
    besides images goes to `ignored`."""
    if data_cfg.dataset == "celeba":
        celeba = _celeba_official_root(data_cfg)
        if celeba is not None:
            return celeba, _celeba_official(celeba, split), None
    base, paths = (_celeba_folder(data_cfg.root, ignored, data_cfg.download) if data_cfg.dataset == "celeba" else
                   find_images(data_cfg.root, ignored))
    return base, split_paths(paths, base, data_cfg.test_fraction, data_cfg.split_seed, split), paths


def _cache_of_a_folder(data_cfg) -> dict | None:
    """The index.json of data.cache when the cache was prepared from an image folder (None otherwise)."""
    index = read_json(Path(data_cfg.cache).expanduser() / "index.json") if data_cfg.cache else None
    if not index or not index.get("root") or data_cfg.dataset in _TORCHVISION or data_cfg.dataset == "digits":
        return None
    return index


def unread_root_warning(data_cfg) -> str | None:
    """For data.cache: a warning when data.root names an image folder other than the one the cache was prepared
    from. Training reads the cache alone, and a run's config.yaml keeps the data.root given."""
    if (index := _cache_of_a_folder(data_cfg)) is None:
        return None
    root = Path(data_cfg.root).expanduser()
    if not root.is_dir() or root.resolve() == Path(index["root"]).resolve():
        return None
    return (f"warning: data.root {root.absolute()} is not read: training reads the cache at {data_cfg.cache}, "
            f"prepared from {index['root']} — to train on {root.absolute()}, leave out data.cache")


def stale_cache_warning(data_cfg) -> str | None:
    """For data.cache: a warning when the image folder the cache was prepared from now holds other files (the
    cache keeps the old images); None when they match, or the folder is not on this machine."""
    if (index := _cache_of_a_folder(data_cfg)) is None:
        return None
    cache = Path(data_cfg.cache).expanduser()
    source = replace(data_cfg, root=index["root"], cache="")
    changed = []
    for split in ("train", "test"):
        try:
            base, files, _ = _image_files(source, split)
        except UserError:  # the folder is not here: a cache is often moved to where the images are not
            return None
        if fingerprint_differs(index.get("fingerprints", {}).get(split), fingerprint(files, base)):
            changed.append(split)
    if not changed:
        return None
    return (f"warning: the images under {index['root']} changed after the cache at {cache} was prepared from them "
            f"({' and '.join(changed)} split); training uses the cache's copies — prepare it again to use the new ones")


def _celeba_folder(root: str, ignored: list[str] | None = None, download: bool = False) -> tuple[Path, list[str]]:
    try:
        return find_images(root, ignored)
    except UserError:
        base = Path(root).expanduser().absolute()
        # torchvision fetches CelebA from a Google Drive that refuses most downloads (its quota)
        not_fetched = " (data.download fetches mnist, fashion_mnist and cifar10, not CelebA)" if download else ""
        raise MissingData(f"no CelebA images under {base}{not_fetched}", f"put the aligned faces in "
                          f"{base}/celeba/img_align_celeba/ with {base}/celeba/list_eval_partition.txt (torchvision's "
                          f"layout), or any folder of aligned face images in {base}") from None


def _checked_files(data_cfg, split: str, base: Path, paths: list[str], crop: int | None, checked: dict | None,
                   other_split: Callable[[], list[str]] | None = None) -> ImageFiles:
    """Check every file of a split (headers, then a decode); drop or refuse the unreadable ones. Refused, the other
    split's files (`other_split` lists them, only then) are checked too, so the count names every file to fix,
    not just this split's."""
    c, size, _ = image_shape(data_cfg)
    check = check_images(paths, base, c, size, crop, checked)
    if check.bad and data_cfg.on_bad_image != "skip":
        also = check_images(other_split(), base, c, size, crop, checked).bad if other_split else []
        raise unreadable_error(check.bad + also, base)
    if not check.good:
        path, reason = check.bad[0]
        raise UserError(f"none of the {len(paths)} images of the {split} split under {base} is readable (the first, "
                        f"{path}: {reason}); fix or replace the files")
    dataset = ImageFiles(check.good, size, c, crop)
    dataset.report = SplitReport(fingerprint(paths, base), len(paths), check.bad, check.conversions, check.records)
    return dataset


def _subfolder_labels(base: Path, paths: list[str]) -> tuple[dict[str, int], list[str]]:
    """Each file's class: the index of its first-level subfolder among all of them, sorted by name."""
    loose = [p for p in paths if "/" not in relative(p, base)]
    if loose:
        # MissingData: for a trained run, whose labels are fixed, the fix is --data (the folder it trained on).
        raise MissingData(f"data.labels: subfolders needs every image in a first-level subfolder (one per class) "
                          f"of {base}, but {loose[0]} is not", "move it or set data.labels: none")
    folder_of = {p: relative(p, base).split("/", 1)[0] for p in paths}
    names = sorted(set(folder_of.values()))
    empty = _empty_folders(base, names)
    if empty:  # left out, it would make the classes after it shift the day it gains images
        one = len(empty) == 1
        raise UserError(f"data.labels: subfolders takes each first-level folder of {base} as a class, but "
                        f"{', '.join(str(base / name) for name in empty)} {'is' if one else 'are'} empty — add images "
                        f"to {'it' if one else 'them'}, or remove {'it' if one else 'them'}")
    if len(names) < 2:
        raise UserError(f"data.labels: subfolders found {len(names)} class folder under {base}; "
                        "class-conditional training needs at least 2 (or set data.labels: none)")
    index = {name: i for i, name in enumerate(names)}
    return {p: index[folder] for p, folder in folder_of.items()}, names


def _empty_folders(base: Path, classes: list[str]) -> list[str]:
    """First-level folders besides the classes that hold no file at all: a class still to be filled. (Folders
    holding only files that are not images, such as __MACOSX, are not classes, as before.)"""
    return sorted(entry.name for entry in os.scandir(base)
                  if entry.is_dir() and entry.name not in classes and not entry.name.startswith(".")
                  and not any(files for _, _, files in os.walk(entry.path)))


def _digits(split: str) -> TensorImages:
    with resources.files("glowtrain").joinpath("assets").joinpath("digits.npz").open("rb") as f:
        arrays = np.load(io.BytesIO(f.read()))
        images, labels = arrays["images"], arrays["labels"]
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    idx = perm[:DIGITS_N_TRAIN] if split == "train" else perm[DIGITS_N_TRAIN:]
    images = torch.from_numpy(images).unsqueeze(1)[idx]  # (N, 1, 8, 8)
    return TensorImages(images, torch.from_numpy(labels)[idx], n_classes=10)


def _torchvision_set(data_cfg, split: str, shape: tuple[int, int, int]) -> TensorImages:
    import torchvision.datasets

    cls_name, folder, native = _TORCHVISION[data_cfg.dataset]
    root = os.path.abspath(os.path.expanduser(data_cfg.root))
    where = os.path.join(root, folder)
    missing = missing_folders(Path(where))
    try:
        # torchvision prints each download attempt; the outcome is said in one line here instead
        with contextlib.redirect_stdout(io.StringIO()):
            ds = getattr(torchvision.datasets, cls_name)(root, train=split == "train", download=data_cfg.download)
    except _TORCHVISION_READ_ERRORS as e:
        remove_if_empty(missing)  # a failed download leaves no empty folders behind
        raise _torchvision_problem(data_cfg, root, where, e) from None
    # Whole arrays at once: per-item PIL conversion is far slower for these small sets.
    data = ds.data if isinstance(ds.data, Tensor) else torch.from_numpy(np.asarray(ds.data))
    images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    size = shape[1]
    dataset = TensorImages(_to_image_size(images, native, size).contiguous(), labels, n_classes=10)
    if size != native:
        dataset.report.conversions[_to_image_size_words(native, size)] = len(dataset)
    return dataset


# What torchvision raises on files it cannot find, download or read: a cut-short MNIST file fails a reshape
# (RuntimeError) or an assertion on its header, an unknown type byte a lookup (KeyError), another element type a
# dtype check (TypeError); a damaged CIFAR-10 pickle fails to unpickle.
_TORCHVISION_READ_ERRORS = (RuntimeError, OSError, AssertionError, ValueError, KeyError, TypeError, EOFError,
                            pickle.UnpicklingError)


def _torchvision_files(dataset: str) -> list[tuple[str, str | None]]:
    """(file name, md5 or None) of each file torchvision reads for a built-in set, in its folder."""
    from torchvision.datasets import cifar, mnist

    cls = getattr(cifar if dataset == "cifar10" else mnist, _TORCHVISION[dataset][0])
    if dataset == "cifar10":
        return [(name, md5) for name, md5 in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]
    return [(os.path.splitext(name)[0], None) for name, _ in cls.resources]  # unpacked from the .gz it downloads


def _torchvision_problem(data_cfg, root: str, where: str, error: Exception) -> UserError:
    """What stopped torchvision, from the files in `where`: all there but unreadable, still compressed, some or all
    missing, or (with data.download) a download that failed."""
    from torchvision.datasets.utils import check_integrity

    cls_name = _TORCHVISION[data_cfg.dataset][0]
    files = _torchvision_files(data_cfg.dataset)
    absent = [name for name, _ in files if not os.path.isfile(os.path.join(where, name))]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    # torchvision's "Error downloading X:" is followed by each mirror's error: keep the heading and the last
    reason = f"{lines[0]} {lines[-1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    if not absent:
        damaged = next((name for name, md5 in files if not check_integrity(os.path.join(where, name), md5)), None)
        why = f"{damaged} is not {cls_name}'s (its checksum differs)" if damaged else reason
        if data_cfg.download and damaged:  # torchvision then downloads them again: that failed
            return UserError(f"{cls_name}'s files in {where} cannot be read ({why}), and downloading them again "
                             f"failed ({reason}) — copy them there again")
        return UserError(f"{cls_name}'s files in {where} cannot be read ({why}): cut short or damaged? — replace "
                         "them: delete them and set data.download: true, or copy them again")
    which = absent[0] + (f" and {len(absent) - 1} more" if len(absent) > 1 else "")
    if len(absent) == len(files) and not data_cfg.download:
        if any(os.path.isfile(os.path.join(where, name + ".gz")) for name in absent):
            return MissingData(f"{cls_name}'s files in {where} are still compressed (.gz)", f"unpack them (gunzip "
                               f"{where}/*.gz), or set data.download: true to have torchvision check and unpack them")
        return MissingData(f"{cls_name} not found under {root}/", "set data.download: true "
                           f"(or --set data.download=true) or put the files in {where}")
    if not data_cfg.download:
        return MissingData(f"{cls_name} in {where} is incomplete ({which} missing)", "put the missing files there, "
                           "or set data.download: true (or --set data.download=true)")
    return UserError(f"could not download {cls_name} into {root}/ ({reason}); put the files ({which}) in {where} "
                     "yourself")


def _to_image_size(images: Tensor, native: int, size: int) -> Tensor:
    """A torchvision set's uint8 (N, C, native, native) images at the training size."""
    if native == 28 and size == 32:
        return F.pad(images, (2, 2, 2, 2))  # the usual 32x32 MNIST: zero border, no resampling
    if size != native:
        return _resize(images, size)
    return images


def _resize(images: Tensor, size: int, chunk: int = 4096) -> Tensor:
    """Antialiased bilinear resize of uint8 (N, C, H, W), in chunks to bound the float copy."""
    out = [F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear",
                         antialias=True, align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
           for i in range(0, len(images), chunk)]
    return torch.cat(out)


def _celeba_official_root(data_cfg) -> Path | None:
    """<root>/celeba when it holds the official layout (images + partition file), else None."""
    celeba = Path(data_cfg.root).expanduser().absolute() / "celeba"
    return celeba if is_celeba_layout(celeba) else None


def refuse_misplaced_celeba_layout(data_cfg) -> None:
    """For a new run or cache: refuse data.root holding torchvision's CelebA layout itself, which is read from
    <data.root>/celeba/ only (a plain folder there: a random split of every image, validation's too, cropped to
    the largest square). Runs trained so already keep reading it as they did."""
    root = Path(data_cfg.root).expanduser().absolute()
    if (data_cfg.dataset != "celeba" or data_cfg.cache or _celeba_official_root(data_cfg) is not None
            or not is_celeba_layout(root)):
        return
    move = (f"set data.root={root.parent}" if root.name == "celeba" else
            f"move {CELEBA_IMAGES}/ and {CELEBA_PARTITION} into {root / 'celeba'}/")
    raise UserError(f"data.root {root} holds CelebA in torchvision's layout, which is read from <data.root>/celeba/ "
                    f"— {move} to train on the official split with the 148x148 crop, or set data.dataset=folder to "
                    "train on every image as a plain folder")


def _celeba_official(celeba: Path, split: str) -> list[str]:
    # The official partition: 0 train, 1 validation (unused), 2 test.
    wanted = "0" if split == "train" else "2"
    lines = (celeba / CELEBA_PARTITION).read_text().split("\n")
    names = [parts[0] for parts in (line.split() for line in lines) if len(parts) == 2 and parts[1] == wanted]
    if not names:
        raise UserError(f"no {split} images listed in {celeba / CELEBA_PARTITION}; "
                        "restore the file or remove it to use data.root as a plain folder")
    return [str(celeba / CELEBA_IMAGES / n) for n in sorted(names)]


def _refuse_none_there(celeba: Path, split: str, paths: list[str]) -> None:
    """None of a split's listed images in img_align_celeba: say so (the unreadable-image message advised skipping)."""
    if not any(os.path.isfile(path) for path in paths):
        raise MissingData(f"none of the {len(paths):,} {split} images {CELEBA_PARTITION} lists is in "
                          f"{celeba / CELEBA_IMAGES} (such as {Path(paths[0]).name})",
                          "put CelebA's aligned faces there (img_align_celeba.zip, unpacked)")


# The cache is a directory: index.json, {split}.npy uint8 (N, C, H, W), {split}_labels.npy int64 (N,); glowtrain
# prepare (cache.py) writes it.
def _check_content_keys(data_cfg, index: dict, cache: Path) -> None:
    """Refuse a cache prepared with other values of the keys that decide its images (one made before these
    were recorded has none, and is taken as it is)."""
    for name, recorded in index.get("keys", {}).items():
        current = getattr(data_cfg, name)
        if current != recorded:
            raise UserError(f"the cache at {cache} was prepared with data.{name}={recorded}, not {current}, and so "
                            f"holds other images; prepare it again with this config, or set data.{name}={recorded}")


def _load_cache(data_cfg, split: str) -> TensorImages:
    cache = Path(data_cfg.cache).expanduser()
    try:
        index = json.loads((cache / "index.json").read_text())
    except (OSError, ValueError):
        raise MissingData(f"no prepared cache at {cache}",
                          "run `glowtrain prepare` first or set data.cache: ''") from None
    if index.get("dataset") != data_cfg.dataset or tuple(index.get("image_shape", ())) != image_shape(data_cfg):
        fix = "prepare it again with this config"
        if len(index.get("image_shape", ())) == 3:
            channels, size, _ = index["image_shape"]
            if index.get("dataset") == data_cfg.dataset:
                fix += f", or train at its shape: data.channels={channels} data.image_size={size}"
            elif index.get("dataset") in DATASETS:  # e.g. a folder's cache given to the digits default
                fix += (f", or train on what it holds: data.dataset={index['dataset']} data.channels={channels} "
                        f"data.image_size={size}")
        raise UserError(f"the cache at {cache} holds {index.get('dataset')} at {index.get('image_shape')}, "
                        f"not {data_cfg.dataset} at {list(image_shape(data_cfg))}; {fix}")
    _check_content_keys(data_cfg, index, cache)
    images, labels = _cache_arrays(cache, split, index)
    dataset = TensorImages(torch.from_numpy(images), torch.from_numpy(labels), n_classes=index["n_classes"])
    if index.get("class_names"):
        dataset.class_names = index["class_names"]
    # The fingerprint of the files the cache was made from, so a run sees the same data either way.
    dataset.report.fingerprint = index.get("fingerprints", {}).get(split, dataset.report.fingerprint)
    report = index.get("reports", {}).get(split)
    if report:  # not in a cache made by an earlier glowtrain
        dataset.report.skipped = [tuple(pair) for pair in report["skipped"]]
        dataset.report.n_found = len(dataset) + len(dataset.report.skipped)
        dataset.report.conversions = Counter(report["conversions"])
        dataset.report.ignored = tuple(report.get("ignored", (0, 0)))
    if "crop" in index:
        dataset.crop = index["crop"]  # the centre crop its image files were read with
    return dataset


def _cache_arrays(cache: Path, split: str, index: dict) -> tuple[np.ndarray, np.ndarray]:
    """A split's images and labels, checked against what index.json says prepare wrote: a file cut short or lost
    (a copy that stopped, a full disk) is refused in one line instead of failing inside numpy."""
    n = index.get("splits", {}).get(split)
    expected = {f"{split}.npy": (n, *index["image_shape"]), f"{split}_labels.npy": (n,)}
    arrays = []
    for name, shape in expected.items():
        try:
            # Copy-on-write mapping: pages load on demand and torch gets a writable array (no warning).
            array = np.load(cache / name, mmap_mode="c" if name == f"{split}.npy" else None)
            problem = None if n is None or array.shape == shape else f"holds {array.shape}, not {shape}"
        except (OSError, ValueError, EOFError) as e:
            array, problem = None, ("is missing" if not (cache / name).exists() else f"cannot be read ({e})")
        if problem:
            raise UserError(f"the cache at {cache} is damaged: {name} {problem} — prepare it again with glowtrain "
                            f"prepare --out {cache} and this config")
        arrays.append(array)
    return arrays[0], arrays[1]


def data_summary(data_cfg: DataConfig, train, test) -> str:
    """One line saying what a run trains on: where, how many images, the splits, what was skipped, the
    training shape and every conversion applied to the files."""
    reports = (train.report, test.report)
    if data_cfg.cache:
        where = f" from the cache {Path(data_cfg.cache).expanduser().absolute()}"
    else:
        where = " (bundled)" if data_cfg.dataset == "digits" else f" {Path(data_cfg.root).expanduser().absolute()}"
    found = sum(r.n_found for r in reports)
    skipped = sum(len(r.skipped) for r in reports)
    c, h, w = train.image_shape
    text = (f"data: {data_cfg.dataset}{where}: {found:,} images found{describe_ignored(*train.report.ignored)}, "
            f"{len(train):,} train / {len(test):,} test, {skipped:,} skipped; {h}x{w} {'RGB' if c == 3 else 'grey'}, "
            f"{data_cfg.n_bits} bits")
    if train.n_classes:
        text += f", {train.n_classes} classes"
    conversions = reports[0].conversions + reports[1].conversions
    if conversions:
        text += "; converted: " + ", ".join(f"{n:,} {what}" for what, n in conversions.most_common())
    return text


def skipped_warning(train, test, limit: int = 3) -> str | None:
    """One plain line naming the files data.on_bad_image: skip dropped (None when there are none)."""
    skipped = train.report.skipped + test.report.skipped
    if not skipped:
        return None
    named = "; ".join(f"{path} ({reason})" for path, reason in skipped[:limit])
    more = f"; and {len(skipped) - limit:,} more" if len(skipped) > limit else ""
    return f"warning: skipped {len(skipped):,} unreadable image(s) (data.on_bad_image: skip): {named}{more}"
