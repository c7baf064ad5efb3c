"""torch.compile for training: whether to use it, and running eager when compiling fails."""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Sequence
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


def uses_cuda_graphs(mode: str) -> bool:
    """Whether train.compile_mode runs the compiled graphs as CUDA graphs (max-autotune does too)."""
    return mode in ("reduce-overhead", "max-autotune")


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
    """A module compiled on first use: whole, or region by region (`regions`: submodules whose forward is
    compiled, the code between them eager; compiled only for calls through this object, so evaluation and
    sampling run them eager as they do the whole). Failures surface in the first step's forward or in its
    backward (compiled lazily), and with CUDA graphs also in the next two (the first warms up, the second records
    the graphs, the third is the first replay): then warn once, and that step and all later ones run eager."""

    def __init__(self, module: torch.nn.Module, enabled: bool, mode: str = "default",
                 regions: Sequence[torch.nn.Module] = ()):
        self.eager = module
        self.module = module
        self.compiled_regions: list[tuple[torch.nn.Module, Callable]] = []
        self.graphs_needed = _graphs_needed(regions)
        self.cuda_graphs = uses_cuda_graphs(mode)
        self.pending = False  # the first step, which compiles, is still to come
        self.steps_on_trial = 0  # steps whose compiler failures still fall back to eager
        if enabled:
            options = {"mode": None if mode == "default" else mode}
            try:
                if regions:
                    # Static shapes: each level's graph is its own, where dynamo would otherwise make the
                    # second shape it meets dynamic, slower and harder for CUDA graphs.
                    self.compiled_regions = [(region, torch.compile(region.forward, dynamic=False, **options))
                                             for region in regions]
                else:
                    self.module = torch.compile(module, **options)
                self.pending = True
                self.steps_on_trial = 3 if self.cuda_graphs else 1
            except Exception as e:  # noqa: BLE001 - e.g. a platform without a compiler backend
                self._go_eager()
                _warn_eager("unavailable", e)

    @property
    def active(self) -> bool:
        """Whether calls run compiled code (False when compiling was off, unavailable or failed)."""
        return self.module is not self.eager or bool(self.compiled_regions)

    def __call__(self, *args):
        if not self.compiled_regions:
            return self.module(*args)
        if self.cuda_graphs:
            # Each training forward is one step for CUDA graphs. Unmarked, torch starts a new one at every call
            # of a region that owes no backward (memory saving's steps, run without autograd), and that frees
            # the output the next region takes in.
            torch.compiler.cudagraph_mark_step_begin()
        for region, forward in self.compiled_regions:
            region.forward = forward  # an instance attribute: nn.Module calls it instead of the class's
        # Regions of one class share their forward's code, and dynamo keeps only so many graphs of one function
        # (8 by default) before it quietly runs the rest eager.
        limit = max(torch._dynamo.config.recompile_limit, self.graphs_needed)
        try:
            with torch._dynamo.config.patch(recompile_limit=limit):
                return self.module(*args)
        finally:
            for region, _ in self.compiled_regions:
                del region.forward

    def first_use(self, work: Callable[[], T], undo: Callable[[], None]) -> T:
        """`work()` (a forward and backward through this module). In the steps on trial, if compiling fails in it:
        warn, `undo()` what it left (e.g. partial gradients), switch to eager and run it again."""
        if not self.steps_on_trial:
            return work()
        try:
            result = work()
        except NOT_COMPILER_FAILURES:
            raise  # eager would fail the same way (or worse, for memory): the error itself is the message
        except Exception as e:  # noqa: BLE001 - the compiler's errors have no common type
            if not self.pending and not _raised_by_compiler(e):
                raise  # after the compiling step, a fault of the step's own (an illegal address, say) is not retried
            _warn_eager("failed", e)
            self._go_eager()
            undo()
            return work()
        self.pending, self.steps_on_trial = False, self.steps_on_trial - 1
        return result

    def _go_eager(self) -> None:
        self.module, self.compiled_regions, self.pending, self.steps_on_trial = self.eager, [], False, 0


# Where compiling, recording CUDA graphs and replaying them run: a later trial step's error elsewhere is the step's.
_COMPILER_CODE = ("torch/_dynamo/", "torch/_inductor/", "torch/_functorch/", "torch/cuda/graphs.py")


# What CUDA graphs' own errors say, raised from C++ wherever a replayed graph's output is read (eager code too).
_CUDA_GRAPH_WORDS = ("cudagraph", "cuda graph", "stream is capturing", "capture")


def _raised_by_compiler(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, passed through the compiler's code or is CUDA graphs'."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = traceback.extract_tb(error.__traceback__)
        if any(part in frame.filename.replace("\\", "/") for frame in frames for part in _COMPILER_CODE):
            return True
        if any(word in str(error).lower() for word in _CUDA_GRAPH_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _graphs_needed(regions: Sequence[torch.nn.Module]) -> int:
    """Graphs that compiling `regions` makes at most: two per kind of region (class and parameter shapes, as a
    level's flow steps), one for an input that needs a gradient and one for an input that needs none (the
    image, taken by the first step; every input inside memory saving's chain, which runs without autograd)."""
    kinds = {(type(region), tuple(p.shape for p in region.parameters())) for region in regions}
    return 2 * len(kinds)


def _warn_eager(what: str, error: Exception) -> None:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    warnings.warn(f"torch.compile {what} ({type(error).__name__}: {message}); training without it "
                  "(set train.compile=off to skip the attempt)", stacklevel=3)
