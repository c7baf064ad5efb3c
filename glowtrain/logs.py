"""What a run records as it goes: metrics.jsonl (one JSON object per event) and TensorBoard, side by side."""

from __future__ import annotations

import json
import math

import torch

from glowtrain.runs import RunDir


class RunLogger:
    """Rank 0's logs: every event to metrics.jsonl and its numbers to TensorBoard."""

    def __init__(self, run: RunDir):
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        self.metrics = open(run.metrics, "a", buffering=1)
        self.writer = SummaryWriter(log_dir=str(run.tb))

    def log(self, step: int, split: str, **values) -> None:
        # Strict JSON: a non-finite number (a diverging step) is written as null, not NaN.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self.metrics.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def image(self, tag: str, picture: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, picture, step)

    def close(self, hparams: dict | None = None, final: dict | None = None) -> None:
        if hparams is not None and final:
            self.writer.add_hparams(hparams, final, run_name=".")
        self.writer.close()
        self.metrics.close()


class NullLogger:
    """What ranks other than 0 log to."""

    def log(self, *args, **kwargs) -> None:
        pass

    def image(self, *args, **kwargs) -> None:
        pass

    def close(self, *args, **kwargs) -> None:
        pass
