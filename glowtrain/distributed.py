"""Where the work runs: device selection (and, with torchrun, ranks and process groups)."""

from __future__ import annotations

import torch

from glowtrain.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"run.device={name} but CUDA is not available here — use run.device=cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"run.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("run.device=mps but MPS is not available here — use run.device=cpu or auto")
    return torch.device(name)
