"""Shared test helpers: the test device, brute-force Jacobians, random non-identity weights, CLI invocation,
host reads."""

import os
import re
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from typer.testing import CliRunner

from glowtrain.cli import app

runner = CliRunner()

# The device the correctness tests run on: GLOWTRAIN_TEST_DEVICE (cpu, cuda or cuda:N), the CPU when unset.
DEVICE_VARIABLE = "GLOWTRAIN_TEST_DEVICE"
_DEVICE_NAME = os.environ.get(DEVICE_VARIABLE) or "cpu"
_DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
# An unusable name stops the session in conftest before any test runs; the CPU only keeps this import working.
TEST_DEVICE = torch.device(_DEVICE_NAME if _DEVICE_PATTERN.fullmatch(_DEVICE_NAME) else "cpu")
if TEST_DEVICE.type == "cuda" and TEST_DEVICE.index is None:
    TEST_DEVICE = torch.device("cuda", 0)  # what tensors report: torch.device("cuda") != torch.device("cuda:0")


def device_problem() -> str | None:
    """Why the GLOWTRAIN_TEST_DEVICE asked for cannot be used here, in one line (None when it can)."""
    name = _DEVICE_NAME
    if not _DEVICE_PATTERN.fullmatch(name):
        return f"{DEVICE_VARIABLE}={name!r} is not a test device — use cpu, cuda or cuda:N (or leave it unset)"
    if TEST_DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            return (f"{DEVICE_VARIABLE}={name} but torch {torch.__version__} sees no CUDA GPU here — "
                    f"unset {DEVICE_VARIABLE} to test on the CPU")
        if (TEST_DEVICE.index or 0) >= torch.cuda.device_count():
            return (f"{DEVICE_VARIABLE}={name} but only {torch.cuda.device_count()} CUDA device(s) exist — "
                    "use cuda or cuda:N with N below that")
    return None


def describe_test_device() -> str:
    """The test device for pytest's header, with the GPU's name when it is one."""
    if TEST_DEVICE.type == "cuda":
        return f"{TEST_DEVICE} ({torch.cuda.get_device_name(TEST_DEVICE)}, torch {torch.__version__})"
    return f"cpu (set {DEVICE_VARIABLE}=cuda to run the device tests on a GPU)"


# The Glow paper's coupling and dequantisation. The digits default is spline couplings with learned
# dequantisation (2.3x the step time); tests about something else pin these cheaper, hand-checked layers.
GLOW_LAYERS = ["model.coupling=affine", "model.dequantization=uniform"]

# The tiny run that several modules only read: a CLI `glowtrain fit` of 4 steps on the bundled digits.
TINY_RUN = [
    *GLOW_LAYERS,
    "model.n_levels=2", "model.n_steps=2", "model.hidden_channels=16",
    "train.batch_size=16", "train.init_batch_size=32", "train.eval_batch_size=300",
    "train.steps=4", "train.log_every=2", "train.eval_every=4", "train.sample_every=4",
    "train.checkpoint_every=4", "train.n_samples=4", "train.warmup_steps=2", "run.device=cpu",
]


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its (often identity-making) initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.add_(scale * noise.to(param))  # drawn on the CPU: the same values on any device


def compile_with(monkeypatch, backend, fullgraph: bool = True) -> None:
    """Make torch.compile use `backend` (e.g. aot_eager: dynamo's graphs, no Inductor), keeping the options
    glowtrain passes but its mode, which a CPU test backend does not take."""
    real = torch.compile

    def patched(module, mode=None, **kwargs):
        return real(module, backend=backend, fullgraph=fullgraph, **kwargs)
    monkeypatch.setattr(torch, "compile", patched)


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| per sample, from the full autograd Jacobian of fn on each sample alone."""
    values = []
    for sample in x:
        jac = torch.autograd.functional.jacobian(lambda s: fn(s.unsqueeze(0)).flatten(), sample)
        values.append(torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))[1])
    return torch.stack(values)


def invoke(*args):
    """Run the CLI in-process with CliRunner (arguments may be paths)."""
    return runner.invoke(app, [str(a) for a in args])


def ok(result):
    """A CliRunner result that exited 0 (its output shown otherwise)."""
    assert result.exit_code == 0, result.output
    return result


def sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def assert_one_line_error(result, code: int = 2, *needles: str) -> str:
    """Exit `code`, no traceback, exactly one `error:` line on stderr containing every needle."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def assert_same_training_state(expected: dict, actual: dict, keys: tuple[str, ...] = ("model", "ema")) -> None:
    """Two checkpoints hold bit-identical state dicts under `keys` (weights, EMA weights) and optimiser state."""
    import torch

    for key in keys:
        assert expected[key].keys() == actual[key].keys()
        for name, tensor in expected[key].items():
            assert torch.equal(tensor, actual[key][name]), f"{key}.{name} differs after resume"
    for index, param_state in expected["optimizer"]["state"].items():
        for name, value in param_state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(actual["optimizer"]["state"][index][name]))


class HostReads(TorchDispatchMode):
    """Records every read of a tensor's values on the host while active: on a GPU each one stalls the queue.

    Watched at torch's dispatcher, so implicit reads count too: a 0-d tensor passed where torch's Python
    binding takes a number (`torch._foreach_add_(tensors, t)` picks the Scalar overload and reads `t`)
    dispatches `_local_scalar_dense` just as `.item()` and `bool()` do. Ops whose output size depends on
    the values (`nonzero`, boolean indexing, `repeat_interleave` with tensor repeats unless given its
    `output_size`), ops that answer a bool (`equal`) and copies from a device to the host wait for the
    GPU as well, and so does a blocking copy from host memory to a device: torch runs it after all the work
    queued there (a meta tensor stands in for a device on a CPU). `tolist` and `numpy` copy out, and
    `torch.tensor`, `torch.as_tensor`, `torch.asarray` and `Tensor.new_tensor` copy host data onto a device,
    without dispatching, so they are patched.
    `reads` holds (label, what, innermost glowtrain frame). With `device_reads_only`, reads of tensors in host
    memory are left out: they wait for nothing where another device (meta, on a CPU) stands for the GPU.
    """

    # Ops (by overload packet) that wait for the device's values: scalars and bools out, or outputs whose size
    # depends on the values (repeat_interleave, which does unless told its size, is judged in `waits`).
    SYNCING_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
                             "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
                             "bincount"})

    def __init__(self, label=lambda: None, ignore=lambda frame: False, device_reads_only: bool = False):
        super().__init__()
        self.label, self.ignore, self.reads = label, ignore, []
        self.device_reads_only = device_reads_only
        self._patched = {}

    def _record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if "/glowtrain/" in f.filename]
        if frames and any(self.ignore(f) for f in frames):
            return
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.reads.append((self.label(), what, where))

    @classmethod
    def waits(cls, func, args, kwargs) -> bool:
        """Whether this op makes the host wait for a device's values (on a CPU: would, on a GPU)."""
        name, kwargs = func.overloadpacket.__name__, kwargs or {}
        if name == "repeat_interleave":
            return func._overloadname == "Tensor" and kwargs.get("output_size") is None
        if name in cls.SYNCING_OPS:
            return True
        if name in ("index", "index_put", "index_put_"):  # boolean masks become indices on the host
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())
        if name in ("_to_copy", "copy_", "_foreach_copy_"):  # copy_'s non_blocking comes third, _to_copy's by name
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            return any(cls._copy_waits(*ends, blocking=not non_blocking) for ends in cls._copy_ends(name, args, kwargs))
        return False

    @staticmethod
    def _copy_ends(name: str, args, kwargs) -> list[tuple]:
        """(source device, target device) of each copy an op makes."""
        if name == "_to_copy":
            return [(args[0].device, torch.device(kwargs.get("device") or args[0].device))]
        if name == "copy_":
            return [(args[1].device, args[0].device)]
        return [(source.device, target.device) for target, source in zip(args[0], args[1])]

    @staticmethod
    def _copy_waits(source: torch.device, target: torch.device, blocking: bool) -> bool:
        """A device's values into host memory always wait; host memory onto a device waits unless non_blocking."""
        if source.type != "cpu":
            return target.type == "cpu"
        return target.type != "cpu" and blocking

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.waits(func, args, kwargs) and not self._reads_host_memory_only(func, args):
            self._record(f"{func.overloadpacket.__name__}.{func._overloadname}")
        return func(*args, **(kwargs or {}))

    def _reads_host_memory_only(self, func, args) -> bool:
        """A read (not a copy, judged by its ends) of tensors all in host memory, left out on request."""
        if not self.device_reads_only or func.overloadpacket.__name__ in ("_to_copy", "copy_", "_foreach_copy_"):
            return False
        return all(t.device.type == "cpu" for t in tree_leaves(args) if isinstance(t, torch.Tensor))

    def __enter__(self):
        for name in ("tolist", "numpy"):
            real = getattr(torch.Tensor, name)

            def recording(tensor, *args, _real=real, _name=name, **kwargs):
                if not (self.device_reads_only and tensor.device.type == "cpu"):
                    self._record(_name)
                return _real(tensor, *args, **kwargs)

            self._patched[torch.Tensor, name] = real
            setattr(torch.Tensor, name, recording)
        for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch, "asarray"), (torch.Tensor, "new_tensor")):
            real = getattr(owner, name)
            self._patched[owner, name] = real
            setattr(owner, name, self._creating(real, name, method=owner is torch.Tensor))
        return super().__enter__()

    def _creating(self, real, name: str, method: bool):
        """`real` (a tensor made from data), recording when it puts host data onto a device: these copy below the
        dispatcher, where a tensor's own copy (`as_tensor(t, device=...)`) is dispatched and judged as a copy."""

        def creating(*args, **kwargs):
            made = real(*args, **kwargs)
            data = args[1] if method else args[0] if args else kwargs.get("data", kwargs.get("obj"))
            if made.device.type != "cpu" and not torch.is_tensor(data):
                self._record(f"{name} onto {made.device.type}")
            return made

        return creating

    def __exit__(self, *exc):
        for (owner, name), real in self._patched.items():
            setattr(owner, name, real)
        self._patched.clear()
        return super().__exit__(*exc)


def sixteen_bit_rgb_png(path: Path, array: np.ndarray) -> None:
    """A 48-bit RGB PNG, written by hand: Pillow reads such files but cannot write them."""
    import struct
    import zlib

    height, width, _ = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
