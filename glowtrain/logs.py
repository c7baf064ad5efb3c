"""What a run records as it goes: metrics.jsonl (one JSON object per event) and TensorBoard, side by side."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import torch

from glowtrain.files import atomic_write
from glowtrain.runs import RunDir


def strict_json(value):
    """`value` with every non-finite float (a diverged model's NaN) as None: JSON has no NaN or Infinity, and
    json.dumps would write them anyway, which strict readers (jq, JavaScript) refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


class RunLogger:
    """Rank 0's logs: every event to metrics.jsonl and its numbers to TensorBoard.

    A run resumed at `resumed_step` goes on from there: what was logged after it (training lost when the run
    stopped without saving, or given up by a resume from an earlier checkpoint) is moved out of metrics.jsonl
    (`n_moved` records) and hidden in TensorBoard, so each step is logged once, and its sample grids are kept
    aside (`grids_kept`) before the same steps draw theirs."""

    def __init__(self, run: RunDir, resumed_step: int | None = None):
        self.run = run
        self.n_moved = 0 if resumed_step is None else move_records_after(run, resumed_step)
        self.grids_kept = [] if resumed_step is None else run.keep_samples_after(resumed_step)
        self._purge_step = None if resumed_step is None else resumed_step + 1
        self.metrics = open(run.metrics, "a", buffering=1)
        self._writer = None
        self._events_file: Path | None = None

    @property
    def writer(self):
        """The TensorBoard writer, made at the first event: a resume that logs nothing adds no empty file."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

            before = set(self.run.tb.glob("*tfevents*"))
            self._writer = SummaryWriter(log_dir=str(self.run.tb), purge_step=self._purge_step)
            made = set(self.run.tb.glob("*tfevents*")) - before
            self._events_file = made.pop() if len(made) == 1 else None
        return self._writer

    def _close_writer(self) -> None:
        """Close the TensorBoard file and number it with ten digits. TensorBoard reads a folder's files in name
        order, and a file's name ends in its process's count of writers (...96, ...98, ...100): the files one
        process wrote within a second (a resume from Python) were read out of order, undoing a resume's hiding
        of the steps it logged again. Padded, a closed file sorts before any the process opens later."""
        self._writer.close()
        self._writer = None
        file, self._events_file = self._events_file, None
        stem, _, count = file.name.rpartition(".") if file is not None else ("", "", "")
        if count.isdigit() and len(count) < 10:
            with contextlib.suppress(OSError):  # a name TensorBoard reads in a good order anyway, most often
                file.rename(file.with_name(f"{stem}.{int(count):010d}"))

    def restart_at(self, step: int) -> int:
        """Go on from `step` (a rollback): the records logged after it move out of metrics.jsonl and TensorBoard
        hides them, and its grids are kept aside, as on a resume; returns how many records moved."""
        self.metrics.close()
        moved = move_records_after(self.run, step)
        self.grids_kept = self.run.keep_samples_after(step)
        self.metrics = open(self.run.metrics, "a", buffering=1)
        if self._writer is not None:
            self._close_writer()
        self._purge_step = step + 1
        return moved

    def log(self, step: int, split: str, **values) -> None:
        self.metrics.write(json.dumps(strict_json({"step": step, "split": split, **values})) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def image(self, tag: str, picture: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, picture, step)

    def close(self, cfg=None, best_test_bpd: float = math.inf, step: int = 0, processes: int = 1) -> None:
        if cfg is not None and math.isfinite(best_test_bpd):
            write_hparams(self.run, cfg, best_test_bpd, step, processes)
        if self._writer is not None:
            self._close_writer()
        self.metrics.close()


def move_records_after(run: RunDir, step: int) -> int:
    """Move the records of metrics.jsonl logged after `step` (and lines cut short by a crash) to
    metrics_discarded.jsonl, keeping them; returns how many moved."""
    try:
        lines = run.metrics.read_text().splitlines(keepends=True)
    except OSError:
        return 0
    kept, moved = [], []
    for line in lines:
        try:
            after = json.loads(line)["step"] > step
        except (ValueError, KeyError, TypeError):
            after = True
        (moved if after else kept).append(line if line.endswith("\n") else line + "\n")
    if moved:
        with open(run.metrics_discarded, "a") as f:
            f.writelines(moved)
        atomic_write(run.metrics, lambda f: f.writelines(kept), mode="w", durable=False)
    return len(moved)


def write_hparams(run: RunDir, cfg, best_test_bpd: float, step: int, processes: int = 1) -> None:
    """The run's one HParams session (tb/hparams): its key settings and best test bpd, rewritten on each
    close, so a resumed run updates it instead of adding another. Its batch size is the global one (over
    micro-batches and `processes`), so runs that train alike show alike."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    d, m, t = cfg.data, cfg.model, cfg.train
    settings = {"dataset": d.dataset, "image_size": d.image_size, "channels": d.channels, "n_bits": d.n_bits,
                "n_levels": m.n_levels, "n_steps": m.n_steps, "hidden_channels": m.hidden_channels,
                "coupling": m.coupling, "n_classes": m.n_classes, "optimizer": t.optimizer, "lr": t.lr,
                "batch_size": t.batch_size * t.grad_accum_steps * processes, "seed": cfg.run.seed}
    folder = run.tb / "hparams"
    shutil.rmtree(folder, ignore_errors=True)
    with SummaryWriter(log_dir=str(folder)) as writer:
        for summary in hparams_summary(settings, {"hparam/best_test_bpd": best_test_bpd}):
            writer.file_writer.add_summary(summary)
        writer.add_scalar("hparam/best_test_bpd", best_test_bpd, step)


class NullLogger:
    """What ranks other than 0 log to."""

    grids_kept: tuple = ()

    def restart_at(self, step: int) -> int:
        return 0

    def log(self, *args, **kwargs) -> None:
        pass

    def image(self, *args, **kwargs) -> None:
        pass

    def close(self, *args, **kwargs) -> None:
        pass
