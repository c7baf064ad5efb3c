"""What a run keeps of its data and checks against it: data.json (which files, their fingerprints, the crop, the
class names), data_check.json (the check of every file, so a resume reads none twice) and the class count."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from glowtrain.data import SPLITS, data_summary, skipped_warning, stale_cache_warning, unread_root_warning
from glowtrain.errors import UserError
from glowtrain.files import write_json
from glowtrain.folders import fingerprint_differs
from glowtrain.runs import RunDir, recorded_data_of

if TYPE_CHECKING:
    from glowtrain.config import DataConfig


def check_class_count(cfg, found: int, resuming: bool = False) -> None:
    """model.n_classes must match the labels the dataset brings (or be 0 for an unconditional model)."""
    m, data = cfg.model.n_classes, cfg.data
    where = f"in the cache at {data.cache}" if data.cache else f"under {data.root}"
    if resuming and m and found != m:  # model.n_classes is the checkpoint's: the data must change, not the config
        found_what = (f"data.labels: subfolders found {found} class folders {where}" if data.labels == "subfolders"
                      else f"dataset {data.dataset} has {found or 'no'} classes")
        raise UserError(f"{found_what} but this run was trained on {m} classes — give it the "
                        f"{'class folders' if data.labels == 'subfolders' else 'data'} it was trained on, or train a "
                        "new run (fit without --resume)")
    if data.labels == "subfolders" and m != found:
        raise UserError(f"data.labels: subfolders found {found} class folders {where} but model.n_classes is {m} — set "
                        f"model.n_classes={found}")
    if m > 0 and found != m:
        fix = (f"set model.n_classes={found} (or 0 for an unconditional model)" if found else
               "set model.n_classes=0, or label a folder's images by its subfolders with data.labels: subfolders")
        raise UserError(f"model.n_classes={m} but dataset {data.dataset} has {found or 'no'} classes — {fix}")


def data_record(data_cfg: DataConfig, train, test) -> dict:
    """What a run records about its data (data.json), to tell later whether the files changed."""
    record = {"dataset": data_cfg.dataset, "split_scheme": getattr(train, "split_scheme", None),
              "fingerprints": {"train": train.report.fingerprint, "test": test.report.fingerprint},
              "skipped": [path for path, _ in train.report.skipped + test.report.skipped]}
    if hasattr(train, "crop"):  # image files, or a cache of them: so score and load_run crop new images alike
        record["crop"] = train.crop
    if getattr(train, "class_names", None):  # subfolder labels: so a moved run's --data means the same classes
        record["class_names"] = train.class_names
    return record


def data_changed_warning(recorded: dict | None, split: str, dataset) -> str | None:
    """A warning when a split's files differ from those a run recorded (None when they match). `recorded` is
    the run's data.json; None for a run made before runs recorded their data."""
    if recorded is None:
        if getattr(dataset, "split_scheme", None) is None:
            return None
        return ("warning: this run recorded no data fingerprint (it predates them) and folder splits are now "
                "chosen by a hash of each file's path: its train/test split may differ from the one it started with")
    before, now = recorded.get("fingerprints", {}).get(split), dataset.report.fingerprint
    if not before or not now or not fingerprint_differs(before, now):
        return None
    return (f"warning: the {split} images differ from those this run recorded ({before['n_images']:,} files "
            f"then, {now['n_images']:,} now, or other names or sizes): its {split} numbers are not "
            "comparable with earlier ones")


def run_data_changed_warning(run_dir: str | Path | None, split: str, dataset) -> str | None:
    """data_changed_warning against what a run directory recorded (None for a checkpoint outside a run)."""
    if not run_dir or not RunDir(run_dir).config.is_file():
        return None
    return data_changed_warning(recorded_data_of(run_dir), split, dataset)


def recorded_data(run: RunDir, resumed_from: RunDir | None = None) -> dict | None:
    """The data.json a run keeps; for a run resumed into a new folder, that of the checkpoint's own run."""
    return recorded_data_of(run.path) or (recorded_data_of(resumed_from.path) if resumed_from else None)


def check_class_names(recorded: dict | None, dataset, where, fix: str) -> None:
    """Subfolder labels must name the classes a run learnt: a renamed or replaced class folder keeps the count
    but gives a label another meaning."""
    before, now = (recorded or {}).get("class_names"), getattr(dataset, "class_names", None)
    if before and now and now != before:
        raise UserError(f"{where} holds the classes {', '.join(now)}, not the run's {', '.join(before)} "
                        f"(each label would mean another class) — {fix}")


def record_run_data(run: RunDir, data_cfg: DataConfig, train, test, resumed: bool,
                    resumed_from: RunDir | None = None) -> tuple[str, list[str]]:
    """Keep the data's record and check results in the run; return the start's data line and its warnings
    (files skipped; on resume, files that differ from those the run recorded, or, for a run resumed into a new
    folder, those the checkpoint's own run recorded)."""
    recorded = recorded_data(run, resumed_from)
    changed = [data_changed_warning(recorded, s, d) for s, d in zip(SPLITS, (train, test))] if resumed else []
    warnings = [w for w in dict.fromkeys([skipped_warning(train, test), stale_cache_warning(data_cfg),
                                          unread_root_warning(data_cfg), *changed])
                if w]  # each line once
    write_json(run.data_record, data_record(data_cfg, train, test))
    if check_records(train, test):  # image files only
        write_json(run.data_check, check_records(train, test))
    return data_summary(data_cfg, train, test), warnings


def check_records(train, test) -> dict:
    """Per file, what the check before training found: kept in the run so a resume reads no file twice."""
    return {**train.report.check_records, **test.report.check_records}
