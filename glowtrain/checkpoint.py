"""Checkpoints and run directories: atomic saves, safe loads, finding the run a command means."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glowtrain import __version__
from glowtrain.config import Config, config_from_dict
from glowtrain.errors import UserError
from glowtrain.model import Glow

CHECKPOINT_FORMAT = 1
RUNS_ROOT = Path("runs")


def run_paths(run_dir: Path) -> dict[str, Path]:
    """Where each artefact of a run lives (DESIGN.md's run directory)."""
    return {
        "config": run_dir / "config.yaml",
        "last": run_dir / "checkpoints" / "last.pt",
        "best": run_dir / "checkpoints" / "best.pt",
        "tb": run_dir / "tb",
        "metrics": run_dir / "metrics.jsonl",
        "samples": run_dir / "samples",
    }


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write atomically: a crash mid-save leaves the previous file at `path` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk, or a power cut can undo it.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True, so a crafted file cannot run code; failures become UserErrors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} — pass an existing .pt file or a run directory")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for files that are not checkpoints
        reason = _weights_only_refusal(str(e))
        if reason:
            raise UserError(f"refusing to load {path}: it holds objects a checkpoint never contains ({reason}); "
                            "only load checkpoints from sources you trust") from None
        raise UserError(f"{path} is not a readable glowtrain checkpoint (truncated or another format): "
                        f"{type(e).__name__}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a glowtrain checkpoint (no model and config inside)")
    return state


def _weights_only_refusal(message: str) -> str:
    """The one line of torch's weights-only error that names the forbidden object, if that is the cause."""
    for line in message.splitlines():
        if "Unsupported global" in line:
            line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
            return line.split("WeightsUnpickler error:")[-1].strip()
    return ""


def config_of(state: dict[str, Any], source: str = "checkpoint") -> Config:
    return config_from_dict(state["config"], source=source)


def build_model(cfg: Config) -> Glow:
    """The model a config describes."""
    m = cfg.model
    return Glow(cfg.image_shape, n_levels=m.n_levels, n_steps=m.n_steps, hidden_channels=m.hidden_channels,
                coupling=m.coupling, conv=m.conv, learn_top=m.learn_top, n_classes=m.n_classes)


def load_state_checked(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a message that names the first mismatched tensor and both shapes."""
    own = module.state_dict()
    for name, tensor in state_dict.items():
        if name not in own:
            raise UserError(f"{source} does not match this model: unexpected tensor {name!r} — the checkpoint "
                            "was made with another architecture")
        if own[name].shape != tensor.shape:
            raise UserError(f"{source} does not match this model: {name} has shape {tuple(tensor.shape)} in the "
                            f"checkpoint but {tuple(own[name].shape)} here — use the config the run was trained with")
    missing = [name for name in own if name not in state_dict]
    if missing:
        raise UserError(f"{source} does not match this model: tensor {missing[0]!r} is missing")
    module.load_state_dict(state_dict)


def model_from_checkpoint(state: dict[str, Any], use_ema: bool = True, source: str = "checkpoint") -> tuple[Glow, Config]:
    """Rebuild the model from the config stored in the checkpoint (no YAML needed)."""
    cfg = config_of(state, source)
    model = build_model(cfg)
    weights = state.get("ema") if use_ema and state.get("ema") is not None else state["model"]
    load_state_checked(model, weights, source)
    return model.eval(), cfg


def latest_run(runs_root: Path = RUNS_ROOT) -> Path:
    """The run under runs_root whose last checkpoint was written most recently."""
    candidates = [p.parent.parent for p in Path(runs_root).glob("*/checkpoints/last.pt")]
    if not candidates:
        raise UserError(f"no finished run found under {runs_root}/ — train one with 'glowtrain fit' or pass --run DIR")
    return max(candidates, key=lambda run: run_paths(run)["last"].stat().st_mtime)


def resolve_checkpoint(run: str | None = None, checkpoint: str | None = None, which: str = "last") -> Path:
    """The checkpoint file meant by --checkpoint, --run, or neither (the most recent run)."""
    if run and checkpoint:
        raise UserError("give either --run or --checkpoint, not both")
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise UserError(f"checkpoint not found: {path} — pass an existing .pt file")
        return path
    run_dir = Path(run) if run else latest_run()
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir} — pass a directory made by 'glowtrain fit'")
    path = run_paths(run_dir)[which]
    if not path.is_file():
        path = run_paths(run_dir)["last"]
    if not path.is_file():
        raise UserError(f"{run_dir} has no checkpoint (checkpoints/last.pt) — train it with 'glowtrain fit' first")
    return path


def checkpoint_state(*, model, ema, optimizer, step: int, cfg_dict: dict, best_test_bpd: float,
                     extra: dict | None = None) -> dict[str, Any]:
    """One dict of plain types and tensors: everything a resume needs."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "step": int(step),
        "config": cfg_dict,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "best_test_bpd": float(best_test_bpd),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    state.update(extra or {})
    return state


@dataclass
class LoadedRun:
    """A trained model ready for inference, with what it came from."""

    model: Glow
    cfg: Config
    step: int
    checkpoint: Path
    run_dir: Path | None  # None for a checkpoint file outside a run directory


def open_run(run: str | None, checkpoint: str | None, device: torch.device | str = "cpu",
             use_ema: bool = True, which: str = "last") -> LoadedRun:
    """Resolve --run/--checkpoint (default: the most recent run), load it, rebuild the model on `device`."""
    path = resolve_checkpoint(run, checkpoint, which)
    state = load_checkpoint(path, map_location="cpu")
    model, cfg = model_from_checkpoint(state, use_ema=use_ema, source=str(path))
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return LoadedRun(model.to(device), cfg, int(state.get("step", 0)), path, run_dir)
