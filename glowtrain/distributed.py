"""Where the work runs: device selection (and, with torchrun, ranks and process groups)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from glowtrain.errors import UserError


def resolve_device(name: str, option: str = "run.device") -> torch.device:
    """The torch device for `auto`, cpu, cuda, cuda:N or mps; `option` names the setting in errors."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise UserError(f"{option}={name!r} is not a device — use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{option}={name} but CUDA is not available here — use {option}=cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"{option}={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
        use_fast_cuda_math()
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{option}=mps but MPS is not available here — use {option}=cpu or auto")
    return torch.device(name)


def use_fast_cuda_math() -> None:
    """TF32 matrix products on Ampere and newer, as cuDNN convolutions already have by default, and tuned convs.

    The coupling networks' 1x1 convolutions are matrix products, so without this they would run in
    full float32. Log-determinants do not depend on it: the invertible 1x1 weight is built in float64.
    """
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.benchmark = True


@dataclass(frozen=True)
class Context:
    """This process's place in the job: rank 0 of 1 unless launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

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

    def any(self, flag: bool) -> bool:
        return not self.all_agree(not flag)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str) -> Context:
    """Join the torchrun job when there is one (NCCL on CUDA, gloo on CPU); else a one-process context."""
    if not launched_by_torchrun():
        return Context(device=resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name.startswith("cuda") and not use_cuda:
        resolve_device(device_name)  # raises the one-line CUDA error
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        use_fast_cuda_math()
    if not dist.is_initialized():
        # A rank that dies makes the others fail at their next collective instead of waiting forever.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    return Context(dist.get_rank(), dist.get_world_size(), device)


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


def torchrun_command(n_processes: int, args: list[str]) -> list[str]:
    """The command that runs `glowtrain <args>` in n processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_processes}",
            "-m", "glowtrain", *args]
