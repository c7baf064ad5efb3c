"""Run directories: where a run's files live, which run a command means, and what `fit` resumes."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from glowtrain.config import Config, config_to_dict, config_to_yaml, load_config
from glowtrain.errors import UserError
from glowtrain.files import atomic_write, read_json
from glowtrain.folders import IMAGE_EXTENSIONS

RUNS_ROOT = Path("runs")
# The first line of every config.yaml that `fit` writes: how a fresh start tells a run of its own that died before
# its first checkpoint (whose files it may replace) from a folder of the user's that happens to hold a config.yaml.
RUN_CONFIG_MARK = "written by glowtrain fit"  # what is checked: keep it when rewording the rest
RUN_CONFIG_HEADER = f"{RUN_CONFIG_MARK}: this run's whole config (its checkpoints keep their own copy)"
# The header ends with a digest of the lines below it, so that a config.yaml the user has since edited (their
# notes, changed values) is told from one fit may replace. Files of versions before it have none: trusted.
_DIGEST_TAG = " [sha256 "


@dataclass(frozen=True)
class RunDir:
    """A run directory's layout (README's "The run directory"): one attribute per artefact."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics_discarded(self) -> Path:
        """What a resume took out of metrics.jsonl: records of training lost when the run stopped unsaved."""
        return self.path / "metrics_discarded.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def data_record(self) -> Path:
        """data.json: the fingerprint of the files the run trained on, compared on resume and eval."""
        return self.path / "data.json"

    @property
    def data_check(self) -> Path:
        """data_check.json: what checking each image file found, so a resume does not read them again."""
        return self.path / "data_check.json"

    @property
    def lock(self) -> Path:
        """Held by the `fit` training this run (see training_lock)."""
        return self.path / ".fit.lock"

    def has_checkpoint(self) -> bool:
        return self.last.is_file()

    def is_run(self) -> bool:
        """A folder fit made: a checkpoint, or the config.yaml fit writes first."""
        return self.has_checkpoint() or self.config_origin() in ("fit", "edited")

    def config_origin(self) -> str:
        """Who wrote config.yaml: 'fit' (as fit wrote it), 'edited' (by fit, then changed by hand), 'other' (not
        fit: a folder of the user's that happens to hold one) or 'none'."""
        try:
            first, rest = self.config.read_bytes().decode("utf-8").split("\n", 1)
        except FileNotFoundError:
            return "none"
        except (OSError, UnicodeDecodeError, ValueError):
            return "other"
        if not first.startswith(f"# {RUN_CONFIG_MARK}"):
            return "other"
        written, tagged, digest = first.partition(_DIGEST_TAG)
        return "fit" if not tagged or digest == f"{_digest(rest)}]" else "edited"

    def unused_edits(self, cfg: Config, trained: dict) -> tuple[list[str], str]:
        """What config.yaml holds changed by hand (from `trained`, the config the run's checkpoint keeps, as fit
        wrote it there) that `cfg` does not take: a resume trains with the checkpoint's config plus --set, so such
        edits would go unused without a word. Returns the keys, and the problem of a file that is not a valid
        config (its edits all go unused)."""
        if self.config_origin() != "edited":
            return [], ""  # as fit wrote it, or not a run's
        try:
            edited = config_to_dict(load_config(self.config))
        except UserError as e:
            return [], str(e)
        used = config_to_dict(cfg)
        return [f"{section}.{key}" for section, values in edited.items() for key, value in values.items()
                if value != trained.get(section, {}).get(key, value) and value != used[section][key]], ""

    def files_a_run_would_replace(self) -> list[str]:
        """What a fresh start here would overwrite or move that no run of glowtrain's left (the user's own files)."""
        if self.config_origin() in ("fit", "edited"):  # a run's folder (write_config keeps an edited config.yaml)
            return []
        names = (self.config, self.data_record, self.data_check, self.metrics, self.metrics_discarded, self.tb,
                 self.checkpoints, self.samples)
        return [path.name for path in names if path.exists()]

    def write_config(self, cfg: Config) -> Path | None:
        """Write config.yaml as fit does; one edited by hand since is kept first, as config.edited.yaml (then
        config.edited_2.yaml, ...), and its new name returned."""
        kept = None
        if self.config_origin() in ("edited", "other"):  # 'other' in a run's folder: resaved as a BOM or Latin-1
            kept = first_unused(lambda n: self.path / f"config.edited{_copy_number(n)}.yaml")
            try:
                os.link(self.config, kept)  # the write below replaces the file: the link keeps the old one
            except OSError:
                shutil.copy2(self.config, kept)
        body = config_to_yaml(cfg)
        text = f"# {RUN_CONFIG_HEADER}{_DIGEST_TAG}{_digest(body)}]\n{body}"
        atomic_write(self.config, lambda f: f.write(text.encode()))
        return kept

    def set_aside_unfinished(self) -> None:
        """A run that stopped before its first checkpoint left logs (and perhaps a best.pt) but nothing to resume:
        keep them as *.old (then *.old_2, ...: an earlier one's are kept too). Its sample grids too: the new run's
        would be written over them, under the same step names."""
        for path in (self.metrics, self.tb, self.best, self.samples):
            if path.exists():
                path.rename(first_unused(lambda n, path=path: path.with_name(f"{path.name}.old{_copy_number(n)}")))

    def keep_checkpoints_given_up(self, resumed: Path) -> list[Path]:
        """A resume from another checkpoint than last.pt (going back, or to another branch) saves over last.pt and
        best.pt, which hold the training it gives up: keep them (all but the checkpoint resumed) as
        checkpoints/discarded_<name>_step<N>.pt. Hard links where the file system has them (saves replace a file,
        so the link keeps the old one), else copies."""
        kept = []
        if not self.last.exists() or resumed.resolve() == self.last.resolve():
            return kept
        for path in (self.last, self.best):
            saved_at = saved_step(path)
            if saved_at is None or path.resolve() == resumed.resolve():
                continue
            keep, copies = path.with_name(f"discarded_{path.stem}_step{saved_at:07d}.pt"), 1
            while keep.exists() and not keep.samefile(path):  # one of another branch, at the same step: keep both
                copies += 1
                keep = path.with_name(f"discarded_{path.stem}_step{saved_at:07d}_{copies}.pt")
            if keep.exists():
                continue  # kept already
            try:
                os.link(path, keep)
            except OSError:
                shutil.copy2(path, keep)
            kept.append(keep)
        return kept

    def keep_samples_after(self, step: int) -> list[Path]:
        """Going on from `step` (a resume from an earlier checkpoint, a roll-back), the run draws its sample grids
        again under the same step names: those drawn after `step`, by the training it gives up, are kept as
        samples/discarded_<name> (as its metrics and checkpoints are)."""
        kept = []
        for grid in sorted(self.samples.glob("step*.png")) if self.samples.is_dir() else ():
            drawn_at = re.match(r"step(\d+)_", grid.name)
            if drawn_at and int(drawn_at.group(1)) > step:
                keep = first_unused(lambda n, grid=grid: grid.with_name(f"discarded{_copy_number(n)}_{grid.name}"))
                grid.rename(keep)
                kept.append(keep)
        return kept


RUNS_OWN_FOLDERS = ("checkpoints", "samples", "tb")


def run_folder_holding(out: Path) -> Path | None:
    """The checkpoints/, samples/ or tb/ folder of a run that `out` is (or lies inside), else None: what is written
    there is taken for that run's own (TensorBoard reads tb/ to any depth, `runs` lists only top-level runs). Links and
    `..` resolved, as the files are written."""
    out = Path(out).expanduser().resolve()
    for folder in (out, *out.parents):
        if folder.name in RUNS_OWN_FOLDERS and RunDir(folder.parent).is_run():
            return folder
    return None


def refuse_another_runs_folder(out: Path, writes: str, fix: str, own: Path | None = None) -> None:
    """Refuse an --out among another run's own files (`own`: a folder of the command's own run, allowed), naming
    what it `writes` and the `fix`."""
    folder = run_folder_holding(out)
    if folder is not None and not (own is not None and folder == Path(own).expanduser().resolve()):
        raise UserError(f"--out {out} lies in {folder}, a run's own folder, where {writes} would be taken for that "
                        f"run's — {fix}")


def first_unused(name: Callable[[int], Path]) -> Path:
    """name(1), or name(2), ...: the first that does not exist, so nothing kept earlier is replaced."""
    copies = 1
    while name(copies).exists() or name(copies).is_symlink():
        copies += 1
    return name(copies)


def _copy_number(n: int) -> str:
    return "" if n == 1 else f"_{n}"


def _remove_interrupted_saves(run: RunDir) -> None:
    """With the run's lock held, no other process saves into its checkpoints/: a temporary file there is what a
    killed save left (atomic_write's .NAME.PID.ID.tmp; a model's size each, never removed)."""
    for leftover in run.checkpoints.glob(".*.tmp") if run.checkpoints.is_dir() else ():
        leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def training_lock(run: RunDir):
    """Hold the run's lock while `fit` trains it: a second `fit` on the same run (which would log every step twice
    and save over its checkpoints) is refused. The kernel drops the lock with the process: a crash leaves none."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): train unguarded
        yield
        return
    created = [folder for folder in (run.path, *run.path.parents) if not folder.exists()]
    run.path.mkdir(parents=True, exist_ok=True)
    try:
        with open(run.lock, "a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _remove_interrupted_saves(run)
            except BlockingIOError:
                raise _being_trained(run, trainer_pid(run) or -1) from None
            except OSError:  # a file system without locks (some network mounts): train unguarded
                pass
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
    finally:
        if created and [p.name for p in run.path.iterdir()] == [run.lock.name]:  # refused before any work
            run.lock.unlink()
            for folder in created:
                folder.rmdir()


def refuse_if_being_trained(run: RunDir) -> None:
    """Refuse a run another `fit` holds now, before prepare_run_dir's refusals, whose fixes (--resume auto) would
    not do. For the first process of a job only: the others would see their own job's lock."""
    if (pid := trainer_pid(run)) is not None:
        raise _being_trained(run, pid)


def _being_trained(run: RunDir, pid: int) -> UserError:
    return UserError(f"{run.path} is being trained by another process (pid {pid if pid > 0 else 'unknown'}) — wait "
                     "for it to finish or stop it, or choose another --out or run.name")


def trainer_pid(run: RunDir) -> int | None:
    """The pid of the `fit` training `run` now (-1 when unknown), or None when none holds its lock."""
    try:
        import fcntl

        with open(run.lock, encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = handle.read().strip()
                return int(text) if text.isdigit() else -1
            return None
    except (ImportError, OSError):
        return None


def peek_checkpoint(path: Path) -> dict:
    """A checkpoint's dict (weights_only) with its tensors memory-mapped, so a look at its step or config reads
    kilobytes however large the weights; read whole on a disk that cannot map files (some network and FUSE
    mounts). Raises what torch.load raises."""
    import torch  # late: the rest of this module needs no torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - torch raises many types; a damaged file fails the whole read as well
        return torch.load(path, map_location="cpu", weights_only=True)


def recorded_data_of(run_dir: str | Path | None) -> dict | None:
    """The data.json a run directory keeps; None without a run directory (a loose checkpoint) or a readable one."""
    return read_json(RunDir(run_dir).data_record) if run_dir else None


def saved_step(checkpoint: Path) -> int | None:
    """The step a checkpoint was saved at (None when there is no readable one), without loading its weights."""
    try:
        return int(peek_checkpoint(checkpoint).get("step", 0))
    except Exception:  # noqa: BLE001 - missing or damaged: nothing to keep
        return None


def resume_message(path: Path, step: int, steps: int) -> str:
    """What `fit --resume` says before it continues (or finds nothing left to do)."""
    if step == steps:
        return (f"{path} is already at step {step} of {steps} — raise train.steps to continue, e.g. --set "
                f"train.steps={2 * steps}")
    if step > steps:  # train.steps lowered below where the run is: the advice must clear the step reached
        return (f"{path} is already at step {step}, past train.steps={steps} — raise train.steps above {step} to "
                f"continue, e.g. --set train.steps={2 * step}")
    return f"resuming {path} from step {step} of {steps}"


def test_records(run: RunDir) -> list[dict]:
    """metrics.jsonl's evaluations (with a bpd), in order."""
    tests = []
    try:
        with open(run.metrics) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                if record.get("split") == "test" and isinstance(record.get("bpd"), (int, float)):
                    tests.append(record)
    except OSError:
        pass
    return tests


def metrics_summary(run: RunDir) -> dict:
    """From metrics.jsonl: the last and the best test bpd (None when no evaluation ran)."""
    tests = test_records(run)
    return {"last_test_bpd": tests[-1]["bpd"] if tests else None,
            "best_test_bpd": min(r["bpd"] for r in tests) if tests else None}


def training_state(path: str | Path, step: int, steps: int) -> dict:
    """What `info --run` says about a run's training: the step reached and its test bits/dim (None: no
    evaluation yet)."""
    summary = metrics_summary(RunDir(Path(path)))
    return {"step": step, "steps": steps, **{k: None if v is None else round(v, 4) for k, v in summary.items()}}


def list_runs(runs_root: Path = RUNS_ROOT, unsearched: list[Path] | None = None) -> list[dict]:
    """Every run directory under runs_root (sorted by name): its step, best test bpd and status (`unsearched`: as
    run_dirs)."""
    found = []
    for run in run_dirs(runs_root, unsearched):
        path = run.path
        row = {"run": str(path), "step": None, "steps": None, "best_test_bpd": None, "status": "no checkpoint yet"}
        if run.has_checkpoint():
            try:
                state = peek_checkpoint(run.last)
                steps = state["config"]["train"]["steps"]
            except Exception:  # noqa: BLE001 - a damaged checkpoint is a status to show, not a reason to stop
                row["status"] = "unreadable checkpoint"
            else:
                step, best = int(state.get("step", 0)), float(state.get("best_test_bpd", math.inf))
                row.update(step=step, steps=steps, best_test_bpd=best if math.isfinite(best) else None,
                           status="finished" if step >= steps else "stopped (resume with --resume auto)")
        if (pid := trainer_pid(run)) is not None:
            row["status"] = f"training now (pid {pid})" if pid > 0 else "training now"
        found.append(row)
    return found


def format_runs(rows: list[dict]) -> list[str]:
    """`glowtrain runs` as aligned text lines."""
    table = [("run", "step", "best test bpd", "status")]
    for row in rows:
        step = "-" if row["step"] is None else f"{row['step']:,}/{row['steps']:,}"
        best = "-" if row["best_test_bpd"] is None else f"{row['best_test_bpd']:.4f}"
        table.append((row["run"], step, best, row["status"]))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    return [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in table]


def checked_files(run_dir: str | Path | None) -> dict | None:
    """What a run's upfront image check found (data_check.json), so that unchanged files are not read again."""
    return read_json(RunDir(run_dir).data_check) if run_dir else None


def run_of_checkpoint(path: Path) -> RunDir | None:
    """The run directory a checkpoint file lies in (RUN/checkpoints/X.pt); None for a file anywhere else."""
    return RunDir(path.parent.parent) if path.parent.name == "checkpoints" else None


def run_dir_for(out: str | None, name: str, resume: str | None) -> RunDir:
    """The run directory: --out, else the run a --resume path points into, else runs/<run.name>."""
    if out:
        return RunDir(Path(out))
    if resume not in (None, "auto", "if-any"):
        path = Path(resume)
        if path.is_dir():
            return RunDir(path)
        if (owner := run_of_checkpoint(path)) is not None:
            return owner
    return RunDir(RUNS_ROOT / name)


def checkpoint_to_resume(resume: str, run: RunDir) -> Path:
    """--resume auto (or a run directory) means its last.pt; anything else is a checkpoint file."""
    path = Path(resume) if resume != "auto" else run.path
    if path.is_dir() or resume == "auto":
        path = RunDir(path).last
    if not path.is_file():
        if resume != "auto" and not path.exists() and "/" not in resume and not resume.endswith(".pt"):
            # A bare word that names nothing: more likely a mistyped choice than a missing file.
            raise UserError(f"--resume {resume}: no such checkpoint or run — pass auto, if-any, a run directory or a "
                            ".pt file")
        if resume == "auto" and (pid := trainer_pid(run)) is not None:  # its first checkpoint is still to come
            raise _being_trained(run, pid)
        if resume != "auto" and not path.exists() and resume.endswith(".pt"):  # a file named, not found
            own = f", or pass auto to continue {run.path}'s own" if run.has_checkpoint() else ""
            raise UserError(f"--resume {resume}: no such checkpoint file — check the path{own}")
        raise UserError(f"nothing to resume: {path} does not exist — start the run without --resume")
    return path


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_run_dir(run: RunDir, resume: str | None) -> Path | None:
    """Check that `run` may be written, and return the checkpoint to resume from (None: a fresh start).

    A fresh start never overwrites a run that has a checkpoint, nor files that no run wrote."""
    check_writable(run.path)
    if not run.is_run():  # a new run there (one made before this check may go on)
        refuse_another_runs_folder(run.path, "this run's files", "choose an --out outside it")
    if resume is None and run.has_checkpoint():
        raise UserError(f"{run.path} already holds a run — continue it with --resume auto, or choose another "
                        "--out or run.name")
    checkpoint = None if resume is None else checkpoint_to_resume(resume, run)
    if checkpoint and run.has_checkpoint() and not checkpoint.resolve().is_relative_to(run.path.resolve()):
        # Its config, metrics, best.pt and (at a rollback) last.pt would mix with those of the resumed run.
        # The path is all that tells: a copy of this run's own checkpoint kept elsewhere goes back in to roll back.
        raise UserError(f"{run.path} already holds another run — to continue from {checkpoint} choose an empty "
                        f"--out, or continue {run.path} itself with --resume auto (a checkpoint of its own kept "
                        f"elsewhere: copy it into {run.checkpoints} and resume from there)")
    if not run.has_checkpoint() and (theirs := run.files_a_run_would_replace()):
        raise UserError(f"{run.path} holds {', '.join(theirs)}, which no glowtrain run wrote and this run would "
                        "replace — choose another --out or run.name (a new or empty folder)")
    if run.path.is_dir() and not run.is_run() and _holds_images(run.path):
        # Its sample grids would join them: a folder dataset or `score` reading the folder would take them in.
        raise UserError(f"{run.path} holds images of its own, which this run's sample grids would be read with — "
                        "choose another --out or run.name (a new or empty folder)")
    # A resume writes into the run's own folders: one it cannot write would fail at the first save, hours on. (A
    # fresh start over a run that died early only moves them aside.)
    for folder in (run.checkpoints, run.samples, run.tb) if checkpoint else ():
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():  # it would fail at the first save
            what = "a file" if folder.exists() else "a link to nothing"
            raise UserError(f"{folder} is {what} where the run keeps its {folder.name}/ folder — move it away, or "
                            "choose another --out or run.name")
        if folder.is_dir():
            check_writable(folder, f"the run's {folder.name} folder", "another --out or run.name, or make it writable")
    return checkpoint


def check_writable(path: Path, what: str = "the run directory", choices: str = "another --out or run.name") -> None:
    """Fail before any work if `path` (`what`, in messages) cannot be created or written (nothing is created
    here); the fixes offered are `choices`."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create {what} {path}: {existing} is a file — choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {existing} (permission denied) — choose {choices}")
    try:  # the permission bits do not tell everything (/proc, read-only mounts): try, and leave nothing behind
        os.rmdir(tempfile.mkdtemp(prefix=".glowtrain-probe-", dir=existing))
    except OSError as e:
        raise UserError(f"cannot create {what} {path.absolute()} ({e.strerror}) — choose {choices}") from None


RUN_SEARCH_DEPTH = 3  # runs/<name>, runs/<group>/<name>, runs/<sweep>/<group>/<name>


def run_dirs(runs_root: Path = RUNS_ROOT, unsearched: list[Path] | None = None) -> list[RunDir]:
    """The run directories (a last.pt, or a config.yaml that fit wrote) under runs_root, sorted by path: its folders
    and theirs, RUN_SEARCH_DEPTH deep, hidden ones, unreadable ones and a run's own folders left out. A group's own
    config.yaml (a sweep's base config) does not hide the runs beside it. The folders at that depth that hold
    folders of their own (runs may lie there) are added to `unsearched`."""
    found = []

    def visit(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:  # unreadable: nothing of it can be listed
            return
        for child in children:
            run = RunDir(child)
            try:
                is_run = run.has_checkpoint() or run.config_origin() in ("fit", "edited")
            except OSError:  # another user's run on a shared disk: not one of ours to list or open
                continue
            if is_run:
                found.append(run)
            elif child.is_symlink():
                continue
            elif depth < RUN_SEARCH_DEPTH:
                visit(child, depth + 1)
            elif unsearched is not None and _has_folders(child):
                unsearched.append(child)

    visit(Path(runs_root), 1)
    return found


def _has_folders(folder: Path) -> bool:
    try:
        return any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
    except OSError:
        return False


def latest_run(runs_root: Path = RUNS_ROOT) -> RunDir:
    """The run under runs_root whose last checkpoint was written most recently."""
    candidates = [run for run in run_dirs(runs_root) if run.has_checkpoint()]
    if not candidates:
        raise UserError(f"no finished run found under {runs_root}/ — train one with 'glowtrain fit' or pass --run DIR")
    return max(candidates, key=lambda run: run.last.stat().st_mtime)


def run_file_fix(path: Path, checkpoint_option: bool = True) -> str:
    """What to pass instead of a file given as --run: the run it lies in, and (a .pt file) the file itself."""
    owner = run_of_checkpoint(path) or RunDir(path.parent)
    fixes = [f"its run directory: --run {shlex.quote(str(owner.path))}"] if owner.is_run() else []
    if checkpoint_option and path.suffix == ".pt":
        fixes.append(f"the file as --checkpoint {shlex.quote(str(path))}")
    return "pass " + (" or ".join(fixes) if fixes else "a directory made by 'glowtrain fit'")


def _checkpoint_period(run: RunDir) -> str:
    """How often a run saves, as its config.yaml says (the key's name when the file cannot say)."""
    try:
        return f"every {load_config(run.config).train.checkpoint_every:,} steps"
    except UserError:
        return "every train.checkpoint_every steps"


def resolve_checkpoint(run: str | None = None, checkpoint: str | None = None, which: str = "last") -> Path:
    """The checkpoint file meant by --checkpoint, --run, or neither (the most recent run)."""
    for option, given in (("--run", run), ("--checkpoint", checkpoint)):
        if given is not None and not str(given).strip():  # an unset $RUN in a script: not the most recent run
            raise UserError(f"{option} was given an empty path — pass a run directory or checkpoint, or leave "
                            f"{option} out for the most recent run under runs/")
    if run and checkpoint:
        raise UserError("give either --run or --checkpoint, not both")
    if checkpoint:
        path = Path(checkpoint)
        if path.is_dir():
            fix = f"pass it as --run {path}" if RunDir(path).is_run() else "pass a .pt file"
            raise UserError(f"--checkpoint takes a checkpoint file, and {path} is a folder — {fix}")
        if not path.is_file():
            raise UserError(f"checkpoint not found: {path} — pass an existing .pt file")
        return path
    run_dir = RunDir(Path(run)) if run else latest_run()
    if run_dir.path.is_file():
        raise UserError(f"--run takes a run directory, and {run_dir.path} is a file — {run_file_fix(run_dir.path)}")
    if not run_dir.path.is_dir():
        raise UserError(f"run directory not found: {run_dir.path} — pass a directory made by 'glowtrain fit'")
    path = getattr(run_dir, which)
    if not path.is_file():
        path = run_dir.last
    if not path.is_file():
        inside = [run for run in run_dirs(run_dir.path) if run.has_checkpoint()] if not run_dir.is_run() else []
        if inside:  # --run runs: a folder of runs, not one
            named = ", ".join(str(run.path) for run in inside[:3]) + (", ..." if len(inside) > 3 else "")
            raise UserError(f"{run_dir.path} is a folder of runs, not a run — pass one of them: {named}")
        if (pid := trainer_pid(run_dir)) is not None:
            raise UserError(f"{run_dir.path} has no checkpoint yet: it is being trained (pid "
                            f"{pid if pid > 0 else 'unknown'}) — try again after its first checkpoint "
                            f"({_checkpoint_period(run_dir)})")
        if not run_dir.is_run() and _holds_images(run_dir.path):
            raise UserError(f"{run_dir.path} is a folder of images, not a run — pass --run a directory made by "
                            "'glowtrain fit' (and a run's images on this machine with --data)")
        raise UserError(f"{run_dir.path} has no checkpoint (checkpoints/last.pt) — train it with 'glowtrain fit' first")
    return path


def _holds_images(folder: Path, look_at: int = 1000) -> bool:
    return any(path.suffix.lower() in IMAGE_EXTENSIONS for path in itertools.islice(folder.rglob("*"), look_at))
