"""Training: a Trainer of small steps (train_step, evaluate, save, restore, roll_back, log) and its run loop."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import shlex
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from glowtrain import precision
from glowtrain.checkpoint import (
    checkpoint_state,
    config_of,
    load_checkpoint,
    load_state_checked,
    resume_config,
    save_checkpoint,
)
from glowtrain.compilation import LazyCompile, compile_enabled
from glowtrain.config import (
    Config,
    TrainConfig,
    check_new_run,
    check_resume_config,
    config_to_dict,
    derived_seed,
    fixed_on_resume,
    load_config,
    settings_changed_on_resume,
    with_absolute_data_paths,
)
from glowtrain.data import build_dataset, refuse_misplaced_celeba_layout
from glowtrain.distributed import (
    Context,
    broadcast_state,
    identical_across_ranks,
    in_turns,
    setup,
    teardown,
)
from glowtrain.errors import STOP_SIGNALS, UserError, nohup
from glowtrain.evaluation import evaluate, mean_text
from glowtrain.folders import refuse_missing_image_folder, refuse_output_among_training_images
from glowtrain.images import display_upscale, image_grid, sample_images, save_png, temperature_label, temperature_name
from glowtrain.loaders import make_train_batches, workers_used
from glowtrain.logs import NullLogger, RunLogger
from glowtrain.losses import dequantize
from glowtrain.model import Glow
from glowtrain.objective import Objective, batch_noise, build_objective
from glowtrain.optim import build_optimizer, load_optimizer_state, skips_on_device
from glowtrain.run_data import check_class_count, check_class_names, check_records, record_run_data, recorded_data
from glowtrain.runs import (
    RunDir,
    checked_files,
    checkpoint_to_resume,
    prepare_run_dir,
    refuse_if_being_trained,
    resume_message,
    run_dir_for,
    run_of_checkpoint,
    test_records,
    training_lock,
)


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after saving; the CLI exits 130. A KeyboardInterrupt, as Ctrl-C is
    anywhere else in Python: a notebook's `except Exception` does not swallow it."""

    def __init__(self, step: int, run_dir: str):
        super().__init__(step, run_dir)
        self.step, self.run_dir = step, run_dir

    def __str__(self) -> str:
        return (f"interrupted at step {self.step}; checkpoint saved in {self.run_dir} — go on with "
                f"train(cfg, out={self.run_dir!r}, resume='auto')")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the CLI reports it and exits 1."""


# ------------------------------------------------------------------------------------------------
# Schedules and small pieces
# ------------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to train.lr, then constant or cosine decay to lr * min_lr_ratio."""
    t = cfg.train
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(step: int, decay: float) -> float:
    """Warmed-up Polyak decay: early averages must forget the random initial weights quickly."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(averaged: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """Move the averaged parameters towards the model's. Buffers never change after the init, so the
    copy the EMA was made from (or restored from) keeps them: no per-step copies of constants."""
    torch._foreach_lerp_(averaged, params, 1.0 - decay)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """Noise for step t depends on (seed, t) alone, so a resumed run draws exactly the same noise."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, step + 1))


@contextlib.contextmanager
def full_precision(model: Glow):
    """Evaluate and sample without bf16 coupling networks, whatever training uses."""
    saved = model.amp_dtype
    model.set_amp(None)
    try:
        yield model
    finally:
        model.set_amp(saved)


@dataclass
class TrainState:
    """Where training stands: what a checkpoint must carry besides weights and optimiser moments."""

    step: int = 0
    best_test_bpd: float = math.inf
    lr_scale: float = 1.0  # halved by each rollback after a run of non-finite steps
    n_rollbacks: int = 0
    n_bad_total: int = 0
    n_bad_in_row: int = 0
    processes: int = 0  # how many processes trained it last (0: a checkpoint from before this was recorded)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, state: dict) -> TrainState:
        """From a checkpoint's `train_state`, or from the top-level keys that checkpoints held before it."""
        saved = state.get("train_state") or {**state, "best_test_bpd": state.get("best_test_bpd", math.inf)}
        return cls(**{name: saved[name] for name in cls.__dataclass_fields__ if name in saved})


class DivergenceGuard:
    """Counts non-finite (skipped) steps on the device, so the loop reads them only when it logs; too many
    in a row roll back to the last checkpoint with half the learning rate, once."""

    def __init__(self, device: torch.device, max_bad_steps: int, total: int = 0, in_row: int = 0):
        self.max_bad_steps = max_bad_steps
        # total, the current run of bad steps, and the longest run since the last check
        self._counts = torch.tensor([total, in_row, in_row], device=device)

    def record(self, finite: torch.Tensor) -> None:
        bad = (~finite).to(self._counts.dtype).reshape(())
        total, in_row, longest = self._counts.unbind()
        in_row = (in_row + 1) * bad
        self._counts = torch.stack([total + bad, in_row, torch.maximum(longest, in_row)])

    def read(self) -> tuple[int, int, int]:
        """(total, current run, longest run since the last check): one host read."""
        total, in_row, longest = self._counts.tolist()
        return total, in_row, longest

    def check(self) -> int:
        """The longest run of bad steps since the last check if it calls for a rollback, else 0."""
        longest = self.read()[2]
        if longest > self.max_bad_steps:
            self._counts[1:] = 0
            return longest
        self._counts[2] = self._counts[1]
        return 0


class _StopFlag:
    """A stop signal asks the loop to stop after the current step; a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            if nohup(sig):  # the run is meant to outlive its terminal
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_optimizer(state: dict, cfg: Config, source: Path) -> None:
    saved = state.get("config", {}).get("train", {}).get("optimizer", cfg.train.optimizer)
    if saved != cfg.train.optimizer:
        raise UserError(f"{source} was trained with train.optimizer={saved}; resume it with the same optimizer "
                        f"(not {cfg.train.optimizer})")


def _objective_extras(objective: Objective) -> dict:
    """The objective's state beyond the flow's (a learned dequantiser's weights; empty for uniform noise)."""
    return {k: v for k, v in objective.state_dict().items() if not k.startswith("model.")}


def _load_objective(objective: Objective, model_state: dict, extras: dict | None, source: str) -> None:
    load_state_checked(objective.model, model_state, source)
    if extras:
        objective.load_state_dict({**{f"model.{k}": v for k, v in model_state.items()}, **extras})


class StepMetrics(NamedTuple):
    """What one optimiser step reports, left on the device until a logging step reads it."""

    terms: dict[str, torch.Tensor]  # each of the objective's terms, as the step's mean over its images
    grad_norm: torch.Tensor  # before clipping


@dataclass
class TrainResult:
    """What `train` returns: where the run is and how it ended."""

    rank: int
    run_dir: str
    step: int
    best_test_bpd: float
    test: dict  # the last evaluation's metrics (bpd, bpd_stderr, n_images, other terms) and its step; {} if none
    timed_out: bool = False  # stopped (after saving) because train.max_time was used up


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------

class Trainer:
    """One training run. Build it (data, model, optimiser, EMA, state: fresh or restored), then `run()`."""

    def __init__(self, cfg: Config, ctx: Context, run: RunDir, resume_from: Path | None = None,
                 progress: bool = True, datasets: tuple | None = None):
        self.cfg, self.ctx, self.run_dir, self.device = cfg, ctx, run, ctx.device
        self.progress = progress
        self.notes: list[str] = []  # what set-up found worth saying, said once the run directory is open
        checkpoint = self._checkpoint_to_resume(resume_from) if resume_from is not None else None
        self.train_set, self.test_set = datasets or self._load_datasets(resuming=resume_from is not None)
        torch.manual_seed(cfg.run.seed)
        self.model = Glow.from_config(cfg).to(self.device)
        self.objective = build_objective(self.model, cfg).to(self.device)
        self.optimizer = build_optimizer(cfg, self.objective.parameters())
        # float16's narrow range needs loss scaling; bfloat16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.train.amp == "fp16" else None
        self.state, self.resume_from = TrainState(), resume_from
        saved = self.restore(resume_from, checkpoint) if self.resumed else None
        if self.resumed:
            self._check_classes_unchanged()
        if not self.resumed:
            self._initialize()
        # After the init or restore, so the copy starts with the model's buffers, which never change.
        self.ema = copy.deepcopy(self.objective).eval().requires_grad_(False) if cfg.train.ema_decay > 0 else None
        if saved is not None and self.ema is not None:
            self._restore_ema(saved, str(resume_from))
        # Listed once: listing walks the module tree, milliseconds per call for the paper model's 1,351 tensors
        # (three calls were a tenth of a host-bound step). Resumes and roll-backs load into these same tensors.
        self.params = list(self.objective.parameters())
        self.ema_params = list(self.ema.parameters()) if self.ema is not None else []
        self.guard = DivergenceGuard(self.device, cfg.train.max_bad_steps, self.state.n_bad_total,
                                     self.state.n_bad_in_row)
        self._configure_model()
        self.wrapped = self._distributed(self.objective)
        compiled = compile_enabled(cfg.train.compile, self.device)
        regions = self.objective.compile_regions() if cfg.train.compile_scope == "steps" else ()
        self.forward = LazyCompile(self.wrapped, compiled, cfg.train.compile_mode, regions)
        # A CUDA graph's outputs are overwritten at its next replay, so a gradient the compiled backward
        # allocated would be gone before the next micro-batch adds to it: accumulation keeps .grad buffers
        # of its own (torch's advice for CUDA graphs with gradient accumulation).
        self.stable_grads = self.forward.active and self.forward.cuda_graphs and cfg.train.grad_accum_steps > 1
        self.batches = self._batches_from(self.state.step)  # a batch larger than the dataset fails here
        self._note_fewer_workers()
        self.logger, self.say = NullLogger(), _quiet

    # --- set-up --------------------------------------------------------------------------------

    def _load_datasets(self, resuming: bool) -> tuple:
        cfg = self.cfg
        earlier = checked_files(self.run_dir.path)  # what an earlier start found: unchanged files are not reread

        def build(from_rank_0: dict | None) -> tuple:
            checked = {**(earlier or {}), **(from_rank_0 or {})}
            return build_dataset(cfg.data, "train", checked), build_dataset(cfg.data, "test", checked)

        # One process downloads, caches or checks a dataset's files; the others then build it from what it found.
        train_set, test_set = in_turns(self.ctx, build, hand_on=lambda sets: check_records(*sets))
        check_class_count(cfg, train_set.n_classes, resuming)
        return train_set, test_set

    def _initialize(self) -> None:
        """ActNorm's data-dependent init (flow and learned dequantiser) on a fixed random batch, broadcast
        from rank 0."""
        cfg = self.cfg
        size = min(cfg.train.init_batch_size, len(self.train_set))
        asked = cfg.train.init_batch_size != TrainConfig.init_batch_size  # the default on a small folder: no news
        if size < cfg.train.init_batch_size and asked:  # said, so that the figure in config.yaml is not taken as used
            self.notes.append(f"note: train.init_batch_size={cfg.train.init_batch_size:,} is more than the "
                              f"{size:,} training images: ActNorm's initial statistics come from all of them")
        images, labels = next(make_train_batches(self.train_set, size, seed=cfg.run.seed + 7919))
        generator = torch.Generator(device=self.device).manual_seed(cfg.run.seed)
        images, noise = batch_noise(images.to(self.device), generator)
        self.objective.initialize(images, labels.to(self.device) if cfg.model.n_classes > 0 else None, noise)
        broadcast_state(self.objective, self.ctx)

    def _checkpoint_to_resume(self, path: Path) -> dict:
        """The checkpoint, once its config is known to model what this one does (`fit` checked it already; the
        Python API's `train` had not: a run went on learning 4-bit images from 2-bit ones)."""
        state = load_checkpoint(path)  # on the CPU: optimizer step counters must stay there
        check_resume_config(config_of(state, str(path)), self.cfg)
        return state

    def restore(self, path: Path, state: dict | None = None) -> dict:
        """Weights, optimiser moments, training state and the CPU random state from a checkpoint (returned;
        `state`: the checkpoint at `path` if loaded already)."""
        state = load_checkpoint(path) if state is None else state
        _check_optimizer(state, self.cfg, path)
        _load_objective(self.objective, state["model"], state.get("objective"), str(path))
        self._load_optimizer(state)
        self.state = TrainState.from_checkpoint(state)
        self.trained_config = state.get("config", {})
        self._forget_rollbacks_if_retuned(self.trained_config.get("train", {}))
        self._note_other_process_count()
        changed = settings_changed_on_resume(self.trained_config, self.cfg)
        if changed and self.state.step < self.cfg.train.steps:  # one that trains nothing uses none of them
            self.notes.append(f"note: this resume trains with {', '.join(changed)}")
        torch.set_rng_state(state["rng"]["torch"].cpu())
        return state

    def _check_classes_unchanged(self) -> None:
        """A resume's class folders must be those its labels were learnt from (checked before anything is written)."""
        recorded = recorded_data(self.run_dir, run_of_checkpoint(Path(self.resume_from)))
        check_class_names(recorded, self.train_set, self.cfg.data.cache or self.cfg.data.root,
                          "give the class folders their trained names again, or train a new run (fit without "
                          "--resume)")

    def _forget_rollbacks_if_retuned(self, saved_train: dict) -> None:
        """A rollback halves the learning rate and leaves no second chance; a resume that sets train.lr or
        train.warmup_steps anew (as the divergence message advises) takes over from it."""
        retuned = [key for key in ("lr", "warmup_steps")
                   if key in saved_train and saved_train[key] != getattr(self.cfg.train, key)]
        if retuned and (self.state.lr_scale != 1.0 or self.state.n_rollbacks):
            self.notes.append(f"train.{retuned[0]} changed since the rollback: training goes on at the configured "
                              f"learning rate (not {self.state.lr_scale:g} of it), with a rollback allowed again")
            self.state.lr_scale, self.state.n_rollbacks = 1.0, 0

    def _note_other_process_count(self) -> None:
        """A resume on another number of processes trains on with another global batch: say so, with both."""
        before, now = self.state.processes, self.ctx.world_size
        trained = self.trained_config.get("train", {})
        old_batch = before * trained.get("batch_size", 0) * trained.get("grad_accum_steps", 1)
        new_batch = now * self.cfg.train.batch_size * self.cfg.train.grad_accum_steps
        if before and before != now and old_batch != new_batch:  # a --set batch_size may keep it as it was
            self.notes.append(f"note: this run trained on {before} process(es) and goes on with {now}: its global "
                              f"batch changes from {old_batch:,} to {new_batch:,} images per step")

    def _load_optimizer(self, state: dict) -> None:
        """Moments and counts, and under fp16 the loss scale (a resumed run continues with the same one)."""
        load_optimizer_state(self.optimizer, state["optimizer"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    def _restore_ema(self, state: dict, source: str) -> None:
        if state.get("ema") is not None:
            _load_objective(self.ema, state["ema"], state.get("ema_objective"), source)

    def _configure_model(self) -> None:
        cfg, is_main = self.cfg, self.ctx.is_main
        # Training may run its coupling networks in bf16 or fp16; evaluation and samples always use full precision.
        self.model.set_amp(precision.AMP_DTYPES[cfg.train.amp])
        if cfg.train.amp == "bf16" and self.device.type == "cpu" and is_main:
            # Measured on a 2-core x86 machine with torch 2.14: a CIFAR-shape bf16 step ran 16x slower than float32.
            warnings.warn("train.amp=bf16 on a CPU: bf16 convolutions are much slower than float32 on many CPUs; "
                          "time a few steps against train.amp=off before a long run", stacklevel=2)
        if cfg.train.amp == "bf16" and cfg.train.memory_saving and is_main:
            # bf16 rounding of the coupling networks' inputs amplifies the rebuild's float32 rounding.
            warnings.warn("train.amp=bf16 with train.memory_saving: the rebuilt activations drift by about 3e-3 "
                          "(3e-4 without bf16, measured on an H200); metrics.jsonl logs the drift at each evaluation",
                          stacklevel=2)
        self.model.set_memory_saving(cfg.train.memory_saving)

    def _distributed(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.ctx.distributed:
            return module
        # Buffers (ActNorm flags, permutations) never change after the init broadcast.
        ddp = torch.nn.parallel.DistributedDataParallel
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                          else {"broadcast_buffers": False})
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return ddp(module, device_ids=device_ids, **no_buffer_sync)

    def _batches_from(self, step: int):
        """The data from `step` on: each rank's share of the step's batch, all its micro-batches at once."""
        cfg, ctx = self.cfg, self.ctx
        return make_train_batches(self.train_set, cfg.train.batch_size * cfg.train.grad_accum_steps,
                                  seed=cfg.run.seed, start_step=step, n_workers=cfg.data.n_workers,
                                  pin_memory=self.device.type == "cuda", rank=ctx.rank, world_size=ctx.world_size)

    def _note_fewer_workers(self) -> None:
        """Said where the CPUs cap the loader's workers (a dataset in memory starts none, whatever is asked)."""
        asked = self.cfg.data.n_workers
        if 0 < (used := workers_used(self.train_set, asked)) < asked:
            self.notes.append(f"note: data.n_workers={asked} is more than this process's share of the CPUs: the data "
                              f"loads in {used} worker process{'es' if used > 1 else ''}")

    @property
    def resumed(self) -> bool:
        return self.resume_from is not None

    # --- one optimiser step --------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepMetrics:
        """Forward and backward over the micro-batches, clip, the skippable optimiser step, EMA.

        Returns the step's mean of each of the objective's terms (bits/dim, ...) and its gradient norm."""
        lr = lr_at(self.state.step, self.cfg) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.prepare_batch(images, labels)
        self._clear_grads()
        terms, loss_finite = self.forward.first_use(lambda: self._forward_backward(*batch), self._clear_grads)
        grad_norm, finite = self._optimizer_step(loss_finite, lr)
        self.guard.record(finite)
        if self.ema is not None:
            update_ema(self.ema_params, self.params, ema_decay_at(self.state.step, self.cfg.train.ema_decay))
        return StepMetrics(terms, grad_norm)

    def _clear_grads(self) -> None:
        """Gradients gone before a step's backward passes: freed, or zeroed where they stay (`stable_grads`)."""
        if not self.stable_grads:
            self.optimizer.zero_grad(set_to_none=True)
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None and param.requires_grad:
                    param.grad = torch.zeros_like(param)
        self.optimizer.zero_grad(set_to_none=False)

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor,
                          noise: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gradients of the step's loss, accumulated over its micro-batches: (each term's mean, loss finite)."""
        n_micro, distributed = self.cfg.train.grad_accum_steps, self.ctx.distributed
        means: dict[str, torch.Tensor] = {}
        loss_finite = torch.ones((), dtype=torch.bool, device=self.device)
        parts = zip(images.chunk(n_micro), labels.chunk(n_micro), noise.chunk(n_micro))
        for index, (part_images, part_labels, part_noise) in enumerate(parts):
            last = index == n_micro - 1
            # DDP averages gradients over ranks once, after the last micro-batch's backward.
            with contextlib.nullcontext() if last or not distributed else self.wrapped.no_sync():
                output = self.forward(part_images, part_labels, part_noise)
                loss = output.loss / n_micro
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            # Read now: under CUDA graphs the next micro-batch's replay overwrites the outputs.
            for name, value in output.terms.items():
                means[name] = means.get(name, 0.0) + value.detach().mean() / n_micro
            loss_finite = loss_finite & torch.isfinite(output.loss.detach())
        return means, loss_finite

    def prepare_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's share of the step's batch on the device, flipped, with its dequantisation noise.

        The noise and flips of step t come from (run.seed, t) alone, so a resumed run draws the same."""
        cfg, ctx = self.cfg, self.ctx
        generator = step_generator(cfg.run.seed, self.state.step, self.device)
        images, noise = batch_noise(images.to(self.device, non_blocking=True), generator, cfg.data.hflip,
                                    ctx.rank, ctx.world_size)
        return images, labels.to(self.device, non_blocking=True), noise

    def _optimizer_step(self, loss_finite: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, then step unless the loss or gradient is non-finite on any rank: (gradient norm, finite).

        A skipped step still counts, so data order and warm-up stay on schedule; every rank skips together,
        as one rank's loss can be non-finite alone. Under fp16 a gradient overflow is such a step.
        """
        params = self.params
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # on the device; an overflow leaves inf in the gradients
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = self.ctx.all_true(loss_finite & torch.isfinite(grad_norm))
        on_device = skips_on_device(self.optimizer)
        if on_device:
            self.optimizer.found_inf = (~finite).float()
        if on_device or bool(finite):  # a plain (unfused) Adam: the loop's one host read per step
            if self.cfg.train.weight_decay > 0:  # decoupled (AdamW-style), for either optimiser
                with torch.no_grad():
                    torch._foreach_mul_(params, 1.0 - lr * self.cfg.train.weight_decay * finite)
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # halves the scale after an overflow, grows it after a run of good steps
        return grad_norm, finite

    # --- what happens between steps ------------------------------------------------------------

    @property
    def eval_objective(self) -> Objective:
        """What evaluation and samples use: the EMA weights, or the raw ones without EMA."""
        return self.ema if self.ema is not None else self.objective

    def evaluate(self) -> dict:
        """Test bits/dim with the EMA weights (or the raw ones), in full precision; keeps the best checkpoint."""
        with full_precision(self.eval_objective.model):
            result = evaluate(self.eval_objective, self.test_set, self.cfg, self.device, ctx=self.ctx,
                              progress=self.progress and self.ctx.is_main)
        self.logger.log(self.state.step, "test", **result)
        accuracy = f", accuracy {result['accuracy']:.3f}" if "accuracy" in result else ""  # class-conditional
        self.say(f"step {self.state.step}: test bpd {mean_text(result['bpd'], result['bpd_stderr'])}{accuracy}")
        if result["bpd"] < self.state.best_test_bpd:
            self.state.best_test_bpd = result["bpd"]
            self.save(self.run_dir.best)
        return result

    def log_reconstruction(self, images: torch.Tensor) -> None:
        """Measured, not assumed: how far memory saving's rebuilt inputs drift from the true ones."""
        with torch.no_grad():
            x = dequantize(images.to(self.device), self.cfg.data.n_bits, 0.5)
            drift = self.model.reconstruction_errors(x)
        self.logger.log(self.state.step, "reconstruction", **{f"max_error_level{i}": e for i, e in enumerate(drift)})

    def log_train(self, metrics: StepMetrics, images_per_s: float) -> None:
        """Every term the objective reports (bpd first), the learning rate, gradient norm and speed."""
        lr = lr_at(self.state.step - 1, self.cfg) * self.state.lr_scale
        terms = self._mean_over_ranks(metrics.terms)
        values = {**terms, "lr": lr, "grad_norm": metrics.grad_norm.item(), "images_per_s": images_per_s}
        self.logger.log(self.state.step, "train", **values)
        self.bar.set_postfix(**{name: f"{value:.3f}" for name, value in terms.items()}, lr=f"{lr:.2e}",
                             img_s=f"{images_per_s:.0f}")
        if not self.progress:  # no bar: one plain line per logging step, for log files of batch jobs
            shown = ", ".join(f"{name} {value:.4f}" for name, value in terms.items())
            self.say(f"step {self.state.step}/{self.cfg.train.steps}: train {shown}, lr {lr:.2e}, "
                     f"{images_per_s:.0f} images/s")

    def _mean_over_ranks(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each term averaged over the ranks' batches: one all-reduce, one host read (at logging steps only)."""
        dtype = functools.reduce(torch.promote_types, [value.dtype for value in terms.values()])
        sums = self.ctx.sum_(torch.stack([value.detach().to(dtype) for value in terms.values()]))
        return {name: total / self.ctx.world_size for name, total in zip(terms, sums.tolist())}

    def write_samples(self) -> list[Path]:
        """A grid per temperature from the EMA weights, in full precision, as PNG and in TensorBoard."""
        cfg, model = self.cfg, self.eval_objective.model
        written = []
        with full_precision(model):
            for temperature in dict.fromkeys(cfg.train.sample_temperatures):  # one listed twice is drawn once
                generator = torch.Generator(device=self.device).manual_seed(cfg.run.seed)
                grid = image_grid(sample_images(model, cfg.train.n_samples, temperature, cfg.data.n_bits, generator))
                name = f"step{self.state.step:07d}_{temperature_name(temperature)}.png"
                written.append(save_png(grid, self.run_dir.samples / name, display_upscale(cfg.data.image_size)))
                self.logger.image(f"samples/{temperature_label(temperature)}", grid, self.state.step)
        return written

    def save(self, path: Path) -> None:
        """Rank 0 writes; every rank learns whether it worked, so none is left waiting in a collective."""
        # One host read for all parameters (a read each would wait on the GPU ~1,000 times per save).
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):
            raise TrainingDiverged(f"the weights hold NaN or inf at step {self.state.step}; not saving them over "
                                   f"{path} — lower train.lr and resume from the last checkpoint")
        self.state.n_bad_total, self.state.n_bad_in_row, _ = self.guard.read()
        error = None
        if self.ctx.is_main:
            try:
                save_checkpoint(self._checkpoint(), path)
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        if not self.ctx.all_agree(error is None):
            raise error or RuntimeError(f"rank 0 could not write {path}; see its error above")

    def _checkpoint(self) -> dict:
        ema = self.ema.model if self.ema is not None else None
        state = checkpoint_state(model=self.model, ema=ema, optimizer=self.optimizer, cfg_dict=config_to_dict(self.cfg),
                                 train_state={**self.state.state_dict(), "processes": self.ctx.world_size})
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        extras = _objective_extras(self.objective)
        if extras:
            state["objective"] = extras
            state["ema_objective"] = _objective_extras(self.ema) if self.ema is not None else None
        return state

    def roll_back(self, bad_step: int, n_bad_in_row: int) -> None:
        """Return to last.pt with half the learning rate, once; a second divergence ends the run."""
        lr = lr_at(bad_step - 1, self.cfg) * self.state.lr_scale
        cause = (f"{n_bad_in_row} steps in a row up to step {bad_step} had a non-finite loss or gradient — "
                 f"the learning rate ({lr:.2e}) is probably too high, or the data holds broken images")
        if self.state.n_rollbacks >= 1:
            raise TrainingDiverged(f"{cause}; rolling back with half the learning rate did not help: "
                                   "lower train.lr or raise train.warmup_steps and resume")
        last = self.run_dir.last
        if not last.exists():
            raise TrainingDiverged(f"{cause}; there is no checkpoint to roll back to yet: lower train.lr or "
                                   "raise train.warmup_steps")
        state = load_checkpoint(last)
        _load_objective(self.objective, state["model"], state.get("objective"), str(last))
        self._load_optimizer(state)
        if self.ema is not None:
            self._restore_ema(state, str(last))
        saved = TrainState.from_checkpoint(state)
        self.state.step, self.state.lr_scale = saved.step, saved.lr_scale * 0.5
        self.state.n_rollbacks += 1
        self.logger.restart_at(saved.step)  # the abandoned steps' records go to metrics_discarded.jsonl
        self.logger.log(saved.step, "train", event="rollback", from_step=bad_step, bad_steps_in_row=n_bad_in_row,
                        lr_scale=self.state.lr_scale)
        self.say(f"step {bad_step}: {n_bad_in_row} non-finite steps; rolled back to step {saved.step} "
                 f"with the learning rate halved")
        if kept := self._grids_kept_note(saved.step):
            self.say(kept)
        self.batches = self._batches_from(saved.step)
        self.bar.reset(total=self.cfg.train.steps)
        self.bar.update(saved.step)

    # --- the run loop --------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to train.steps: log, evaluate, sample and checkpoint on schedule; stop cleanly on a signal."""
        cfg, state = self.cfg.train, self.state
        self._open_run_dir()
        final = self._logged_result() if self._nothing_to_train else {}
        self.deadline = None if cfg.max_time_s is None else self._now() + cfg.max_time_s
        self.timed_out = False
        window, start = _Throughput(self.ctx.world_size, self.device), state.step
        # The flag stays up through the close and the ranks' last comparison: a Ctrl-C after the last step (one
        # finishing rank still closing its logs while another prints its summary) leaves a finished run finished.
        with _StopFlag() as stop:
            try:
                while state.step < cfg.steps:
                    if self._stop_if_asked(stop):
                        break
                    images, labels = next(self.batches)
                    if state.step == start:  # the window starts with the first batch, not the data workers' start-up
                        window.restart()
                    compiling, started = self.forward.pending, time.perf_counter()
                    metrics = self.train_step(images, labels)
                    state.step += 1
                    window.add(images.shape[0])
                    self.bar.update(1)
                    if compiling:
                        self._compiled(time.perf_counter() - started, window)
                    if self._events_due() and self._rolled_back():
                        window.restart()
                        continue
                    if self._due(cfg.log_every):
                        self.log_train(metrics, window.restart())
                    if not any(map(self._due, (cfg.eval_every, cfg.sample_every, cfg.checkpoint_every))):
                        continue
                    with window.paused():  # evaluations, samples and saves are not training's images/s
                        if self._due(cfg.eval_every):
                            final = {**self.evaluate(), "step": state.step}
                            if cfg.memory_saving:
                                self.log_reconstruction(images[: cfg.batch_size])
                        if self.ctx.is_main and self._due(cfg.sample_every):
                            self.write_samples()
                        if self._due(cfg.checkpoint_every):
                            self.save(self.run_dir.last)
            finally:
                self._close()
            if not identical_across_ranks(self.objective, self.ctx):
                raise RuntimeError("the ranks finished with different weights; please report this with your config")
        return TrainResult(self.ctx.rank, str(self.run_dir.path), state.step, state.best_test_bpd, final,
                           self.timed_out)

    def _logged_result(self) -> dict:
        """The evaluation metrics.jsonl logged last up to the checkpoint's step: what a resume with nothing left to
        train returns, as the run's finishing call did (not one of later training that this resume leaves behind)."""
        tests = [record for record in test_records(self.run_dir) if record.get("step", 0) <= self.state.step]
        return {key: value for key, value in tests[-1].items() if key != "split"} if tests else {}

    def _compiled(self, seconds: float, window: _Throughput) -> None:
        """After the step that compiled: say how long it took, and leave it out of the images/s logged next."""
        if self.forward.active:  # not when compiling failed and the step ran eager (a warning said so)
            self.say(f"the first step compiled in {seconds:.0f} s")
        window.restart()

    def _due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step == self.cfg.train.steps

    def _events_due(self) -> bool:
        t = self.cfg.train
        return any(self._due(every) for every in (t.log_every, t.eval_every, t.checkpoint_every))

    def _rolled_back(self) -> bool:
        """At logging, evaluation and checkpoint steps (a checkpoint must never follow a run past the limit):
        log new bad steps, and roll back after too many in a row."""
        n_bad_total = self.guard.read()[0]
        if n_bad_total > self._n_bad_logged:
            self.logger.log(self.state.step, "train", bad_steps=n_bad_total)
            self._n_bad_logged = n_bad_total
        longest = self.guard.check()
        if longest:
            self.roll_back(self.state.step, longest)
        return bool(longest)

    def _stop_if_asked(self, stop: _StopFlag) -> bool:
        """Raise Interrupted after saving on a signal; True (after saving) once train.max_time is used up."""
        # Several processes must agree on stopping, every step: torchrun and schedulers kill what has not
        # stopped within seconds. They ask each other on the host, so the GPU is never waited for here.
        asked, out_of_time = self.ctx.any_on_host(stop.requested,
                                                  self.deadline is not None and self._now() >= self.deadline)
        if asked:
            self._save_before_stopping()
            raise Interrupted(self.state.step, str(self.run_dir.path))
        if out_of_time:
            self._save_before_stopping()
            self.timed_out = True
            return True
        return False

    def _save_before_stopping(self) -> None:
        """last.pt, after the divergence check that a checkpoint step runs: a run of bad steps not yet checked
        rolls back now instead of being forgotten by the resumed run."""
        self._rolled_back()
        self.save(self.run_dir.last)

    def _now(self) -> float:
        return time.monotonic()

    def _open_run_dir(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        # A resume of a run already at train.steps trains nothing: it leaves the run's record (config, data,
        # TensorBoard's settings) as it was, or the record would describe settings no weights were trained with.
        self._nothing_to_train = self.resumed and self.state.step >= cfg.train.steps
        if ctx.is_main:
            if not self.resumed:
                self.run_dir.set_aside_unfinished()
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            unused_edits = self.run_dir.unused_edits(cfg, self.trained_config) if self.resumed else ([], "")
            edited = self.run_dir.config
            if not self._nothing_to_train and (kept := self.run_dir.write_config(cfg)):
                tqdm.write(f"note: {edited} had been edited since fit wrote it; kept as {kept}")
                edited = kept
            self._note_unused_edits(edited, *unused_edits)
            going_on = self.resumed and not self._nothing_to_train
            # Only a run that goes on replaces what was logged after its step; one that trains nothing moves nothing.
            self.logger = RunLogger(self.run_dir, self.state.step if going_on else None)
            if self.logger.n_moved:
                tqdm.write(f"note: {self.logger.n_moved} metrics.jsonl record(s) logged after step {self.state.step} "
                           f"(the step this run resumes from) moved to {self.run_dir.metrics_discarded}")
            kept = self.run_dir.keep_checkpoints_given_up(self.resume_from) if going_on else []
            if kept:
                tqdm.write(f"note: going on from step {self.state.step}, this run saves over the last.pt/best.pt of "
                           f"the training it gives up; they are kept as {', '.join(str(path) for path in kept)}")
            if kept := self._grids_kept_note(self.state.step):
                tqdm.write(kept)
            if not self._nothing_to_train:
                self._record_data()
        show = self.progress and ctx.is_main and not self._nothing_to_train  # a full bar of no steps says nothing
        self.bar = tqdm(total=cfg.train.steps, initial=self.state.step, disable=not show, unit="step",
                        dynamic_ncols=True)
        self.say = self.bar.write if ctx.is_main else _quiet
        self._n_bad_logged = self.guard.read()[0]
        if self.resumed:
            self.say(resume_message(self.run_dir.path, self.state.step, cfg.train.steps))
        for note in self.notes:
            self.say(note)
        if self.forward.pending:
            what = ("each level's flow step" if cfg.train.compile_scope == "steps"
                    else "the model (minutes for a large one; train.compile_scope=steps shortens it)")
            self.say(f"train.compile={cfg.train.compile}: the first step compiles {what}; train.compile=off skips it")

    def _grids_kept_note(self, step: int) -> str | None:
        """What going back to `step` did with the sample grids drawn after it (None: there were none)."""
        if not self.logger.grids_kept:
            return None
        return (f"note: {len(self.logger.grids_kept)} sample grid(s) drawn after step {step} kept as "
                f"{self.run_dir.samples}/discarded_*.png")

    def _note_unused_edits(self, edited: Path, keys: list[str], problem: str) -> None:
        """Say which hand edits of the run's config.yaml (kept as `edited`) this resume leaves unused, and how to
        use them: --config for training settings; a new run for what changes the model."""
        unused = f"this resume does not use the edits in {edited}"
        if problem:  # said of config.yaml, which is fit's own by now
            self.notes.append(f"note: {unused}: {problem.replace(str(self.run_dir.config), str(edited))}")
            return
        if not keys:
            return
        fixed = [key for key in keys if fixed_on_resume(key, self.cfg.model)]
        how = (f"{', '.join(fixed)} cannot change on resume: train a new run with --config "
               f"{shlex.quote(str(edited))} and another --out" if fixed else
               f"to use them, resume with --config {shlex.quote(str(edited))}")
        self.notes.append(f"note: {unused} ({', '.join(keys)}): a resume trains with the config its checkpoint "
                          f"keeps (and --set); {how}")

    def _record_data(self) -> None:
        """Say what the run trains on, warn about skipped or changed files, and keep the data's record."""
        if not all(hasattr(d, "report") for d in (self.train_set, self.test_set)):  # datasets handed in from Python
            return
        source = run_of_checkpoint(Path(self.resume_from)) if self.resumed else None
        line, warnings_ = record_run_data(self.run_dir, self.cfg.data, self.train_set, self.test_set, self.resumed,
                                          source)
        tqdm.write(line)
        for warning in warnings_:
            tqdm.write(warning, file=sys.stderr)

    def _close(self) -> None:
        self.bar.close()
        self.logger.close(None if self._nothing_to_train else self.cfg, self.state.best_test_bpd, self.state.step,
                          self.ctx.world_size)


class _Throughput:
    """Images per second over a window of steps (all ranks together).

    A GPU runs behind the host, which queues steps without waiting for them: the clock is read only once the device
    has done what was queued, or a pause (an evaluation, which waits for the device) would take in training's work."""

    def __init__(self, world_size: int, device: torch.device | None = None):
        self.world_size, self.device = world_size, device or torch.device("cpu")
        self.start, self.images = time.perf_counter(), 0

    def add(self, n_images: int) -> None:
        self.images += n_images

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is left out of the window."""
        paused_at = self._now()
        try:
            yield
        finally:
            self.start += self._now() - paused_at

    def restart(self) -> float:
        """The window's images per second; a new window starts now."""
        now = self._now()
        rate = self.world_size * self.images / max(now - self.start, 1e-9)
        self.start, self.images = now, 0
        return rate

    def _now(self) -> float:
        if self.device.type == "cuda":  # at logging steps and pauses only, which wait for the device anyway
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _quiet(*args, **kwargs) -> None:
    pass


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------

def train(cfg: Config, out: str | None = None, resume: str | None = None, progress: bool = True, *,
          trainer: type[Trainer] = Trainer) -> TrainResult:
    """Train the model `cfg` describes into `out` (default runs/<run.name>), fresh or resumed.

    `resume`: None starts a new run (refused where one is); "auto" continues from the run's last.pt; "if-any" does
    so when there is one and starts fresh otherwise; a checkpoint's path continues from it. A resumed run must
    model what `cfg` does: the keys fit refuses to change on a resume (most of data.* and model.*) as stored.
    `progress`: tqdm bars.
    `trainer` may be a subclass (tests inject faults by overriding `prepare_batch`). On `cuda:N`, that GPU is the
    current device while training; a process that had used CUDA before gets its own current device back."""
    resume = _if_any(resume, out, cfg.run.name)
    if resume is None:
        check_new_run(cfg)
    saved, saved_threads = precision.settings(), torch.get_num_threads()
    # setup makes the run's GPU the current one; a notebook's own current device comes back (and none is made).
    saved_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    cfg = with_absolute_data_paths(cfg)
    ctx = setup(cfg.run.device, tf32=cfg.run.tf32, deterministic=cfg.run.deterministic)
    try:
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        precision.check_amp(cfg.train.amp, ctx.device, cfg.train.allow_emulated_bf16)
        run = run_dir_for(out, cfg.run.name, resume)
        with contextlib.ExitStack() as held:
            resume_from = _claim_run(run, resume, cfg, ctx, held)
            return trainer(cfg, ctx, run, resume_from, progress).run()
    finally:
        with _StopFlag():  # a Ctrl-C while the process group closes: the run ended already, finished or saved
            teardown()
        precision.restore(saved)  # a notebook's later work runs as it did before
        torch.set_num_threads(saved_threads)
        if saved_device is not None:
            torch.cuda.set_device(saved_device)


def _claim_run(run: RunDir, resume: str | None, cfg: Config, ctx: Context,
               held: contextlib.ExitStack) -> Path | None:
    """prepare_run_dir on every rank; rank 0 also refuses a run another fit trains and takes its lock into `held`.
    A refusal on any rank is raised on all of them, before rank 0 writes into the run: alone, the rest would wait
    in their first collective until it timed out (under a launcher that does not end a job at its first failure).
    A missing image folder is said first: without --out, the run of the same name would answer for it."""
    problem, resume_from = None, None
    try:
        refuse_missing_image_folder(cfg.data)
        if resume is None:
            refuse_misplaced_celeba_layout(cfg.data)
        refuse_output_among_training_images(run.path, cfg.data)  # its sample grids would become training images
        if ctx.is_main:
            refuse_if_being_trained(run)
        resume_from = prepare_run_dir(run, resume)
        if ctx.is_main:
            held.enter_context(training_lock(run))
    except Exception as e:  # noqa: BLE001 - raised below, on every rank
        problem = e
    said = None  # (bad input?, what went wrong)
    if problem is not None:
        bad_input = isinstance(problem, UserError)
        said = (bad_input, str(problem) if bad_input else f"{type(problem).__name__}: {problem}")
    first = ctx.first_of(said)
    if problem is not None:
        raise problem
    if first is not None:
        bad_input, text = first
        raise UserError(text) if bad_input else RuntimeError(f"another process of the job could not claim the run: "
                                                             f"{text}")
    return resume_from


def resolve_resume(resume: str | None, config_path: str | None, overrides: list[str], out: str | None) -> str | None:
    """`if-any` means `auto` when the run has a last.pt and a fresh start otherwise (for restarted jobs)."""
    if resume != "if-any":
        return resume
    return _if_any(resume, out, _run_name(config_path, overrides, out))


def _run_name(config_path: str | None, overrides: list[str], out: str | None) -> str:
    """run.name where --out does not name the run. With --out no config is read here, so that a bad --set value
    is said against the resumed run's own config (train.steps=4, the run's), not the defaults."""
    return "" if out else load_config(config_path, overrides).run.name


def _if_any(resume: str | None, out: str | None, name: str) -> str | None:
    """`if-any` as `auto` when the run has a last.pt, else None (a fresh start); any other value as it is."""
    if resume != "if-any":
        return resume
    return "auto" if run_dir_for(out, name, None).has_checkpoint() else None


def fit_config(config_path: str | None, overrides: list[str], out: str | None, resume: str | None) -> Config:
    """The config `fit` runs: a resumed run keeps the one stored with it unless --config is given."""
    if resume is None:
        cfg = load_config(config_path, overrides)
        check_new_run(cfg)
        refuse_misplaced_celeba_layout(cfg.data)  # here too: before `fit --nproc` starts its processes
        return cfg
    run = run_dir_for(out, _run_name(config_path, overrides, out), resume)
    checkpoint = checkpoint_to_resume(resume, run)
    return resume_config(checkpoint, config_path, overrides)  # data.* and model.* stay as trained
