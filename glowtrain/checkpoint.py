"""Checkpoints: what one holds, atomic saves, safe loads, and a trained model rebuilt from one."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glowtrain import __version__
from glowtrain.config import Config, apply_overrides, check_resume_config, config_from_dict, load_config
from glowtrain.errors import UserError
from glowtrain.files import atomic_write
from glowtrain.model import Glow
from glowtrain.objective import Objective, build_objective
from glowtrain.runs import peek_checkpoint, resolve_checkpoint, run_of_checkpoint

CHECKPOINT_FORMAT = 1
# Tensors are copied from a GPU in buckets of about this size: few copies, yet only this much extra memory at once.
HOST_COPY_BUCKET_BYTES = 64 * 2**20


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write atomically: a crash mid-save leaves the previous file at `path` intact. Tensors are stored on the
    CPU, so the file loads anywhere as it is."""
    on_host = host_copy(state)
    before = _identity(path)
    try:
        atomic_write(path, lambda f: torch.save(on_host, f))
    except (OSError, RuntimeError) as e:
        cause = _os_error(e)
        if cause is None:
            raise
        # Only while the file is the one that was there: a failure after the rename (the folder's fsync) is not.
        kept = f"; the previous {Path(path).name} is kept" if before and _identity(path) == before else ""
        raise UserError(f"cannot write {path} ({cause.strerror or cause}){kept} — free space or make it writable, "
                        "or choose another --out") from e


def _identity(path: Path) -> tuple | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind `error` (torch's writer reports a full disk as a RuntimeError raised while handling it)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def _on_cuda(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda"


def host_copy(tree: Any, bucket_bytes: int = HOST_COPY_BUCKET_BYTES,
              on_device: Callable[[torch.Tensor], bool] = _on_cuda) -> Any:
    """`tree` (dicts, lists and tuples, namedtuples included, of tensors and plain values) rebuilt with every tensor
    detached and on the CPU; other values are kept as they are. The tensors are gathered as gather_to_host does."""
    found: list[torch.Tensor] = []
    _map_tensors(tree, found.append)  # a first pass only finds them, in the order the second one meets them
    copies = iter(gather_to_host(found, bucket_bytes, on_device))
    return _map_tensors(tree, lambda _: next(copies))


def _map_tensors(value: Any, change: Callable[[torch.Tensor], Any]) -> Any:
    """`value` with `change` applied to each tensor in it, every container rebuilt as the same kind."""
    if isinstance(value, torch.Tensor):
        return change(value)
    if isinstance(value, dict):
        copied = {key: _map_tensors(item, change) for key, item in value.items()}
        if isinstance(value, OrderedDict):  # a state_dict: keep its class and the module versions it carries
            copied = OrderedDict(copied)
            if hasattr(value, "_metadata"):
                copied._metadata = value._metadata
        return copied
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes its fields one by one
        return type(value)(*(_map_tensors(item, change) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, change) for item in value)
    return value


def gather_to_host(tensors: list[torch.Tensor], bucket_bytes: int = HOST_COPY_BUCKET_BYTES,
                   on_device: Callable[[torch.Tensor], bool] = _on_cuda) -> list[torch.Tensor]:
    """Detached CPU copies of `tensors`, in order. Those `on_device` picks are joined into buckets (plan_buckets)
    and each bucket crosses in one copy: one per tensor would be thousands per checkpoint. The others are only
    detached and moved (a CPU tensor is returned as it is, sharing its memory)."""
    copies: list[torch.Tensor | None] = [None] * len(tensors)
    for bucket in plan_buckets(tensors, bucket_bytes, on_device):
        for index, copied in zip(bucket, _copy_bucket([tensors[index] for index in bucket])):
            copies[index] = copied
    return [tensor.detach().cpu() if copied is None else copied for tensor, copied in zip(tensors, copies)]


def plan_buckets(tensors: list[torch.Tensor], bucket_bytes: int,
                 on_device: Callable[[torch.Tensor], bool] = _on_cuda) -> list[list[int]]:
    """Indices of the tensors `on_device` picks, grouped by device and dtype (torch.cat joins only those) and cut
    into buckets of at most `bucket_bytes`, in order; a tensor larger than that is a bucket of its own."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        if on_device(tensor):
            groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    buckets: list[list[int]] = []
    for indices in groups.values():
        bucket: list[int] = []
        filled = 0
        for index in indices:
            size = tensors[index].numel() * tensors[index].element_size()
            if bucket and filled + size > bucket_bytes:
                buckets.append(bucket)
                bucket, filled = [], 0
            bucket.append(index)
            filled += size
        buckets.append(bucket)
    return buckets


def _copy_bucket(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of one bucket (one device, one dtype) on the CPU, each in storage of its own size."""
    flat = [tensor.detach().reshape(-1) for tensor in tensors]
    # A lone tensor needs no joining: cat would hold a second copy of it, possibly a large one, on the device.
    joined = torch.cat(flat) if len(flat) > 1 else flat[0]
    # A blocking copy into ordinary memory: a non_blocking one lands in pinned memory, as much as the model and
    # optimiser state take, and torch's caching host allocator keeps that pinned for the rest of the process.
    on_host = joined.cpu()
    pieces = on_host.split([tensor.numel() for tensor in tensors])
    # torch.save writes the whole storage of a view, so a piece of a shared buffer is cloned into its own.
    return [piece.view(tensor.shape) if piece.untyped_storage().nbytes() == piece.nbytes
            else piece.view(tensor.shape).clone() for piece, tensor in zip(pieces, tensors)]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load with weights_only=True, so a crafted file cannot run code; failures become UserErrors. mmap: onto the
    CPU, tensors read from the file only when used (a look at the config of a paper-size checkpoint reads
    kilobytes; runs.peek_checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} — pass an existing .pt file or a run directory")
    try:
        if mmap:
            state = peek_checkpoint(path)
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for files that are not checkpoints
        reason = _weights_only_refusal(str(e))
        if reason:
            raise UserError(f"refusing to load {path}: it holds objects a checkpoint never contains ({reason}); "
                            "only load checkpoints from sources you trust") from None
        best = path.with_name("best.pt")  # a run's other checkpoint, written at other times
        other = f" — {best} may be intact: pass it instead" if path.name == "last.pt" and best.is_file() else ""
        raise UserError(f"{path} is not a readable glowtrain checkpoint (truncated or another format){other}") from None
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


def resume_config(checkpoint: Path, config_path: str | None, overrides: list[str]) -> Config:
    """The config a resumed run continues with: the stored one (or --config) plus overrides, refused when it
    changes what the run models (data.*, model.*)."""
    saved = config_of(load_checkpoint(checkpoint, mmap=True), str(checkpoint))  # tensors: the trainer reads them
    cfg = load_config(config_path, overrides) if config_path is not None else apply_overrides(saved, overrides)
    try:
        check_resume_config(saved, cfg)
    except UserError as e:
        if config_path is None:
            raise
        # Often a key that --config leaves out, so at its default rather than the run's value.
        raise UserError(f"{e}; or resume without --config: the run's own config is used, and --set changes "
                        "its run.* and train.* keys") from None
    return cfg


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


def model_from_checkpoint(state: dict[str, Any], use_ema: bool = True,
                          source: str = "checkpoint") -> tuple[Glow, Config]:
    """Rebuild the model from the config stored in the checkpoint (no YAML needed)."""
    cfg = config_of(state, source)
    model = Glow.from_config(cfg)
    weights = state.get("ema") if use_ema and state.get("ema") is not None else state["model"]
    load_state_checked(model, weights, source)
    return model.eval(), cfg


def objective_from_checkpoint(state: dict[str, Any], model: Glow, cfg: Config, use_ema: bool = True,
                              source: str = "checkpoint") -> Objective:
    """The objective around `model` with the checkpoint's learned dequantiser (if any), EMA or raw like the model."""
    objective = build_objective(model, cfg)
    use_ema = use_ema and state.get("ema") is not None
    extras = state.get("ema_objective") if use_ema else state.get("objective")
    if extras:
        load_state_checked(objective.dequantizer, {k.removeprefix("dequantizer."): v for k, v in extras.items()},
                           source)
    elif any(True for _ in objective.dequantizer.parameters()):
        raise UserError(f"{source} holds no weights for its {cfg.model.dequantization} dequantizer — it is not a "
                        "complete glowtrain checkpoint")
    return objective.eval()


def checkpoint_state(*, model, ema, optimizer, cfg_dict: dict, train_state: dict[str, Any]) -> dict[str, Any]:
    """One dict of plain types and tensors: everything a resume needs.

    `step` and `best_test_bpd` are also kept at the top level, where commands that only look at a
    checkpoint (and checkpoints written before `train_state` existed) have them."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "step": int(train_state["step"]),
        "best_test_bpd": float(train_state["best_test_bpd"]),
        "config": cfg_dict,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "train_state": train_state,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }


@dataclass
class LoadedRun:
    """A trained model ready for inference, with what it came from."""

    model: Glow
    cfg: Config
    step: int
    checkpoint: Path
    run_dir: Path | None  # None for a checkpoint file outside a run directory
    used_ema: bool = False  # whether `model` holds the EMA weights (a run without EMA has only the raw ones)
    objective: Objective | None = None  # the model with its dequantiser (learned or uniform), for eval


def open_run(run: str | None, checkpoint: str | None, device: torch.device | str = "cpu",
             use_ema: bool = True, which: str = "last") -> LoadedRun:
    """Resolve --run/--checkpoint (default: the most recent run), load it, rebuild the model on `device`."""
    path = resolve_checkpoint(run, checkpoint, which)
    state = load_checkpoint(path, map_location="cpu")
    model, cfg = model_from_checkpoint(state, use_ema=use_ema, source=str(path))
    run_dir = owner.path if (owner := run_of_checkpoint(path)) is not None else None
    used_ema = use_ema and state.get("ema") is not None
    objective = objective_from_checkpoint(state, model, cfg, use_ema, str(path)).to(device)
    return LoadedRun(objective.model, cfg, int(state.get("step", 0)), path, run_dir, used_ema, objective)
