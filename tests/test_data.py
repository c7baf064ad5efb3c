"""Tests for glowtrain.data: the digits asset, folder/torchvision/CelebA datasets, caches and samplers."""

import json
import multiprocessing
import os
import pickle
import shutil
import struct
import warnings
from collections import Counter
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke, ok, sets, sixteen_bit_rgb_png
from PIL import Image
from torch.utils.data import Dataset

from glowtrain import cache as cache_module
from glowtrain import data, loaders, run_data
from glowtrain.cache import prepare_cache
from glowtrain.config import DataConfig
from glowtrain.errors import UserError
from glowtrain.folders import check_images


def data_cfg(**overrides):
    fields = dict(dataset="digits", root="data", image_size=8, channels=1, n_bits=5, download=False,
                  hflip=False, test_fraction=0.1, split_seed=0, n_workers=0, on_bad_image="error", cache="")
    fields.update(overrides)
    return DataConfig(**fields)


def write_image(path: Path, array: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def random_image(rng, h, w, channels=3):
    shape = (h, w, 3) if channels == 3 else (h, w)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def make_folder(root: Path, n: int, size=(12, 12), seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = [root / f"img{i:03d}.png" for i in range(n)]
    for p in paths:
        write_image(p, random_image(rng, *size))
    return paths


def all_items(ds):
    return [ds[i] for i in range(len(ds))]


class PlainDataset(Dataset):
    """A dataset without get_batch, to force the DataLoader path."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


# ---------------------------------------------------------------- digits

def test_digits_asset_holds_1797_uint8_8x8_images_scaled_from_0_16_with_labels_0_to_9():
    with resources.files("glowtrain").joinpath("assets").joinpath("digits.npz").open("rb") as f:
        arrays = np.load(f)
        images, labels = arrays["images"], arrays["labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    allowed = {round(k * 255 / 16) for k in range(17)}
    assert set(np.unique(images).tolist()) <= allowed
    assert images.min() == 0 and images.max() == 255
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.min() >= 170


def test_digits_split_is_1500_train_297_test_and_partitions_the_asset():
    train, test = data.build_dataset(data_cfg(), "train"), data.build_dataset(data_cfg(), "test")
    assert (len(train), len(test)) == (1500, 297)
    assert train.image_shape == test.image_shape == (1, 8, 8) and train.n_classes == 10
    with resources.files("glowtrain").joinpath("assets").joinpath("digits.npz").open("rb") as f:
        asset = np.load(f)["images"]
    # Rows as bytes: the two splits together are the asset exactly (as a multiset), so disjoint.
    rows = sorted(x.numpy().tobytes() for x in torch.cat([train.images, test.images]))
    assert rows == sorted(a.tobytes() for a in asset[:, None])


def test_digits_split_is_stable_and_independent_of_config_seeds():
    a = data.build_dataset(data_cfg(split_seed=0), "test")
    b = data.build_dataset(data_cfg(split_seed=99), "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # Pinned: a change here silently changes every reported digits test bpd.
    assert a.labels[:12].tolist() == [6, 5, 3, 8, 4, 0, 3, 3, 0, 1, 6, 8]


def test_digits_items_are_uint8_chw_and_int_labels():
    x, y = data.build_dataset(data_cfg(), "train")[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 8, 8) and isinstance(y, int) and 0 <= y <= 9


def test_digits_at_another_image_size_is_a_user_error():
    with pytest.raises(UserError, match="data.image_size: 8"):
        data.image_shape(data_cfg(image_size=16))


def test_image_shape_and_n_classes_need_no_files():
    root = "/nonexistent/glowtrain"
    assert data.image_shape(data_cfg(root=root)) == (1, 8, 8)
    assert data.image_shape(data_cfg(dataset="mnist", image_size=32, root=root)) == (1, 32, 32)
    assert data.image_shape(data_cfg(dataset="fashion_mnist", image_size=28, root=root)) == (1, 28, 28)
    assert data.image_shape(data_cfg(dataset="cifar10", image_size=32, channels=1, root=root)) == (3, 32, 32)
    assert data.image_shape(data_cfg(dataset="celeba", image_size=64, channels=3, root=root)) == (3, 64, 64)
    assert data.image_shape(data_cfg(dataset="folder", image_size=16, channels=1, root=root)) == (1, 16, 16)
    assert [data.n_classes(data_cfg(dataset=d)) for d in data.DATASETS] == [10, 10, 10, 10, 0, 0]
    with pytest.raises(UserError, match="data.dataset"):
        data.image_shape(data_cfg(dataset="imagenet"))


# ---------------------------------------------------------------- folders

def test_folder_finds_nested_images_with_any_case_extension_and_ignores_other_files(tmp_path):
    rng = np.random.default_rng(0)
    names = ["a.png", "b.PNG", "sub/c.Jpg", "sub/deeper/d.jpeg", "e.bmp", "f.WEBP", "sub/g.png"]
    for name in names:
        write_image(tmp_path / name, random_image(rng, 10, 14))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._a.png").write_bytes(b"macOS resource fork")
    cfg = data_cfg(dataset="folder", root=str(tmp_path), image_size=8, channels=3, test_fraction=0.3)
    train, test = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "test")
    found = {Path(p).relative_to(tmp_path).as_posix() for p in train.paths + test.paths}
    assert found == set(names) and len(train) + len(test) == 7 and min(len(train), len(test)) >= 1
    for x, y in all_items(train) + all_items(test):
        assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and y == -1
    assert train.image_shape == (3, 8, 8) and train.n_classes == 0


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_converts_grey_and_colour_images_to_the_configured_channels(tmp_path, channels):
    rng = np.random.default_rng(1)
    write_image(tmp_path / "grey.png", random_image(rng, 9, 9, channels=1))
    write_image(tmp_path / "rgb.png", random_image(rng, 9, 9))
    rgba = np.concatenate([random_image(rng, 9, 9), np.full((9, 9, 1), 128, np.uint8)], axis=2)
    write_image(tmp_path / "rgba.png", rgba)
    cfg = data_cfg(dataset="folder", root=str(tmp_path), image_size=4, channels=channels, test_fraction=0.3)
    items = all_items(data.build_dataset(cfg, "train")) + all_items(data.build_dataset(cfg, "test"))
    assert len(items) == 3 and all(x.shape == (channels, 4, 4) for x, _ in items)


def test_folder_centre_crops_to_a_square_without_resampling_at_the_crop_size(tmp_path):
    rng = np.random.default_rng(2)
    wide, tall = random_image(rng, 8, 12), random_image(rng, 14, 8)
    write_image(tmp_path / "a_wide.png", wide)
    write_image(tmp_path / "b_tall.png", tall)
    cfg = data_cfg(dataset="folder", root=str(tmp_path), image_size=8, channels=3, test_fraction=0.5)
    by_name = {Path(p).name: ds[i][0] for ds in (data.build_dataset(cfg, s) for s in ("train", "test"))
               for i, p in enumerate(ds.paths)}
    assert torch.equal(by_name["a_wide.png"], torch.from_numpy(wide[:, 2:10]).permute(2, 0, 1))
    assert torch.equal(by_name["b_tall.png"], torch.from_numpy(tall[3:11]).permute(2, 0, 1))


def test_folder_resize_keeps_the_centre_square_content(tmp_path):
    # 30x10: a white 10x10 centre between black sides; after cropping only white is left.
    array = np.zeros((10, 30), np.uint8)
    array[:, 10:20] = 255
    write_image(tmp_path / "a.png", array)
    write_image(tmp_path / "b.png", array)
    cfg = data_cfg(dataset="folder", root=str(tmp_path), image_size=5, channels=1)
    x, _ = data.build_dataset(cfg, "train")[0]
    assert x.shape == (1, 5, 5) and bool((x == 255).all())


def test_folder_split_is_seeded_stable_disjoint_and_covers_every_image(tmp_path):
    make_folder(tmp_path, 20)
    cfg = data_cfg(dataset="folder", root=str(tmp_path), image_size=4, channels=3, test_fraction=0.25)
    train, test = data.build_dataset(cfg, "train").paths, data.build_dataset(cfg, "test").paths
    assert len(test) >= 1 and len(train) + len(test) == 20
    assert not set(train) & set(test) and len(set(train) | set(test)) == 20
    assert train == sorted(train) and test == sorted(test)
    assert data.build_dataset(cfg, "test").paths == test
    other = data_cfg(**{**vars(cfg), "split_seed": 1})
    assert data.build_dataset(other, "test").paths != test


def test_folder_split_keeps_every_file_in_its_split_when_files_are_added_or_removed(tmp_path):
    make_folder(tmp_path, 1000, size=(2, 2))
    cfg = data_cfg(dataset="folder", root=str(tmp_path), image_size=2, channels=3, test_fraction=0.1)
    test = set(data.build_dataset(cfg, "test").paths)
    assert 70 <= len(test) <= 130  # each file is in test with probability 0.1
    write_image(tmp_path / "new.png", random_image(np.random.default_rng(9), 2, 2))
    (tmp_path / "img500.png").unlink()
    after = set(data.build_dataset(cfg, "test").paths)
    assert after - {str(tmp_path / "new.png")} == test - {str(tmp_path / "img500.png")}


def test_folder_of_two_images_gets_one_in_each_split_even_with_tiny_test_fraction(tmp_path):
    make_folder(tmp_path, 2)
    cfg = data_cfg(dataset="folder", root=str(tmp_path), image_size=4, channels=3, test_fraction=0.01)
    assert len(data.build_dataset(cfg, "train")) == len(data.build_dataset(cfg, "test")) == 1


def test_folder_with_one_image_is_a_user_error(tmp_path):
    make_folder(tmp_path, 1)
    with pytest.raises(UserError, match="at least 2"):
        data.build_dataset(data_cfg(dataset="folder", root=str(tmp_path), channels=3), "train")


def test_missing_folder_root_is_a_user_error_naming_the_path_and_key(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as info:
        data.build_dataset(data_cfg(dataset="folder", root=str(missing), channels=3), "train")
    assert str(missing) in str(info.value) and "data.root" in str(info.value)


def test_folder_without_images_is_a_user_error_naming_the_path_and_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(UserError) as info:
        data.build_dataset(data_cfg(dataset="folder", root=str(tmp_path), channels=3), "train")
    assert str(tmp_path) in str(info.value) and ".png" in str(info.value) and ".webp" in str(info.value)


def folder_with_corrupt_file(root: Path, on_bad_image: str):
    make_folder(root, 6, size=(6, 6))
    (root / "img002.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return data_cfg(dataset="folder", root=str(root), image_size=4, channels=3, test_fraction=0.5,
                    on_bad_image=on_bad_image)


def test_a_corrupt_image_is_found_when_the_split_is_built_naming_the_file_and_the_skip_switch(tmp_path):
    cfg = folder_with_corrupt_file(tmp_path, "error")
    with pytest.raises(UserError) as info:
        [data.build_dataset(cfg, split) for split in ("train", "test")]
    assert str(tmp_path / "img002.png") in str(info.value) and "data.on_bad_image: skip" in str(info.value)


def test_a_truncated_image_whose_header_reads_is_found_by_the_decode_pass(tmp_path):
    make_folder(tmp_path, 6, size=(32, 32))
    whole = (tmp_path / "img003.png").read_bytes()
    (tmp_path / "img003.png").write_bytes(whole[: len(whole) // 2])
    with Image.open(tmp_path / "img003.png") as image:
        assert image.size == (32, 32)  # the header alone looks fine
    cfg = data_cfg(dataset="folder", root=str(tmp_path), image_size=4, channels=3, test_fraction=0.5)
    with pytest.raises(UserError, match="img003.png"):
        [data.build_dataset(cfg, split) for split in ("train", "test")]


def test_more_data_workers_than_cpus_load_with_one_per_cpu_and_the_same_batches(tmp_path, monkeypatch):
    """Shipped configs ask for 4 or 8 workers: on a smaller machine torch warned of a freeze; now they are capped."""
    make_folder(tmp_path, 6, size=(6, 6))
    ds = data.build_dataset(data_cfg(dataset="folder", root=str(tmp_path), image_size=4, channels=3,
                                     test_fraction=0.5), "train")
    alone = list(loaders.make_eval_batches(ds, 2))
    monkeypatch.setattr(loaders, "cpus_per_process", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "suggested max number of worker" warning counts this machine's CPUs
        loaded = list(loaders.make_eval_batches(ds, 2, n_workers=64))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(alone, loaded, strict=True))


def test_the_processes_of_a_job_on_one_machine_share_its_cpus_among_their_data_workers(monkeypatch):
    from glowtrain import distributed

    monkeypatch.setattr(distributed, "usable_cpus", lambda pid=0: 16)  # the launcher's too: the CPUs are shared
    for processes, each in ((None, 16), ("2", 8), ("8", 2), ("64", 1)):
        if processes is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)  # torchrun's processes on this machine
        assert distributed.cpus_per_process() == each


def test_a_process_bound_to_cpus_of_its_own_keeps_them_all_for_its_data_workers(monkeypatch):
    """numactl per rank: 8 processes on a 64-core machine, each bound to 8 of them. A launcher whose affinity cannot
    be read leaves the share as if the CPUs were shared."""
    from glowtrain import distributed

    launcher = []

    def affinity(pid=0):
        if pid == 0:
            return 8
        assert pid == os.getppid()
        if not launcher:
            raise ProcessLookupError(pid)
        return launcher[0]

    monkeypatch.setattr(distributed, "usable_cpus", affinity)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.cpus_per_process() == 1
    launcher.append(64)
    assert distributed.cpus_per_process() == 8
    launcher[0] = 8  # bound together (a container's CPU set): shared
    assert distributed.cpus_per_process() == 1
    launcher[0] = 16  # torchrun --numa-binding=node: 8 ranks on two nodes of 8 CPUs, four ranks to a node
    assert distributed.cpus_per_process() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "5")  # 5 ranks on the two nodes: one holds 3, whose share is 8 // 3
    assert distributed.cpus_per_process() == 2
    launcher[0] = 2  # a launcher narrower than its ranks (taskset -c 0,1 torchrun, numactl per rank): not 16 ranks
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.cpus_per_process() == 4


def test_an_image_that_breaks_after_the_check_fails_in_one_line_also_from_a_worker(tmp_path):
    make_folder(tmp_path, 6, size=(6, 6))
    cfg = data_cfg(dataset="folder", root=str(tmp_path), image_size=4, channels=3, test_fraction=0.5)
    ds = data.build_dataset(cfg, "train")
    Path(ds.paths[0]).write_bytes(b"garbage")
    with pytest.raises(UserError) as info:
        list(loaders.make_eval_batches(ds, 2, n_workers=1))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot read image {ds.paths[0]}")
    # The worker is stopped with the error, not left to a garbage collection that would wait 10 s for it.
    assert not [child for child in multiprocessing.active_children() if child.daemon]



def test_the_unreadable_image_error_counts_both_splits_and_an_all_bad_split_names_its_first_file(tmp_path):
    make_folder(tmp_path, 8, size=(6, 6))
    for i in range(8, 14):
        (tmp_path / f"broken{i}.png").write_bytes(b"junk")
    cfg = data_cfg(dataset="folder", root=str(tmp_path), image_size=4, channels=3, test_fraction=0.5)
    reports = [data.build_dataset(replace(cfg, on_bad_image="skip"), split).report for split in ("train", "test")]
    assert min(len(r.skipped) for r in reports) > 0 and sum(len(r.skipped) for r in reports) == 6  # both splits
    for split in ("train", "test"):  # whichever split is built first counts all six
        with pytest.raises(UserError, match=r"\(.*\) and 5 more under "):
            data.build_dataset(cfg, split)
    for path in tmp_path.glob("img*.png"):
        path.write_bytes(b"junk too")
    with pytest.raises(UserError) as refused:
        data.build_dataset(replace(cfg, on_bad_image="skip"), "test")
    assert str(refused.value).startswith(f"none of the {reports[1].n_found} images of the test split under "
                                         f"{tmp_path} is readable (the first, {tmp_path}")


def test_skip_drops_and_counts_an_unreadable_image_instead_of_repeating_another(tmp_path):
    cfg = folder_with_corrupt_file(tmp_path, "skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the skip is reported by the caller in one plain line, not a warning
        splits = [data.build_dataset(cfg, split) for split in ("train", "test")]
    paths = [p for ds in splits for p in ds.paths]
    assert len(paths) == 5 and len(set(paths)) == 5 and str(tmp_path / "img002.png") not in paths
    skipped = [s for ds in splits for s in ds.report.skipped]
    assert [p for p, _ in skipped] == [str(tmp_path / "img002.png")]
    assert sum(ds.report.n_found for ds in splits) == 6
    images = [x for ds in splits for x, _ in all_items(ds)]
    assert len({x.numpy().tobytes() for x in images}) == 5  # five different images, none twice


# ---------------------------------------------------------------- torchvision sets

def write_mnist(root: Path, folder: str, train: np.ndarray, test: np.ndarray):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, images in (("train", train), ("t10k", test)):
        n = len(images)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.tobytes())


def test_missing_mnist_without_download_names_the_expected_folder(tmp_path):
    for name, folder in (("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")):
        with pytest.raises(UserError) as info:
            data.build_dataset(data_cfg(dataset=name, root=str(tmp_path), image_size=28), "train")
        message = str(info.value)
        assert f"{tmp_path}/{folder}/raw" in message and "data.download" in message
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or created


@pytest.mark.parametrize("download", [False, True])
@pytest.mark.parametrize("damage", ["cut short", "random bytes", "unknown type", "int32 pixels"])
def test_mnist_files_that_are_there_but_damaged_are_named_as_such_not_as_missing(tmp_path, download, damage):
    """They were "not found — put the files in X/raw" (where they were), "could not download" (nothing was), or an
    AssertionError with exit code 1."""
    images = np.zeros((5, 28, 28), np.uint8)
    write_mnist(tmp_path, "MNIST", images, images[:3])
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    damaged = {"cut short": path.read_bytes()[:1000],
               "random bytes": np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes(),
               # idx's header: its type byte (0x0A: none; 0x0C: int32), then 3 dimensions
               "unknown type": struct.pack(">iiii", 0x0A03, 5, 28, 28) + bytes(5 * 28 * 28),
               "int32 pixels": struct.pack(">iiii", 0x0C03, 5, 28, 28) + bytes(5 * 28 * 28 * 4)}
    path.write_bytes(damaged[damage])
    with pytest.raises(UserError) as info:
        data.build_dataset(data_cfg(dataset="mnist", root=str(tmp_path), image_size=28, download=download), "train")
    assert not isinstance(info.value, data.MissingData)
    assert str(info.value).startswith(f"MNIST's files in {tmp_path}/MNIST/raw cannot be read (")
    assert str(info.value).endswith("): cut short or damaged? — replace them: delete them and set data.download: "
                                    "true, or copy them again")


def test_mnist_still_compressed_or_incomplete_says_so(tmp_path):
    images = np.zeros((5, 28, 28), np.uint8)
    write_mnist(tmp_path, "MNIST", images, images[:3])
    raw = tmp_path / "MNIST" / "raw"
    cfg = data_cfg(dataset="mnist", root=str(tmp_path), image_size=28)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.MissingData, match=rf"^MNIST in {raw} is incomplete \(t10k-labels-idx1-ubyte missing\) "
                                               "— put the missing files there, or set data.download: true"):
        data.build_dataset(cfg, "train")
    for path in list(raw.iterdir()):
        path.rename(path.with_name(path.name + ".gz"))  # the form they are downloaded in
    with pytest.raises(data.MissingData, match=rf"^MNIST's files in {raw} are still compressed \(.gz\) — unpack "
                                               rf"them \(gunzip {raw}/\*.gz\)"):
        data.build_dataset(cfg, "train")


def test_cifar10_files_of_another_checksum_name_the_first_such_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 7]}))
    with pytest.raises(UserError, match=rf"^CIFAR10's files in {folder} cannot be read \(data_batch_1 is not "
                                        r"CIFAR10's \(its checksum differs\)\): cut short or damaged\?"):
        data.build_dataset(data_cfg(dataset="cifar10", root=str(tmp_path), image_size=32), "train")


def test_cifar10_files_of_another_checksum_with_download_on_and_no_network_say_both(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\nTried https://example.invalid/, got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(UserError) as info:
        data.build_dataset(data_cfg(dataset="cifar10", root=str(tmp_path), image_size=32, download=True), "train")
    assert str(info.value) == (f"CIFAR10's files in {folder} cannot be read (data_batch_1 is not CIFAR10's (its "
                               "checksum differs)), and downloading them again failed (Error downloading "
                               "cifar-10-python.tar.gz: <urlopen error [Errno -3] Temporary failure in name "
                               "resolution>) — copy them there again")


def test_read_images_counts_what_preprocessing_did_in_the_data_lines_words(tmp_path):
    """score's images line: only images read, MNIST's zero border as such, EXIF turns as fit names them."""
    Image.new("L", (28, 28)).save(tmp_path / "mnist.png")
    Image.new("RGB", (56, 40)).save(tmp_path / "photo.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side
    Image.new("L", (32, 32)).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    (tmp_path / "cut.png").write_bytes((tmp_path / "photo.png").read_bytes()[:60])  # its header still reads
    sixteen_bit_rgb_png(tmp_path / "scan.png", np.full((32, 32, 3), 40_000))  # loading it empties its tiles
    names = ["mnist.png", "photo.png", "turned.jpg", "cut.png", "scan.png"]
    converted, skipped = Counter(), []
    cfg = data_cfg(dataset="mnist", root=str(tmp_path), image_size=32)
    images = list(data.read_images([str(tmp_path / n) for n in names], cfg, "skip", skipped, converted=converted))
    assert [image is None for image in images] == [False, False, False, True, False] and len(skipped) == 1
    assert converted == Counter({"zero-padded 28→32": 2, "colour→grey": 2, "centre-cropped": 1, "resized": 1,
                                 "turned upright (EXIF)": 1, "16-bit→8-bit": 1})
    good = [str(tmp_path / n) for n in names if n != "cut.png"]
    converted = Counter()
    folder = data_cfg(dataset="folder", root=str(tmp_path), image_size=32, channels=1)
    list(data.read_images(good, folder, "error", [], converted=converted))
    check = check_images(good, tmp_path, 1, 32, None)  # what fit's data line counts
    assert converted == check.conversions == Counter({"resized": 2, "colour→grey": 2, "centre-cropped": 1,
                                                      "turned upright (EXIF)": 1, "16-bit→8-bit": 1})
    converted = Counter()
    cifar = data_cfg(dataset="cifar10", root=str(tmp_path), image_size=16)
    list(data.read_images(good, cifar, "error", [], converted=converted))
    assert converted["resized 32→16"] == 4 and converted["resized"] == 2  # the 28 and the 56x40 to 32 first


def test_mnist_loads_from_raw_idx_files_and_pads_to_32_with_zeros(tmp_path):
    rng = np.random.default_rng(3)
    train, test = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_mnist(tmp_path, "MNIST", train, test)
    cfg = data_cfg(dataset="mnist", root=str(tmp_path), image_size=28)
    ds = data.build_dataset(cfg, "train")
    assert isinstance(ds, data.TensorImages) and ds.image_shape == (1, 28, 28) and ds.n_classes == 10
    assert torch.equal(ds.images[:, 0], torch.from_numpy(train)) and ds.labels.tolist() == [0, 1, 2, 3, 4]
    padded = data.build_dataset(data_cfg(**{**vars(cfg), "image_size": 32}), "test")
    assert padded.images.shape == (3, 1, 32, 32)
    assert torch.equal(padded.images[:, 0, 2:30, 2:30], torch.from_numpy(test))
    border = padded.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.sum()) == 0


def test_fashion_mnist_resizes_with_antialiasing_to_other_sizes(tmp_path):
    flat = np.full((4, 28, 28), 200, np.uint8)
    write_mnist(tmp_path, "FashionMNIST", flat, flat[:2])
    ds = data.build_dataset(data_cfg(dataset="fashion_mnist", root=str(tmp_path), image_size=14), "train")
    assert ds.images.shape == (4, 1, 14, 14) and bool((ds.images == 200).all())


def test_cifar10_loads_from_python_batches_in_channel_first_order(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # our files have other md5s
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(4)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 7]}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    cfg = data_cfg(dataset="cifar10", root=str(tmp_path), image_size=32)
    train, test = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "test")
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    assert torch.equal(test.images, torch.from_numpy(batches["test_batch"]["data"]).reshape(2, 3, 32, 32))
    assert test.labels.tolist() == [1, 7]
    small = data.build_dataset(data_cfg(**{**vars(cfg), "image_size": 16}), "test")
    assert small.images.shape == (2, 3, 16, 16) and small.images.dtype == torch.uint8


# ---------------------------------------------------------------- celeba

def test_celeba_torchvision_layout_uses_official_partition_and_148_centre_crop(tmp_path):
    celeba = tmp_path / "celeba"
    rng = np.random.default_rng(5)
    faces = {f"{i:06d}.jpg": random_image(rng, 218, 178) for i in range(1, 5)}
    for name, array in faces.items():
        write_image(celeba / "img_align_celeba" / name, array, fmt="PNG")  # lossless; PIL reads by content
    (celeba / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 1\n000003.jpg 2\n000004.jpg 0\n")
    cfg = data_cfg(dataset="celeba", root=str(tmp_path), image_size=148, channels=3)
    train, test = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "test")
    assert [Path(p).name for p in train.paths] == ["000001.jpg", "000004.jpg"]
    assert [Path(p).name for p in test.paths] == ["000003.jpg"]
    assert data.data_summary(cfg, train, test).endswith("converted: 3 centre-cropped to 148x148")
    expected = torch.from_numpy(faces["000003.jpg"][35:183, 15:163]).permute(2, 0, 1)
    assert torch.equal(test[0][0], expected)
    small = data.build_dataset(data_cfg(**{**vars(cfg), "image_size": 8}), "train")
    assert small[0][0].shape == (3, 8, 8) and small.n_classes == 0


def test_celeba_without_the_torchvision_layout_reads_root_as_a_plain_folder(tmp_path):
    make_folder(tmp_path, 4, size=(20, 16))
    cfg = data_cfg(dataset="celeba", root=str(tmp_path), image_size=8, channels=3, test_fraction=0.25)
    train, test = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "test")
    assert len(train) + len(test) == 4 and min(len(train), len(test)) >= 1 and train[0][0].shape == (3, 8, 8)


@pytest.mark.parametrize("root_name", ["celeba", "faces"])
def test_a_root_holding_celebas_layout_itself_is_refused_for_new_runs_and_read_as_before_by_old_ones(tmp_path,
                                                                                                 root_name):
    """torchvision's layout is read from <root>/celeba/; in <root> itself (the shipped config's root is data/celeba)
    it was read as a plain folder: a random split of every image, validation's too, cropped to the largest square."""
    root = tmp_path / root_name
    make_folder(root / "img_align_celeba", 4, size=(20, 16))
    (root / "list_eval_partition.txt").write_text("img000.png 0\nimg001.png 2\n")
    cfg = data_cfg(dataset="celeba", root=str(root), image_size=8, channels=3)
    move = (f"set data.root={tmp_path}" if root_name == "celeba" else
            f"move img_align_celeba/ and list_eval_partition.txt into {root}/celeba/")
    with pytest.raises(UserError) as info:
        data.refuse_misplaced_celeba_layout(cfg)
    assert str(info.value) == (f"data.root {root} holds CelebA in torchvision's layout, which is read from "
                               f"<data.root>/celeba/ — {move} to train on the official split with the 148x148 crop, "
                               "or set data.dataset=folder to train on every image as a plain folder")
    for cache in ("", str(tmp_path / "elsewhere")):  # prepare reads the images whatever data.cache names
        with pytest.raises(UserError, match="holds CelebA in torchvision's layout"):
            prepare_cache(data_cfg(**{**vars(cfg), "cache": cache}), str(tmp_path / "cache"), progress=False)
    assert not (tmp_path / "cache").exists()
    old_run = [data.build_dataset(cfg, split) for split in ("train", "test")]  # a run trained so reads it so
    assert sum(len(split) for split in old_run) == 4 and old_run[0].crop is None
    if root_name == "celeba":
        data.refuse_misplaced_celeba_layout(data_cfg(**{**vars(cfg), "root": str(tmp_path)}))  # the fix


def test_celebas_kaggle_layout_is_a_plain_folder_of_faces(tmp_path):
    make_folder(tmp_path / "img_align_celeba" / "img_align_celeba", 4, size=(20, 16))
    (tmp_path / "list_eval_partition.csv").write_text("image_id,partition\nimg000.png,0\n")
    cfg = data_cfg(dataset="celeba", root=str(tmp_path), image_size=8, channels=3, test_fraction=0.25)
    data.refuse_misplaced_celeba_layout(cfg)
    assert sum(len(data.build_dataset(cfg, split)) for split in ("train", "test")) == 4


def test_celeba_images_missing_from_the_official_layout_are_counted_over_both_splits(tmp_path):
    """With none there, the message said to skip unreadable images; with some, it counted this split's alone."""
    celeba = tmp_path / "celeba"
    (celeba / "img_align_celeba").mkdir(parents=True)
    (celeba / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {i % 3}\n" for i in range(1, 10)))
    cfg = data_cfg(dataset="celeba", root=str(tmp_path), image_size=8, channels=3)
    with pytest.raises(data.MissingData, match=r"^none of the 3 train images list_eval_partition.txt lists is in "
                                               rf"{celeba}/img_align_celeba \(such as 000003.jpg\) — put CelebA's"):
        data.build_dataset(cfg, "train")
    rng = np.random.default_rng(0)
    for name in ("000003.jpg", "000008.jpg"):  # one train image (partition 0) and one test image (2) are there
        write_image(celeba / "img_align_celeba" / name, random_image(rng, 218, 178), fmt="PNG")
    with pytest.raises(UserError, match=r"000006.jpg .* and 3 more"):  # 000009.jpg, and 000002/5.jpg of test
        data.build_dataset(cfg, "train")
    for name in ("000002.jpg", "000005.jpg"):
        shutil.copy(celeba / "img_align_celeba" / "000008.jpg", celeba / "img_align_celeba" / name)
    assert len(data.build_dataset(cfg, "test")) == 3  # eval of the test split needs none of train's images


# ---------------------------------------------------------------- cache

def test_cache_batches_equal_folder_batches(tmp_path):
    make_folder(tmp_path / "images", 9, size=(10, 13))
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=6, channels=3, test_fraction=0.3)
    index = prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    assert sum(index["splits"].values()) == 9 and index["image_shape"] == [3, 6, 6]
    assert json.loads((tmp_path / "cache" / "index.json").read_text()) == index
    cached_cfg = data_cfg(**{**vars(cfg), "cache": str(tmp_path / "cache")})
    for split in ("train", "test"):
        folder, cached = data.build_dataset(cfg, split), data.build_dataset(cached_cfg, split)
        assert cached.image_shape == (3, 6, 6) and len(cached) == len(folder)
        x, y = cached.get_batch(torch.arange(len(folder)))
        assert torch.equal(x, torch.stack([img for img, _ in all_items(folder)]))
        assert y.tolist() == [-1] * len(folder)


def test_a_run_from_a_cache_says_what_prepare_said_of_the_files(tmp_path):
    make_folder(tmp_path / "images", 9, size=(10, 13))
    (tmp_path / "images" / "broken.png").write_bytes(b"not a picture")
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=6, channels=1, test_fraction=0.3,
                   on_bad_image="skip")
    index = prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    cached_cfg = data_cfg(**{**vars(cfg), "cache": str(tmp_path / "cache")})
    train, test = (data.build_dataset(cached_cfg, split) for split in ("train", "test"))
    line = data.data_summary(cached_cfg, train, test)
    assert line.split(": ", 2)[2] == index["summary"].split(": ", 2)[2]  # after "data: folder <where>: "
    assert line.endswith(": 10 images found, 7 train / 2 test, 1 skipped; 6x6 grey, 5 bits; converted: "
                         "9 colour→grey, 9 centre-cropped, 9 resized")
    assert data.skipped_warning(train, test) == index["warning"]


def test_a_cache_whose_image_folder_changed_since_it_was_prepared_says_so(tmp_path):
    paths = make_folder(tmp_path / "images", 9, size=(10, 13))
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=6, channels=3, test_fraction=0.3)
    prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    cached = data_cfg(**{**vars(cfg), "root": "elsewhere", "cache": str(tmp_path / "cache")})  # it knows its folder
    assert data.stale_cache_warning(cached) is None
    write_image(paths[0], random_image(np.random.default_rng(5), 20, 20))  # another picture, another size
    warning = data.stale_cache_warning(cached)
    assert warning.startswith(f"warning: the images under {tmp_path / 'images'} changed after the cache at "
                              f"{tmp_path / 'cache'} was prepared from them (")
    assert warning.endswith("split); training uses the cache's copies — prepare it again to use the new ones")
    shutil.rmtree(tmp_path / "images")  # a cache moved to a machine without the images: nothing to compare
    assert data.stale_cache_warning(cached) is None
    assert data.stale_cache_warning(cfg) is None  # no cache at all


def test_a_cache_with_another_image_folder_as_data_root_says_that_folder_is_not_read(tmp_path):
    make_folder(tmp_path / "images", 9, size=(10, 13))
    make_folder(tmp_path / "others", 4)
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=6, channels=3, test_fraction=0.3)
    prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    cached = data_cfg(**{**vars(cfg), "cache": str(tmp_path / "cache")})
    assert data.unread_root_warning(cached) is None  # its own folder
    assert data.unread_root_warning(data_cfg(**{**vars(cached), "root": str(tmp_path / "nowhere")})) is None
    other = data_cfg(**{**vars(cached), "root": str(tmp_path / "others")})
    assert data.unread_root_warning(other) == (
        f"warning: data.root {tmp_path / 'others'} is not read: training reads the cache at {tmp_path / 'cache'}, "
        f"prepared from {tmp_path / 'images'} — to train on {tmp_path / 'others'}, leave out data.cache")
    assert data.unread_root_warning(cfg) is None  # no cache


def test_cache_prepared_at_another_size_or_missing_is_a_user_error(tmp_path):
    make_folder(tmp_path / "images", 4)
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=6, channels=3)
    prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    with pytest.raises(UserError, match=r"holds folder at \[3, 6, 6\], not folder at \[3, 8, 8\]; prepare it again "
                                        r"with this config, or train at its shape: data.channels=3 data.image_size=6"):
        data.build_dataset(data_cfg(**{**vars(cfg), "image_size": 8, "cache": str(tmp_path / "cache")}), "train")
    # A folder's cache given with the defaults (digits): the keys that would read it, not only "prepare again".
    with pytest.raises(UserError, match=r"holds folder at \[3, 6, 6\], not digits at \[1, 8, 8\]; prepare it again "
                                        r"with this config, or train on what it holds: data.dataset=folder "
                                        r"data.channels=3 data.image_size=6$"):
        data.build_dataset(data_cfg(cache=str(tmp_path / "cache")), "train")
    with pytest.raises(UserError, match="glowtrain prepare"):
        data.build_dataset(data_cfg(**{**vars(cfg), "cache": str(tmp_path / "elsewhere")}), "train")


@pytest.mark.parametrize("damage", ["truncated", "missing", "labels missing", "not an array", "other count"])
def test_a_damaged_cache_is_refused_in_one_line_that_says_to_prepare_it_again(tmp_path, damage):
    make_folder(tmp_path / "images", 8)
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=6, channels=3, test_fraction=0.25)
    index = prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    cache = tmp_path / "cache"
    images = cache / "test.npy"
    if damage == "truncated":  # a copy that stopped part way
        images.write_bytes(images.read_bytes()[:-50])
    elif damage == "missing":
        images.unlink()
    elif damage == "labels missing":
        (cache / "test_labels.npy").unlink()
    elif damage == "not an array":
        images.write_bytes(b"not numpy")
    else:  # a complete array of the wrong length: another cache's file
        np.save(images, np.zeros((index["splits"]["test"] + 1, 3, 6, 6), np.uint8))
    cached = data_cfg(**{**vars(cfg), "cache": str(cache)})
    assert len(data.build_dataset(cached, "train")) == index["splits"]["train"]  # the other split is sound
    with pytest.raises(UserError) as refused:
        data.build_dataset(cached, "test")
    name = "test_labels.npy" if damage == "labels missing" else "test.npy"
    message = str(refused.value)
    assert message.startswith(f"the cache at {cache} is damaged: {name} ") and "\n" not in message
    assert message.endswith(f"— prepare it again with glowtrain prepare --out {cache} and this config")
    if "missing" in damage:
        assert f"{name} is missing" in message


@pytest.mark.parametrize("key,value", [("test_fraction", 0.5), ("split_seed", 3), ("labels", "subfolders")])
def test_a_cache_refuses_a_key_that_decides_its_images_but_not_another_root(tmp_path, key, value):
    make_folder(tmp_path / "images" / "cats", 4)
    make_folder(tmp_path / "images" / "dogs", 4, seed=1)
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=6, channels=3, test_fraction=0.25,
                   labels="none", cache=str(tmp_path / "cache"))
    prepare_cache(data_cfg(**{**vars(cfg), "cache": ""}), cfg.cache, progress=False)
    recorded = getattr(cfg, key)
    with pytest.raises(UserError) as info:
        data.build_dataset(data_cfg(**{**vars(cfg), key: value}), "train")
    assert str(info.value) == (f"the cache at {tmp_path / 'cache'} was prepared with data.{key}={recorded}, not "
                               f"{value}, and so holds other images; prepare it again with this config, or set "
                               f"data.{key}={recorded}")
    elsewhere = data.build_dataset(data_cfg(**{**vars(cfg), "root": "/nowhere", "n_bits": 3, "hflip": True}), "train")
    assert torch.equal(elsewhere.images, data.build_dataset(cfg, "train").images)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    del index["keys"]  # a cache prepared before the keys were recorded loads as it did
    (tmp_path / "cache" / "index.json").write_text(json.dumps(index))
    assert len(data.build_dataset(data_cfg(**{**vars(cfg), key: value}), "train")) == len(elsewhere)


def test_a_cache_that_skipped_files_refuses_on_bad_image_error(tmp_path):
    paths = make_folder(tmp_path / "images", 6)
    paths[2].write_bytes(b"not an image")
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=6, channels=3, on_bad_image="skip")
    prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    strict = data_cfg(**{**vars(cfg), "on_bad_image": "error", "cache": str(tmp_path / "cache")})
    with pytest.raises(UserError, match="prepared with data.on_bad_image=skip, not error"):
        data.build_dataset(strict, "train")
    paths[2].unlink()  # nothing skipped: the images are the same either way, so either value loads the cache
    prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    assert len(data.build_dataset(strict, "train")) + len(data.build_dataset(strict, "test")) == 5


# ---------------------------------------------------------------- samplers and loaders

def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_step_sampler_started_at_a_step_yields_exactly_the_tail_of_the_stream_from_zero():
    full = take(iter(loaders.StepBatchSampler(23, 4, seed=7)), 30)
    resumed = take(iter(loaders.StepBatchSampler(23, 4, seed=7, start_step=17)), 13)
    assert resumed == full[17:]


def test_step_sampler_epochs_are_seeded_permutations_with_drop_last():
    n, b, seed = 10, 3, 5
    batches = take(iter(loaders.StepBatchSampler(n, b, seed)), 9)  # 3 batches per epoch
    for e in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e)).tolist()
        epoch = batches[3 * e:3 * e + 3]
        assert epoch == [perm[0:3], perm[3:6], perm[6:9]]
        assert len(set(sum(epoch, []))) == 9  # within an epoch no index repeats
    assert batches[0:3] != batches[3:6]


def test_step_sampler_ranks_take_their_slices_of_the_global_batch():
    single = take(iter(loaders.StepBatchSampler(50, 8, seed=3, start_step=4)), 12)
    ranks = [take(iter(loaders.StepBatchSampler(50, 4, seed=3, start_step=4, rank=r, world_size=2)), 12)
             for r in range(2)]
    assert all(len(b) == 4 for r in ranks for b in r)
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == single


def test_step_sampler_with_fewer_items_than_a_global_batch_is_a_user_error():
    with pytest.raises(UserError) as info:
        loaders.StepBatchSampler(10, 6, seed=0, world_size=2)
    assert "train.batch_size" in str(info.value) and "10" in str(info.value)


def test_train_batches_fast_path_equals_dataloader_path_and_resumes_exactly():
    images = torch.arange(30 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(30, 1, 2, 2)
    ds = data.TensorImages(images, torch.arange(30), n_classes=30)
    fast = take(loaders.make_train_batches(ds, 4, seed=1), 12)
    slow = take(loaders.make_train_batches(PlainDataset(ds), 4, seed=1), 12)
    for (x, y), (xs, ys) in zip(fast, slow):
        assert x.dtype == xs.dtype == torch.uint8 and y.dtype == ys.dtype == torch.int64
        assert torch.equal(x, xs) and torch.equal(y, ys) and torch.equal(x, images[y])
    resumed = take(loaders.make_train_batches(ds, 4, seed=1, start_step=9), 3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(resumed, fast[9:]))


def test_eval_batches_over_two_ranks_cover_the_split_exactly_once(tmp_path):
    ds = data.TensorImages(torch.zeros(11, 1, 2, 2, dtype=torch.uint8), torch.arange(11), n_classes=11)
    per_rank = [list(loaders.make_eval_batches(ds, 3, rank=r, world_size=2)) for r in range(2)]
    assert [len(x) for x, _ in per_rank[0]] == [3, 3]  # items 0, 2, ..., 10
    assert [len(x) for x, _ in per_rank[1]] == [3, 2]  # items 1, 3, ..., 9
    labels = torch.cat([y for batches in per_rank for _, y in batches])
    assert sorted(labels.tolist()) == list(range(11))
    # The DataLoader path (lazy files) gives the same order as indexing.
    make_folder(tmp_path, 7, size=(4, 4))
    files = data.build_dataset(data_cfg(dataset="folder", root=str(tmp_path), image_size=4, channels=3,
                                        test_fraction=0.3), "train")
    x = torch.cat([b for b, _ in loaders.make_eval_batches(files, 2, rank=1, world_size=2)])
    assert torch.equal(x, torch.stack([files[i][0] for i in range(1, len(files), 2)]))


# ---------------------------------------------------------------- data safety (issue 14)

def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failed_prepare_leaves_an_existing_cache_byte_identical_and_no_partial_files(tmp_path):
    make_folder(tmp_path / "images", 8, size=(6, 6))
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=4, channels=3)
    cache = tmp_path / "cache"
    prepare_cache(cfg, str(cache), progress=False)
    before = tree_bytes(cache)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(UserError, match="broken.png"):
        prepare_cache(cfg, str(cache), progress=False)
    assert tree_bytes(cache) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "images"]  # nothing left beside it
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_an_interrupted_prepare_leaves_an_existing_cache_byte_identical(tmp_path, monkeypatch):
    make_folder(tmp_path / "images", 8, size=(6, 6))
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=4, channels=3)
    cache = tmp_path / "cache"
    prepare_cache(cfg, str(cache), progress=False)
    before = tree_bytes(cache)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "make_eval_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(cfg, str(cache), progress=False)
    assert tree_bytes(cache) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "images"]


def test_prepare_replaces_a_complete_cache_and_refuses_a_folder_that_is_not_one(tmp_path):
    make_folder(tmp_path / "images", 8, size=(6, 6))
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=4, channels=3)
    prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    make_folder(tmp_path / "images", 12, size=(6, 6), seed=1)  # more images: the new cache replaces the old
    index = prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    assert sum(index["splits"].values()) == 12 and json.loads((tmp_path / "cache" / "index.json").read_text()) == index
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match=r"no glowtrain cache \(no index.json\)"):
        prepare_cache(cfg, str(tmp_path / "mine"), progress=False)
    (tmp_path / "mine" / "index.json").write_text('{"chapters": 3}')  # an index of the user's, not a cache's
    for overwrite in (False, True):
        with pytest.raises(UserError, match="no glowtrain cache \\(an index.json that is not a cache's\\)"):
            prepare_cache(cfg, str(tmp_path / "mine"), progress=False, overwrite=overwrite)
    assert tree_bytes(tmp_path / "mine") == {"thesis.tex": b"precious", "index.json": b'{"chapters": 3}'}


def test_data_for_a_moved_run_is_a_cache_only_when_prepare_made_it(tmp_path):
    make_folder(tmp_path / "images", 8, size=(6, 6))
    cfg = data_cfg(dataset="folder", root="/where/it/was/trained", image_size=4, channels=3)
    (tmp_path / "images" / "index.json").write_text('{"photographer": "me"}')  # the user's, in the image folder
    moved = data.relocated(cfg, str(tmp_path / "images"))
    assert (moved.root, moved.cache) == (str(tmp_path / "images"), "")
    prepare_cache(moved, str(tmp_path / "cache"), progress=False)
    assert data.relocated(cfg, str(tmp_path / "cache")).cache == str(tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    old = {key: index[key] for key in ("format", "dataset", "image_size", "channels", "image_shape", "n_classes",
                                       "splits")}  # as the first caches were written: no fingerprints, reports, keys
    (tmp_path / "cache" / "index.json").write_text(json.dumps(old))
    assert data.relocated(cfg, str(tmp_path / "cache")).cache == str(tmp_path / "cache")
    assert len(data.build_dataset(data.relocated(cfg, str(tmp_path / "cache")), "train")) > 0


@pytest.mark.parametrize("trained_crop", [148, None])
def test_data_for_a_moved_celeba_run_may_be_the_folder_holding_the_official_layout(tmp_path, trained_crop):
    """--data DIR/celeba for a run trained on the official layout read DIR/celeba as a plain folder: another split
    and crop. A run trained on such a folder as a plain one (data.json: no crop) still reads it so."""
    celeba = tmp_path / "celeba"
    make_folder(celeba / "img_align_celeba", 4, size=(20, 16))
    (celeba / "list_eval_partition.txt").write_text("img000.png 0\nimg001.png 2\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "data.json").write_text(json.dumps({"crop": trained_crop}))
    cfg = data_cfg(dataset="celeba", root="/where/it/was/trained", image_size=8, channels=3)
    expected = tmp_path if trained_crop else celeba
    assert data.relocated(cfg, str(celeba), run).root == str(expected)
    assert data.relocated(cfg, str(tmp_path), run).root == str(tmp_path)  # the dataset root, as before


@pytest.mark.parametrize("overwrite", [False, True])
def test_preparing_a_cache_again_keeps_the_other_files_in_its_folder(tmp_path, overwrite):
    make_folder(tmp_path / "images", 8, size=(6, 6))
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=4, channels=3)
    cache = tmp_path / "cache"
    prepare_cache(cfg, str(cache), progress=False)
    (cache / "NOTES.md").write_text("made from the March images")
    (cache / "plots").mkdir()
    (cache / "plots" / "hist.png").write_bytes(b"mine")
    other = data_cfg(**{**vars(cfg), "image_size": 2}) if overwrite else cfg
    prepare_cache(other, str(cache), progress=False, overwrite=overwrite)
    assert (cache / "NOTES.md").read_text() == "made from the March images"
    assert (cache / "plots" / "hist.png").read_bytes() == b"mine"
    assert data.is_prepared_cache(cache) and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "images"]


@pytest.mark.parametrize("key,value", [("channels", 1), ("image_size", 2), ("split_seed", 3), ("root", "other")])
def test_prepare_replaces_a_cache_of_other_settings_only_with_overwrite(tmp_path, key, value):
    make_folder(tmp_path / "images", 8, size=(6, 6))
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=4, channels=3)
    cache = tmp_path / "cache"
    prepare_cache(cfg, str(cache), progress=False)
    before = {path.name: path.read_bytes() for path in cache.iterdir()}
    if key == "root":  # another folder of images, while the one the cache came from is still there
        make_folder(tmp_path / value, 8, size=(6, 6), seed=1)
        value = str(tmp_path / value)
    other = data_cfg(**{**vars(cfg), key: value})
    with pytest.raises(UserError) as refused:
        prepare_cache(other, str(cache), progress=False)
    assert str(refused.value).startswith(f"{cache} holds a cache of other settings (")
    assert str(refused.value).endswith("that runs may train from — choose another --out, or pass --overwrite to "
                                       "replace it")
    assert {path.name: path.read_bytes() for path in cache.iterdir()} == before
    prepare_cache(other, str(cache), progress=False, overwrite=True)
    assert len(data.build_dataset(data_cfg(**{**vars(other), "cache": str(cache)}), "train")) > 0


def test_prepare_from_a_moved_image_folder_replaces_its_cache_without_overwrite(tmp_path):
    make_folder(tmp_path / "images", 8, size=(6, 6))
    cfg = data_cfg(dataset="folder", root=str(tmp_path / "images"), image_size=4, channels=3)
    prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    (tmp_path / "images").rename(tmp_path / "moved")  # the folder it came from is gone: the same images, elsewhere
    index = prepare_cache(data_cfg(**{**vars(cfg), "root": str(tmp_path / "moved")}), str(tmp_path / "cache"),
                               progress=False)
    assert index["root"] == str((tmp_path / "moved").resolve())


def test_the_crop_of_a_celeba_run_is_recorded_and_used_from_any_working_directory(tmp_path, monkeypatch):
    """score and load_run crop new images as training did, even where data.root is not at hand."""
    from dataclasses import replace

    cfg = DataConfig(dataset="celeba", image_size=64, channels=3, root="data")
    monkeypatch.chdir(tmp_path)
    assert data.training_crop(cfg, None) is None  # no record, no official layout: the largest square
    official = tmp_path / "data" / "celeba"
    (official / "img_align_celeba").mkdir(parents=True)
    (official / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    assert data.training_crop(cfg, None) == data.CELEBA_CROP
    run = tmp_path / "run"
    run.mkdir()
    cropped = data.ImageFiles([], 64, 3, data.CELEBA_CROP)
    (run / "data.json").write_text(json.dumps(run_data.data_record(cfg, cropped, cropped)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # data/celeba is no longer under the working directory
    assert data.training_crop(cfg, run) == data.CELEBA_CROP
    assert data.training_crop(replace(cfg, dataset="folder"), run) is None
    image = Image.fromarray(np.arange(178 * 218 * 3, dtype=np.uint8).reshape(218, 178, 3))
    assert not torch.equal(data.preprocess_image(image, cfg, data.CELEBA_CROP), data.preprocess_image(image, cfg))


def test_a_run_trained_from_a_cache_records_the_crop_the_cache_was_made_with(tmp_path, monkeypatch):
    """A CelebA cache made from the official layout was cropped to 148: runs trained from it say so in data.json,
    and a cache of a plain folder says "largest square" even where the working directory has the layout."""
    celeba = tmp_path / "celeba"
    rng = np.random.default_rng(6)
    for i in range(1, 5):
        write_image(celeba / "img_align_celeba" / f"{i:06d}.jpg", random_image(rng, 218, 178), fmt="PNG")
    (celeba / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 1\n000003.jpg 2\n000004.jpg 0\n")
    official = data_cfg(dataset="celeba", root=str(tmp_path), image_size=8, channels=3)
    prepare_cache(official, str(tmp_path / "official-cache"), progress=False)
    cached = data_cfg(**{**vars(official), "cache": str(tmp_path / "official-cache")})
    train, test = data.build_dataset(cached, "train"), data.build_dataset(cached, "test")
    assert run_data.data_record(cached, train, test)["crop"] == data.CELEBA_CROP

    plain = tmp_path / "plain"
    make_folder(plain, 4, size=(20, 16))
    folder = data_cfg(dataset="celeba", root=str(plain), image_size=8, channels=3, test_fraction=0.25)
    prepare_cache(folder, str(tmp_path / "plain-cache"), progress=False)
    cached = data_cfg(**{**vars(folder), "cache": str(tmp_path / "plain-cache"), "root": str(tmp_path)})
    train, test = data.build_dataset(cached, "train"), data.build_dataset(cached, "test")
    record = run_data.data_record(cached, train, test)
    assert "crop" in record and record["crop"] is None
    run = tmp_path / "run"
    run.mkdir()
    (run / "data.json").write_text(json.dumps(record))
    assert data.training_crop(cached, None) == data.CELEBA_CROP  # data.root now holds the official layout
    assert data.training_crop(cached, run) is None  # but this run's images were cropped to their largest square

    digits = data.build_dataset(data_cfg(dataset="digits"), "train")
    assert "crop" not in run_data.data_record(data_cfg(dataset="digits"), digits, digits)


def test_a_process_exits_with_loader_workers_still_running(tmp_path):
    """Workers ignore SIGTERM (a signal to the whole job must not kill them before the trainer saves), which is
    what multiprocessing ends them with at exit: the process must still exit, promptly and without a traceback."""
    import subprocess
    import sys
    import textwrap

    make_folder(tmp_path / "images", 12, size=(8, 8))
    script = textwrap.dedent(f"""
        from glowtrain.config import DataConfig
        from glowtrain.data import build_dataset
        from glowtrain.loaders import make_train_batches
        dataset = build_dataset(DataConfig(dataset="folder", root={str(tmp_path / "images")!r}, image_size=8), "train")
        batches = make_train_batches(dataset, 4, seed=0, n_workers=2)
        next(batches)  # persistent workers now run, and nothing shuts them down before exit
        print("done")
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout == "done\n", child.stderr
    assert "Traceback" not in child.stderr


def test_a_prepare_that_replaces_a_cache_of_other_images_says_so(tmp_path):
    """A cache whose own folder is gone is replaced without --overwrite (the folder may have moved); when the new
    images are other ones, runs that trained from the cache now read them: said in a note."""
    from glowtrain.cache import replaced_note
    from glowtrain.folders import prepared_index

    make_folder(tmp_path / "first", 6)
    make_folder(tmp_path / "second", 5, seed=1)
    cache = str(tmp_path / "cache")
    first = data_cfg(dataset="folder", root=str(tmp_path / "first"), image_size=8, channels=3)
    assert prepared_index(cache) is None
    index = prepare_cache(first, cache, progress=False)
    assert prepared_index(cache) == index and replaced_note(cache, None, index) is None  # nothing was there
    assert replaced_note(cache, index, prepare_cache(first, cache, progress=False)) is None  # the same images again
    shutil.rmtree(tmp_path / "first")
    second = data_cfg(dataset="folder", root=str(tmp_path / "second"), image_size=8, channels=3)
    assert replaced_note(cache, index, prepare_cache(second, cache, progress=False)) == (
        f"note: {cache} held a cache of 6 other images (prepared from {(tmp_path / 'first').resolve()}); runs that "
        "trained from it now read these")
    make_folder(tmp_path / "third", 4, seed=2)  # by the command: on stderr, after what it cached
    shutil.rmtree(tmp_path / "second")
    done = ok(invoke("prepare", "--out", cache, "--no-progress", *sets(
        "data.dataset=folder", f"data.root={tmp_path / 'third'}", "data.image_size=8", "data.channels=3")))
    assert done.stderr.strip() == (f"note: {cache} held a cache of 5 other images (prepared from "
                                   f"{(tmp_path / 'second').resolve()}); runs that trained from it now read these")
