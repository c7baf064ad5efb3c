"""Image folders end to end: every file checked before training, skip counts, the stable split, the data record."""

import dataclasses
import json
import os
import pickle
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, assert_one_line_error, invoke, ok, sets, sixteen_bit_rgb_png
from PIL import Image

import glowtrain
from glowtrain.cache import prepare_cache
from glowtrain.config import DataConfig
from glowtrain.errors import MissingData
from glowtrain.folders import find_images, refuse_output_among_training_images
from glowtrain.runs import RunDir

FOLDER_RUN = [*TINY_RUN, "data.dataset=folder", "data.image_size=8", "data.channels=3", "train.batch_size=4",
              "train.init_batch_size=8", "data.test_fraction=0.25"]


def make_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(root / f"img{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def truncate(path: Path) -> None:
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


def fit(root: Path, out: Path, *extra: str, resume: bool = False):
    args = ["fit", "--out", out, "--no-progress", *(["--resume", "auto"] if resume else [])]
    return invoke(*args, *sets(*FOLDER_RUN, f"data.root={root}", *extra))


def test_a_corrupt_image_stops_fit_before_training_with_one_line_and_no_run_written(tmp_path):
    paths = make_images(tmp_path / "images", 16)
    truncate(paths[5])
    # A one-image init batch that misses the broken file: a loader that reads files only when a batch needs
    # them gets past the start and writes the run before failing.
    result = fit(tmp_path / "images", tmp_path / "run", "train.init_batch_size=1")
    assert_one_line_error(result, 2, f"cannot read image {paths[5]}", "data.on_bad_image: skip")
    assert not (tmp_path / "run").exists()


def test_skip_reports_found_skipped_and_converted_counts_in_one_line_and_one_plain_warning(tmp_path):
    paths = make_images(tmp_path / "images", 16)
    truncate(paths[5])
    (tmp_path / "images" / "notes.png").write_text("not an image")
    Image.new("L", (9, 9), 7).save(tmp_path / "images" / "grey.png")
    result = fit(tmp_path / "images", tmp_path / "run", "data.on_bad_image=skip")
    assert result.exit_code == 0, result.output
    summary = [line for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert len(summary) == 1
    assert f"data: folder {tmp_path / 'images'}: 18 images found, " in summary[0]
    assert "2 skipped; 8x8 RGB, 4 bits; converted: " in summary[0]
    assert "1 grey→RGB" in summary[0] and "15 centre-cropped" in summary[0] and "16 resized" in summary[0]
    warning = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: skipped 2 unreadable image(s)")
    assert str(paths[5]) in warning[0] and "notes.png" in warning[0] and "UserWarning" not in result.stderr
    record = json.loads(RunDir(tmp_path / "run").data_record.read_text())
    assert sorted(record["skipped"]) == sorted([str(paths[5]), str(tmp_path / "images" / "notes.png")])


def test_an_image_that_broke_since_the_run_started_can_be_skipped_on_resume(tmp_path):
    paths = make_images(tmp_path / "images", 16)
    ok(fit(tmp_path / "images", tmp_path / "run"))
    truncate(paths[3])
    refused = fit(tmp_path / "images", tmp_path / "run", "train.steps=6", resume=True)
    assert_one_line_error(refused, 2, f"cannot read image {paths[3]}", "data.on_bad_image: skip")
    resumed = ok(fit(tmp_path / "images", tmp_path / "run", "train.steps=6", "data.on_bad_image=skip", resume=True))
    assert "1 skipped" in resumed.stdout and f"skipped 1 unreadable image(s) (data.on_bad_image: skip): {paths[3]}" \
        in resumed.stderr
    assert "images differ from those this run recorded" in resumed.stderr


def test_resume_reads_no_image_file_again_for_the_check(tmp_path, monkeypatch):
    make_images(tmp_path / "images", 16)
    assert fit(tmp_path / "images", tmp_path / "run").exit_code == 0
    checked = json.loads(RunDir(tmp_path / "run").data_check.read_text())
    assert len(checked) == 16
    from glowtrain import folders

    opened = []
    original = folders._header
    monkeypatch.setattr(folders, "_header", lambda path: opened.append(path) or original(path))
    result = fit(tmp_path / "images", tmp_path / "run", "train.steps=6", resume=True)
    assert result.exit_code == 0, result.output
    assert opened == []


def test_changed_data_is_recorded_and_warned_about_on_resume_and_eval(tmp_path):
    make_images(tmp_path / "images", 16)
    run = tmp_path / "run"
    first = fit(tmp_path / "images", run)
    assert first.exit_code == 0 and "warning" not in first.stderr
    record = json.loads(RunDir(run).data_record.read_text())
    assert sum(fp["n_images"] for fp in record["fingerprints"].values()) == 16
    quiet = invoke("eval", "--run", run, "--device", "cpu")
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr
    make_images(tmp_path / "images", 40, seed=1)  # 24 new files; the 16 old ones get other contents and sizes
    evaluated = invoke("eval", "--run", run, "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.stderr.startswith("warning: the test images differ from those this run recorded")
    resumed = fit(tmp_path / "images", run, "train.steps=6", resume=True)
    assert resumed.exit_code == 0, resumed.output
    assert "warning: the train images differ" in resumed.stderr


def test_missing_data_crosses_processes_with_both_of_its_fixes(tmp_path):
    with pytest.raises(MissingData) as missing:
        find_images(str(tmp_path / "gone"))
    copied = pickle.loads(pickle.dumps(missing.value))  # as from a data worker or another rank
    assert type(copied) is MissingData and str(copied) == str(missing.value)
    assert str(copied) == f"image folder {tmp_path / 'gone'} does not exist — set data.root to a directory of images"
    assert copied.for_run().startswith(f"image folder {tmp_path / 'gone'} does not exist — pass --data DIR: ")


def test_a_data_root_that_is_a_file_says_so(tmp_path):
    (tmp_path / "file.png").write_bytes(b"x")
    result = fit(tmp_path / "file.png", tmp_path / "run")
    assert_one_line_error(result, 2, "is a file, not a folder")


@pytest.mark.parametrize("mode,channels,expected", [
    ("L", 3, ["grey→RGB"]), ("RGB", 1, ["colour→grey"]), ("RGBA", 3, ["alpha dropped"]),
    ("P", 3, ["palette→RGB"]), ("RGB", 3, []), ("I;16", 1, ["16-bit→8-bit"]),
    ("I;16B", 3, ["16-bit→8-bit", "grey→RGB"]), ("I", 1, []),
])
def test_conversions_name_what_happens_to_each_mode(mode, channels, expected):
    from glowtrain import folders

    assert folders.conversions(mode, 8, 8, channels, 8, None) == expected
    assert folders.conversions(mode, 10, 8, channels, 4, None) == [*expected, "centre-cropped", "resized"]


def make_classes(root: Path, names=("birds", "cats", "dogs"), per_class: int = 8) -> None:
    for k, name in enumerate(names):
        rng = np.random.default_rng(k)
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_subfolder_labels_are_the_sorted_first_level_folders_in_both_splits(tmp_path):
    from glowtrain.config import DataConfig
    from glowtrain.data import build_dataset

    make_classes(tmp_path / "images")
    (tmp_path / "images" / "cats" / "deeper").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "cats" / "deeper" / "x.png")  # still a cat
    cfg = DataConfig(dataset="folder", root=str(tmp_path / "images"), image_size=8, channels=3, labels="subfolders")
    for split in ("train", "test"):
        ds = build_dataset(cfg, split)
        assert ds.n_classes == 3 and ds.class_names == ["birds", "cats", "dogs"]
        for index, path in enumerate(ds.paths):
            folder = Path(path).relative_to(tmp_path / "images").parts[0]
            assert ds[index][1] == ds.class_names.index(folder)


def test_subfolder_labels_train_a_class_conditional_model_and_refuse_loose_files(tmp_path):
    make_classes(tmp_path / "images")
    labelled = ["data.labels=subfolders", "model.n_classes=3"]
    result = fit(tmp_path / "images", tmp_path / "run", *labelled)
    assert result.exit_code == 0, result.output
    assert "3 classes" in next(line for line in result.stdout.splitlines() if line.startswith("data: "))
    records = [json.loads(line) for line in RunDir(tmp_path / "run").metrics.read_text().splitlines()]
    assert any(r["split"] == "test" and "accuracy" in r for r in records)
    wrong = fit(tmp_path / "images", tmp_path / "run2", "data.labels=subfolders")
    assert_one_line_error(wrong, 2, "found 3 class folders", "set model.n_classes=3")
    for names in (("birds", "cats"), ("ants", "birds", "cats", "dogs")):  # --data with other classes than trained
        other = tmp_path / f"other{len(names)}"
        make_classes(other, names)
        for command in ("eval", "reconstruct"):
            moved = invoke(command, "--run", tmp_path / "run", "--data", other, "--device", "cpu")
            assert_one_line_error(moved, 2, f"{other} holds {len(names)} class folders ({', '.join(names)}) but this "
                                  "run was trained on 3 classes (birds, cats, dogs) — pass the folder it was trained "
                                  "on with --data DIR")
    renamed = tmp_path / "renamed"
    make_classes(renamed, ("birds", "dogs", "eels"))  # three, but label 1 would mean dogs where the model learnt cats
    moved = invoke("eval", "--run", tmp_path / "run", "--data", renamed, "--device", "cpu")
    assert_one_line_error(moved, 2, f"{renamed} holds the classes birds, dogs, eels, not the run's birds, cats, dogs "
                          "(each label would mean another class) — pass the folder it was trained on with --data DIR")
    cache = tmp_path / "renamed-cache"  # a cache keeps its class names for the same check
    ok(invoke("prepare", "--out", cache, "--no-progress", *sets(*FOLDER_RUN, f"data.root={renamed}", *labelled)))
    moved = invoke("eval", "--run", tmp_path / "run", "--data", cache, "--device", "cpu")
    assert_one_line_error(moved, 2, f"{cache} holds the classes birds, dogs, eels, not the run's birds, cats, dogs")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):  # no class folders at all
        shutil.copy(tmp_path / "images" / "cats" / f"{i}.png", flat / f"cat{i}.png")
    moved = invoke("eval", "--run", tmp_path / "run", "--data", flat, "--device", "cpu")
    assert_one_line_error(moved, 2, f"of {flat}, but {flat / 'cat0.png'} is not — pass --data DIR: where the run's "
                          "data is")
    (tmp_path / "empty").mkdir()  # said data.root, which the user had not typed
    moved = invoke("reconstruct", "--run", tmp_path / "run", "--data", tmp_path / "empty", "--device", "cpu")
    assert_one_line_error(moved, 2, f"no images under {tmp_path / 'empty'} — pass --data DIR: where the run's data is")
    shutil.copytree(tmp_path / "images", tmp_path / "moved")  # the same classes elsewhere: evaluated as trained
    assert invoke("eval", "--run", tmp_path / "run", "--data", tmp_path / "moved", "--device", "cpu").exit_code == 0
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "loose.png")
    loose = fit(tmp_path / "images", tmp_path / "run3", *labelled)
    assert_one_line_error(loose, 2, "first-level subfolder", str(tmp_path / "images" / "loose.png"))


def test_a_resume_refuses_class_folders_renamed_since_the_run_learnt_them(tmp_path):
    make_classes(tmp_path / "images")
    labelled = ["data.labels=subfolders", "model.n_classes=3"]
    ok(fit(tmp_path / "images", tmp_path / "run", *labelled))
    run = RunDir(tmp_path / "run")
    before = {path: path.read_bytes() for path in (run.data_record, run.last)}
    (tmp_path / "images" / "cats").rename(tmp_path / "images" / "ants")  # three classes still; label 0 now ants
    resumed = fit(tmp_path / "images", run.path, *labelled, "train.steps=6", resume=True)
    assert_one_line_error(resumed, 2, f"{tmp_path / 'images'} holds the classes ants, birds, dogs, not the run's "
                          "birds, cats, dogs (each label would mean another class) — give the class folders their "
                          "trained names again, or train a new run")
    assert {path: path.read_bytes() for path in before} == before  # nothing trained, data.json keeps the names
    elsewhere = invoke("fit", "--out", tmp_path / "run2", "--resume", run.last, "--no-progress",
                       *sets(*FOLDER_RUN, f"data.root={tmp_path / 'images'}", *labelled, "train.steps=6"))
    assert_one_line_error(elsewhere, 2, "not the run's birds, cats, dogs")  # resumed into a new folder: its record
    (tmp_path / "images" / "ants").rename(tmp_path / "images" / "cats")
    ok(fit(tmp_path / "images", run.path, *labelled, "train.steps=6", resume=True))


def test_an_empty_class_folder_is_refused_so_the_classes_cannot_shift_when_it_fills(tmp_path):
    make_classes(tmp_path / "images")
    labelled = ["data.labels=subfolders", "model.n_classes=3"]
    images = tmp_path / "images"
    (images / "eels" / "later").mkdir(parents=True)  # empty however deep
    (images / ".thumbnails").mkdir()  # hidden: not a class, as find_images does not enter it
    (images / "__MACOSX").mkdir()  # files, none an image: not a class, as before
    (images / "__MACOSX" / "._0.png").write_bytes(b"resource fork")
    refused = fit(images, tmp_path / "run", *labelled)
    assert_one_line_error(refused, 2, f"data.labels: subfolders takes each first-level folder of {images} as a class, "
                          f"but {images / 'eels'} is empty — add images to it, or remove it")
    assert not (tmp_path / "run").exists()
    (images / "fish").mkdir()
    assert_one_line_error(fit(images, tmp_path / "run", *labelled), 2, f"but {images / 'eels'}, {images / 'fish'} "
                          "are empty — add images to them, or remove them")
    shutil.rmtree(images / "eels")
    (images / "fish").rmdir()
    ok(fit(tmp_path / "images", tmp_path / "run", *labelled))
    make_classes(tmp_path / "more", ("eels",))  # a fourth class arrives: the run's model has three
    shutil.move(tmp_path / "more" / "eels", tmp_path / "images" / "eels")
    resumed = fit(tmp_path / "images", tmp_path / "run", *labelled, "train.steps=6", resume=True)
    assert_one_line_error(resumed, 2, "found 4 class folders under", "but this run was trained on 3 classes — give it "
                          "the class folders it was trained on, or train a new run (fit without --resume)")
    moved = invoke("eval", "--run", tmp_path / "run", "--data", tmp_path / "images", "--device", "cpu")
    assert_one_line_error(moved, 2, "holds 4 class folders (birds, cats, dogs, eels) but this run was trained on 3 "
                          "classes (birds, cats, dogs)")


def test_prepare_of_class_folders_suggests_the_class_count_and_fit_from_it_names_the_cache(tmp_path):
    make_classes(tmp_path / "images", ("cats", "dogs"))
    cache = tmp_path / "cache"
    prepared = ok(invoke("prepare", "--out", cache, "--no-progress",
                         *sets(*FOLDER_RUN, f"data.root={tmp_path / 'images'}", "data.labels=subfolders")))
    suggested = shlex.split(prepared.stdout.split("train from it with: ")[1].splitlines()[0])
    assert suggested[:2] == ["--set", f"data.cache={cache}"] and "data.labels=subfolders" in suggested
    assert suggested[-2:] == ["--set", "model.n_classes=2"]
    ok(invoke("fit", "--out", tmp_path / "run", "--no-progress", *sets(*FOLDER_RUN), *suggested))
    wrong = invoke("fit", "--out", tmp_path / "run2", "--no-progress", *sets(*FOLDER_RUN), *suggested[:-2],
                   *sets("model.n_classes=3"))
    assert_one_line_error(wrong, 2, f"found 2 class folders in the cache at {cache} but model.n_classes is 3")


def test_commands_take_a_class_by_its_folder_name_as_by_its_number(tmp_path):
    make_classes(tmp_path / "images")
    assert fit(tmp_path / "images", tmp_path / "run", "data.labels=subfolders", "model.n_classes=3").exit_code == 0
    run, cpu = tmp_path / "run", ("--device", "cpu")
    by_name = ok(invoke("sample", "--run", run, "--class", "cats", "--class", "DOGS", "--n", "4", "--out",
                        tmp_path / "named", *cpu)).stdout.strip()
    by_number = ok(invoke("sample", "--run", run, "--class", "1", "--class", "2", "--n", "4", "--out",
                          tmp_path / "numbered", *cpu)).stdout.strip()
    assert Path(by_name).name == Path(by_number).name == "sample_step0000004_t0p70_seed0_n4_class1-2.png"
    assert Path(by_name).read_bytes() == Path(by_number).read_bytes()
    loaded = glowtrain.load_run(run, device="cpu")
    assert loaded.class_names == ["birds", "cats", "dogs"]
    assert "\nclass_names: ['birds', 'cats', 'dogs']\n" in ok(invoke("info", "--run", run)).stdout
    assert torch.equal(loaded.sample(4, seed=3, classes=["cats", "dogs"]), loaded.sample(4, seed=3, classes=[1, 2]))
    moved = json.loads(ok(invoke("manipulate", "--run", run, "--from-class", "birds", "--to-class", "Dogs", "--n", "1",
                                 *cpu)).stdout)
    assert moved["direction"] == "class 0 (birds) -> 2 (dogs)" and moved["path"].endswith("_class0-2_n1.png")
    for args, line in ((("sample", "--class", "fish"), "--class 'fish' names no class of this run — give a number or "
                        "a name: 0 birds, 1 cats, 2 dogs"),
                       (("sample", "--class", "3"), "--class 3 is out of range: this model has classes 0..2 (0 birds, "
                        "1 cats, 2 dogs)"),
                       (("manipulate", "--from-class", "cat", "--to-class", "dogs"), "--from-class 'cat' names no "
                        "class"),
                       (("manipulate", "--from-class", "1", "--to-class", "cats"), "--from-class and --to-class are "
                        "both 1")):
        assert_one_line_error(invoke(*args[:1], "--run", run, *args[1:], *cpu), 2, line)


@pytest.mark.parametrize("dataset", ["folder", "celeba"])  # CelebA in a plain folder is read to any depth too
def test_outputs_are_refused_inside_the_image_folder_and_the_folder_its_cache_came_from(tmp_path, dataset):
    images = tmp_path / "images"
    make_images(images, 2)
    data = DataConfig(dataset=dataset, root=str(images))
    with pytest.raises(glowtrain.UserError, match="lies inside the image folder this run trains on"):
        refuse_output_among_training_images(images / "samples", data)
    # An empty root names no folder (the config's checks refuse it; no output is "inside the image folder ()").
    refuse_output_among_training_images(tmp_path / "samples", dataclasses.replace(data, root=""))
    # A prepared cache's source folder is protected too, with or without data.root: eval --data or a new prepare
    # would read what was written there.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.json").write_text(json.dumps({"root": str(images.resolve())}))
    for cached in (dataclasses.replace(data, cache=str(cache)), dataclasses.replace(data, cache=str(cache), root="")):
        with pytest.raises(glowtrain.UserError, match="lies inside the image folder this run trains on"):
            refuse_output_among_training_images(images / "run", cached)
        refuse_output_among_training_images(tmp_path / "run", cached)
    refuse_output_among_training_images(tmp_path / "run", dataclasses.replace(data, cache=str(tmp_path / "none")))


def test_celeba_in_torchvisions_layout_reads_only_its_listed_faces_so_outputs_beside_them_are_fine(tmp_path):
    """Its partition file names the images: runs kept under data.root (made before the refusal covered CelebA)
    still resume and sample; a plain CelebA folder is read to any depth and refuses them."""
    root = tmp_path / "cel"
    make_images(root / "celeba" / "img_align_celeba", 2)
    data = DataConfig(dataset="celeba", root=str(root), channels=3)
    with pytest.raises(glowtrain.UserError, match="lies inside the image folder this run trains on"):
        refuse_output_among_training_images(root / "runs" / "a", data)  # not the layout yet: a plain folder
    (root / "celeba" / "list_eval_partition.txt").write_text("")
    refuse_output_among_training_images(root / "runs" / "a", data)
    refuse_output_among_training_images(root / "runs" / "a" / "samples", data)


def test_subfolder_labels_are_only_for_folders():
    from glowtrain.config import load_config
    from glowtrain.errors import UserError

    with pytest.raises(UserError, match="data.labels"):
        load_config(None, ["data.labels=subfolders"])


def test_a_folder_run_from_before_data_records_is_warned_that_its_split_may_differ(tmp_path):
    make_images(tmp_path / "images", 16)
    run = tmp_path / "run"
    assert fit(tmp_path / "images", run).exit_code == 0
    RunDir(run).data_record.unlink()  # as a run made before this version
    evaluated = invoke("eval", "--run", run, "--device", "cpu")
    assert evaluated.exit_code == 0 and "recorded no data fingerprint" in evaluated.stderr
    resumed = fit(tmp_path / "images", run, "train.steps=6", resume=True)
    assert resumed.exit_code == 0 and resumed.stderr.count("recorded no data fingerprint") == 1
    again = invoke("eval", "--run", run, "--device", "cpu")
    assert "warning" not in again.stderr  # the resumed run recorded its data
    # A checkpoint resumed into a new folder is compared with the data its own run recorded: no false warning,
    # and a real change is still said.
    checkpoint = str(RunDir(run).last)
    branched = invoke("fit", "--out", tmp_path / "branch", "--no-progress", "--resume", checkpoint,
                      *sets(*FOLDER_RUN, f"data.root={tmp_path / 'images'}", "train.steps=8"))
    assert branched.exit_code == 0, branched.output
    assert "warning" not in branched.stderr
    make_images(tmp_path / "images" / "more", 4, seed=1)
    changed = invoke("fit", "--out", tmp_path / "branch2", "--no-progress", "--resume", checkpoint,
                     *sets(*FOLDER_RUN, f"data.root={tmp_path / 'images'}", "train.steps=8"))
    assert changed.exit_code == 0 and "images differ from those this run recorded" in changed.stderr


def test_a_file_that_vanishes_between_listing_and_checking_is_an_unreadable_file_not_a_crash(tmp_path):
    from glowtrain import folders

    paths = [str(p) for p in make_images(tmp_path, 3)]
    Path(paths[1]).unlink()
    checked = folders.check_images(paths, tmp_path, 3, 8, None)
    assert checked.good == [paths[0], paths[2]] and [p for p, _ in checked.bad] == [paths[1]]
    assert folders.conversions("CMYK", 8, 8, 3, 8, None) == ["CMYK→RGB"]


def test_check_records_of_an_earlier_glowtrain_are_read_again_and_a_malformed_exif_is_a_bad_file(tmp_path):
    from glowtrain import folders

    paths = [str(p) for p in make_images(tmp_path, 2)]
    first = folders.check_images(paths, tmp_path, 3, 8, None)
    earlier = {name: record[:6] for name, record in first.records.items()}  # 6 fields, no header conversions
    again = folders.check_images(paths, tmp_path, 3, 8, None, earlier)
    assert again.records == first.records and all(len(record) == 7 for record in again.records.values())
    from glowtrain.data import read_image

    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x0132] = 6, "Canon", "2020:01:01 00:00:00"
    block = bytearray(exif.tobytes())
    block[41] = 74  # a tag's count now points past the block: turning the image by it fails (struct.error)
    broken = tmp_path / "broken-exif.png"
    Image.new("RGB", (8, 8)).save(broken, exif=bytes(block))
    try:
        read_image(broken, 3)
        unreadable = False
    except folders.PIL_DECODE_ERRORS:  # one line, as any broken file, not a traceback
        unreadable = True
    checked = folders.check_images([str(broken)], tmp_path, 3, 8, None)
    assert [path for path, _ in checked.bad] == ([str(broken)] if unreadable else [])  # found before training
    assert unreadable  # with this Pillow; the line above is what must hold with any


def test_a_run_finds_its_folder_from_any_working_directory(tmp_path, monkeypatch):
    """A relative data.root is stored as an absolute path, so eval works from elsewhere."""
    from glowtrain.config import load_config

    images = tmp_path / "work" / "photos"
    images.mkdir(parents=True)
    for i, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)):
        Image.fromarray(pixels).save(images / f"{i}.png")
    monkeypatch.chdir(tmp_path / "work")
    fitted = invoke("fit", "--out", "run", "--no-progress", *sets(
        "run.device=cpu", "data.dataset=folder", "data.root=photos", "data.image_size=8", "model.n_levels=2",
        "model.n_steps=1", "model.hidden_channels=8", "model.coupling=affine", "model.dequantization=uniform",
        "train.batch_size=8", "train.init_batch_size=16", "train.steps=2", "train.eval_every=2", "train.n_samples=1"))
    assert fitted.exit_code == 0, fitted.output
    assert load_config(tmp_path / "work" / "run" / "config.yaml").data.root == str(images)
    monkeypatch.chdir(tmp_path)
    result = invoke("eval", "--run", tmp_path / "work" / "run", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_images"] > 0


needs_byte_names = pytest.mark.skipif(os.name != "posix" or sys.platform == "darwin",
                                      reason="file names that are not UTF-8 need a POSIX file system other than APFS")


def test_a_valid_name_keeps_the_split_position_it_always_had():
    import hashlib

    from glowtrain.folders import _position

    for name in ("img001.png", "café/été.png"):  # hashed as before: str.encode() of seed, NUL, relative path
        expected = int.from_bytes(hashlib.sha256(f"7\0{name}".encode()).digest()[:8], "big") / 2**64
        assert _position(name, 7) == expected


@needs_byte_names
def test_file_names_that_are_not_utf8_are_split_fingerprinted_prepared_and_trained(tmp_path):
    from glowtrain.folders import find_images, fingerprint, split_paths

    root = tmp_path / "images"
    make_images(root, 12)
    for i in range(3):  # Latin-1 names, as old cameras and archives write them
        os.rename(root / f"img{i:03d}.png", os.fsdecode(os.fsencode(root) + b"/caf\xe9%d.png" % i))
    base, paths = find_images(str(root))
    train, test = (split_paths(paths, base, 0.25, 0, split) for split in ("train", "test"))
    assert sorted(train + test) == sorted(paths) and not set(train) & set(test)
    assert fingerprint(paths, base)["n_images"] == 12
    result = invoke("prepare", *sets(*FOLDER_RUN, f"data.root={root}"), "--out", tmp_path / "cache", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "12 images found" in result.stdout
    result = fit(root, tmp_path / "run")
    assert result.exit_code == 0, result.output


def test_a_cache_prepared_inside_the_image_folder_is_not_taken_for_files_there(tmp_path):
    from glowtrain.folders import find_images

    root = tmp_path / "images"
    make_images(root, 12)
    (root / "notes.txt").write_text("mine")
    before = find_images(str(root), ignored := [])
    result = invoke("prepare", *sets(*FOLDER_RUN, f"data.root={root}"), "--no-progress")  # the default: in root
    assert result.exit_code == 0, result.output
    cache = root / "glowtrain-cache-folder-8px"
    assert (cache / "index.json").is_file() and f"in {cache}\n" in result.stdout
    assert find_images(str(root), again := []) == before and again == ignored == [str(root / "notes.txt")]
    (root / "glowtrain-cache-folder-8px" / "index.json").write_text('{"not": "a cache"}')  # a folder of the user's
    assert len(find_images(str(root), mine := [])[1]) == 12 and sorted(mine) == sorted(
        [str(root / "notes.txt"), *(str(p) for p in cache.iterdir())])


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_linked_folders_list_each_file_once_and_keep_it_in_one_split(tmp_path):
    from glowtrain.folders import find_images, split_paths

    root = tmp_path / "images"
    make_images(root / "a", 20)
    base, plain = find_images(str(root))
    before = {split: split_paths(plain, base, 0.25, 0, split) for split in ("train", "test")}
    os.symlink(".", root / "loop")  # a link back up: endless without loop detection
    os.symlink(root / "a", root / "b")  # a second way to the same folder
    os.symlink(root / "a" / "img003.png", root / "a" / "z.png")  # a second name for one file
    # Links whose names sort first: the files keep their own names (a name decides the split).
    os.symlink(root / "a" / "img005.png", root / "a" / "aa.png")
    os.symlink(root / "a", root / "0a")
    base, linked = find_images(str(root))
    assert linked == plain  # each real file once, by its own path
    after = {split: split_paths(linked, base, 0.25, 0, split) for split in ("train", "test")}
    assert after == before and not set(after["train"]) & set(after["test"])
    make_images(tmp_path / "elsewhere", 3)  # a folder outside data.root, reached only through a link
    os.symlink(tmp_path / "elsewhere", root / "a" / "more")
    os.symlink(tmp_path / "elsewhere" / "img001.png", root / "0.png")  # and one of its files by a second name
    base, linked = find_images(str(root))
    assert linked == sorted(plain + [str(root / "a" / "more" / f"img{i:03d}.png") for i in range(3)])


def sixteen_bit(array: np.ndarray, mode: str) -> Image.Image:
    order = ">u2" if mode == "I;16B" else "<u2"
    if mode == "I":
        return Image.frombytes("I", array.shape[::-1], array.astype("<i4").tobytes())
    return Image.frombytes(mode, array.shape[::-1], array.astype(order).tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped_to_white(mode, channels):
    from glowtrain.data import read_image

    wide = np.array([[0, 128, 255, 256], [1000, 32768, 60000, 65535]], dtype=np.int64)
    expected = np.floor(wide / 65535 * 255 + 0.5).astype(np.uint8)  # [[0, 0, 1, 1], [4, 128, 233, 255]]
    read = np.asarray(read_image(sixteen_bit(wide, mode), channels))
    assert np.array_equal(read if channels == 1 else read[..., 0], expected)
    assert channels == 1 or (read == read[..., :1]).all()


def test_32_bit_integer_images_holding_8_bit_values_keep_them():
    from glowtrain.data import read_image

    eight = np.array([[0, 128, 255]], dtype=np.int32)
    assert np.asarray(read_image(Image.fromarray(eight, "I"), 1)).tolist() == [[0, 128, 255]]


def test_a_folder_of_16_bit_pngs_trains_on_scaled_pixels_and_counts_the_conversion(tmp_path):
    from glowtrain import data
    from glowtrain.config import DataConfig

    rng = np.random.default_rng(0)
    (tmp_path / "scans").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(tmp_path / "scans" / f"{i}.png")
    with Image.open(tmp_path / "scans" / "0.png") as img:
        assert img.mode == "I;16"
        expected = (np.asarray(img).astype(np.int64) * 255 + 32767) // 65535
    cfg = DataConfig(dataset="folder", root=str(tmp_path / "scans"), image_size=8, channels=1, test_fraction=0.5)
    train, test = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "test")
    assert "converted: 6 16-bit→8-bit" in data.data_summary(cfg, train, test)
    assert np.array_equal(data.preprocess_image(tmp_path / "scans" / "0.png", cfg)[0].numpy(), expected)
    pixels = np.concatenate([ds[i][0].numpy().ravel() for ds in (train, test) for i in range(len(ds))])
    assert pixels.mean() == pytest.approx(127.5, abs=8)  # clipping made nearly every pixel 255


def test_exif_rotations_and_16_bit_colour_are_counted_in_the_data_line(tmp_path):
    from glowtrain import data
    from glowtrain.config import DataConfig

    make_images(tmp_path / "images", 4)
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 65536, (8, 8, 3))
    sixteen_bit_rgb_png(tmp_path / "images" / "scan.png", wide)
    upright = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    orientation = Image.Exif()
    orientation[0x0112] = 6  # stored turned: the viewer turns it 90° clockwise
    Image.fromarray(np.rot90(upright, -3).copy()).save(tmp_path / "images" / "phone.png", exif=orientation)
    cfg = DataConfig(dataset="folder", root=str(tmp_path / "images"), image_size=8, channels=3, test_fraction=0.25)
    train, test = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "test")
    line = data.data_summary(cfg, train, test)
    assert "1 turned upright (EXIF)" in line and "1 16-bit→8-bit" in line
    assert np.array_equal(data.preprocess_image(tmp_path / "images" / "phone.png", cfg).permute(1, 2, 0).numpy(),
                          upright)
    scan = data.preprocess_image(tmp_path / "images" / "scan.png", cfg).permute(1, 2, 0).numpy()
    assert np.abs(scan.astype(int) - wide / 257).max() <= 1  # each channel's high byte


def test_float_images_are_refused_or_skipped_as_unreadable_not_clipped(tmp_path):
    """Mode F pixels may span 0..1 or 0..255 or anything: Pillow's conversion would silently clip them."""
    from glowtrain import data
    from glowtrain.config import DataConfig
    from glowtrain.errors import UserError

    (tmp_path / "images").mkdir()
    for i in range(20):
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "images" / "float.tiff")
    shutil.move(tmp_path / "images" / "float.tiff", tmp_path / "images" / "float.png")  # found by extension
    cfg = DataConfig(dataset="folder", root=str(tmp_path / "images"), image_size=8, test_fraction=0.25)
    with pytest.raises(UserError, match=r"float\.png.*32-bit float pixels \(mode F\)"):
        data.build_dataset(cfg, "train"), data.build_dataset(cfg, "test")
    skipping = DataConfig(**{**vars(cfg), "on_bad_image": "skip"})
    kept = len(data.build_dataset(skipping, "train")) + len(data.build_dataset(skipping, "test"))
    assert kept == 20
    with pytest.raises(ValueError, match="mode F"):
        data.read_image(Image.fromarray(np.zeros((2, 2), np.float32), "F"), 1)


def test_a_run_moved_to_another_machine_reads_its_data_from_where_data_says(tmp_path, monkeypatch):
    """The stored data.root is where the run was trained; --data names where the images (or their prepared
    cache) are here, for eval, score and the other commands that read the run's data."""
    from glowtrain.config import load_config

    images = tmp_path / "gpu-box" / "photos"
    images.mkdir(parents=True)
    for i, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)):
        Image.fromarray(pixels).save(images / f"{i}.png")
    run = tmp_path / "run"
    fitted = invoke("fit", "--out", run, "--no-progress", *sets(
        "run.device=cpu", "data.dataset=folder", f"data.root={images}", "data.image_size=8", "model.n_levels=2",
        "model.n_steps=1", "model.hidden_channels=8", "model.coupling=affine", "model.dequantization=uniform",
        "train.batch_size=8", "train.init_batch_size=16", "train.steps=2", "train.eval_every=2", "train.n_samples=1"))
    assert fitted.exit_code == 0, fitted.output
    trained = json.loads(invoke("eval", "--run", run, "--device", "cpu", "--no-progress").stdout)
    laptop = tmp_path / "laptop" / "pics"
    laptop.parent.mkdir()
    shutil.move(images, laptop)
    gone = assert_one_line_error(invoke("eval", "--run", run, "--device", "cpu"), 2, str(images), "--data DIR")
    assert "data.root" not in gone  # eval takes no config keys: the fix it names is its own option
    refit = invoke("fit", "--out", tmp_path / "refit", "--config", run / "config.yaml", "--no-progress")
    assert "set data.root" in assert_one_line_error(refit, 2, str(images)) and "--data" not in refit.stderr
    moved = invoke("eval", "--run", run, "--device", "cpu", "--no-progress", "--data", laptop)
    assert moved.exit_code == 0 and moved.stderr == "", moved.output  # the same files: no changed-data warning
    assert json.loads(moved.stdout)["bpd"] == trained["bpd"]
    assert invoke("score", "--run", run, "--device", "cpu", "--no-progress", "--data", laptop, "--images", laptop,
                  "--out", tmp_path / "score").exit_code == 0
    cache = tmp_path / "laptop" / "cache"
    prepared = invoke("prepare", "--config", run / "config.yaml", "--set", f"data.root={laptop}", "--out", cache,
                      "--no-progress")
    assert prepared.exit_code == 0, prepared.output
    from_cache = invoke("eval", "--run", run, "--device", "cpu", "--no-progress", "--data", cache)
    assert from_cache.exit_code == 0, from_cache.output
    assert json.loads(from_cache.stdout)["bpd"] == pytest.approx(trained["bpd"], abs=1e-6)
    assert load_config(run / "config.yaml").data.root == str(images)  # the run itself is left as it was
    assert_one_line_error(invoke("eval", "--run", run, "--device", "cpu", "--data", tmp_path / "nowhere"), 2,
                          "--data", "no such folder")
    cached = invoke("fit", "--out", tmp_path / "cached", "--config", run / "config.yaml", "--no-progress",
                    "--set", f"data.cache={cache}", "--set", "train.steps=1", "--set", "train.eval_every=1")
    assert cached.exit_code == 0, cached.output
    shutil.rmtree(cache)
    message = assert_one_line_error(invoke("eval", "--run", tmp_path / "cached", "--device", "cpu"), 2,
                                    f"no prepared cache at {cache} — pass --data DIR")
    assert "data.cache" not in message
    score_message = assert_one_line_error(invoke("score", "--run", tmp_path / "cached", "--device", "cpu",
                                                 "--images", laptop, "--batch-test", "--out", tmp_path / "s2"), 2,
                                          "--batch-test needs the training split", "— pass --data DIR")
    assert "data.cache" not in score_message and not (tmp_path / "s2").exists()


def test_the_data_line_says_how_many_hidden_folders_and_other_files_it_did_not_read(tmp_path):
    from glowtrain import data
    from glowtrain.config import DataConfig

    root = tmp_path / "photos"
    make_images(root, 6)
    make_images(root / ".thumbs", 4)  # a hidden folder: not entered, but said
    for name in ("notes.txt", "scan.tif", ".DS_Store", "sub/.hidden.png"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(b"x")
    cfg = DataConfig(dataset="folder", root=str(root), image_size=8, channels=3, test_fraction=0.5)
    train, test = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "test")
    assert data.data_summary(cfg, train, test).startswith(
        f"data: folder {root}: 6 images found (not read: 1 hidden folder, 4 files hidden or not "
        ".png/.jpg/.jpeg/.webp/.bmp), ")
    index = prepare_cache(cfg, str(tmp_path / "cache"), progress=False)
    cached = DataConfig(**{**vars(cfg), "cache": str(tmp_path / "cache")})
    line = data.data_summary(cached, data.build_dataset(cached, "train"), data.build_dataset(cached, "test"))
    assert line.split(": ", 2)[2] == index["summary"].split(": ", 2)[2]
    make_images(tmp_path / "plain", 4)
    plain = DataConfig(**{**vars(cfg), "root": str(tmp_path / "plain")})
    assert ": 4 images found, " in data.data_summary(plain, data.build_dataset(plain, "train"),
                                                       data.build_dataset(plain, "test"))


def test_fit_on_a_missing_image_folder_says_so_before_the_runs_refusals(fitted_digits_run_here):
    """Without --out the run is runs/<run.name>: the digits run already there would answer for the missing folder."""
    missing = Path("nope").absolute()
    result = invoke("fit", "--no-progress", *sets("run.device=cpu", "data.dataset=folder", "data.root=nope",
                                                  "data.channels=3"))
    assert assert_one_line_error(result, 2) == (f"error: image folder {missing} does not exist — set data.root to a "
                                                "directory of images")


@pytest.fixture
def fitted_digits_run_here(tmp_path, monkeypatch):
    """A working directory whose runs/digits holds a run (a checkpoint is all fit looks at)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "digits" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "digits" / "checkpoints" / "last.pt").write_bytes(b"a run's checkpoint")
    return tmp_path / "runs" / "digits"
