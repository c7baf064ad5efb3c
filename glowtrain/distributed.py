"""Where the work runs: device selection (and, with torchrun, ranks and process groups)."""

from __future__ import annotations

import re

import torch

from glowtrain.errors import UserError


def resolve_device(name: str, option: str = "run.device") -> torch.device:
    """The torch device for `auto`, cpu, cuda, cuda:N or mps; `option` names the setting in errors."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise UserError(f"{option}={name!r} is not a device — use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{option}={name} but CUDA is not available here — use {option}=cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"{option}={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{option}=mps but MPS is not available here — use {option}=cpu or auto")
    return torch.device(name)
