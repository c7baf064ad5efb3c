"""`glowtrain score` and glowtrain.load_run on the shared tiny digits run: the bits/dim of `eval`, per-level terms,
OOD metrics through the CLI, streaming, bad input, and the README's Python example."""

import csv
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, assert_one_line_error, invoke, ok, sets
from PIL import Image

import glowtrain
from glowtrain import data as data_module
from glowtrain.checkpoint import open_run
from glowtrain.config import DataConfig
from glowtrain.data import ImageFiles, build_dataset, preprocess_image
from glowtrain.score import TRAIN_CACHE, file_set, png_bits_per_dim

REPO = Path(__file__).resolve().parent.parent
CPU = ("--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def run_dir(tiny_cli_run, tmp_path_factory):
    """A copy of the shared tiny run: scoring caches the typical set inside the run directory."""
    copy = tmp_path_factory.mktemp("score") / "tiny"
    shutil.copytree(tiny_cli_run[1], copy)
    return copy


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """The digits test split as 8x8 PNG files, and uniform noise images."""
    root = tmp_path_factory.mktemp("score_images")
    test = build_dataset(DataConfig(), "test")
    for name, images in (("digits", test.images[:, 0].numpy()),
                         ("noise", np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))):
        (root / name).mkdir()
        for index, image in enumerate(images):
            Image.fromarray(image, "L").save(root / name / f"{index:04d}.png")
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def score(run_dir, out, *args):
    ok(invoke("score", "--run", run_dir, "--out", out, *CPU, *args))
    return read_csv(out / "scores.csv"), json.loads((out / "summary.json").read_text())


def eval_json(run_dir, *args):
    return json.loads(ok(invoke("eval", "--run", run_dir, "--device", "cpu", *args)).stdout)


@pytest.mark.parametrize("n_dequant", [1, 2])
def test_csv_mean_bpd_over_the_digits_test_split_equals_eval(run_dir, tmp_path, n_dequant):
    rows, summary = score(run_dir, tmp_path, "--dataset", "digits", "--n-dequant", n_dequant)
    expected = eval_json(run_dir, "--n-dequant", n_dequant)
    assert len(rows) == expected["n_images"] == 297
    assert np.mean([float(r["bpd"]) for r in rows]) == pytest.approx(expected["bpd"], abs=2e-6)
    assert summary["sets"]["images"]["scores"]["bpd"]["mean"] == pytest.approx(expected["bpd"], abs=1e-6)


def test_files_of_the_test_split_score_like_the_split_itself(run_dir, digit_files, tmp_path):
    from_files, _ = score(run_dir, tmp_path / "files", "--images", digit_files / "digits")
    from_split, _ = score(run_dir, tmp_path / "split", "--dataset", "digits")
    assert [r["bpd"] for r in from_files] == [r["bpd"] for r in from_split]
    assert from_files[5]["path"].endswith("0005.png") and from_split[5]["path"] == "digits/test/5"


def test_files_named_relative_to_here_are_listed_like_a_folders_files(run_dir, digit_files, tmp_path, monkeypatch):
    folder = digit_files / "digits"
    monkeypatch.chdir(folder)
    first, second = sorted(path.name for path in folder.glob("*.png"))[:2]
    rows, _ = score(run_dir, tmp_path / "named", "--images", first, "--images", folder)
    assert [row["path"] for row in rows[:2]] == [str(folder / first), str(folder / second)]
    assert len(rows) == len(list(folder.glob("*.png")))  # the file named and found in its folder counts once


def test_per_level_terms_add_up_to_the_total(run_dir, tmp_path):
    rows, _ = score(run_dir, tmp_path, "--dataset", "digits")
    n_bits = 4  # the digits default
    for row in rows:
        levels = [float(v) for k, v in row.items() if re.fullmatch(r"level\d+_(prior|logdet)_bpd", k)]
        assert len(levels) == 4  # two levels, a prior and a log-det each
        assert n_bits + sum(levels) == pytest.approx(float(row["bpd"]), abs=2e-5)
        last = float(row["level2_prior_bpd"]) + float(row["level2_logdet_bpd"])
        assert float(row["last_level_bpd"]) == pytest.approx(last, abs=2e-6)
        # Of bpd, not of the levels' sum (a continuous density's, near 0 in this 4-step model: the share would be huge)
        assert float(row["last_level_share"]) == pytest.approx(last / float(row["bpd"]), rel=1e-5)
        assert float(row["complexity"]) == pytest.approx(float(row["bpd"]) - float(row["png_bpd"]), abs=2e-6)


def test_typicality_uses_the_training_splits_mean_bpd_and_caches_it_in_the_run(run_dir, tmp_path):
    (run_dir / TRAIN_CACHE).unlink(missing_ok=True)
    rows, summary = score(run_dir, tmp_path / "a", "--dataset", "digits")
    entropy = summary["entropy_bpd"]
    assert entropy == pytest.approx(eval_json(run_dir, "--split", "train")["bpd"], abs=1e-6)
    for row in rows[:20]:
        assert float(row["typicality"]) == pytest.approx(abs(float(row["bpd"]) - entropy), abs=2e-6)
    [cached] = json.loads((run_dir / TRAIN_CACHE).read_text())["entries"]
    assert len(cached["bpd"]) == 1500 and cached["key"]["step"] == 4
    cached["bpd"] = [value + 1.0 for value in cached["bpd"]]  # a cache hit must use these values
    (run_dir / TRAIN_CACHE).write_text(json.dumps(cached))  # as written before: one typical set, no list
    assert score(run_dir, tmp_path / "b", "--dataset", "digits")[1]["entropy_bpd"] == pytest.approx(entropy + 1)
    # Another --n-dequant adds its own; switching back finds the first (it was recomputed each time).
    two = score(run_dir, tmp_path / "b2", "--dataset", "digits", "--n-dequant", "2")[1]["entropy_bpd"]
    assert two != pytest.approx(entropy + 1)
    entries = json.loads((run_dir / TRAIN_CACHE).read_text())["entries"]
    assert [entry["key"]["n_dequant"] for entry in entries] == [2, 1]
    assert score(run_dir, tmp_path / "b3", "--dataset", "digits")[1]["entropy_bpd"] == pytest.approx(entropy + 1)
    # Other training images (another folder through --data, or the run's own changed) are another typical set.
    entries = json.loads((run_dir / TRAIN_CACHE).read_text())["entries"]
    assert entries[0]["key"]["train_images"]["n_images"] == 1500
    for entry in entries:
        entry["key"]["train_images"] = {"n_images": 1499, "digest": "of other images"}
    (run_dir / TRAIN_CACHE).write_text(json.dumps({"entries": entries}))
    assert score(run_dir, tmp_path / "b4", "--dataset", "digits")[1]["entropy_bpd"] == pytest.approx(entropy)
    # The same step saved again (a resume from an earlier checkpoint that trains to it anew) is other weights.
    last = run_dir / "checkpoints" / "last.pt"
    saved = last.stat()
    os.utime(last, ns=(saved.st_atime_ns, saved.st_mtime_ns + 10**9))
    try:
        assert score(run_dir, tmp_path / "c", "--dataset", "digits")[1]["entropy_bpd"] == pytest.approx(entropy)
    finally:
        os.utime(last, ns=(saved.st_atime_ns, saved.st_mtime_ns))
    (run_dir / TRAIN_CACHE).unlink()


def test_the_images_line_names_what_the_folders_hold_besides_images(run_dir, digit_files, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(digit_files / "noise", folder)
    (folder / "scan.tif").write_bytes(b"II*\x00")  # not an extension score reads
    (folder / ".cache").mkdir()
    result = ok(invoke("score", "--run", run_dir, "--out", tmp_path / "out", *CPU, "--images", folder))
    model, images = result.stdout.splitlines()[:2]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert model == f"model: {run_dir / 'checkpoints' / 'last.pt'} at step {summary['step']} (EMA weights)"
    assert images.startswith("images: 40 images (not read: 1 hidden folder, 1 file hidden or not ")
    assert summary["sets"]["images"]["source"] == {"files": [str(folder)]} and "reference" not in summary
    assert summary["sets"]["images"]["not_read"] == {"hidden_folders": 1, "other_files": 1}
    assert summary["ema"] is True  # --no-ema changes every number
    one = ok(invoke("score", "--run", run_dir, "--out", tmp_path / "one", *CPU, "--images", folder / "0000.png"))
    assert re.search(r"^images: 1 image, bpd \d+\.\d{4} \(one image, no error bar\)\n", one.stdout, re.M)
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert one_summary["sets"]["images"]["scores"]["bpd"]["stderr"] is None


def test_images_of_another_shape_are_counted_as_converted_on_the_images_line(run_dir, tmp_path):
    """A 1x200 strip became one constant pixel scored as in-distribution without a word."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "colour.png")
    Image.fromarray(np.zeros((1, 200), np.uint8)).save(folder / "strip.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "as_trained.png")
    result = ok(invoke("score", "--run", run_dir, "--out", tmp_path / "out", *CPU, "--images", folder))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sets"]["images"]["converted"] == {"resized": 2, "colour→grey": 1, "centre-cropped": 1}
    line = next(line for line in result.stdout.splitlines() if line.startswith("images: 3 images"))
    assert line.endswith("; converted to the run's images: 2 resized, 1 colour→grey, 1 centre-cropped")


def test_a_file_named_twice_is_scored_once(run_dir, digit_files, tmp_path):
    digits = digit_files / "digits"
    rows, summary = score(run_dir, tmp_path / "twice", "--images", digits, "--images", digits / "0003.png",
                          "--images", digits / ".." / "digits")
    assert summary["sets"]["images"]["n_images"] == len(rows) == 297
    assert len({row["path"] for row in rows}) == 297


def test_against_the_same_images_gives_auroc_one_half_and_against_noise_the_table(run_dir, digit_files, tmp_path):
    with pytest.warns(UserWarning, match=r"--images and --against share 297 of 297 file\(s\) \(such as .*0000.png\)"):
        _, same = score(run_dir, tmp_path / "same", "--images", digit_files / "digits", "--against",
                        digit_files / "digits")
    assert {m["higher_is_ood"]["auroc"] for m in same["ood"].values()} == {0.5}
    result = ok(invoke("score", "--run", run_dir, "--out", tmp_path / "noise", *CPU, "--dataset", "digits",
                       "--against", digit_files / "noise", "--batch-test", "--n-bootstrap", "99"))
    summary = json.loads((tmp_path / "noise" / "summary.json").read_text())
    assert summary["sets"]["against"]["n_images"] == 40
    for metrics in summary["ood"].values():
        assert metrics["lower_is_ood"]["auroc"] == pytest.approx(1 - metrics["higher_is_ood"]["auroc"])
    assert summary["ood"]["png_bpd"]["higher_is_ood"]["auroc"] > 0.9  # noise does not compress
    assert summary["batch_test"]["against"]["p_value"] == pytest.approx(1 / 100)
    assert "AUROC" in result.stdout and "typicality test, against" in result.stdout
    assert "out-of-distribution metrics from 297 --images and 40 --against images:\nscore " in result.stdout
    with Image.open(tmp_path / "noise" / "hist_bpd.png") as picture:
        assert picture.format == "PNG" and picture.size == (520, 300)


def test_a_checkpoint_whose_bits_per_dim_are_nan_gets_a_warning_and_no_metrics(run_dir, digit_files, tmp_path):
    """NaN scores ranked as the most out-of-distribution in both directions: a diverged checkpoint scored
    AUPR-in and AUPR-out 1.000, FPR@95 0.000 and the smallest p, with exit code 0 and no warning."""
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    for weights in (state["model"], state["ema"]):
        name = next(name for name in weights if name.endswith(".bias"))
        weights[name] = torch.full_like(weights[name], float("nan"))
    torch.save(state, tmp_path / "diverged.pt")
    result = ok(invoke("score", "--checkpoint", tmp_path / "diverged.pt", "--out", tmp_path / "score", *CPU,
                       "--dataset", "digits", "--against", digit_files / "noise", "--batch-test",
                       "--n-bootstrap", "99"))
    for role, n in (("images", 297), ("against", 40)):
        assert (f"warning: {n} of {n} images in the {role} set have a bpd of NaN (the model's likelihood broke "
                "down there: a diverged checkpoint?); the OOD metrics and typicality test that would count them are "
                "n/a") in result.stderr
        # The training split's bits/dim are NaN too under this checkpoint: H first
        assert (f"typicality test, {role} as a whole: n/a (the training split's mean bits/dim, H, is not finite)"
                in result.stdout)
    table = [line.split() for line in result.stdout.splitlines() if line.startswith(("bpd ", "complexity "))]
    assert len(table) == 4 and all(row[2:] == ["n/a"] * 4 for row in table)
    summary = json.loads((tmp_path / "score" / "summary.json").read_text())
    for name, metrics in summary["ood"].items():  # the PNG size of an image needs no model
        assert all((value is None) == (name != "png_bpd") for direction in metrics.values()
                   for value in direction.values()), name
    assert summary["sets"]["against"]["n_nan"] == {"bpd": 40} and summary["batch_test"]["images"]["p_value"] is None
    # A diverged reference run: its scores alone are n/a, and said so.
    result = ok(invoke("score", "--run", run_dir, "--reference-run", tmp_path / "diverged.pt", "--out",
                       tmp_path / "ratio", *CPU, "--dataset", "digits", "--against", digit_files / "noise"))
    assert ("warning: 297 of 297 images in the images set have a reference_bpd of NaN (the reference run's "
            "likelihood broke down there: a diverged checkpoint?); the reference_bpd and ratio OOD metrics that "
            "would count them are n/a") in result.stderr
    summary = json.loads((tmp_path / "ratio" / "summary.json").read_text())
    assert summary["sets"]["images"]["n_nan"] == {"bpd": 0, "reference_bpd": 297}
    assert summary["ood"]["ratio"]["higher_is_ood"]["auroc"] is None
    assert summary["ood"]["bpd"]["higher_is_ood"]["auroc"] is not None


def test_a_typicality_test_left_undefined_says_why():
    from glowtrain.score import report

    files = {"csv": "scores.csv", "summary": "summary.json", "histograms": {}}
    tests = {"images": {"statistic": None, "p_value": None, "n_images": 3, "n_bootstrap": 9, "entropy_bpd": 2.5},
             "against": {"statistic": None, "p_value": None, "n_images": 3, "n_bootstrap": 9, "entropy_bpd": None}}
    lines, _ = report({"sets": {}, "batch_test": tests, "files": files})
    assert lines[:2] == ["typicality test, images as a whole: n/a (a bits/dim is NaN)",
                         "typicality test, against as a whole: n/a (the training split's mean bits/dim, H, is not "
                         "finite)"]


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """Another run of the same data and shape (another seed, one more step): a reference model."""
    out = tmp_path_factory.mktemp("reference") / "other"
    ok(invoke("fit", "--out", out, "--no-progress", *sets(*TINY_RUN, "run.seed=1", "train.steps=5")))
    return out


@pytest.mark.parametrize("reference", ["run", "checkpoint"])
def test_a_reference_run_gives_the_likelihood_ratio(run_dir, other_run, tmp_path, reference):
    path = other_run if reference == "run" else other_run / "checkpoints" / "last.pt"
    rows, summary = score(run_dir, tmp_path, "--dataset", "digits", "--reference-run", path)
    assert summary["reference"] == {"checkpoint": str(other_run / "checkpoints" / "last.pt"), "step": 5, "ema": True}
    assert summary["sets"]["images"]["source"] == {"dataset": "digits", "split": "test"}
    own, theirs = eval_json(run_dir), eval_json(other_run)
    assert len(rows) == own["n_images"] == 297
    bpd, reference_bpd = (np.array([float(r[key]) for r in rows]) for key in ("bpd", "reference_bpd"))
    assert bpd.mean() == pytest.approx(own["bpd"]) and reference_bpd.mean() == pytest.approx(theirs["bpd"])
    assert (bpd != reference_bpd).mean() > 0.9  # two models
    assert np.allclose([float(r["ratio"]) for r in rows], bpd - reference_bpd, atol=2e-6)  # 6 decimals in the CSV


def test_options_that_would_change_nothing_are_said(run_dir, tmp_path):
    with pytest.warns(UserWarning, match="^--n-bootstrap 50 has no effect without --batch-test$"):
        ok(invoke("score", "--run", run_dir, "--out", tmp_path / "a", *CPU, "--dataset", "digits",
                  "--n-bootstrap", "50"))
    with pytest.warns(UserWarning, match="^--reference-run is the scored checkpoint itself: its likelihood ratio is 0"):
        itself = ok(invoke("score", "--run", run_dir, "--out", tmp_path / "b", *CPU, "--dataset", "digits",
                           "--reference-run", run_dir))
    assert "; reference: " in itself.stdout.splitlines()[0]


def test_a_run_without_ema_is_said_to_score_its_raw_weights(tmp_path, monkeypatch):
    run = tmp_path / "raw"
    ok(invoke("fit", "--out", run, "--no-progress", *sets(*TINY_RUN, "train.ema_decay=0")))
    monkeypatch.setenv("HOME", str(tmp_path))  # `~` in --images is the home folder, and recorded so
    shutil.copytree(build_folder_of_digits(tmp_path / "home_digits"), tmp_path / "digits")
    result = ok(invoke("score", "--run", run, "--out", tmp_path / "s", *CPU, "--images", "~/digits"))
    assert result.stdout.splitlines()[0].endswith("(raw weights)")
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["ema"] is False and summary["sets"]["images"]["source"] == {"files": [str(tmp_path / "digits")]}


def build_folder_of_digits(folder: Path) -> Path:
    folder.mkdir()
    for index, image in enumerate(build_dataset(DataConfig(), "test").images[:6, 0].numpy()):
        Image.fromarray(image, "L").save(folder / f"{index}.png")
    return folder


def test_a_folder_run_scores_its_own_held_out_split_as_eval_reads_it(tmp_path):
    """Only --images could score a folder run's images, and passing its folder mixed training images in."""
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(3)
    for index in range(30):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(images / f"{index:02d}.png")
    folder = ["data.dataset=folder", f"data.root={images}", "data.image_size=8", "data.channels=1",
              "data.test_fraction=0.2", "train.batch_size=8", "train.init_batch_size=16"]
    run = tmp_path / "run"
    ok(invoke("fit", "--out", run, "--no-progress", *sets(*TINY_RUN, *folder)))
    rows, summary = score(run, tmp_path / "scored", "--dataset", "folder")
    evaluated = eval_json(run)
    assert len(rows) == evaluated["n_images"] == 6 and summary["sets"]["images"]["source"]["dataset"] == "folder"
    assert np.mean([float(r["bpd"]) for r in rows]) == pytest.approx(evaluated["bpd"], abs=1e-6)
    assert all(Path(r["path"]).parent == images for r in rows)  # each held-out image named by its file
    train_rows, _ = score(run, tmp_path / "train", "--dataset", "folder", "--split", "train")
    assert len(train_rows) == 24 and not {r["path"] for r in rows} & {r["path"] for r in train_rows}
    # A held-out image gone since: score says so as eval does, once, and the training split (H) is as recorded.
    Path(rows[0]["path"]).unlink()
    changed = ("the test images differ from those this run recorded (6 files then, 5 now, or other names or "
               "sizes): its test numbers are not comparable with earlier ones")
    with pytest.warns(UserWarning) as warned:
        ok(invoke("score", "--run", run, "--out", tmp_path / "after", *CPU, "--dataset", "folder"))
    assert [str(warning.message) for warning in warned] == [changed]
    assert f"warning: {changed}" in ok(invoke("eval", "--run", run, "--device", "cpu")).stderr
    Path(train_rows[0]["path"]).unlink()  # the typical set (H) is then another's than the run learnt
    with pytest.warns(UserWarning) as warned:
        ok(invoke("score", "--run", run, "--out", tmp_path / "after_train", *CPU, "--dataset", "folder"))
    assert [str(warning.message) for warning in warned] == [changed, changed.replace("test", "train").replace(
        "6 files then, 5 now", "24 files then, 23 now")]


def test_a_run_whose_training_images_are_not_here_scores_with_its_cached_typical_set(tmp_path, digit_files):
    """A run copied without its data: its images scored with --images keep the typicality score cached for these
    weights (the cache's key holds the training images' fingerprint, which cannot be taken here)."""
    images = tmp_path / "imgs"
    shutil.copytree(digit_files / "noise", images)
    folder = ["data.dataset=folder", f"data.root={images}", "data.image_size=8", "data.channels=1",
              "data.test_fraction=0.2", "train.batch_size=4", "train.init_batch_size=4"]
    run = tmp_path / "run"
    ok(invoke("fit", "--out", run, "--no-progress", *sets(*TINY_RUN, *folder)))
    elsewhere = tmp_path / "to_score"
    shutil.copytree(images, elsewhere)
    _, summary = score(run, tmp_path / "first", "--images", elsewhere)
    assert summary["entropy_bpd"] is not None
    shutil.rmtree(images)
    result = ok(invoke("score", "--run", run, "--out", tmp_path / "second", *CPU, "--images", elsewhere))
    assert "no typicality score" not in result.stderr
    again = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert again["entropy_bpd"] == summary["entropy_bpd"]


def test_a_read_only_run_directory_scores_without_caching_the_typical_set(run_dir, tmp_path, monkeypatch):
    import errno

    import glowtrain.score as score_module

    written = score_module.atomic_write

    def read_only_run(path, *args, **kwargs):
        if Path(path).parent == run_dir:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return written(path, *args, **kwargs)

    (run_dir / TRAIN_CACHE).unlink(missing_ok=True)
    monkeypatch.setattr(score_module, "atomic_write", read_only_run)
    result = ok(invoke("score", "--run", run_dir, "--out", tmp_path / "out", *CPU, "--dataset", "digits"))
    assert "warning: cannot cache the typical set" in result.stderr and "Read-only file system" in result.stderr
    assert not (run_dir / TRAIN_CACHE).exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["entropy_bpd"] == pytest.approx(eval_json(run_dir, "--split", "train")["bpd"], abs=1e-6)


def test_an_out_that_is_a_file_is_refused_as_an_output_folder(run_dir, tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = invoke("score", "--run", run_dir, "--out", tmp_path / "taken", *CPU, "--dataset", "digits")
    line = assert_one_line_error(result, 2, "cannot create the output folder", "is a file", "choose another --out")
    assert "run directory" not in line
    assert (tmp_path / "taken").read_text() == "mine"


def test_an_out_in_another_runs_own_folders_is_refused(run_dir, other_run, tmp_path):
    """Scores written into another run's directory or its checkpoints were taken for that run's files."""
    for out, what in ((other_run, "a run directory"), (other_run / "checkpoints", "a run's folder"),
                      (run_dir / "checkpoints", "a run's folder")):
        before = sorted(p.name for p in out.iterdir())
        result = invoke("score", "--run", run_dir, "--dataset", "digits", "--out", out, *CPU)
        assert_one_line_error(result, 2, f"--out {out} is {what}, where the scores would lie among that run's own "
                              "files", "leave out --out")
        assert sorted(p.name for p in out.iterdir()) == before
    deeper = other_run / "tb" / "scores"  # TensorBoard reads tb/ to any depth
    result = invoke("score", "--run", run_dir, "--dataset", "digits", "--out", deeper, *CPU)
    assert_one_line_error(result, 2, f"--out {deeper} is a run's folder, where the scores would lie among that run's "
                          "own files")
    assert not deeper.exists()
    ok(invoke("score", "--run", run_dir, "--dataset", "digits", "--out", other_run / "score-of-tiny", *CPU))


def test_an_out_that_is_the_run_directory_is_refused(run_dir):
    """Its scores.csv, summary.json and ten histograms went into the run's root, beside config.yaml."""
    before = sorted(path.name for path in run_dir.iterdir())
    result = invoke("score", "--run", run_dir, "--out", run_dir / ".", *CPU, "--dataset", "digits")
    assert_one_line_error(result, 2, f"--out {run_dir / '.'} is the run directory", "(the default is <run>/score)")
    assert sorted(path.name for path in run_dir.iterdir()) == before


def test_scoring_streams_in_batches_that_do_not_change_the_scores(run_dir, digit_files, tmp_path, monkeypatch):
    small, _ = score(run_dir, tmp_path / "small", "--images", digit_files / "noise", "--batch-size", "3")
    large, _ = score(run_dir, tmp_path / "large", "--images", digit_files / "noise")
    for a, b in zip(small, large):
        assert float(a["bpd"]) == pytest.approx(float(b["bpd"]), abs=2e-6)
    decoded = []
    original = data_module.preprocess_image
    monkeypatch.setattr(data_module, "preprocess_image", lambda *a: decoded.append(a) or original(*a))
    image_set = file_set("images", [str(digit_files / "noise")], open_run(str(run_dir), None), "error")
    batches = image_set.batches(4)
    indices, noise_keys, images = next(batches)
    assert indices == noise_keys == [0, 1, 2, 3] and images.shape == (4, 1, 8, 8)
    assert len(decoded) == 4  # only the first batch has been read
    assert sum(len(batch.indices) for batch in batches) == 36


def test_progress_bars_go_to_stderr(run_dir, digit_files, tmp_path):
    result = ok(invoke("score", "--run", run_dir, "--out", tmp_path, "--device", "cpu", "--images",
                       digit_files / "noise"))
    assert "scoring images" in result.stderr and "40/40" in result.stderr


def test_a_reference_run_of_another_quantisation_is_refused(run_dir, tmp_path):
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    state["config"]["data"]["n_bits"] = 3  # the same model, said to be trained on 3-bit pixels
    torch.save(state, tmp_path / "three_bit.pt")
    result = invoke("score", "--run", run_dir, "--dataset", "digits", "--reference-run", tmp_path / "three_bit.pt",
                    "--out", tmp_path / "out", *CPU)
    assert_one_line_error(result, 2, "--reference-run models 3-bit pixels but the run 4-bit: their bits/dim do not "
                          "compare; train the reference with data.n_bits=4")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [
    ((), "give the images to score"),
    (("--dataset", "digits", "--images", "x"), "not both"),
    (("--images", "does/not/exist"), "does/not/exist: no such file or folder — pass image files or a folder"),
    (("--images", "imgs/00*.png"), "imgs/00*.png: no such file or folder, and patterns are not expanded here"),
    (("--dataset", "folder"), "not a built-in set"),
    (("--dataset", "cifar10"), "does not come in this model's 1x8x8 images"),
    (("--dataset", "mnist"), "put its files there, or pass a folder of its images with --images"),
    (("--dataset", "digits", "--split", "valid"), "--split must be 'test' or 'train'"),
    (("--images", "x", "--split", "train"), "--split chooses a split of --dataset; --images are scored as given"),
    (("--dataset", "digits", "--n-dequant", "0"), "--n-dequant must be at least 1"),
    (("--dataset", "digits", "--batch-size", "0"), "--batch-size must be at least 1"),
    (("--dataset", "digits", "--on-bad-image", "ignore"), "--on-bad-image must be 'skip' or 'error'"),
    (("--dataset", "digits", "--reference-run", "nowhere"), "--reference-run: "),
])
def test_bad_options_give_one_line_errors_and_write_nothing(run_dir, tmp_path, args, needle):
    result = invoke("score", "--run", run_dir, "--out", tmp_path / "out", *CPU, *args)
    assert "--data " not in assert_one_line_error(result, 2, needle)  # the run's own data is not what is missing
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("role", ["--images", "--against"])
@pytest.mark.parametrize("inside", ["", "scores"])
def test_an_out_inside_a_folder_being_scored_is_refused_and_the_folder_left_alone(run_dir, digit_files, tmp_path,
                                                                                  role, inside):
    folder = tmp_path / "mine"
    shutil.copytree(digit_files / "noise", folder)
    before = sorted(p.name for p in folder.rglob("*"))
    images = ("--images", digit_files / "digits") if role == "--against" else ()
    (tmp_path / "link").symlink_to(folder)
    for given in (folder, tmp_path / "link", tmp_path / "mine" / ".." / "mine"):
        result = invoke("score", "--run", run_dir, "--out", folder / inside, *CPU, *images, role, given)
        assert_one_line_error(result, 2, f"lies inside the image folder given to score ({given})",
                              "choose an --out outside it")
    assert sorted(p.name for p in folder.rglob("*")) == before
    outside = tmp_path / "mine" / ".." / "elsewhere"  # spelt through the folder, but outside it
    assert invoke("score", "--run", run_dir, "--out", outside, *CPU, *images, role, folder).exit_code == 0


def test_a_second_score_into_the_same_folder_is_refused_unless_overwrite_and_leaves_no_stale_file(
        run_dir, digit_files, tmp_path):
    out = tmp_path / "score"
    with pytest.warns(UserWarning, match="scored checkpoint itself"):  # a reference only to write hist_ratio.png
        score(run_dir, out, "--images", digit_files / "noise", "--against", digit_files / "digits",
              "--reference-run", run_dir)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "hist_ratio.png" in before and json.loads(before["summary.json"])["sets"]["against"]["n_images"] == 297
    refused = invoke("score", "--run", run_dir, "--out", out, *CPU, "--images", digit_files / "digits")
    assert_one_line_error(refused, 2, f"{out} holds an earlier score", "--out DIR", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rows, summary = score(run_dir, out, "--images", digit_files / "digits", "--overwrite")
    assert len(rows) == 297 and list(summary["sets"]) == ["images"]
    histograms = sorted(p.name for p in out.glob("hist_*.png"))
    assert histograms == sorted(Path(p).name for p in summary["files"]["histograms"].values())
    assert sorted(p.name for p in out.iterdir()) == sorted(["scores.csv", "summary.json", *histograms])
    assert "hist_ratio.png" not in histograms  # the earlier score's likelihood-ratio histogram is gone


def test_files_of_score_names_that_no_score_wrote_are_never_removed(run_dir, digit_files,
                                                                                              tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "hist_mine.png").write_bytes(b"my own picture")
    (out / "summary.json").write_text('{"my": "notes"}')
    refused = invoke("score", "--run", run_dir, "--out", out, *CPU, "--images", digit_files / "noise")
    assert_one_line_error(refused, 2, "--overwrite")  # its summary.json would be replaced
    assert (out / "summary.json").read_text() == '{"my": "notes"}'
    score(run_dir, out, "--images", digit_files / "noise", "--overwrite")
    assert (out / "hist_mine.png").read_bytes() == b"my own picture"  # not a histogram a score wrote


def test_an_unreadable_image_is_rejected_in_one_line_or_skipped(run_dir, digit_files, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(digit_files / "noise", folder)
    (folder / "0003.png").write_bytes(b"not a png")
    result = invoke("score", "--run", run_dir, "--out", tmp_path / "out" / "new", *CPU, "--images", folder)
    assert_one_line_error(result, 2, "0003.png", "--on-bad-image skip")
    assert not (tmp_path / "out").exists()  # the folders it made for its output are gone with the failure
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")
    result = invoke("score", "--run", run_dir, "--out", tmp_path / "out", *CPU, "--images", folder)
    assert_one_line_error(result, 2, "0003.png", "--on-bad-image skip")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.txt"]  # no scores.csv, nor a partial one
    result = ok(invoke("score", "--run", run_dir, "--out", tmp_path / "out", *CPU, "--images", folder,
                       "--on-bad-image", "skip"))
    assert "warning: skipped unreadable image" in result.stderr and "0003.png" in result.stderr
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert len(rows) == 39 and not any(r["path"].endswith("0003.png") for r in rows)
    (folder / "0003.png").unlink()  # the images after it get the noise they get in a folder without it
    without, _ = score(run_dir, tmp_path / "without", "--images", folder)
    assert [{**r, "path": Path(r["path"]).name} for r in rows] == [{**r, "path": Path(r["path"]).name}
                                                                   for r in without]
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    for name in ("a.png", "b.png"):
        (only_bad / name).write_bytes(b"not a png")
    result = invoke("score", "--run", run_dir, "--out", tmp_path / "none", *CPU, "--images", only_bad,
                    "--on-bad-image", "skip")
    assert_one_line_error(result, 2, "none of the 2 images could be read", "a.png: cannot", "; 1 more)")
    assert not (tmp_path / "none").exists()


def test_png_bits_per_dim_counts_the_compressed_image_data_of_the_quantised_image():
    constant = torch.full((1, 1, 8, 8), 200, dtype=torch.uint8)
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 1, 8, 8), dtype=np.uint8))
    for image in (constant, noise):
        buffer = io.BytesIO()
        Image.fromarray((image[0, 0] // 16).numpy()).save(buffer, format="PNG", compress_level=9)
        # One IDAT chunk: the file less its signature (8), IHDR (25), IDAT's frame (12) and IEND (12).
        assert png_bits_per_dim(image, 4)[0] == 8 * (len(buffer.getvalue()) - 57) / 64
    assert png_bits_per_dim(constant, 4)[0] < png_bits_per_dim(noise, 4)[0]


def test_preprocess_image_follows_each_datasets_training_path(tmp_path):
    photo = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    folder = DataConfig(dataset="folder", image_size=16, channels=3)
    expected = ImageFiles([str(tmp_path / "photo.png")], 16, 3)[0][0]
    assert torch.equal(preprocess_image(tmp_path / "photo.png", folder), expected)
    digit = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    mnist = preprocess_image(Image.fromarray(digit), DataConfig(dataset="mnist", image_size=32, channels=1))
    assert mnist.shape == (1, 32, 32) and mnist[:, :2].sum() == 0  # MNIST's zero border, the digit untouched
    assert torch.equal(mnist[0, 2:30, 2:30], torch.from_numpy(digit))
    at_32 = np.random.default_rng(2).integers(0, 256, (32, 32), dtype=np.uint8)  # e.g. a sample of the run
    mnist_32 = preprocess_image(Image.fromarray(at_32), DataConfig(dataset="mnist", image_size=32, channels=1))
    assert torch.equal(mnist_32[0], torch.from_numpy(at_32))  # not shrunk to 28 and bordered again
    eight = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert torch.equal(preprocess_image(Image.fromarray(eight), DataConfig())[0], torch.from_numpy(eight))


def test_load_run_preprocesses_scores_samples_and_inverts(run_dir, digit_files):
    run = glowtrain.load_run(run_dir, device="cpu")
    assert run.step == 4 and run.model.image_shape == (1, 8, 8)
    test = build_dataset(run.cfg.data, "test")
    assert run.bits_per_dim(test.images).mean().item() == pytest.approx(eval_json(run_dir)["bpd"], abs=1e-6)
    files = sorted((digit_files / "digits").glob("*.png"))[:3]
    as_files = run.preprocess([str(f) for f in files])
    assert torch.equal(as_files, run.preprocess(test.images[:3]))
    assert torch.equal(as_files, run.preprocess(test.images[:3, 0].numpy()))  # (N, H, W) arrays
    assert torch.equal(run.preprocess(as_files), as_files)  # already at n_bits: unchanged
    assert torch.equal(run.bits_per_dim(as_files), run.bits_per_dim(test.images[:3]))
    zs, _ = run.encode(as_files)
    assert torch.equal(run.decode(zs), as_files)
    with pytest.warns(RuntimeWarning, match="1 of 3 decoded images are not finite"):
        run.decode([torch.cat([z[:1] * float("nan"), z[1:]]) for z in zs])
    zs[0].mul_(0.5)  # what encode and decode give are ordinary tensors: a user may change them in place
    run.decode(zs).add_(1)
    run.sample(2, 0.7).add_(1)
    assert torch.equal(run.sample(5, 0.7, seed=3), run.sample(5, 0.7, seed=3))
    with pytest.raises(glowtrain.UserError, match="uint8"):
        run.preprocess(torch.rand(2, 1, 8, 8))


def test_load_run_refuses_what_the_cli_refuses_with_a_user_error(run_dir, tmp_path):
    run = glowtrain.load_run(run_dir, device=torch.device("cpu"))  # a torch.device works like its name
    pixels = run.preprocess(build_dataset(run.cfg.data, "test").images[:2])
    zs, _ = run.encode(pixels)
    good, broken = np.zeros((8, 8), np.uint8), tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = [
        (lambda: run.bits_per_dim(pixels, n_dequant=0), "n_dequant must be a whole number >= 1, got 0"),
        (lambda: run.bits_per_dim(pixels, batch_size=0), "batch_size must be a whole number >= 1, got 0"),
        (lambda: run.bits_per_dim([]), "no images given"),
        (lambda: run.sample(0), "n must be a whole number >= 1, got 0"),
        (lambda: run.sample(2, temperature=float("nan")), "temperature must be a finite number >= 0"),
        (lambda: run.sample(2, temperature=-1.0), "temperature must be a finite number >= 0"),
        (lambda: run.sample(2, seed=2**32), "seed must be a whole number from 0 to 2**32 - 1"),
        (lambda: run.decode([z.double() for z in zs]), "decode takes the latents encode gives"),
        (lambda: run.decode(zs[:1]), "decode takes the latents encode gives"),
        (lambda: glowtrain.load_run(tmp_path / "nope"), "no run directory or checkpoint at"),
        (lambda: glowtrain.load_run(run_dir, ema="no"), "ema must be True or False, got 'no'"),
        (lambda: run.preprocess(torch.zeros(8, 8, 1, dtype=torch.uint8)), "(8, 8, 1) has its channels last — pass "
                                                                           "x.permute(2, 0, 1)"),
        (lambda: run.preprocess(torch.zeros(2, 8, 8, 1, dtype=torch.uint8)), "x.permute(0, 3, 1, 2)"),
        (lambda: run.preprocess(np.zeros((2, 1, 8, 8), np.uint8)), "(2, 1, 8, 8) looks channels-first — pass "
                                                                   "x.transpose(0, 2, 3, 1)"),
        (lambda: run.preprocess(np.zeros((8, 8), np.float32)), "pass (x * 255).round().astype(np.uint8)"),
        (lambda: run.preprocess(torch.zeros(1, 8, 8)), "pass (x * 255).round().to(torch.uint8)"),
        (lambda: run.preprocess(torch.zeros(8, 8, dtype=torch.uint8)), "got torch.uint8 (8, 8); for one grey image "
                                                                       "(H, W) pass x[None]"),
        (lambda: run.preprocess(np.zeros((8, 8), np.uint16)), "for 16-bit ones (x // 257).astype(np.uint8)"),
        (lambda: run.preprocess(None), "cannot read NoneType as images; pass paths, PIL images"),
        (lambda: run.preprocess([[0, 1], [2, 3]]), "cannot read int as images"),
        # Which of several images could not be read: its path, or its place in the list
        (lambda: run.preprocess([good, str(broken)]), f"cannot read {broken} ("),
        (lambda: run.preprocess([good, np.zeros((0, 8), np.uint8)]), "cannot read image 1 of 2 (it has no pixels: "
                                                                      "8x0)"),
    ]
    for call, message in bad:
        with pytest.raises(glowtrain.UserError) as refused:
            call()
        assert message in str(refused.value)


def untrained_run(channels: int):
    from glowtrain.api import Run
    from glowtrain.config import apply_overrides, default_config
    from glowtrain.model import Glow
    from glowtrain.objective import build_objective

    cfg = apply_overrides(default_config(), ["data.dataset=folder", "data.image_size=8", f"data.channels={channels}",
                                             "model.n_levels=1", "model.n_steps=1", "model.hidden_channels=4"])
    model = Glow.from_config(cfg)
    return Run(model, cfg, 0, Path("unused.pt"), None, torch.device("cpu"), build_objective(model, cfg))


def test_a_3_h_w_array_is_three_grey_images_to_a_grey_run_and_refused_by_a_colour_run(tmp_path):
    picture = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    planes = picture.transpose(2, 0, 1)  # (3, 8, 8): channels first, or three grey images
    grey = untrained_run(1)
    assert torch.equal(grey.preprocess(planes), grey.preprocess(list(planes)))
    assert grey.preprocess(planes).shape == (3, 1, 8, 8)
    colour = untrained_run(3)
    with pytest.raises(glowtrain.UserError, match=re.escape("(3, 8, 8) looks channels-first — pass "
                                                            "x.transpose(1, 2, 0), or a list of (H, W) arrays")):
        colour.preprocess(planes)
    assert colour.preprocess(list(planes)).shape == (3, 3, 8, 8)  # a list of grey pictures: each made RGB
    assert colour.preprocess(picture).shape == (1, 3, 8, 8)
    for i, plane in enumerate(planes):
        Image.fromarray(plane).save(tmp_path / f"{i}.png")
    from_glob = colour.preprocess(sorted(tmp_path.glob("*.png")))
    assert torch.equal(colour.preprocess(path for path in sorted(tmp_path.glob("*.png"))), from_glob)  # a generator


def _readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("### A trained run in a notebook: `glowtrain.load_run`", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_load_run_example_runs(run_dir, tmp_path, monkeypatch, capsys):
    shutil.copytree(run_dir, tmp_path / "runs" / "digits")
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_python_example(), "README.md", "exec"), {})
    assert "bits/dim" in capsys.readouterr().out


def test_make_ood_sets_writes_the_four_folders_readmes_table_scores(tmp_path):
    import subprocess
    import sys

    script = REPO / "scripts" / "make_ood_sets.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    digits = build_dataset(DataConfig(), "test").images[:, 0].numpy()

    def folder(name):
        return np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / name).glob("*.png"))])

    assert np.array_equal(folder("inverted"), 255 - digits)
    shifted = folder("shifted")
    assert np.array_equal(shifted[:, :, 2:], digits[:, :, :-2]) and not shifted[:, :, :2].any()
    constant = folder("constant")
    assert (constant == constant[:, :1, :1]).all() and len(np.unique(constant[:, 0, 0])) > 100
    noise = folder("noise")
    assert noise.shape == digits.shape and len(np.unique(noise)) == 256


def test_without_the_training_split_typicality_is_left_out_with_a_warning(run_dir, tmp_path, monkeypatch):
    import glowtrain.score as score_module

    def no_training_split(data_cfg, split, checked=None):
        if split == "train":
            raise glowtrain.UserError("image folder gone does not exist")
        return build_dataset(data_cfg, split, checked)

    (run_dir / TRAIN_CACHE).unlink(missing_ok=True)
    monkeypatch.setattr(score_module, "build_dataset", no_training_split)
    result = ok(invoke("score", "--run", run_dir, "--out", tmp_path, *CPU, "--dataset", "digits"))
    assert "no typicality score" in result.stderr
    assert "typicality" not in read_csv(tmp_path / "scores.csv")[0]
    failed = invoke("score", "--run", run_dir, "--out", tmp_path / "b", *CPU, "--dataset", "digits", "--batch-test")
    assert_one_line_error(failed, 2, "--batch-test needs the training split")


def test_a_learned_dequantiser_is_part_of_every_score(tmp_path):
    """A variational run's scores include log q(u | x): the CSV's mean is still eval's figure, and load_run agrees."""
    from helpers import TINY_RUN, sets

    run = tmp_path / "variational"
    ok(invoke("fit", "--out", run, "--no-progress", *sets(*TINY_RUN, "model.dequantization=variational",
                                                           "model.dequant_steps=1", "model.dequant_hidden_channels=4")))
    rows, _ = score(run, tmp_path / "score", "--dataset", "digits")
    expected = eval_json(run)
    assert np.mean([float(r["bpd"]) for r in rows]) == pytest.approx(expected["bpd"], abs=2e-6)
    for row in rows:  # its log q is a column of its own, and the terms still add up
        levels = [float(v) for k, v in row.items() if re.fullmatch(r"level\d+_(prior|logdet)_bpd", k)]
        assert 4 + float(row["dequantizer_bpd"]) + sum(levels) == pytest.approx(float(row["bpd"]), abs=2e-5)
    loaded = glowtrain.load_run(run, device="cpu")
    assert type(loaded.objective.dequantizer).__name__ != "UniformDequantizer"
    test = build_dataset(loaded.cfg.data, "test")
    first = loaded.bits_per_dim(test.images[:8])
    assert torch.allclose(first, torch.tensor([float(r["bpd"]) for r in rows[:8]], dtype=first.dtype), atol=2e-5)


@pytest.mark.skipif(os.name != "posix" or sys.platform == "darwin",
                    reason="file names that are not UTF-8 need a POSIX file system other than APFS")
def test_a_file_name_that_is_not_utf8_is_written_to_the_csv_as_its_own_bytes(run_dir, digit_files, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(digit_files / "noise", folder)
    latin1 = os.fsencode(folder) + b"/caf\xe9.png"
    os.rename(folder / "0000.png", os.fsdecode(latin1))
    ok(invoke("score", "--run", run_dir, "--out", tmp_path / "out", *CPU, "--images", folder))
    lines = (tmp_path / "out" / "scores.csv").read_bytes().splitlines()
    named = [line for line in lines if b"caf" in line]
    assert len(lines) == 41 and len(named) == 1 and named[0].startswith(b"images," + latin1 + b",")
    with open(tmp_path / "out" / "scores.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert os.fsdecode(latin1) in paths and Path(os.fsdecode(latin1)).is_file()  # the CSV names the file


def test_histograms_have_a_share_axis_and_the_scores_middle():
    """Only the two ends of the score were written; the height of the bars had no scale."""
    from glowtrain.images import histogram_picture

    rng = np.random.default_rng(0)
    picture = np.asarray(histogram_picture({"images": rng.normal(3, 0.2, 300), "against": rng.normal(4, 0.3, 100)},
                                           "bpd"))
    dark = picture.sum(2) < 200
    assert dark[24:264, 40].all()  # the share axis, from the tallest bar down to the score axis
    assert dark[20:36, :36].any() and dark[250:264, :36].any()  # its top label ("12%") and its 0
    middle = dark[270:290, 240:280]
    assert middle.any()  # the middle of the score's range, under the axis
