"""torch.compile for training: whether to use it, and running eager when compiling fails."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from glowtrain.errors import UserError

T = TypeVar("T")


def compiler_works(device: torch.device) -> bool:
    """Whether Inductor can generate kernels for `device` here (Triton for CUDA)."""
    if device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def compile_enabled(setting: str, device: torch.device) -> bool:
    """train.compile: `on`, `off`, or `auto` (on for CUDA when a compiler backend works, off elsewhere).

    On a CPU, compiling the flow's small convolutions gained nothing in our measurements (README)."""
    if setting == "auto":
        return compiler_works(device)
    return setting == "on"


# Errors of the step itself, not of compiling it: out of GPU memory (an eager retry needs more), and our
# one-line user errors (bad labels, data).
NOT_COMPILER_FAILURES = (torch.OutOfMemoryError, UserError)


class LazyCompile:
    """A module compiled on first use. Failures surface in the first step's forward or in its backward
    (compiled lazily): then warn once, and that step and all later ones run eager."""

    def __init__(self, module: torch.nn.Module, enabled: bool, mode: str = "default"):
        self.eager = module
        self.module = module
        self.pending = False
        if enabled:
            try:
                self.module = torch.compile(module, mode=None if mode == "default" else mode)
                self.pending = True
            except Exception as e:  # noqa: BLE001 - e.g. a platform without a compiler backend
                _warn_eager("unavailable", e)

    def __call__(self, *args):
        return self.module(*args)

    def first_use(self, work: Callable[[], T], undo: Callable[[], None]) -> T:
        """`work()` (a forward and backward through this module). The first time, if compiling fails in it:
        warn, `undo()` what it left (e.g. partial gradients), switch to eager and run it again."""
        if not self.pending:
            return work()
        try:
            result = work()
        except NOT_COMPILER_FAILURES:
            raise  # eager would fail the same way (or worse, for memory): the error itself is the message
        except Exception as e:  # noqa: BLE001 - the compiler's errors have no common type
            _warn_eager("failed", e)
            self.module, self.pending = self.eager, False
            undo()
            return work()
        self.pending = False
        return result


def _warn_eager(what: str, error: Exception) -> None:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    warnings.warn(f"torch.compile {what} ({type(error).__name__}: {message}); training without it "
                  "(set train.compile=off to skip the attempt)", stacklevel=3)
