"""Step-exact batch loaders: infinite training batches addressed by global step (so a resume is exact), one ordered
evaluation pass, and DataLoader workers that leave stopping to the main process."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from glowtrain.config import derived_seed
from glowtrain.distributed import cpus_per_process
from glowtrain.errors import STOP_SIGNALS, UserError


class StepBatchSampler(Sampler[list[int]]):
    """Infinite index batches addressed by global step, so resuming at a step is exact."""

    def __init__(self, n_items: int, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if batch_size < 1:
            raise UserError(f"train.batch_size must be at least 1, got {batch_size}")
        if n_items < global_batch:
            raise UserError(f"a step needs {global_batch} images ({batch_size} per process, train.batch_size x "
                            f"train.grad_accum_steps, x {world_size} process(es)) but the dataset has {n_items}; "
                            "lower train.batch_size")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.batches_per_epoch = n_items // global_batch  # drop_last: every batch is full

    def __iter__(self) -> Iterator[list[int]]:
        step, epoch, perm = self.start_step, None, None
        global_batch = self.batch_size * self.world_size
        while True:
            e, position = divmod(step, self.batches_per_epoch)
            if e != epoch:
                epoch = e
                generator = torch.Generator().manual_seed(derived_seed(self.seed, e))
                perm = torch.randperm(self.n_items, generator=generator)
            start = position * global_batch + self.rank * self.batch_size
            yield perm[start:start + self.batch_size].tolist()
            step += 1


def make_train_batches(dataset, batch_size: int, seed: int, start_step: int = 0, *, n_workers: int = 0,
                       pin_memory: bool = False, rank: int = 0,
                       world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Infinite (uint8 images, int64 labels) batches from step start_step on."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, rank, world_size)
    return _batches(dataset, sampler, n_workers, pin_memory, persistent=n_workers > 0)


def make_eval_batches(dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, n_workers: int = 0,
                      pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """One ordered pass; rank r gets items r, r + world_size, ... (the last batch may be smaller)."""
    mine = list(range(rank, len(dataset), world_size))
    index_batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    return _batches(dataset, index_batches, n_workers, pin_memory, persistent=False)


def workers_used(dataset, n_workers: int) -> int:
    """The worker processes a loader of `dataset` asked for `n_workers` starts: none for a dataset in memory, which
    gathers its batches itself; else at most this process's share of the CPUs, as more would only contend for the
    cores (torch warns of a freeze)."""
    return 0 if hasattr(dataset, "get_batch") else min(n_workers, cpus_per_process())


def _batches(dataset, index_batches: Iterable[list[int]], n_workers: int, pin_memory: bool,
             persistent: bool) -> Iterator[tuple[Tensor, Tensor]]:
    if hasattr(dataset, "get_batch"):
        return _gathered(dataset, index_batches, pin_memory and torch.cuda.is_available())
    n_workers = workers_used(dataset, n_workers)
    if n_workers > 0:
        _end_workers_at_exit()
    loader = DataLoader(dataset, batch_sampler=index_batches, num_workers=n_workers,
                        worker_init_fn=_ignore_stop_signals,
                        pin_memory=pin_memory and torch.cuda.is_available(),
                        persistent_workers=persistent and n_workers > 0)
    return _one_line_errors(loader)


@functools.cache
def _end_workers_at_exit() -> None:
    """Workers ignore SIGTERM, the signal multiprocessing's own exit handler ends them with before it waits for
    them: kill those still running first (handlers registered later run earlier)."""
    def kill_workers() -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # DataLoader's handler would report the kills as failures
        for child in multiprocessing.active_children():
            if child.daemon:  # DataLoader's workers; processes the user started are left alone
                child.kill()
    atexit.register(kill_workers)


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C (and a closed terminal's SIGHUP) reaches the whole process group, and torchrun and batch schedulers
    # send SIGTERM to every process of a job; stopping is the main process's to handle (finish the step, save): a
    # worker killed by the signal would turn a clean stop into "DataLoader worker is killed by signal". Workers
    # still end with the main process: DataLoader tells them to, and they exit on their own when it is gone.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _gathered(dataset, index_batches: Iterable[list[int]], pin: bool) -> Iterator[tuple[Tensor, Tensor]]:
    # In-memory data: one gather per batch in this process beats DataLoader's per-item collate.
    for indices in index_batches:
        x, y = dataset.get_batch(torch.tensor(indices, dtype=torch.int64))
        yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)


def _one_line_errors(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    batches = iter(loader)
    try:
        yield from batches
    except UserError as e:
        # A worker re-raises UserError with its traceback prepended; keep only the user's one line.
        message = str(e).strip().splitlines()[-1] if str(e).strip() else str(e)
        prefix = f"{UserError.__module__}.{UserError.__qualname__}: "
        raise UserError(message.removeprefix(prefix)) from None
    finally:
        # Stop the workers as the batches stop, above all on an error from a worker: left to garbage collection,
        # the iterator caught in the error's reference cycle sees its queues finalised first, so its stop signal
        # never leaves and its shutdown waits 5 s per worker (10 s with our SIGTERM-proof ones). A consumer that
        # itself keeps this generator in such a cycle still meets that wait; close() the generator when done.
        stop_workers = getattr(batches, "_shutdown_workers", None)  # DataLoader's own, as its __del__ calls it
        if stop_workers is not None:
            stop_workers()
