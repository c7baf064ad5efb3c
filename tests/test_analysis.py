"""Looking into a trained model through the CLI: sample, eval, reconstruct, interpolate, manipulate, info."""

import ast
import json
import math
import os
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, assert_one_line_error, invoke, ok, sets
from PIL import Image
from tqdm import tqdm

import glowtrain
from glowtrain import analysis, images
from glowtrain import sample as sample_module
from glowtrain.analysis import multiply_adds
from glowtrain.checkpoint import load_checkpoint, model_from_checkpoint, open_run
from glowtrain.config import load_config
from glowtrain.data import build_dataset
from glowtrain.evaluation import evaluate
from glowtrain.images import image_grid, temperature_label, temperature_name
from glowtrain.model import Glow
from glowtrain.runs import RunDir

REPO = Path(__file__).resolve().parent.parent
TINY = TINY_RUN
# The class-conditional run trains a little longer and keeps 8 bits, so that the class means at T=0
# decode to visibly different images (with 4 bits, 4 steps move them by a pixel or two at most).
CONDITIONAL = [
    "model.n_classes=10", "data.n_bits=8", "train.lr=0.005", "train.steps=8", "train.eval_every=8",
    "train.sample_every=8", "train.checkpoint_every=8",
]
SIZE, UP = 8, 8  # digits are 8x8 and saved grids enlarge them 8x (display_upscale)
CPU = ("--device", "cpu")


@pytest.fixture
def fitted(tiny_cli_run):
    """The shared tiny unconditional run (conftest): (root, run directory)."""
    return tiny_cli_run[:2]


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A tiny class-conditional digits run (model.n_classes=10) in a root of its own."""
    root = tmp_path_factory.mktemp("analysis_conditional")
    run_dir = root / "runs" / "cond"
    ok(invoke("fit", "--out", run_dir, "--no-progress", *sets(*TINY, *CONDITIONAL)))
    return run_dir


def test_load_run_gives_evals_class_given_bits_per_dim_with_labels(conditional, fitted):
    """Without labels a class-conditional run scores the class marginal (score's figure, not eval's)."""
    import glowtrain
    from glowtrain.data import build_dataset
    from glowtrain.errors import UserError

    run = glowtrain.load_run(conditional, device="cpu")
    test = build_dataset(run.cfg.data, "test")
    given = run.bits_per_dim(test.images, labels=test.labels)
    evaluated = json.loads(ok(invoke("eval", "--run", conditional, *CPU)).stdout)["bpd"]
    assert float(given.mean()) == pytest.approx(evaluated, abs=1e-6)
    images, labels = run.split("test")  # the split as eval reads it, without reaching into glowtrain.data
    assert torch.equal(images, test.images) and torch.equal(labels, test.labels)
    assert float(run.bits_per_dim(images, labels=labels).mean()) == pytest.approx(evaluated, abs=1e-6)
    assert len(run.split("train")[0]) == 1500
    with pytest.raises(UserError, match=r"^split must be 'train' or 'test', got 'valid'"):
        run.split("valid")
    assert float(run.bits_per_dim(test.images).mean()) != pytest.approx(evaluated, abs=1e-4)
    three = test.images[:3]
    assert torch.equal(run.bits_per_dim(three, labels=2), run.bits_per_dim(three, labels=[2, 2, 2]))
    assert torch.equal(run.bits_per_dim(three, labels="2"), run.bits_per_dim(three, labels=2))  # digits' names
    with pytest.raises(UserError, match=r"^labels must be a class number or name, or one per image \(3\)"):
        run.bits_per_dim(three, labels=[1, 2])
    with pytest.raises(UserError, match=r"^labels 10 is out of range: this model has classes 0..9"):
        run.bits_per_dim(three, labels=10)
    with pytest.raises(UserError, match="^labels needs a class-conditional model"):
        glowtrain.load_run(fitted[1], device="cpu").bits_per_dim(three, labels=1)


ATTRIBUTES = ["Smiling", "Young", "Eyeglasses"]


def attribute_row(index: int) -> list[int]:
    # Smiling on every third image, Young on all (so it has no "without" side), Eyeglasses on none.
    return [1 if index % 3 == 0 else -1, 1, -1]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A tiny run on a folder of 8x8 greyscale PNGs with a CelebA-style list_attr_celeba.txt beside them."""
    root = tmp_path_factory.mktemp("analysis_folder")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    names = [f"img{i:03d}.png" for i in range(40)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8), "L").save(images / name)
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in attribute_row(i)) for i, name in enumerate(names)]
    (images / "list_attr_celeba.txt").write_text("\n".join([str(len(names)), " ".join(ATTRIBUTES), *rows]) + "\n")
    run_dir = root / "runs" / "folder"
    folder = ["data.dataset=folder", f"data.root={images}", "data.image_size=8", "data.channels=1",
              "data.test_fraction=0.25", "train.steps=2", "train.eval_every=2", "train.sample_every=2",
              "train.checkpoint_every=2", "train.warmup_steps=1"]
    ok(invoke("fit", "--out", run_dir, "--no-progress", *sets(*TINY, *folder)))
    return run_dir, images, names


# ---------------------------------------------------------------------------- helpers


def grid_size(n: int, n_columns: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels of a saved grid of n digits: make_grid's 1-pixel padding, then 8x."""
    if n == 1:
        return SIZE * UP, SIZE * UP  # torchvision's make_grid returns a lone image as it is, unpadded
    n_columns = min(n_columns or math.ceil(math.sqrt(n)), n)
    n_rows = math.ceil(n / n_columns)
    return (n_columns * (SIZE + 1) + 1) * UP, (n_rows * (SIZE + 1) + 1) * UP


def pixels(path) -> np.ndarray:
    """A saved PNG as one (H, W) uint8 array (grids are stored as grey RGB)."""
    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim == 3:
        assert (array == array[..., :1]).all(), "a greyscale picture should have equal channels"
        array = array[..., 0]
    return array


def labelled(path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(the grid, the label margin on its left) of a saved figure whose grid is `size` (width, height) pixels."""
    picture = pixels(path)
    margin = picture.shape[1] - size[0]
    assert margin > 0 and picture.shape[0] == size[1], (picture.shape, size)
    return picture[:, margin:], picture[:, :margin]


def tile(picture: np.ndarray, row: int, column: int) -> np.ndarray:
    """The 8x8 digit at (row, column) of an upscaled grid, at its native resolution."""
    top, left = (1 + row * (SIZE + 1)) * UP, (1 + column * (SIZE + 1)) * UP
    block = picture[top : top + SIZE * UP, left : left + SIZE * UP]
    native = block[::UP, ::UP]
    assert (np.kron(native, np.ones((UP, UP), dtype=np.uint8)) == block).all(), "not a nearest-neighbour upscale"
    return native


def test_images_as_displayed(n: int, n_bits: int = 4) -> list[np.ndarray]:
    """The first n digits test images, reduced to n_bits and spread over 0..255 as the grids show them."""
    dataset = build_dataset(load_config().data, "test")
    levels = 2**n_bits
    return [(dataset[i][0][0].numpy().astype(np.int64) // (256 // levels) * (255 // (levels - 1))).astype(np.uint8)
            for i in range(n)]


test_images_as_displayed.__test__ = False  # a helper, not a test


def final_test_line(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    return [line for line in lines if line["split"] == "test"][-1]


def json_output(result) -> dict:
    return json.loads(ok(result).stdout)


def parse_info(text: str) -> tuple[dict, str]:
    head, config = text.split("\nconfig:\n", 1)
    values = {}
    for line in head.splitlines():
        key, value = line.split(": ", 1)
        values[key] = int(value.replace(",", "")) if value.replace(",", "").isdigit() else ast.literal_eval(value)
    return values, textwrap.dedent(config)


def hand_multiply_adds(channels: int, size: int, n_levels: int, n_steps: int, hidden: int, coupling: str,
                       conv: str, spline_bins: int = 8) -> int:
    """Multiply-adds of one image's forward pass, counted from the architecture on paper."""
    # Network outputs per changed element: shift, or shift and scale, or a spline's K widths, K heights and
    # K - 1 inner derivatives (its elementwise arithmetic is not counted).
    outputs = {"additive": 1, "affine": 2, "spline": 3 * spline_bins - 1}[coupling]
    total = 0
    for level in range(n_levels):
        channels, size = 4 * channels, size // 2  # squeeze
        pixels_ = size * size
        kept = channels // 2
        changed = channels - kept
        per_step = 0
        if conv in ("lu", "plain"):
            per_step += channels * channels * pixels_  # the 1x1 invertible convolution
        per_step += hidden * pixels_ * kept * 9  # coupling net: 3x3 conv in
        per_step += hidden * pixels_ * hidden  # 1x1 conv
        per_step += changed * outputs * pixels_ * hidden * 9  # 3x3 zero conv out
        total += n_steps * per_step
        if level < n_levels - 1:
            total += 2 * changed * pixels_ * kept * 9  # split prior: 3x3 zero conv from the kept half
            channels = kept
    return total


# ---------------------------------------------------------------------------- sample


@pytest.mark.parametrize("n_columns", [None, 1, 4, 20])
@pytest.mark.parametrize(("n", "channels"), [(1, 1), (2, 3), (7, 1), (16, 3), (17, 1)])
def test_grids_are_torchvisions_make_grid_with_a_one_pixel_border(n, channels, n_columns):
    from torchvision.utils import make_grid

    images = torch.randint(0, 256, (n, channels, 5, 6), generator=torch.Generator().manual_seed(n),
                           dtype=torch.uint8)
    expected = make_grid(images, nrow=n_columns or math.ceil(math.sqrt(n)), padding=1, pad_value=0)
    assert torch.equal(image_grid(images, n_columns), expected)


@pytest.mark.parametrize("n", [1, 5, 10])
def test_sample_writes_one_grid_per_temperature_sized_by_n(fitted, tmp_path, n):
    _, run_dir = fitted
    result = ok(invoke("sample", "--run", run_dir, "--temp", "0.5", "--temp", "1", "--n", n, "--seed", "2",
                       "--out", tmp_path, *CPU))
    written = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in written] == [f"sample_step0000004_{t}_seed2_n{n}.png" for t in ("t0p50", "t1p00")]
    assert result.stdout.split() == [str(p) for p in written]
    for path in written:
        with Image.open(path) as image:
            assert image.size == grid_size(n)


def test_sample_same_seed_gives_identical_bytes_and_another_seed_other_images(fitted, tmp_path):
    _, run_dir = fitted
    args = ["sample", "--run", run_dir, "--temp", "0.8", "--n", "9", *CPU]
    paths = {}
    for label, seed in (("a", 1), ("b", 1), ("c", 2)):
        paths[label] = Path(ok(invoke(*args, "--seed", seed, "--out", tmp_path / label)).stdout.strip())
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    first, other = pixels(paths["a"]), pixels(paths["c"])
    assert first.shape == other.shape and (first != other).any()
    # The nine images of one grid are nine different draws.
    tiles = [tile(first, i // 3, i % 3) for i in range(9)]
    assert len({t.tobytes() for t in tiles}) > 1


def test_sample_at_temperature_zero_repeats_the_prior_mode_for_an_unconditional_model(fitted, tmp_path):
    _, run_dir = fitted
    path = ok(invoke("sample", "--run", run_dir, "--temp", "0", "--n", "9", "--out", tmp_path, *CPU)).stdout.strip()
    picture = pixels(path)
    tiles = [tile(picture, i // 3, i % 3) for i in range(9)]
    assert all((t == tiles[0]).all() for t in tiles)
    # ... and that one image is the decoded prior mean of the EMA model.
    model = open_run(str(run_dir), None).model
    mode = model.sample(1, temperature=0.0)
    expected = torch.floor((mode + 0.5) * 16).clamp(0, 15) * 17
    assert (tiles[0] == expected[0, 0].numpy().astype(np.uint8)).all()


def test_sample_generates_large_n_in_batches_of_batch_size(fitted, tmp_path, monkeypatch):
    _, run_dir = fitted
    calls = []
    original = Glow.sample

    def recording(self, n, *args, **kwargs):
        calls.append(n)
        return original(self, n, *args, **kwargs)

    monkeypatch.setattr(Glow, "sample", recording)
    args = ["sample", "--run", run_dir, "--temp", "0", "--temp", "0.7", "--n", "10", "--seed", "4", *CPU]
    small = ok(invoke(*args, "--batch-size", "3", "--out", tmp_path / "small")).stdout.split()
    assert calls == [3, 3, 3, 1] * 2
    again = ok(invoke(*args, "--batch-size", "3", "--out", tmp_path / "again")).stdout.split()
    calls.clear()
    large = ok(invoke(*args, "--batch-size", "256", "--out", tmp_path / "large")).stdout.split()
    assert calls == [10, 10]
    for path in small + large:
        with Image.open(path) as image:
            assert image.size == grid_size(10)
    # Batched sampling is still deterministic for a seed ...
    assert [Path(p).read_bytes() for p in small] == [Path(p).read_bytes() for p in again]
    # ... and T=0 draws no noise, so there the batch size cannot matter. (At T>0 the noise is drawn
    # batch by batch from one generator, so other batch sizes give other, equally valid, images.)
    assert (pixels(small[0]) == pixels(large[0])).all()


def test_sample_individual_writes_each_image_equal_to_its_grid_tile(fitted, tmp_path):
    _, run_dir = fitted
    result = ok(invoke("sample", "--run", run_dir, "--temp", "0.7", "--n", "5", "--individual", "--seed", "6",
                       "--out", tmp_path, *CPU))
    grid_path = tmp_path / "sample_step0000004_t0p70_seed6_n5.png"
    singles = [tmp_path / "sample_step0000004_t0p70_seed6_n5" / f"{i:04d}.png" for i in range(5)]
    assert result.stdout.split() == [str(grid_path), f"{singles[0].parent}/"]  # the folder once, not every file
    assert sorted((tmp_path / "sample_step0000004_t0p70_seed6_n5").iterdir()) == singles
    grid = pixels(grid_path)
    for index, path in enumerate(singles):
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE)  # the model's own resolution: no display enlargement
        assert (pixels(path) == tile(grid, index // 3, index % 3)).all()


def test_sample_grid_flag_writes_one_labelled_figure_stacking_the_temperature_grids(fitted, tmp_path):
    _, run_dir = fitted
    temps = ["0", "0.7", "1"]
    args = ["sample", "--run", run_dir, *[a for t in temps for a in ("--temp", t)], "--n", "4", "--seed", "3", *CPU]
    result = ok(invoke(*args, "--grid", "--out", tmp_path / "figure"))
    name = "sample_step0000004_grid_t0p00-t0p70-t1p00_seed3_n4.png"
    assert sorted(p.name for p in (tmp_path / "figure").iterdir()) == [name]
    assert result.stdout.split() == [str(tmp_path / "figure" / name)]
    separate = ok(invoke(*args, "--out", tmp_path / "separate")).stdout.split()

    with Image.open(result.stdout.strip()) as image:
        figure = np.asarray(image.convert("RGB"))
    width, height = grid_size(4)
    assert figure.shape[0] == len(temps) * height  # one row block per temperature, nothing else
    margin = figure.shape[1] - width
    assert margin > 0  # room on the left for the labels
    for block, path in enumerate(separate):
        rows = slice(block * height, (block + 1) * height)
        with Image.open(path) as image:
            assert (figure[rows, margin:] == np.asarray(image.convert("RGB"))).all()
        label = figure[rows, :margin]
        assert (label < 128).any(), f"no label drawn for T={temps[block]}"
    labels = [figure[b * height : (b + 1) * height, :margin].tobytes() for b in range(len(temps))]
    assert len(set(labels)) == len(temps)  # each block carries its own temperature


def test_sample_classes_give_one_block_per_class_labelled_on_a_conditional_model(conditional, tmp_path):
    path = ok(invoke("sample", "--run", conditional, "--temp", "0", "--class", "3", "--class", "5", "--n", "4",
                     "--out", tmp_path, *CPU)).stdout.strip()
    picture, margin = labelled(path, grid_size(4, 2))
    threes, fives = [tile(picture, 0, c) for c in range(2)], [tile(picture, 1, c) for c in range(2)]
    assert (threes[0] == threes[1]).all() and (fives[0] == fives[1]).all()
    assert (threes[0] != fives[0]).any()
    # Each class's block of rows carries its own label on the left ("3", "5": the digits have no class names).
    row = (SIZE + 1) * UP
    three_label, five_label = margin[UP : UP + row], margin[UP + row : UP + 2 * row]
    assert (three_label < 128).any() and (five_label < 128).any() and (three_label != five_label).any()


def test_sample_grid_of_classes_labels_each_class_at_each_temperature(conditional, tmp_path):
    args = ["sample", "--run", conditional, "--temp", "0,1", "--class", "3", "--class", "5", "--n", "4", *CPU]
    figure = ok(invoke(*args, "--grid", "--out", tmp_path / "grid")).stdout.strip()
    separate = ok(invoke(*args, "--out", tmp_path / "separate")).stdout.split()
    width, height = grid_size(4, 2)
    picture, margin = labelled(figure, (width, 2 * height))
    row = (SIZE + 1) * UP
    for block, path in enumerate(separate):  # the separate grids are the figure's, each labelled by class alone
        grid, its_margin = labelled(path, (width, height))
        assert (picture[block * height : (block + 1) * height] == grid).all()
        assert its_margin.shape[1] < margin.shape[1]  # "3" against "T=0, 3"
    labels = [margin[UP + k * row : UP + (k + 1) * row].tobytes() for k in range(4)]  # T=0, 3 / T=0, 5 / T=1, ...
    assert len(set(labels)) == 4


def test_sample_several_classes_fill_rows_of_equal_length(conditional, tmp_path):
    path = ok(invoke("sample", "--run", conditional, "--temp", "0", "--class", "1", "--class", "2", "--class", "7",
                     "--n", "5", "--out", tmp_path, *CPU)).stdout.strip()
    picture = labelled(path, grid_size(5, 2))[0]  # ceil(5 / 3) = 2 per class: rows [1, 1], [2, 2], [7]
    assert (tile(picture, 0, 0) == tile(picture, 0, 1)).all()
    assert (tile(picture, 1, 0) == tile(picture, 1, 1)).all()
    assert (picture[(1 + 2 * (SIZE + 1)) * UP :, (1 + SIZE + 1) * UP :] == 0).all()  # the empty fifth slot


def test_a_class_with_more_images_than_a_square_grids_row_fills_rows_of_that_width(conditional, tmp_path):
    """One class is a square grid, not a strip of 64; two classes of 9 each take two rows of 5 (one cell blank)."""
    one = ok(invoke("sample", "--run", conditional, "--temp", "0", "--class", "3", "--n", "16", "--out",
                    tmp_path / "one", *CPU)).stdout.strip()
    labelled(one, grid_size(16))
    two = ok(invoke("sample", "--run", conditional, "--temp", "0", "--class", "3", "--class", "5", "--n", "18",
                    "--out", tmp_path / "two", *CPU)).stdout.strip()
    picture = labelled(two, grid_size(20, 5))[0]
    threes = [tile(picture, row, column) for row in (0, 1) for column in range(5)][:9]
    fives = [tile(picture, row, column) for row in (2, 3) for column in range(5)][:9]
    assert all((t == threes[0]).all() for t in threes) and all((f == fives[0]).all() for f in fives)
    assert (threes[0] != fives[0]).any() and (tile(picture, 1, 4) == 0).all() and (tile(picture, 3, 4) == 0).all()


@pytest.mark.parametrize("n, n_classes, columns, rows", [(64, 1, 8, 8), (64, 2, 8, 8), (18, 2, 5, 4), (120, 10, 12, 10),
                                                    (5, 3, 2, 3), (1024, 1, 32, 32)])
def test_class_blocks_make_a_grid_about_square_with_each_class_starting_a_row(n, n_classes, columns, rows):
    from glowtrain.sample import class_blocks

    per_class = math.ceil(n / n_classes)
    images = torch.arange(1, n + 1, dtype=torch.uint8).view(n, 1, 1, 1)
    laid_out, width = class_blocks(images, per_class)
    assert (width, math.ceil(len(laid_out) / width)) == (columns, rows)
    for k, block in enumerate(images.split(per_class)):  # each class's images in order from a row's start
        start = k * math.ceil(per_class / width) * width
        assert torch.equal(laid_out[start : start + len(block)], block)


def test_class_blocks_of_a_draw_larger_than_a_grid_lay_out_the_images_it_shows():
    from glowtrain.sample import class_blocks

    shown = torch.zeros(1024, 1, 1, 1, dtype=torch.uint8)  # the first 1,024 of --n 2000 --class 3 --individual
    laid_out, width = class_blocks(shown, 2000)
    assert (width, len(laid_out)) == (32, 1024)


def test_a_temperature_asked_for_twice_is_written_once(fitted, tmp_path):
    _, run_dir = fitted
    written = ok(invoke("sample", "--run", run_dir, "--temp", "0.7", "--temp", "0.7", "--n", "4", "--out", tmp_path,
                        *CPU)).stdout.split()
    assert written == [str(tmp_path / "sample_step0000004_t0p70_seed0_n4.png")]


def test_sample_says_how_many_images_overflowed_instead_of_drawing_them_silently(fitted, tmp_path):
    _, run_dir = fitted
    with pytest.warns(RuntimeWarning) as said:  # the CLI prints each warning as one line (test_cli)
        result = ok(invoke("sample", "--run", run_dir, "--temp", "1e308", "--temp", "0.7", "--n", "4", "--out",
                           tmp_path, *CPU))
    assert [str(warning.message) for warning in said] == [
        "4 of 4 images sampled at temperature 1e+308 are not finite (the model's inverse overflowed), so their "
        "pixels mean nothing — use a lower temperature, like 0.7"]
    assert len(result.stdout.split()) == 2  # the grids are still written, as asked
    run = glowtrain.load_run(run_dir, device="cpu")
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))
    for temperature in (0.7, 2.0):  # a lower temperature cannot help weights that are not finite
        with pytest.warns(RuntimeWarning, match=f"3 of 3 images sampled at temperature {temperature:g} are not "
                                                r"finite .* the model's weights are not finite \(the run diverged\): "
                                                "try an earlier checkpoint"):
            run.sample(3, temperature)


def test_load_run_samples_the_classes_asked_for_as_the_cli_does(conditional, tmp_path):
    folder = tmp_path / "cli"
    printed = ok(invoke("sample", "--run", conditional, "--temp", "0.7", "--seed", "2", "--class", "3", "--class",
                        "5", "--n", "5", "--individual", "--no-grid", "--out", folder, *CPU)).stdout.split()
    written = sorted(Path(printed[0]).iterdir())
    assert len(printed) == 1 and len(written) == 5
    from_cli = torch.stack([torch.tensor(pixels(path)).reshape(1, SIZE, SIZE) for path in written])
    run = glowtrain.load_run(conditional, device="cpu")
    assert torch.equal(run.sample(5, 0.7, seed=2, classes=[3, 5]), from_cli)
    assert torch.equal(run.sample(5, 0.7, seed=2, classes=np.array([3, 5])), from_cli)
    means = run.sample(2, 0.0, classes=4)  # one class: every image is that class's mean at T = 0
    assert torch.equal(means[0], means[1]) and not torch.equal(means[0], run.sample(1, 0.0, classes=3)[0])
    assert torch.equal(run.sample(2, 0.0, classes=torch.tensor(4)), means)
    assert torch.equal(run.sample(5, 0.7, seed=2, classes=["3", "5"]), from_cli)  # digits' names are numbers
    for classes, message in ((10, "classes 10 is out of range: this model has classes 0..9"),
                             (1.5, "classes must be a class number or name, or a non-empty list of them, got 1.5"),
                             (["three"], "classes 'three' is not a class number, and this run's classes have no "
                                         "names — give a number from 0 to 9"),
                             ([], "classes must be a class number or name, or a non-empty list"),
                             (b"\x03", "classes must be a class number or name, or a non-empty list"),
                             ({3: "a"}, "classes must be a class number or name, or a non-empty list")):
        with pytest.raises(glowtrain.UserError, match=message):
            run.sample(2, classes=classes)
    with pytest.raises(glowtrain.UserError, match=r"^n=2 leaves class 5 without an image .* pass n=3, or fewer"):
        run.sample(2, classes=[3, 4, 5])  # the Python API's own names, not the CLI's --n


@pytest.mark.parametrize("value,number", [
    ("cats", 2), ("CATS", 2), (" cats ", 2), ("0", 0), ("10", 1), ("+0", 0), (2, 2), ("-1", -1), ("7", 7),
])
def test_a_class_is_taken_by_number_or_by_name(value, number):
    # Folders named 1, 10 and cats: "10" is out of range as a number, so it is the folder; "7" stays a number
    # for the caller's range check, and "-1" too.
    assert sample_module.class_number(value, ["1", "10", "cats"], 3) == number


@pytest.mark.parametrize("value,names,needle", [
    ("1", ["1", "10", "cats"], "--class 1 could mean class 1 (10) or the class named 1 (class 0) — give the one you "
                               "mean by name: '10' or '1'"),
    ("cat", ["Cat", "cat", "dog"], None),  # an exact match wins over a match aside from case
    ("CAT", ["Cat", "cat", "dog"], "--class 'CAT' could name classes 'Cat' or 'cat' — give the name as written"),
    ("fish", ["cat", "dog"], "--class 'fish' names no class of this run — give a number or a name: 0 cat, 1 dog"),
    ("fish", [], "--class 'fish' is not a class number, and this run's classes have no names — give a number from 0 "
                 "to 2"),
    ("+-1", [], "--class '+-1' is not a class number, and this run's classes have no names — give a number from 0 "
                "to 2"),
    ("²", ["cat", "dog"], "--class '²' names no class of this run — give a number or a name: 0 cat, 1 dog"),
])
def test_a_class_name_that_could_mean_two_classes_or_none_is_refused(value, names, needle):
    if needle is None:
        assert sample_module.class_number(value, names, 3) == 1
        return
    with pytest.raises(glowtrain.UserError) as raised:
        sample_module.class_number(value, names, 3)
    assert str(raised.value) == needle


@pytest.mark.parametrize("values,numbers", [
    (["3,5"], [3, 5]), (["3", "5"], [3, 5]), (["3, cats", "0"], [3, 2, 0]), (["3,"], [3]),
    (["cats, big"], [1]),  # a class folder named with a comma is taken whole
    ([4], [4]),
])
def test_classes_are_given_repeated_or_comma_separated(values, numbers):
    assert sample_module.class_numbers(values, ["1", "cats, big", "cats", "x", "y", "z"], 6) == numbers


def test_a_class_list_with_no_class_in_it_or_an_empty_item_is_refused():
    with pytest.raises(glowtrain.UserError, match=r"^--class got no class \(', ,'\); give one by number or name"):
        sample_module.class_numbers([", ,"], [], 10)
    with pytest.raises(glowtrain.UserError, match=r"^--class has an empty item in '0,,2' \(a class left out\?\)"):
        sample_module.class_numbers(["0,,2"], [], 10)


def test_the_builtin_sets_class_names_are_torchvisions_in_its_order():
    import torchvision.datasets

    from glowtrain.config import DataConfig

    # CIFAR10 reads its names from the downloaded files, so only FashionMNIST's can be compared here.
    assert sample_module.class_names(None, DataConfig(dataset="fashion_mnist")) == \
        torchvision.datasets.FashionMNIST.classes
    cifar = sample_module.class_names(None, DataConfig(dataset="cifar10"))
    assert len(set(cifar)) == 10 and sample_module.class_number("truck", cifar, 10) == 9
    assert sample_module.class_names(None, DataConfig(dataset="digits")) == []


def test_a_loaded_run_prints_as_one_line_saying_what_it_is(fitted, conditional):
    run = glowtrain.load_run(fitted[1], device="cpu")
    model = run.cfg.model
    assert repr(run) == (f"Run({str(fitted[1])!r}, step 4, digits 1x8x8 {run.n_bits}-bit, L={model.n_levels} "
                         f"K={model.n_steps} {model.coupling}, device cpu)")
    assert repr(glowtrain.load_run(conditional, device="cpu")).endswith(", 10 classes, device cpu)")
    best = glowtrain.load_run(RunDir(fitted[1]).best, device="cpu", ema=False)  # a checkpoint inside the run
    assert repr(best).startswith(f"Run({str(fitted[1])!r}, step 4, best.pt, raw weights, digits 1x8x8")


def test_load_run_refuses_classes_for_an_unconditional_model(fitted):
    run = glowtrain.load_run(fitted[1], device="cpu")
    with pytest.raises(glowtrain.UserError, match="classes needs a class-conditional model"):
        run.sample(2, classes=[1])



def test_pictures_and_runs_are_never_written_among_the_images_the_run_trains_on(folder_run, tmp_path):
    run_dir, images, _ = folder_run
    before = sorted(p.name for p in images.rglob("*"))
    for command in (["sample", "--temp", "0.7", "--n", "2", "--individual"], ["reconstruct", "--n", "2"],
                    ["interpolate", "--pairs", "1", "--steps", "2"],
                    ["score", "--images", images / "img000.png", "--no-progress"]):
        for out in (images / "samples", images):
            result = invoke(*command, "--run", run_dir, "--out", out, *CPU)
            assert_one_line_error(result, 2, f"the output folder {out} lies inside the image folder this run trains on "
                                             f"({images})", "choose an --out outside it")
    fit = invoke("fit", "--out", images / "run2", "--no-progress", "--config", run_dir / "config.yaml")
    assert_one_line_error(fit, 2, f"the output folder {images / 'run2'} lies inside the image folder this run")
    assert sorted(p.name for p in images.rglob("*")) == before
    hidden = images / ".scores"  # hidden folders are not read as images
    ok(invoke("score", "--run", run_dir, "--images", images / "img000.png", "--out", hidden, "--no-progress", *CPU))
    shutil.rmtree(hidden)


# ---------------------------------------------------------------------------- eval


def test_eval_prints_the_training_loops_final_test_bpd_for_the_same_checkpoint(fitted):
    _, run_dir = fitted
    result = json_output(invoke("eval", "--run", run_dir, *CPU))
    assert set(result) == {"bpd", "bpd_stderr", "n_images", "n_dequant", "split", "step", "checkpoint", "ema"}
    final = final_test_line(run_dir)
    assert final["step"] == result["step"] == 4
    assert result["bpd"] == pytest.approx(final["bpd"], abs=1e-9)
    assert result["bpd_stderr"] == pytest.approx(final["bpd_stderr"], abs=1e-9)
    assert result["n_images"] == final["n_images"] == 297
    assert result["n_dequant"] == 1 and result["split"] == "test"
    assert result["checkpoint"] == str(RunDir(run_dir).last)
    assert 0 < result["bpd_stderr"] < 0.1 and 0 < result["bpd"] < 8


def test_sample_shows_progress_for_a_long_draw_and_not_with_no_progress(fitted, tmp_path, monkeypatch):
    _, run_dir = fitted
    args = ["sample", "--run", run_dir, "--temp", "0,0.7", "--n", "6", "--batch-size", "4", *CPU]
    # As if the draw were slow: the bar shows at once and redraws at every batch.
    eager = {"delay": 0, "mininterval": 0, "miniters": 1}
    monkeypatch.setattr(images, "tqdm", lambda *a, **k: tqdm(*a, **{**k, **eager}))
    shown = ok(invoke(*args, "--out", tmp_path / "shown"))
    counts = re.findall(r"sampling: .*?\| (\d+/\d+) ", shown.stderr)
    assert counts == ["0/12", "4/12", "6/12", "10/12", "12/12"]  # both temperatures' images, batch by batch
    quiet = ok(invoke(*args, "--out", tmp_path / "quiet", "--no-progress"))
    assert quiet.stderr == "" and quiet.stdout == shown.stdout.replace("shown", "quiet")


def test_eval_shows_its_progress_on_stderr_and_leaves_stdout_to_the_json(fitted):
    _, run_dir = fitted
    shown = ok(invoke("eval", "--run", run_dir, *CPU, "--batch-size", "100"))
    assert "evaluating" in shown.stderr and "/297 " in shown.stderr  # a bar over the split's images
    quiet = ok(invoke("eval", "--run", run_dir, *CPU, "--batch-size", "100", "--no-progress"))  # same batches
    assert quiet.stderr == "" and json.loads(quiet.stdout) == json.loads(shown.stdout)


def test_eval_ignores_seed_and_batch_size_because_the_dequantisation_seed_is_fixed(fitted):
    _, run_dir = fitted
    reference = json_output(invoke("eval", "--run", run_dir, *CPU))
    for extra in (["--seed", "7"], ["--batch-size", "50"]):
        other = json_output(invoke("eval", "--run", run_dir, *CPU, *extra))
        assert other["bpd"] == pytest.approx(reference["bpd"], abs=1e-9)
        assert other["n_images"] == reference["n_images"]


def test_eval_uses_ema_weights_unless_no_ema(fitted):
    _, run_dir = fitted
    ema = json_output(invoke("eval", "--run", run_dir, *CPU))["bpd"]
    raw = json_output(invoke("eval", "--run", run_dir, "--no-ema", *CPU))["bpd"]
    state = load_checkpoint(RunDir(run_dir).last)
    model, cfg = model_from_checkpoint(state, use_ema=False)
    expected = evaluate(model, build_dataset(cfg.data, "test"), cfg, torch.device("cpu"))["bpd"]
    assert raw == pytest.approx(expected, abs=1e-9)
    assert abs(raw - ema) > 1e-6


def test_eval_averages_several_dequantisation_draws(fitted):
    _, run_dir = fitted
    one = json_output(invoke("eval", "--run", run_dir, *CPU))
    three = json_output(invoke("eval", "--run", run_dir, "--n-dequant", "3", *CPU))
    assert three["n_dequant"] == 3 and three["n_images"] == one["n_images"]
    assert three["bpd"] != one["bpd"]
    assert abs(three["bpd"] - one["bpd"]) < 0.05
    # The first of the three draws is the single draw, so the other two average to within 0.05 too.
    assert abs((3 * three["bpd"] - one["bpd"]) / 2 - one["bpd"]) < 0.05


def test_eval_on_the_train_split_covers_all_1500_images(fitted):
    _, run_dir = fitted
    result = json_output(invoke("eval", "--run", run_dir, "--split", "train", *CPU))
    assert result["split"] == "train" and result["n_images"] == 1500
    assert abs(result["bpd"] - final_test_line(run_dir)["bpd"]) < 0.5  # same model, similar images


def test_eval_of_a_conditional_model_adds_its_classification_accuracy(conditional):
    result = json_output(invoke("eval", "--run", conditional, *CPU))
    final = final_test_line(conditional)
    assert result["step"] == final["step"] == 8
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == pytest.approx(final["accuracy"], abs=1e-12)
    assert result["accuracy"] * result["n_images"] == pytest.approx(round(result["accuracy"] * 297), abs=1e-6)
    assert result["bpd"] == pytest.approx(final["bpd"], abs=1e-9)


# ---------------------------------------------------------------------------- reconstruct


def test_reconstruct_is_exact_to_1e_3_pixel_levels_and_shows_originals_over_reconstructions(fitted, tmp_path):
    _, run_dir = fitted
    result = json_output(invoke("reconstruct", "--run", run_dir, "--n", "5", "--out", tmp_path, *CPU))
    assert result["n_images"] == 5
    assert 0 <= result["mean_abs_error"] <= result["max_abs_error"] < 1e-3
    path = Path(result["path"])
    assert path == tmp_path / "reconstruct_step0000004_n5.png" and path.is_file()
    with Image.open(path) as image:
        assert image.size == grid_size(10, 5)  # two rows of five
    picture = pixels(path)
    for i, original in enumerate(test_images_as_displayed(5)):
        assert (tile(picture, 0, i) == original).all()
        assert (tile(picture, 1, i) == original).all()


def test_reconstruct_of_more_images_than_one_batch_decodes_each_to_its_original(fitted, tmp_path):
    _, run_dir = fitted
    result = json_output(invoke("reconstruct", "--run", run_dir, "--n", "70", "--out", tmp_path, "--no-progress",
                                *CPU))
    assert result["n_images"] == 70 and result["max_abs_error"] < 1e-3
    picture = pixels(result["path"])
    for i, original in enumerate(test_images_as_displayed(70)):
        assert (tile(picture, 0, i) == original).all() and (tile(picture, 1, i) == original).all()


def test_reconstruct_and_interpolate_show_progress_batch_by_batch_and_pair_by_pair(fitted, tmp_path, monkeypatch):
    _, run_dir = fitted
    eager = {"delay": 0, "mininterval": 0, "miniters": 1}  # as if the work were slow
    monkeypatch.setattr(images, "tqdm", lambda *a, **k: tqdm(*a, **{**k, **eager}))
    shown = ok(invoke("reconstruct", "--run", run_dir, "--n", "70", "--out", tmp_path, *CPU))
    assert re.findall(r"reconstructing: .*?\| (\d+/\d+) ", shown.stderr) == ["0/70", "64/70", "70/70"]
    shown = ok(invoke("interpolate", "--run", run_dir, "--pairs", "2", "--out", tmp_path, *CPU))
    assert re.findall(r"interpolating: .*?\| (\d+/\d+) ", shown.stderr) == ["0/2", "1/2", "2/2"]
    assert ok(invoke("interpolate", "--run", run_dir, "--pairs", "2", "--out", tmp_path / "quiet", "--no-progress",
                     *CPU)).stderr == ""


def test_reconstruct_without_out_writes_into_the_checkpoints_samples_folder(fitted, tmp_path):
    _, run_dir = fitted
    in_run = json_output(invoke("reconstruct", "--run", run_dir, "--n", "2", *CPU))
    written = Path(in_run["path"])
    assert written == RunDir(run_dir).samples / "reconstruct_step0000004_n2.png" and written.is_file()
    written.unlink()  # leave the shared run as the other tests expect it

    loose = tmp_path / "loose.pt"
    shutil.copy(RunDir(run_dir).last, loose)
    outside = json_output(invoke("reconstruct", "--checkpoint", loose, "--n", "2", *CPU))
    assert Path(outside["path"]) == tmp_path / "samples" / "reconstruct_step0000004_n2.png"
    assert outside["max_abs_error"] == in_run["max_abs_error"]


def test_analysis_pictures_are_named_by_their_options_and_never_replaced_silently(fitted, tmp_path):
    """reconstruct, interpolate and manipulate: the defaults give the plain name, other values are named in it,
    and a second identical call stops before any work (exit 2) unless --overwrite."""
    _, run_dir = fitted
    calls = {
        "reconstruct_step0000004.png": ("reconstruct",),
        "reconstruct_step0000004_n3_raw.png": ("reconstruct", "--n", "3", "--no-ema"),
        "interpolate_step0000004.png": ("interpolate",),
        "interpolate_step0000004_pairs2.png": ("interpolate", "--pairs", "2"),
        "manipulate_step0000004_class3-5.png": ("manipulate", "--from-class", "3", "--to-class", "5"),
        "manipulate_step0000004_class3-5_a0,0.5_n2.png": ("manipulate", "--from-class", "3", "--to-class", "5",
                                                          "--alphas", "0,0.5", "--n", "2"),
        # Exact digits: 0.10000001 was named (and labelled) 0.1, so --alphas 0.1,0.1 took its name.
        "manipulate_step0000004_class3-5_a0.1,0.10000001_n1.png": ("manipulate", "--from-class", "3", "--to-class",
                                                                   "5", "--alphas", "0.1,0.10000001", "--n", "1"),
    }
    for name, args in calls.items():
        ok(invoke(*args, "--run", run_dir, "--out", tmp_path, *CPU))
        assert (tmp_path / name).is_file(), (name, sorted(p.name for p in tmp_path.iterdir()))
    assert len(list(tmp_path.iterdir())) == len(calls)
    before = {name: (tmp_path / name).read_bytes() for name in calls}
    for name, args in calls.items():
        (tmp_path / name).write_bytes(b"mine")
        refused = invoke(*args, "--run", run_dir, "--out", tmp_path, *CPU)
        assert_one_line_error(refused, 2, f"{tmp_path / name} already exists", "--overwrite")
        assert (tmp_path / name).read_bytes() == b"mine"
        ok(invoke(*args, "--run", run_dir, "--out", tmp_path, *CPU, "--overwrite"))
        assert (tmp_path / name).read_bytes() == before[name]
    taken = tmp_path / "taken"
    (taken / "sample_step0000004_t0p70_seed0.png").mkdir(parents=True)  # a folder where the picture would go
    for overwrite in ((), ("--overwrite",)):  # it failed after the drawing: IsADirectoryError, exit 1
        assert_one_line_error(invoke("sample", "--run", run_dir, "--out", taken, *CPU, *overwrite), 2,
                              f"{taken / 'sample_step0000004_t0p70_seed0.png'} is a folder, where this command "
                              "writes a picture — move it, or choose another --out")


# ---------------------------------------------------------------------------- interpolate


def test_interpolate_grid_is_pairs_by_steps_and_starts_and_ends_at_the_test_images(fitted, tmp_path):
    _, run_dir = fitted
    result = ok(invoke("interpolate", "--run", run_dir, "--pairs", "3", "--steps", "5", "--out", tmp_path, *CPU))
    path = Path(result.stdout.strip())
    assert path == tmp_path / "interpolate_step0000004_pairs3_steps5.png"
    with Image.open(path) as image:
        assert image.size == grid_size(15, 5)  # a row of five per pair
    picture = pixels(path)
    originals = test_images_as_displayed(6)
    moved = False
    for pair in range(3):
        start, end = originals[2 * pair], originals[2 * pair + 1]
        assert (tile(picture, pair, 0) == start).all() and (tile(picture, pair, 4) == end).all()
        middle = tile(picture, pair, 2)
        moved |= bool((middle != start).any() and (middle != end).any())
    assert moved, "the middle of every path equals one of its ends"


# ---------------------------------------------------------------------------- manipulate


def test_manipulate_moves_test_images_along_a_class_direction(fitted, tmp_path):
    _, run_dir = fitted
    result = json_output(invoke("manipulate", "--run", run_dir, "--from-class", "3", "--to-class", "5",
                                "--alphas", "-1,0,1,2", "--n", "3", "--out", tmp_path, *CPU))
    labels = build_dataset(load_config().data, "train").labels
    assert result["direction"] == "class 3 -> 5"
    assert result["n_with"] == int((labels == 5).sum()) and result["n_without"] == int((labels == 3).sum())
    assert result["alphas"] == [-1.0, 0.0, 1.0, 2.0]
    path = Path(result["path"])
    assert path == tmp_path / "manipulate_step0000004_class3-5_n3.png"
    figure = pixels(path)
    width, height = grid_size(12, 4)  # n rows of len(alphas), under a band naming each column's alpha
    band = figure.shape[0] - height
    assert figure.shape[1] == width and band > 0
    picture, headings = figure[band:], figure[:band]
    for row, original in enumerate(test_images_as_displayed(3)):
        assert (tile(picture, row, 1) == original).all()  # alpha 0 leaves the image as it was
        assert any((tile(picture, row, c) != original).any() for c in (0, 2, 3))
    title, headings = headings[: band // 2], headings[band // 2 :]  # "class 3 -> 5", then each column's alpha
    assert (title < 128).any()
    columns = [headings[:, (1 + c * (SIZE + 1)) * UP : (1 + c * (SIZE + 1) + SIZE) * UP] for c in range(4)]
    assert all((column < 128).any() for column in columns) and len({c.tobytes() for c in columns}) == 4


def test_column_headings_take_the_longest_form_that_fits_every_column():
    """manipulate's "alpha -0.25" ran into its neighbours over 48-pixel images; it fits over enlarged digits."""
    forms = [[f"alpha {a}", a] for a in ("-0.25", "0.25", "0.5", "0.75")]

    def drawn(size: int, upscale: int, labels) -> np.ndarray:
        picture = image_grid(torch.zeros(4, 1, size, size, dtype=torch.uint8), 4)
        return np.asarray(images.labelled_columns(picture, labels, size, upscale))

    assert (drawn(48, 1, forms) == drawn(48, 1, [[short] for _, short in forms])).all()
    assert (drawn(8, 8, forms) == drawn(8, 8, [[long] for long, _ in forms])).all()
    assert (drawn(8, 8, forms) != drawn(8, 8, [[short] for _, short in forms])).any()


def test_manipulate_says_how_many_images_overflowed_instead_of_drawing_them_silently(fitted, tmp_path):
    _, run_dir = fitted
    with pytest.warns(RuntimeWarning) as said:
        ok(invoke("manipulate", "--run", run_dir, "--from-class", "3", "--to-class", "5", "--alphas", "0,1e300",
                  "--n", "2", "--out", tmp_path, *CPU))
    assert [str(warning.message) for warning in said] == [
        "2 of 4 manipulated images are not finite (the model's inverse overflowed), so their pixels mean nothing — "
        "use smaller --alphas"]


def test_manipulate_along_a_celeba_attribute_uses_list_attr_celeba(folder_run, tmp_path):
    run_dir, images, names = folder_run
    result = json_output(invoke("manipulate", "--run", run_dir, "--attribute", "Smiling", "--alphas", "0,1",
                                "--n", "2", "--out", tmp_path, *CPU))
    train_names = [Path(p).name for p in build_dataset(open_run(str(run_dir), None).cfg.data, "train").paths]
    smiling = [name for name in train_names if attribute_row(names.index(name))[0] == 1]
    assert 0 < len(smiling) < len(train_names)
    assert result["direction"] == "Smiling"
    assert result["n_with"] == len(smiling) and result["n_without"] == len(train_names) - len(smiling)
    with Image.open(result["path"]) as image:
        width, height = grid_size(4, 2)
        assert image.width == width and image.height > height  # the alphas' band above the grid


@pytest.mark.parametrize("args,needle", [
    (["--attribute", "Bald"], "unknown attribute 'Bald'"),
    (["--attribute", "Young"], "no training images on one side of Young"),
    (["--from-class", "0", "--to-class", "1"],
     "need labelled data, and this run's folder has none — use --attribute on CelebA, or a run trained with labels"),
], ids=["unknown-attribute", "attribute-everywhere", "classes-on-unlabelled"])
def test_manipulate_errors_on_a_folder_run_exit_2(folder_run, tmp_path, args, needle):
    run_dir, _, _ = folder_run
    result = invoke("manipulate", "--run", run_dir, *args, "--out", tmp_path, *CPU)
    message = assert_one_line_error(result, 2, needle)
    if "Bald" in needle:
        assert all(name in message for name in ATTRIBUTES)
    assert list(tmp_path.iterdir()) == []


def test_manipulate_attribute_on_a_prepared_cache_asks_for_the_image_folder(folder_run, tmp_path):
    """A run read from a cache keeps no file names to look the attributes up by: it said "needs a dataset of
    image files (celeba), not celeba"."""
    run_dir, images, _ = folder_run
    folder = ["data.dataset=folder", f"data.root={images}", "data.image_size=8", "data.channels=1",
              "data.test_fraction=0.25"]
    ok(invoke("prepare", "--out", tmp_path / "cache", "--no-progress", *sets(*TINY, *folder)))
    result = invoke("manipulate", "--run", run_dir, "--attribute", "Smiling", "--data", tmp_path / "cache",
                    "--out", tmp_path / "out", *CPU)
    assert_one_line_error(result, 2, "--attribute reads CelebA's attribute list by file name, and this run trains "
                          f"from the prepared cache {tmp_path / 'cache'} — pass its image folder with --data DIR")


def test_the_attribute_file_is_found_under_a_data_root_starting_with_a_tilde(tmp_path, monkeypatch):
    from glowtrain.analysis import _celeba_attributes
    from glowtrain.config import apply_overrides, default_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "faces" / "celeba").mkdir(parents=True)
    text = "1\nSmiling Young\n000001.jpg  1 -1\n"
    (tmp_path / "faces" / "celeba" / "list_attr_celeba.txt").write_text(text)
    cfg = apply_overrides(default_config(), ["data.dataset=celeba", "data.root=~/faces"])
    assert _celeba_attributes(cfg) == (["Smiling", "Young"], {"000001.jpg": [1, -1]})


def test_manipulate_attribute_without_the_attribute_file_exits_2(folder_run, tmp_path):
    run_dir, images, _ = folder_run
    table = images / "list_attr_celeba.txt"
    hidden = images / "list_attr_celeba.txt.hidden"
    table.rename(hidden)
    try:
        result = invoke("manipulate", "--run", run_dir, "--attribute", "Smiling", "--out", tmp_path, *CPU)
    finally:
        hidden.rename(table)
    assert_one_line_error(result, 2, "list_attr_celeba.txt")


@pytest.mark.parametrize("args,needle", [
    ([], "give either --attribute"),
    (["--from-class", "3"], "give either --attribute"),
    (["--attribute", "Smiling"], "--attribute needs a dataset of image files"),
    (["--from-class", "3", "--to-class", "12"], "--to-class 12 is out of range: this run's data has classes 0..9"),
    (["--from-class", "3", "--to-class", "3"], "--from-class and --to-class are both 3"),
    (["--from-class", "3", "--to-class", "5", "--alphas", "a,b"], "--alphas"),
    (["--from-class", "3", "--to-class", "5", "--n", "257"], "--n 257 with 4 alphas make 1,028 images (a row per "
     "image), more than a picture holds (1,024) — use --n 256 or less"),
    (["--from-class", "3", "--to-class", "5", "--n", "1000", "--alphas", "1"], "test split has 297"),
], ids=["neither", "from-only", "attribute-on-digits", "class-out-of-range", "same-class", "bad-alphas",
        "oversized", "too-many"])
def test_manipulate_bad_input_exits_2(fitted, tmp_path, args, needle):
    _, run_dir = fitted
    assert_one_line_error(invoke("manipulate", "--run", run_dir, *args, "--out", tmp_path, *CPU), 2, needle)
    assert list(tmp_path.iterdir()) == []


def test_manipulate_shows_its_progress_over_the_training_images_it_encodes(fitted, tmp_path, monkeypatch):
    _, run_dir = fitted
    args = ["manipulate", "--run", run_dir, "--from-class", "3", "--to-class", "5", "--n", "1", "--alphas", "0,1",
            *CPU]
    eager = {"delay": 0, "mininterval": 0, "miniters": 1}
    monkeypatch.setattr(images, "tqdm", lambda *a, **k: tqdm(*a, **{**k, **eager}))
    shown = ok(invoke(*args, "--out", tmp_path / "shown"))
    result = json.loads(shown.stdout)
    total = result["n_with"] + result["n_without"]
    counts = re.findall(r"direction: .*?\| (\d+/\d+) ", shown.stderr)
    assert counts == [f"0/{total}", f"{result['n_with']}/{total}", f"{total}/{total}"]  # fives, then threes
    quiet = ok(invoke(*args, "--out", tmp_path / "quiet", "--no-progress"))
    assert quiet.stderr == ""


@pytest.mark.parametrize("args,needle", [
    (["reconstruct", "--n", "513"], "--n 513 makes 1,026 images (originals and reconstructions), more than a "
     "picture holds (1,024) — use --n 512 or less"),
    (["interpolate", "--pairs", "4", "--steps", "100000"], "--pairs 4 --steps 100000 make 400,000 images (a row per "
     "pair), more than a picture holds (1,024) — use --steps 256 or less"),
    (["interpolate", "--pairs", "148", "--steps", "8"], "— use --steps 6 or less"),
    (["interpolate", "--pairs", "600", "--steps", "8"], "use --pairs 128 or less, or fewer --steps"),
    (["interpolate", "--pairs", "2000", "--steps", "2"], "more than a picture holds (1,024) — use --pairs 512 or less"),
    (["manipulate", "--from-class", "3", "--to-class", "5", "--n", "200", "--alphas", "0,1,2,3,4,5"],
     "--n 200 with 6 alphas make 1,200 images (a row per image), more than a picture holds (1,024) — use --n 170 or "
     "less"),
], ids=["reconstruct", "interpolate-steps", "interpolate-steps-at-the-most-pairs", "interpolate-pairs",
        "interpolate-pairs-at-fewest-steps", "manipulate"])
def test_pictures_larger_than_a_grid_are_refused_before_any_work(fitted, tmp_path, monkeypatch, args, needle):
    _, run_dir = fitted
    if {"513", "600", "2000"} & set(args):  # more than the digits' test split holds: a larger split's case
        monkeypatch.setattr(analysis, "_test_split", lambda loaded, n, *rest, **options: range(10**6))
    line = assert_one_line_error(invoke(*args, "--run", run_dir, "--out", tmp_path, *CPU), 2, needle)
    assert line.endswith(needle)  # the fix offered is one that can be taken (2 is already the fewest --steps)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["reconstruct", "--n", "513"], ["interpolate", "--pairs", "200", "--steps", "8"],
                                  ["manipulate", "--from-class", "3", "--to-class", "5", "--n", "400"]],
                         ids=["reconstruct", "interpolate", "manipulate"])
def test_more_test_images_than_the_split_holds_is_said_before_the_pictures_size(fitted, tmp_path, args):
    """The picture's own limit would otherwise offer a fix the test split then refuses."""
    _, run_dir = fitted
    fix = "--pairs 148" if args[0] == "interpolate" else "--n 297"
    assert_one_line_error(invoke(*args, "--run", run_dir, "--out", tmp_path, *CPU), 2,
                          f"but the test split has 297 — use {fix} or less")


@pytest.mark.parametrize("args", [["--n", "0"], ["--alphas", ","]], ids=["zero-n", "no-alphas"])
def test_manipulate_empty_grid_exits_2(fitted, tmp_path, args):
    _, run_dir = fitted
    result = invoke("manipulate", "--run", run_dir, "--from-class", "3", "--to-class", "5", *args,
                    "--out", tmp_path, *CPU)
    assert_one_line_error(result, 2)


# ---------------------------------------------------------------------------- info


def test_info_on_a_run_counts_the_loaded_models_parameters_and_multiply_adds(fitted, tmp_path, monkeypatch):
    _, run_dir = fitted
    monkeypatch.chdir(tmp_path)
    values, config_text = parse_info(ok(invoke("info", "--run", run_dir)).stdout)
    model = open_run(str(run_dir), None).model
    assert values["parameters_total"] == sum(p.numel() for p in model.parameters())
    assert values["parameters_per_level"] == [sum(p.numel() for p in level.parameters()) for level in model.levels]
    assert sum(values["parameters_per_level"]) + values["parameters_priors"] == values["parameters_total"]
    assert values["latent_shapes"] == [[2, 4, 4], [8, 2, 2]]
    assert values["dimensions"] == 64 == sum(math.prod(s) for s in values["latent_shapes"])
    assert values["multiply_adds_per_image"] == hand_multiply_adds(1, 8, 2, 2, 16, "affine", "lu") == 53_888
    (tmp_path / "printed.yaml").write_text(config_text)
    assert load_config(tmp_path / "printed.yaml") == open_run(str(run_dir), None).cfg
    assert list(tmp_path.iterdir()) == [tmp_path / "printed.yaml"]  # info itself wrote nothing


def test_info_without_options_describes_the_digits_default_without_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values, config_text = parse_info(ok(invoke("info")).stdout)
    torch.manual_seed(0)
    model = Glow.from_config(load_config())
    assert values["parameters_total"] == sum(p.numel() for p in model.parameters())
    assert values["parameters_per_level"] == [sum(p.numel() for p in level.parameters()) for level in model.levels]
    assert values["latent_shapes"] == [[2, 4, 4], [8, 2, 2]]
    assert values["dimensions"] == 64
    assert values["multiply_adds_per_image"] == hand_multiply_adds(1, 8, 2, 8, 64, "spline", "lu")
    # The counts README "Results" gives for spline couplings with variational dequantisation.
    assert (values["parameters_total"], values["parameters_dequantizer"]) == (737_104, 107_568)
    assert "n_steps: 8" in config_text and "hidden_channels: 64" in config_text
    assert "coupling: spline" in config_text and "dequantization: variational" in config_text
    assert list(tmp_path.iterdir()) == []


def test_info_of_the_cifar10_config_counts_every_parameter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "cifar10.yaml"
    values, _ = parse_info(ok(invoke("info", "--config", config)).stdout)
    cfg = load_config(config)
    model = Glow.from_config(cfg)
    assert values["parameters_total"] == sum(p.numel() for p in model.parameters())
    assert values["dimensions"] == 3 * 32 * 32 == sum(math.prod(s) for s in values["latent_shapes"])
    assert values["latent_shapes"] == [[6, 16, 16], [12, 8, 8], [48, 4, 4]]
    m = cfg.model
    assert values["multiply_adds_per_image"] == hand_multiply_adds(3, 32, m.n_levels, m.n_steps, m.hidden_channels,
                                                                    m.coupling, m.conv)


def test_info_names_the_classes_of_a_conditional_model_where_they_have_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--set", "model.n_levels=1", "--set", "model.n_steps=1", "--set", "model.hidden_channels=8"]
    conditional = parse_info(ok(invoke("info", "--config", REPO / "configs" / "cifar10.yaml", *small, "--set",
                                       "model.n_classes=10")).stdout)[0]
    assert conditional["class_names"][:3] == ["airplane", "automobile", "bird"]
    assert "class_names" not in parse_info(ok(invoke("info", "--config", REPO / "configs" / "cifar10.yaml",
                                                     *small)).stdout)[0]  # unconditional: no labels to name
    assert "class_names" not in parse_info(ok(invoke("info", *small, "--set", "model.n_classes=10")).stdout)[0]


def test_the_parameter_counts_quoted_for_the_flowpp_config_are_what_info_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / "cifar10-flowpp.yaml"
    values, _ = parse_info(ok(invoke("info", "--config", config)).stdout)
    quoted = (f"{values['parameters_total'] / 1e6:.1f}M parameters", "plus "
              f"{values['parameters_dequantizer'] / 1e6:.2g}M in the noise flow")
    for text in (config.read_text(), (REPO / "README.md").read_text()):
        assert all(part in text for part in quoted), quoted


@pytest.mark.parametrize("channels,size,n_levels,n_steps,hidden,coupling,conv", [
    (1, 8, 2, 1, 4, "affine", "lu"),
    (3, 8, 3, 2, 6, "additive", "plain"),
    (3, 16, 2, 3, 5, "affine", "shuffle"),
    (1, 4, 1, 2, 3, "additive", "reverse"),
    (1, 8, 2, 1, 4, "spline", "lu"),
])
def test_multiply_adds_matches_a_count_by_hand(channels, size, n_levels, n_steps, hidden, coupling, conv):
    torch.manual_seed(0)
    model = Glow((channels, size, size), n_levels=n_levels, n_steps=n_steps, hidden_channels=hidden,
                 coupling=coupling, conv=conv)
    assert multiply_adds(model) == hand_multiply_adds(channels, size, n_levels, n_steps, hidden, coupling, conv)


def test_multiply_adds_leaves_an_untrained_model_untouched():
    torch.manual_seed(0)
    model = Glow((1, 8, 8), n_levels=2, n_steps=1, hidden_channels=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    multiply_adds(model)
    assert not model.is_initialized
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("args,needle", [
    (["--config", "missing.yaml"], "missing.yaml"),
    (["--run", "nowhere"], "nowhere"),
    (["--set", "model.n_levels=0"], "model.n_levels"),
    (["--set", "model.n_classes=7"], "model.n_classes=7 but dataset digits has 10 classes — set model.n_classes=10"),
    (["--set", "model.spline_bound=1e6"], "model.spline_bound=1000000.0 is not allowed — use a bound up to 50"),
], ids=["missing-config", "missing-run", "bad-override", "class-count-fit-refuses", "spline-bound-fit-refuses"])
def test_info_bad_input_exits_2(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("info", *args), 2, needle)


def test_info_with_both_run_and_config_exits_2(fitted):
    _, run_dir = fitted
    assert_one_line_error(invoke("info", "--run", run_dir, "--config", REPO / "configs" / "digits.yaml"), 2,
                          "either --run or --config")


# ---------------------------------------------------------------------------- tensorboard


def tensorboard_images(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(RunDir(run_dir).tb), size_guidance={"images": 0}).Reload()
    return {tag: events.Images(tag) for tag in events.Tags()["images"]}


def test_tensorboard_flag_adds_every_grid_to_the_runs_log(fitted, tmp_path):
    _, shared = fitted
    run_dir = tmp_path / "run"
    shutil.copytree(shared, run_dir)
    before = set(tensorboard_images(run_dir))
    out = ("--out", tmp_path / "out")
    ok(invoke("sample", "--run", run_dir, "--temp", "0", "--temp", "0.7", "--n", "4", *out, *CPU))
    assert set(tensorboard_images(run_dir)) == before  # nothing without --tensorboard
    ok(invoke("sample", "--run", run_dir, "--temp", "0", "--temp", "0.7", "--n", "4", "--tensorboard", "--overwrite",
              *out, *CPU))
    ok(invoke("reconstruct", "--run", run_dir, "--n", "3", "--tensorboard", *out, *CPU))
    ok(invoke("interpolate", "--run", run_dir, "--pairs", "2", "--steps", "3", "--tensorboard", *out, *CPU))
    ok(invoke("manipulate", "--run", run_dir, "--from-class", "3", "--to-class", "5", "--n", "2", "--alphas", "0,1",
              "--tensorboard", *out, *CPU))
    ok(invoke("sample", "--run", run_dir, "--temp", "0.7", "--n", "9", "--seed", "3", "--tensorboard", *out, *CPU))
    images = tensorboard_images(run_dir)
    # A card per picture and set of options, named as its file is without the step; none added to training's.
    expected = {"samples/T=0 sample seed0_n4": grid_size(4), "samples/T=0.7 sample seed0_n4": grid_size(4),
                "samples/T=0.7 sample seed3_n9": grid_size(9), "reconstruct_n3": grid_size(6, 3),
                "interpolate_pairs2_steps3": grid_size(6, 3), "manipulate_class3-5_a0,1_n2": grid_size(4, 2)}
    assert "samples/T=0.7" in before and set(images) == before | set(expected)
    assert all(len(images[tag]) == len(tensorboard_images(shared)[tag]) for tag in before)
    for tag, (width, height) in expected.items():
        assert len(images[tag]) == 1 and images[tag][0].step == 4
        assert (images[tag][0].width, images[tag][0].height) == (width // UP, height // UP)  # unenlarged grids


def test_tensorboard_needs_a_run_directory(fitted, tmp_path):
    _, run_dir = fitted
    loose = tmp_path / "loose.pt"
    shutil.copy(RunDir(run_dir).last, loose)
    result = invoke("interpolate", "--checkpoint", loose, "--pairs", "1", "--steps", "2", "--tensorboard",
                    "--out", tmp_path / "out", *CPU)
    assert_one_line_error(result, 2, "--tensorboard needs a run directory")


def test_tensorboard_into_a_folder_it_cannot_write_is_refused_before_drawing(fitted, tmp_path, monkeypatch):
    _, run_dir = fitted
    tb = RunDir(run_dir).tb
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tb and access(path, mode))  # as for a user
    for command in (["sample", "--n", "2"], ["reconstruct", "--n", "1"]):
        out = tmp_path / command[0]
        result = invoke(*command, "--run", run_dir, "--tensorboard", "--out", out, *CPU)
        assert_one_line_error(result, 2, f"cannot write to {tb} (permission denied) — choose another run, or leave "
                              "out --tensorboard")
        assert not out.exists()  # no picture written that the next call would refuse to replace


# ---------------------------------------------------------------------------- which run


def test_commands_without_run_or_checkpoint_use_the_most_recent_run(fitted, conditional, tmp_path, monkeypatch):
    _, tiny = fitted
    shutil.copytree(tiny, tmp_path / "runs" / "a")
    shutil.copytree(conditional, tmp_path / "runs" / "b")
    monkeypatch.chdir(tmp_path)

    def make_latest(name: str) -> None:
        for other, when in (("a", 1_000_000), ("b", 1_000_000)):
            os.utime(RunDir(Path("runs") / other).last, (when, when))
        os.utime(RunDir(Path("runs") / name).last, (2_000_000, 2_000_000))

    make_latest("a")
    first = json_output(invoke("eval", *CPU))
    assert first["checkpoint"] == str(Path("runs/a/checkpoints/last.pt")) and "accuracy" not in first
    assert first["bpd"] == pytest.approx(final_test_line(tiny)["bpd"], abs=1e-9)
    samples = RunDir(Path("runs") / "a").samples
    assert Path(ok(invoke("sample", "--n", "2", *CPU)).stdout.strip()).parent == samples
    assert Path(json_output(invoke("reconstruct", "--n", "2", *CPU))["path"]).parent == samples
    assert Path(ok(invoke("interpolate", "--pairs", "1", "--steps", "2", *CPU)).stdout.strip()).parent == samples
    manipulated = json_output(invoke("manipulate", "--from-class", "0", "--to-class", "1", "--n", "1", *CPU))
    assert Path(manipulated["path"]).parent == samples

    make_latest("b")
    second = json_output(invoke("eval", *CPU))
    assert second["checkpoint"] == str(Path("runs/b/checkpoints/last.pt")) and "accuracy" in second


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args,needle", [
    (["sample", "--run", "{tiny}", "--temp", "-1"], "temperatures must be >= 0"),
    (["sample", "--run", "{empty}"], "has no checkpoint"),
    (["eval", "--checkpoint", "nope.pt"], "checkpoint not found: nope.pt"),
    (["sample", "--run", "{tiny}", "--class", "1"], "--class needs a class-conditional model"),
    (["sample", "--run", "{cond}", "--class", "10"], "--class 10 is out of range"),
    (["sample", "--run", "{cond}", "--class", "0", "--class", "1", "--class", "2", "--n", "4"],
     "--n 4 leaves class 2 without an image (blocks of 2 per class, a row each) — pass --n 6, or fewer classes"),
    (["sample", "--run", "{cond}", "--class", "0", "--class", "1", "--class", "2", "--n", "2"],
     "--n 2 leaves class 2 without an image (blocks of 1 per class, a row each) — pass --n 3"),
    (["eval", "--run", "{tiny}", "--split", "valid"], "--split must be 'test' or 'train'"),
    (["eval", "--run", "{tiny}", "--n-dequant", "0"], "--n-dequant"),
    (["eval", "--run", "{tiny}", "--checkpoint", "{last}"], "either --run or --checkpoint"),
    (["interpolate", "--run", "{tiny}", "--steps", "1"], "--steps >= 2"),
    (["interpolate", "--run", "{tiny}", "--pairs", "0"], "got --pairs 0 and --steps 8 — use --pairs 4 --steps 8"),
    (["interpolate", "--run", "{tiny}", "--pairs", "200", "--steps", "2"], "test split has 297"),
    (["reconstruct", "--run", "{tiny}", "--n", "0"], "--n must be at least 1"),
    (["reconstruct", "--checkpoint", "{config}"], "config.yaml"),
    (["manipulate", "--run", "{tiny}", "--from-class", "0", "--to-class", "1", "--alphas", "1,nan"],
     "--alphas takes finite numbers, got nan"),
    (["manipulate", "--run", "{tiny}", "--from-class", "0", "--to-class", "1", "--alphas", "-inf"],
     "--alphas takes finite numbers, got -inf"),
    (["sample", "--run", "{tiny}", "--temp", "0.7,inf"], "--temp takes finite numbers, got inf"),
    (["eval", "--run", "{tiny}", "--data", "{empty}"], "trained on the bundled digits"),
], ids=["negative-temp", "empty-run-dir", "missing-checkpoint", "class-on-unconditional", "class-out-of-range",
        "class-left-out", "classes-over-n", "bad-split", "zero-dequant", "run-and-checkpoint", "one-step",
        "zero-pairs", "too-many-pairs", "zero-n",
        "config-as-checkpoint", "nan-alpha", "infinite-alpha", "infinite-temp", "data-for-digits"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(fitted, conditional, tmp_path, monkeypatch, args,
                                                            needle):
    _, tiny = fitted
    (tmp_path / "empty").mkdir()
    where = {"tiny": tiny, "cond": conditional, "empty": tmp_path / "empty",
             "last": RunDir(tiny).last, "config": RunDir(tiny).config}
    monkeypatch.chdir(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    shared_before = {p for d in (tiny, conditional) for p in d.rglob("*")}
    out = [] if args[0] == "eval" else ["--out", tmp_path / "out"]  # eval writes no files
    result = invoke(*[a.format(**where) for a in args], *out, *CPU)
    assert_one_line_error(result, 2, needle)
    assert {p for p in tmp_path.rglob("*")} == before
    assert {p for d in (tiny, conditional) for p in d.rglob("*")} == shared_before


@pytest.mark.parametrize("command", [
    ["sample"], ["eval"], ["reconstruct"], ["interpolate"], ["manipulate", "--from-class", "0", "--to-class", "1"],
], ids=lambda c: c[0])
def test_every_command_without_any_run_exits_2(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke(*command, *CPU), 2, "no finished run")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [
    ["sample"], ["reconstruct"], ["interpolate"], ["manipulate", "--from-class", "0", "--to-class", "1"],
], ids=lambda c: c[0])
@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_an_out_that_is_or_lies_under_a_file_exits_2_before_any_work(fitted, tmp_path, command, out):
    _, run_dir = fitted
    (tmp_path / "afile").write_text("mine\n")
    result = invoke(*command, "--run", run_dir, "--out", tmp_path / out, *CPU)
    assert_one_line_error(result, 2, f"cannot create the output folder {tmp_path / out}", "is a file")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == "mine\n"


def test_temperatures_name_files_briefly_and_never_share_a_name():
    assert [temperature_name(t) for t in (0, 0.7, 1.0, 9999.99)] == ["t0p00", "t0p70", "t1p00", "t9999p99"]
    assert [temperature_name(t) for t in (0.705, 1 / 3, 12345.0, 1e30, 1e300)] == [
        "t0p705", "t0p3333333333333333", "t12345p0", "t1e+30", "t1e+300"]
    close = [0.7, 0.70001, 0.7000000000000001, 0.701, 0.704, 0.705, 12345.0, 12346.0, 12345.000000000002]
    assert len({temperature_name(t) for t in close}) == len(close)
    assert len({temperature_label(t) for t in close}) == len(close)  # grid labels and TensorBoard tags
    assert [temperature_label(t) for t in (0.7, 1.0, 0.705, 0.7000001)] == ["T=0.7", "T=1", "T=0.705", "T=0.7000001"]
    assert temperature_name(-0.0) == "t0p00" and temperature_label(-0.0) == "T=0"


def test_sample_nan_temperature_exits_2(fitted, tmp_path):
    _, run_dir = fitted
    assert_one_line_error(invoke("sample", "--run", run_dir, "--temp", "nan", "--out", tmp_path, *CPU), 2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", ["-1", "0"])
def test_eval_non_positive_batch_size_exits_2(fitted, size):
    _, run_dir = fitted
    assert_one_line_error(invoke("eval", "--run", run_dir, "--batch-size", size, *CPU), 2, "--batch-size")


# ---------------------------------------------------------------------------- sample files (issue 14)


def test_sample_file_names_carry_the_class_and_n_and_never_overwrite_silently(conditional, tmp_path):
    run_dir = conditional
    args = ["sample", "--run", run_dir, "--temp", "0.7", "--out", tmp_path / "out", *CPU]
    three = Path(ok(invoke(*args, "--class", "3", "--n", "4")).stdout.strip())
    seven = Path(ok(invoke(*args, "--class", "7", "--n", "4")).stdout.strip())
    assert three.name == "sample_step0000008_t0p70_seed0_n4_class3.png"
    assert seven.name == "sample_step0000008_t0p70_seed0_n4_class7.png"
    assert three.read_bytes() != seven.read_bytes()
    first = three.read_bytes()
    again = invoke(*args, "--class", "3", "--n", "4")
    assert_one_line_error(again, 2, f"{three} already exists", "--overwrite")
    assert three.read_bytes() == first
    replaced = ok(invoke(*args, "--class", "3", "--n", "4", "--overwrite"))
    assert Path(replaced.stdout.strip()) == three


def test_sample_grid_is_capped_and_no_grid_writes_only_the_individual_files(fitted, tmp_path, monkeypatch):
    import glowtrain.sample as sample_module

    _, run_dir = fitted
    monkeypatch.setattr(sample_module, "GRID_LIMIT", 6)  # the real cap (1,024) works the same, only slower
    result = ok(invoke("sample", "--run", run_dir, "--n", "10", "--batch-size", "4", "--individual", "--out",
                       tmp_path / "capped", *CPU))
    assert "grids show the first 6 of the 10 images" in result.stderr
    assert_one_line_error(invoke("sample", "--run", run_dir, "--n", "10", "--out", tmp_path / "grid-only", *CPU), 2,
                          "--n 10 is more images than a grid holds (6), and without --individual only grids are "
                          "written — use --n 6 or less, or add --individual to write every image")
    grid, folder = [Path(p) for p in result.stdout.split()]
    with Image.open(grid) as image:
        assert image.size == grid_size(6)
    singles = sorted(folder.iterdir())
    assert len(singles) == 10 and folder.name == grid.stem
    assert (pixels(singles[4]) == tile(pixels(grid), 1, 1)).all()  # the grid holds the first images
    result = ok(invoke("sample", "--run", run_dir, "--n", "10", "--individual", "--no-grid", "--out",
                       tmp_path / "nogrid", *CPU))
    assert [p.name for p in (tmp_path / "nogrid").iterdir()] == ["sample_step0000004_t0p70_seed0_n10"]
    assert result.stdout == f"{tmp_path / 'nogrid' / 'sample_step0000004_t0p70_seed0_n10'}/\n"
    assert_one_line_error(invoke("sample", "--run", run_dir, "--no-grid", "--out", tmp_path / "x", *CPU), 2,
                          "--no-grid")


def test_sample_streams_individual_files_batch_by_batch(fitted, tmp_path, monkeypatch):
    import glowtrain.sample as sample_module

    _, run_dir = fitted
    written_before_next_batch = []
    original = sample_module._write_individual

    def recording(batch, folder, start, n, written):
        original(batch, folder, start, n, written)
        written_before_next_batch.append(len(list(folder.iterdir())))

    monkeypatch.setattr(sample_module, "_write_individual", recording)
    ok(invoke("sample", "--run", run_dir, "--n", "10", "--batch-size", "4", "--individual", "--no-grid",
              "--out", tmp_path, *CPU))
    assert written_before_next_batch == [4, 8, 10]


def test_sample_stopped_part_way_names_its_partial_folder_and_the_way_to_finish(fitted, tmp_path, monkeypatch):
    import glowtrain.sample as sample_module

    _, run_dir = fitted
    original = sample_module._write_individual

    def ctrl_c_in_the_second_batch(batch, folder, start, n, written):
        if start > 0:
            original(batch[:1], folder, start, n, written)  # one file of the batch written, then Ctrl-C
            raise KeyboardInterrupt
        original(batch, folder, start, n, written)

    monkeypatch.setattr(sample_module, "_write_individual", ctrl_c_in_the_second_batch)
    command = ("sample", "--run", run_dir, "--n", "10", "--batch-size", "4", "--individual", "--no-grid",
               "--out", tmp_path, *CPU)
    result = invoke(*command)
    folder = tmp_path / "sample_step0000004_t0p70_seed0_n10_b4"
    said = (f"interrupted: 5 of the 10 images written to {folder}; the same command with --overwrite writes them "
            "all\n")
    assert result.exit_code == 130 and "Traceback" not in result.output and result.stderr == said
    monkeypatch.setattr(sample_module, "_write_individual", original)
    assert_one_line_error(invoke(*command), 2, "--overwrite")  # the partial folder is not written over unasked
    ok(invoke(*command, "--overwrite"))
    assert len(list(folder.iterdir())) == 10
    monkeypatch.setattr(sample_module, "_write_individual", ctrl_c_in_the_second_batch)
    again = invoke(*command, "--overwrite")  # the folder holds all 10 of the earlier call: this one wrote 5
    assert again.exit_code == 130 and again.stderr == said


def test_temperatures_and_alphas_take_both_comma_lists_and_repeats(fitted, tmp_path):
    _, run_dir = fitted
    commas = ok(invoke("sample", "--run", run_dir, "--n", "1", "--temp", "0.5,1", "--out", tmp_path / "a", *CPU))
    repeats = ok(invoke("sample", "--run", run_dir, "--n", "1", "--temp", "0.5", "--temp", "1", "--out",
                        tmp_path / "b", *CPU))
    assert [Path(p).name for p in commas.stdout.split()] == [Path(p).name for p in repeats.stdout.split()]
    assert len(commas.stdout.split()) == 2
    result = json_output(invoke("manipulate", "--run", run_dir, "--from-class", "3", "--to-class", "5", "--n", "1",
                                "--alphas", "0", "--alphas", "1,2", "--out", tmp_path / "m", *CPU))
    assert result["alphas"] == [0.0, 1.0, 2.0]
    assert_one_line_error(invoke("sample", "--run", run_dir, "--temp", "0.5,x", *CPU), 2, "--temp")


@pytest.mark.parametrize("command, extra, named, writes", [
    ("sample", (), "grid.png", "the pictures"),
    ("reconstruct", (), "recon.JPG", "the pictures"),
    ("interpolate", (), "walk.webp", "the pictures"),
    ("manipulate", ("--from-class", "0", "--to-class", "1"), "moved.png", "the pictures"),
    ("score", ("--dataset", "digits"), "scores.csv", "scores.csv, summary.json and the histograms"),
])
def test_an_out_that_names_a_file_is_refused_before_a_folder_of_that_name_is_made(fitted, tmp_path, command, extra,
                                                                                      named, writes):
    """`sample --out grid.png` wrote its grid into a new folder called grid.png."""
    _, run_dir = fitted
    target = tmp_path / "pictures" / named
    error = assert_one_line_error(invoke(command, "--run", run_dir, *CPU, *extra, "--out", target), 2, writes)
    assert error.endswith(f"pass a folder, like --out {target.with_suffix('')}")
    assert not (tmp_path / "pictures").exists()
    result = invoke(command, "--run", run_dir, *CPU, *extra, "--out", f"{target}/")  # a new folder, said so
    assert "names a file" not in result.output
    target.mkdir(parents=True, exist_ok=True)  # a folder that happens to be called so is a folder
    result = invoke(command, "--run", run_dir, *CPU, *extra, "--out", target)
    assert "names a file" not in result.output


def test_load_runs_split_reads_a_folder_runs_images_where_they_are_now(folder_run, tmp_path):
    import glowtrain

    run_dir, images, names = folder_run
    run = glowtrain.load_run(run_dir, device="cpu")
    pictures, labels = run.split("test")
    evaluated = json.loads(ok(invoke("eval", "--run", run_dir, *CPU)).stdout)["bpd"]
    test = build_dataset(run.cfg.data, "test")  # the files a hash of each path put into test
    assert pictures.shape == (len(test), 1, SIZE, SIZE) and 0 < len(test) < 40 and (labels == -1).all()
    assert float(run.bits_per_dim(pictures).mean()) == pytest.approx(evaluated, abs=1e-6)
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)  # the run's images on another machine
    assert torch.equal(run.split("test", data=moved)[0], pictures)
    with pytest.raises(glowtrain.UserError, match="no such folder"):
        run.split("test", data=tmp_path / "nowhere")
