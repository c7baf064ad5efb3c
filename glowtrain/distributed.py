"""Where the work runs: device selection (and, with torchrun, ranks and process groups)."""

from __future__ import annotations

import inspect
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from glowtrain import precision
from glowtrain.config import DEVICE_PATTERN
from glowtrain.errors import UserError

T = TypeVar("T")
H = TypeVar("H")


def resolve_device(name: str, option: str = "run.device", tf32: bool | None = True,
                   deterministic: bool | None = None) -> torch.device:
    """The torch device for `auto`, cpu, cuda, cuda:N or mps, with glowtrain's math set for it (see precision.py;
    None leaves a setting as it is).

    `option` names the setting in errors."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise UserError(f"{option}={name!r} is not a device — use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{option}={name} but CUDA is not available here — use {option}=cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"{option}={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{option}=mps but MPS is not available here — use {option}=cpu or auto")
    device = torch.device(name)
    precision.configure(device, tf32, deterministic)
    return device


@dataclass(frozen=True)
class Context:
    """This process's place in the job: rank 0 of 1 unless launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    local_rank: int = 0  # the process's place on its own machine
    # A gloo group beside NCCL's, for questions asked on the host every step (None: the default group is gloo)
    host_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_agree(self, flag: torch.Tensor | bool) -> bool:
        """True on every rank only if it is True on every rank (one tiny all-reduce)."""
        if not self.distributed:
            return bool(flag)
        return bool(self.all_true(torch.as_tensor(flag, device=self.device)))

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """A boolean tensor AND-ed over the ranks, left on the device: nothing waits for it."""
        if not self.distributed:
            return flag
        value = flag.to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value.reshape(()).bool()

    def any_on_host(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether it is True on some rank: one small all-reduce through a CPU group, cheap enough
        for every step, and it never waits for the GPU."""
        if not self.distributed:
            return tuple(bool(flag) for flag in flags)
        values = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.host_group)
        return tuple(bool(value) for value in values.tolist())

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self, group: dist.ProcessGroup | None = None) -> None:
        if self.distributed:
            dist.barrier(group=group)

    def first_of(self, value: T | None) -> T | None:
        """The lowest rank's `value` that is not None, on every rank (None when every rank has None), through the
        host group: a check that fails on one rank then fails on all, before any waits in a collective for it."""
        if not self.distributed:
            return value
        values: list[T | None] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.host_group)
        return next((v for v in values if v is not None), None)

    def share(self, value: T, src: int = 0, group: dist.ProcessGroup | None = None) -> T:
        """Rank `src`'s `value` on every rank (a picklable object, sent once through the process group)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src, group=group)
        return box[0]


# Waiting for another rank's download or check of every image file can take far longer than the training
# collectives' timeout (PROCESS_GROUP_TIMEOUT), which is kept short so that a hung rank stops the job soon.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)
TURN_TIMEOUT = timedelta(hours=6)


@contextmanager
def _waiting_group(ctx: Context) -> Iterator[dist.ProcessGroup | None]:
    """A gloo group of all ranks with an hours-long timeout, for waiting on slow work (None in one process)."""
    if not ctx.distributed:
        yield None
        return
    group = dist.new_group(backend="gloo", timeout=TURN_TIMEOUT)
    try:
        yield group
    finally:
        dist.destroy_process_group(group)


def in_turns(ctx: Context, work: Callable[[H | None], T], hand_on: Callable[[T], H] | None = None) -> T:
    """`work(handed)` on every rank: rank 0 alone first, then the first process of each other machine, then the rest.

    For work that downloads or caches files: rank 0 fetches them once; a machine without shared storage
    fetches its own copy in one process; every other process finds the files already there. `hand_on(result)`
    picks what rank 0's turn passes to every later turn (e.g. what it found checking image files, so that no
    other process reads them again); rank 0's own `work` gets None."""
    turn = 0 if ctx.is_main else 1 if ctx.local_rank == 0 else 2
    result, handed = None, None
    with _waiting_group(ctx) as group:
        for phase in range(3):
            if phase == turn:
                result = work(handed)
            ctx.barrier(group)
            if phase == 0 and hand_on is not None:
                handed = ctx.share(hand_on(result) if ctx.is_main else None, group=group)
    return result


def make_current(device: torch.device) -> torch.device:
    """A CUDA device with an index becomes the process's current one: pinned memory and the data loader's pinning
    thread use the current device, which would otherwise make a context (about half a GB) on GPU 0 beside a run on
    cuda:1. A bare `cuda` (run.device auto or cuda) already means the current device."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str, tf32: bool = True, deterministic: bool = False) -> Context:
    """Join the torchrun job when there is one (NCCL on CUDA, gloo on CPU); else a one-process context."""
    if not launched_by_torchrun():
        return Context(device=make_current(resolve_device(device_name, tf32=tf32, deterministic=deterministic)))
    if "LOCAL_RANK" not in os.environ:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but LOCAL_RANK is not set — launch several "
                        "processes with torchrun or `glowtrain fit --nproc N`")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = _uses_cuda(device_name)
    if device_name.startswith("cuda") and not use_cuda:
        resolve_device(device_name)  # raises the one-line CUDA error
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise UserError(f"this is local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible "
                        "— start at most one process per GPU on each machine")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    precision.configure(device, tf32, deterministic)
    if not dist.is_initialized():
        # A rank that dies makes the others fail at their next collective instead of waiting forever.
        options = {"timeout": PROCESS_GROUP_TIMEOUT}
        if use_cuda and "device_id" in inspect.signature(dist.init_process_group).parameters:
            options["device_id"] = device  # binds NCCL to this GPU now, instead of guessing from the rank
        dist.init_process_group("nccl" if use_cuda else "gloo", **options)
    host_group = dist.new_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT) if use_cuda else None
    quiet_library_logs(dist.get_rank())
    return Context(dist.get_rank(), dist.get_world_size(), device, local_rank, host_group)


def quiet_library_logs(rank: int) -> None:
    """torch's own log warnings (compiling, profiler hooks) from rank 0 alone: every process would repeat them,
    once per GPU. Errors still come from all; TORCH_LOGS, when set, is left to decide."""
    if rank != 0 and not os.environ.get("TORCH_LOGS"):
        torch._logging.set_logs(all=logging.ERROR)


def _uses_cuda(device_name: str) -> bool:
    """Whether processes launched by torchrun with this run.device train on GPUs (one each)."""
    return device_name not in ("cpu", "mps") and torch.cuda.is_available()


def check_process_count(n_processes: int, device_name: str) -> None:
    """Refuse more processes than GPUs, or CUDA where there is none, before torchrun starts them (each would fail
    on its own)."""
    if n_processes <= 1:
        return
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"run.device={device_name} but CUDA is not available here — use run.device=cpu or auto")
    if not _uses_cuda(device_name):
        cores = usable_cpus()
        if n_processes > cores:  # more ranks than cores only wait on each other (64 on 2 cores: no output for minutes)
            raise UserError(f"--nproc {n_processes} on the CPU but only {cores} core(s) are available here — use "
                            f"--nproc {cores} or fewer")
        return
    if n_processes > torch.cuda.device_count():
        raise UserError(f"--nproc {n_processes} but only {torch.cuda.device_count()} GPU(s) are visible here — "
                        f"use --nproc {torch.cuda.device_count()} or fewer, or run.device=cpu")


def usable_cpus(pid: int = 0) -> int:
    """The CPUs a process (this one by default) may run on: its affinity, as torch's DataLoader counts them."""
    return len(os.sched_getaffinity(pid)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpus_per_process() -> int:
    """This process's share of the CPUs it may run on, beside the job's other processes on this machine. Processes
    bound to part of their launcher's CPUs (numactl per rank, torchrun --numa-binding: a NUMA node each) share
    them with as many others as the parts allow."""
    own, processes = usable_cpus(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if processes > 1:
        try:
            # Rounded up (5 ranks on two nodes: one node holds 3), and never more than there are ranks.
            processes = min(processes, max(1, -(-processes * own // usable_cpus(os.getppid()))))
        except OSError:  # the launcher has gone, or its affinity may not be read: the CPUs are taken as shared
            pass
    return max(1, own // processes)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_state(module: torch.nn.Module, ctx: Context, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank `src`'s (in place)."""
    if ctx.distributed:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src)


def identical_across_ranks(module: torch.nn.Module, ctx: Context) -> bool:
    """Whether every parameter is bit-for-bit the same on all ranks."""
    if not ctx.distributed:
        return True
    flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def torchrun_arguments(n_processes: int, args: list[str]) -> list[str]:
    """torchrun's arguments for `glowtrain <args>` in n processes on this machine."""
    return ["--standalone", f"--nproc_per_node={n_processes}", "-m", "glowtrain", *args]


@dataclass(frozen=True)
class JobEnd:
    """How torchrun's processes ended, as its launcher saw it."""

    failed: dict[int, int]  # rank -> exit code of each process it saw fail (negative: killed by that signal)
    signalled: bool  # a signal stopped the launcher; it passed the signal on and waited for the processes
    forced: bool = False  # another signal followed, and stopped them at once (or killed them)


# Where torchrun's launcher logs; torch's own handler prints what reaches `torch.distributed`.
_LAUNCHER_LOGGERS = ("torch.distributed.run", "torch.distributed.launcher", "torch.distributed.elastic")
# The signals torchrun's launcher catches (and passes on to its processes) while they run.
_LAUNCHER_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                          if hasattr(signal, name))


class Escalation:
    """The launcher's signal handler: the first signal is torchrun's (it raises `first`, and torchrun passes the
    signal on and waits for the processes); each later one stops them harder instead of abandoning them: the
    second passes SIGINT on again (a process stops at once on its second, as one `fit` does), the third kills
    them. Processes are found by the `<rank>.pid` files they leave in `folder` (each leads a session of its own)."""

    def __init__(self, folder: Path, first: Callable[[int, object], None]):
        self.folder, self.first, self.count = folder, first, 0

    def __call__(self, signum: int, frame) -> None:
        self.count += 1
        if self.count == 1:
            self.first(signum, frame)
            return
        stop = signal.SIGINT if self.count == 2 else getattr(signal, "SIGKILL", signal.SIGTERM)
        for pid in job_pids(self.folder):
            try:
                os.killpg(pid, stop)
            except (ProcessLookupError, PermissionError):  # already gone (or its pid taken by another's)
                pass


PID_SUFFIX = ".pid"


def leave_pid(folder: str | Path, rank: str) -> None:
    """A process of `fit --nproc` says who it is, so that the launcher can stop it harder on a second signal."""
    (Path(folder) / f"{rank}{PID_SUFFIX}").write_text(str(os.getpid()))


def stop_with_launcher(launcher_pid: int) -> None:
    """A process of `fit --nproc` is asked to stop (SIGTERM: save, then end) when its launcher dies without
    passing a signal on (SIGKILL, the OOM killer), instead of training on unseen into the same run directory.
    Linux only (prctl); elsewhere a process outlives a killed launcher as before."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        set_parent_death_signal = 1  # PR_SET_PDEATHSIG
        if libc.prctl(set_parent_death_signal, int(signal.SIGTERM), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no prctl here
        return
    if os.getppid() != launcher_pid:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def job_pids(folder: Path) -> list[int]:
    pids = []
    for path in folder.glob(f"*{PID_SUFFIX}"):
        try:
            pids.append(int(path.read_text()))
        except (OSError, ValueError):  # being written
            pass
    return pids


def run_local_job(n_processes: int, args: list[str], quiet: bool = True, pid_folder: Path | None = None,
                  ignore_late_signals: bool = False) -> JobEnd:
    """Run `glowtrain <args>` in n processes with torchrun's launcher inside this process, which stays their
    parent. torchrun passes SIGINT/SIGTERM on to the processes and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
    for them; with `pid_folder`, where they leave their pids, later signals stop them harder (`Escalation`).
    `quiet` keeps its own log lines and failure report off the terminal: the caller speaks for the job.
    `ignore_late_signals`: once a signal has stopped the job, this process ignores more of them (for a caller
    that then only says how the job ended, which a Ctrl-C still held down should not cut short)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api as launcher
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun installs its handler by this module-level name when it starts the processes; its own would raise
    # again on a second signal, out of its wait for them, and leave them running behind a parent that has ended.
    torchruns_handler = getattr(launcher, "_terminate_process_handler", None)
    escalation = Escalation(pid_folder or Path(os.devnull), torchruns_handler)
    if pid_folder is not None and torchruns_handler is not None:
        launcher._terminate_process_handler = escalation
    handlers = {sig: signal.getsignal(sig) for sig in _LAUNCHER_SIGNALS}
    loggers = [logging.getLogger(name) for name in _LAUNCHER_LOGGERS] if quiet else []
    muted = [(logger, logger.propagate) for logger in loggers]
    silent = logging.NullHandler()
    for logger in loggers:
        logger.propagate = False
        logger.addHandler(silent)
    try:
        with _rendezvous_handlers_made() as rendezvous:
            torchrun.run(torchrun.parse_args(torchrun_arguments(n_processes, args)))
        return JobEnd({}, False)
    except ChildFailedError as e:
        return JobEnd({rank: failure.exitcode for rank, failure in e.failures.items()}, False)
    except SignalException:
        _close(rendezvous)  # while the exception, whose frames hold the handler, is still here
        return JobEnd({}, True, forced=escalation.count > 1)
    finally:
        for sig, handler in handlers.items():  # torchrun's handlers would turn a late Ctrl-C into its exception
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(sig, signal.SIG_IGN if escalation.count and ignore_late_signals else handler)
        for logger, propagate in muted:
            logger.removeHandler(silent)
            logger.propagate = propagate
        if torchruns_handler is not None:
            launcher._terminate_process_handler = torchruns_handler


@contextmanager
def _rendezvous_handlers_made() -> Iterator[list]:
    """The rendezvous handlers torchrun's launcher makes while this is open (it finds their maker by this
    module-level name; a torch that did not would leave the list empty)."""
    from torch.distributed.elastic.rendezvous import registry

    made, make = [], registry.get_rendezvous_handler

    def make_and_keep(parameters):
        made.append(make(parameters))
        return made[-1]

    registry.get_rendezvous_handler = make_and_keep
    try:
        yield made
    finally:
        registry.get_rendezvous_handler = make


def _close(rendezvous: list) -> None:
    """Close the rendezvous torchrun leaves open when a signal stops it (for nodes that might join later), its
    heartbeat thread still beating. Whichever thread lets go of the handler last finalises it; when that was the
    heartbeat's, it could not join itself, and a `RuntimeError` traceback followed the job's one line, cut short as
    the launcher exited. A job on this machine alone is over: it is closed here, from this thread."""
    for handler in rendezvous:
        with suppress(Exception):  # no process will join it again: a failure to close changes nothing
            handler.shutdown()
