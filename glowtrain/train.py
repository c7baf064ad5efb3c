"""The training loop: data-dependent init, Adamax with warm-up, EMA, evaluation, logging, checkpoints."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from glowtrain.checkpoint import (
    build_model,
    checkpoint_state,
    config_of,
    load_checkpoint,
    load_state_checked,
    run_paths,
    save_checkpoint,
)
from glowtrain.config import Config, apply_overrides, config_to_dict, load_config, save_config
from glowtrain.data import build_dataset, make_train_batches
from glowtrain.errors import UserError
from glowtrain.distributed import Context, broadcast_state, identical_across_ranks, setup, teardown
from glowtrain.evaluation import evaluate, prepare_batch
from glowtrain.flows import CouplingNet
from glowtrain.losses import bits_per_dim
from glowtrain.sample import display_upscale, image_grid, sample_images, save_png, temperature_name

class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving; the CLI exits 130."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the CLI reports it and exits 1."""


def _compiled(model: torch.nn.Module):
    try:
        return torch.compile(model)
    except Exception as e:  # e.g. a platform without a compiler backend
        warnings.warn(f"torch.compile is unavailable ({type(e).__name__}: {e}); training without it")
        return model


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


@contextlib.contextmanager
def full_precision(model):
    """Evaluate and sample without bf16 coupling networks, whatever training uses."""
    saved = [(m, m.amp_dtype) for m in model.modules() if isinstance(m, CouplingNet)]
    model.set_amp(None)
    try:
        yield model
    finally:
        for module, dtype in saved:
            module.amp_dtype = dtype


def ema_decay_at(step: int, decay: float) -> float:
    """Warmed-up Polyak decay: early averages must forget the random initial weights quickly."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, list(model.parameters()), 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """Noise for step t depends on (seed, t) alone, so a resumed run draws exactly the same noise."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + 1)


class RunLogger:
    """metrics.jsonl (one JSON object per event) and TensorBoard, side by side."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        paths = run_paths(run_dir)
        self.metrics = open(paths["metrics"], "a", buffering=1)
        self.writer = SummaryWriter(log_dir=str(paths["tb"]))

    def log(self, step: int, split: str, **values) -> None:
        # Strict JSON: a non-finite number (a diverging step) is written as null, not NaN.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self.metrics.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def image(self, tag: str, picture: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, picture, step)

    def close(self, hparams: dict | None = None, final: dict | None = None) -> None:
        if hparams is not None and final:
            self.writer.add_hparams(hparams, final, run_name=".")
        self.writer.close()
        self.metrics.close()


def _quiet(*args, **kwargs) -> None:
    pass


class NullLogger:
    """What ranks other than 0 log to."""

    def log(self, *args, **kwargs) -> None:
        pass

    def image(self, *args, **kwargs) -> None:
        pass

    def close(self, *args, **kwargs) -> None:
        pass


class _NonFiniteSteps:
    """Counts skipped (non-finite) steps on the training device, so the loop reads them only when it logs."""

    def __init__(self, device: torch.device, total: int = 0, in_row: int = 0):
        # total, the current run of bad steps, and the longest run since the last check
        self._counts = torch.tensor([total, in_row, in_row], device=device)

    def record(self, finite: torch.Tensor) -> None:
        bad = (~finite).to(self._counts.dtype).reshape(())
        total, in_row, longest = self._counts.unbind()
        in_row = (in_row + 1) * bad
        self._counts = torch.stack([total + bad, in_row, torch.maximum(longest, in_row)])

    def read(self) -> tuple[int, int, int]:
        """(total, current run, longest run since the last check) — one host read."""
        total, in_row, longest = self._counts.tolist()
        return total, in_row, longest

    def checked(self, clear_run: bool = False) -> None:
        self._counts[2] = 0 if clear_run else self._counts[1]
        if clear_run:
            self._counts[1] = 0


def _build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The configured optimiser; a fused one skips a non-finite step on the device by itself.

    torch's fused Adam takes a `found_inf` flag and leaves weights, moments and step count alone when it
    is set, so the loop need not wait for the GPU to learn whether a step was finite. Adamax has no
    fused form: the loop reads its verdict on the host, one tiny sync per step.
    """
    if cfg.train.optimizer == "adam":
        try:
            return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
        except (RuntimeError, ValueError):  # a device without a fused Adam (or an older torch)
            return torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    return torch.optim.Adamax(model.parameters(), lr=cfg.train.lr)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load saved moments and counts, keeping this run's implementation choice.

    torch restores every saved group setting, `fused` included: a checkpoint from an unfused Adam
    would silently unfuse this one (whose on-device skip then fails), and the reverse.
    """
    groups = [{**group, **{key: current[key] for key in ("fused", "foreach") if key in current}}
              for group, current in zip(saved["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**saved, "param_groups": groups})


def _update(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float, max_norm: float,
            weight_decay: float, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward, clipping and the optimiser step; returns (gradient norm, whether the step was finite).

    A non-finite step is skipped (it still counts, so data order and warm-up stay on schedule); every
    rank skips together, as one rank's loss can be non-finite alone.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    finite = ctx.all_true(torch.isfinite(loss) & torch.isfinite(grad_norm))
    skips_on_device = bool(optimizer.param_groups[0].get("fused"))  # fused Adam honours found_inf
    if skips_on_device:
        optimizer.found_inf = (~finite).float()
    if skips_on_device or bool(finite):  # Adamax: the loop's one host read per step
        if weight_decay > 0:  # decoupled (AdamW-style), for either optimiser
            with torch.no_grad():
                torch._foreach_mul_(list(model.parameters()), 1.0 - lr * weight_decay * finite)
        optimizer.step()
    return grad_norm, finite


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
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


@dataclass
class RunDir:
    path: Path
    resume_from: Path | None


def run_dir_for(out: str | None, name: str, resume: str | None) -> Path:
    """The run directory: --out, else the run a --resume path points into, else runs/<run.name>."""
    if out:
        return Path(out)
    if resume not in (None, "auto", "if-any"):
        path = Path(resume)
        if path.is_dir():
            return path
        if path.parent.name == "checkpoints":
            return path.parent.parent
    return Path("runs") / name


def checkpoint_to_resume(resume: str, run_dir: Path) -> Path:
    """--resume auto (or a run directory) means its last.pt; anything else is a checkpoint file."""
    path = Path(resume) if resume != "auto" else run_dir
    if path.is_dir() or resume == "auto":
        path = run_paths(path)["last"]
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist — start the run without --resume")
    return path


def prepare_run_dir(cfg: Config, out: str | None, resume: str | None) -> RunDir:
    """Decide where the run lives and what it resumes from; refuse to overwrite an existing run."""
    run_dir = run_dir_for(out, cfg.run.name, resume)
    _check_writable(run_dir)
    if resume is None:
        if run_paths(run_dir)["last"].exists():
            raise UserError(f"{run_dir} already holds a run — continue it with --resume auto, or choose another "
                            "--out or run.name")
        return RunDir(run_dir, None)
    return RunDir(run_dir, checkpoint_to_resume(resume, run_dir))


def _set_aside_unfinished(run_dir: Path) -> None:
    """A run that stopped before its first checkpoint left logs but nothing to resume: keep them as *.old."""
    for name in ("metrics", "tb"):
        path = run_paths(run_dir)[name]
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            path.rename(old)


def _check_optimizer(state: dict, cfg: Config, source: Path) -> None:
    saved = state.get("config", {}).get("train", {}).get("optimizer", cfg.train.optimizer)
    if saved != cfg.train.optimizer:
        raise UserError(f"{source} was trained with train.optimizer={saved}; resume it with the same optimizer "
                        f"(not {cfg.train.optimizer})")


def _check_writable(run_dir: Path) -> None:
    """Fail before any work if the run directory cannot be created or written (nothing is created here)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create the run directory {run_dir}: {existing} is a file — choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {existing} (permission denied) — choose another --out or run.name")


def resolve_resume(resume: str | None, config_path: str | None, overrides: list[str], out: str | None) -> str | None:
    """`if-any` means `auto` when the run has a last.pt and a fresh start otherwise (for restarted jobs)."""
    if resume != "if-any":
        return resume
    run_dir = run_dir_for(out, load_config(config_path, overrides).run.name, None)
    return "auto" if run_paths(run_dir)["last"].exists() else None


def fit_config(config_path: str | None, overrides: list[str], out: str | None, resume: str | None) -> Config:
    """The config `fit` runs: a resumed run keeps the one stored with it unless --config is given."""
    if resume is None or config_path is not None:
        return load_config(config_path, overrides)
    run_dir = run_dir_for(out, load_config(None, overrides).run.name, resume)
    checkpoint = checkpoint_to_resume(resume, run_dir)
    return apply_overrides(config_of(load_checkpoint(checkpoint), str(checkpoint)), overrides)


def _seeded_init_batch(dataset, cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of train.init_batch_size images for the data-dependent init."""
    size = min(cfg.train.init_batch_size, len(dataset))
    images, labels = next(make_train_batches(dataset, size, seed=cfg.run.seed + 7919))
    generator = torch.Generator(device=device).manual_seed(cfg.run.seed)
    return prepare_batch(images, cfg, device, generator), labels.to(device)


def _write_samples(model, cfg: Config, step: int, run_dir: Path, logger: RunLogger, device: torch.device) -> list[Path]:
    written = []
    for temperature in cfg.train.sample_temperatures:
        generator = torch.Generator(device=device).manual_seed(cfg.run.seed)
        images = sample_images(model, cfg.train.n_samples, temperature, cfg.data.n_bits, generator)
        grid = image_grid(images)
        name = f"step{step:07d}_{temperature_name(temperature)}.png"
        written.append(save_png(grid, run_paths(run_dir)["samples"] / name, display_upscale(cfg.data.image_size)))
        logger.image(f"samples/T={temperature:g}", grid, step)
    return written


def train(cfg: Config, out: str | None = None, resume: str | None = None, progress: bool = True) -> dict:
    """Train the model `cfg` describes; returns the final test metrics and where things were written."""
    ctx = setup(cfg.run.device, tf32=cfg.run.tf32, deterministic=cfg.run.deterministic)
    try:
        return _train(cfg, ctx, out, resume, progress)
    finally:
        teardown()


def _train(cfg: Config, ctx: Context, out: str | None, resume: str | None, progress: bool) -> dict:
    device = ctx.device
    run = prepare_run_dir(cfg, out, resume)
    ctx.barrier()  # every rank has checked the run directory before rank 0 writes into it
    if not ctx.is_main:
        ctx.barrier()  # rank 0 builds (and may download) the dataset first
    train_set = build_dataset(cfg.data, "train")
    test_set = build_dataset(cfg.data, "test")
    if ctx.is_main:
        ctx.barrier()
    if cfg.model.n_classes > 0 and train_set.n_classes != cfg.model.n_classes:
        raise UserError(f"model.n_classes={cfg.model.n_classes} but dataset {cfg.data.dataset} has "
                        f"{train_set.n_classes} classes — set model.n_classes={train_set.n_classes} (or 0)")

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg).to(device)
    optimizer = _build_optimizer(cfg, model)
    start_step, best_bpd = 0, math.inf
    lr_scale, n_rollbacks = 1.0, 0  # halved on each rollback after a run of non-finite steps
    if run.resume_from is not None:
        state = load_checkpoint(run.resume_from)  # on the CPU: optimizer step counters must stay there
        _check_optimizer(state, cfg, run.resume_from)
        load_state_checked(model, state["model"], str(run.resume_from))
        _load_optimizer_state(optimizer, state["optimizer"])
        start_step, best_bpd = state["step"], state["best_test_bpd"]
        lr_scale, n_rollbacks = state.get("lr_scale", 1.0), state.get("n_rollbacks", 0)
        torch.set_rng_state(state["rng"]["torch"].cpu())
    else:
        x, labels = _seeded_init_batch(train_set, cfg, device)
        model.initialize(x, labels if cfg.model.n_classes > 0 else None)
        broadcast_state(model, ctx)  # every rank starts from rank 0's initialisation
    ema = None
    if cfg.train.ema_decay > 0:
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        if run.resume_from is not None and state.get("ema") is not None:
            load_state_checked(ema, state["ema"], str(run.resume_from))
    eval_model = ema if ema is not None else model
    # Training may run its coupling networks in bf16; evaluation and samples always use full precision.
    model.set_amp(torch.bfloat16 if cfg.train.amp == "bf16" else None)
    if cfg.train.amp == "bf16" and device.type == "cpu" and ctx.is_main:
        # Measured on a 2-core x86 machine with torch 2.14: a CIFAR-shape bf16 step ran 16x slower than float32.
        warnings.warn("train.amp=bf16 on a CPU: bf16 convolutions are much slower than float32 on many CPUs; "
                      "measure with scripts/bench.py before a long run")
    if cfg.train.amp == "bf16" and cfg.train.memory_saving and ctx.is_main:
        # bf16 rounding of the coupling networks' inputs amplifies the rebuild's float32 rounding.
        warnings.warn("train.amp=bf16 with train.memory_saving: the rebuilt activations drift by about 3e-3 "
                      "(3e-4 without bf16, measured on an H200); metrics.jsonl logs the drift at each evaluation")
    model.set_memory_saving(cfg.train.memory_saving)
    wrapped = model
    if ctx.distributed:
        # Buffers (ActNorm flags, permutations) never change after the init broadcast.
        ddp = torch.nn.parallel.DistributedDataParallel
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                          else {"broadcast_buffers": False})
        wrapped = ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
    forward = _compiled(wrapped) if cfg.train.compile else wrapped
    compile_pending = forward is not wrapped

    def train_batches(start: int):
        return make_train_batches(train_set, cfg.train.batch_size, seed=cfg.run.seed, start_step=start,
                                  n_workers=cfg.data.n_workers, pin_memory=device.type == "cuda",
                                  rank=ctx.rank, world_size=ctx.world_size)

    batches = train_batches(start_step)  # a batch larger than the dataset fails here, before any write
    if ctx.is_main:
        if run.resume_from is None:
            _set_aside_unfinished(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_paths(run.path)["config"])
    logger = RunLogger(run.path) if ctx.is_main else NullLogger()
    cfg_dict = config_to_dict(cfg)

    def save(step: int, path: Path) -> None:
        """Rank 0 writes; every rank learns whether it worked, so none is left waiting in a collective."""
        # Every rank holds the same weights, so every rank reaches the same verdict here.
        # One host read for all parameters (a read each would wait on the GPU ~1,000 times per save).
        if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
            raise TrainingDiverged(f"the weights hold NaN or inf at step {step}; not saving them over {path} — "
                                   "lower train.lr and resume from the last checkpoint")
        error, n_bad = None, bad_steps.read()
        if ctx.is_main:
            try:
                save_checkpoint(checkpoint_state(
                    model=model, ema=ema, optimizer=optimizer, step=step, cfg_dict=cfg_dict, best_test_bpd=best_bpd,
                    extra={"lr_scale": lr_scale, "n_rollbacks": n_rollbacks, "n_bad_in_row": n_bad[1],
                           "n_bad_total": n_bad[0]}), path)
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        if not ctx.all_agree(error is None):
            raise error or RuntimeError(f"rank 0 could not write {path}; see its error above")

    def roll_back(bad_step: int, n_bad_in_row: int):
        """Return to last.pt with half the learning rate, once; a second divergence ends the run."""
        nonlocal lr_scale, n_rollbacks
        last = run_paths(run.path)["last"]
        cause = (f"{n_bad_in_row} steps in a row up to step {bad_step} had a non-finite loss or gradient — "
                 f"the learning rate ({lr:.2e}) is probably too high, or the data holds broken images")
        if n_rollbacks >= 1:
            raise TrainingDiverged(f"{cause}; rolling back with half the learning rate did not help: "
                                   "lower train.lr or raise train.warmup_steps and resume")
        if not last.exists():
            raise TrainingDiverged(f"{cause}; there is no checkpoint to roll back to yet: lower train.lr or "
                                   "raise train.warmup_steps")
        state = load_checkpoint(last)
        load_state_checked(model, state["model"], str(last))
        _load_optimizer_state(optimizer, state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            load_state_checked(ema, state["ema"], str(last))
        lr_scale, n_rollbacks = state.get("lr_scale", 1.0) * 0.5, n_rollbacks + 1
        logger.log(state["step"], "train", event="rollback", from_step=bad_step, lr_scale=lr_scale)
        say(f"step {bad_step}: {n_bad_in_row} non-finite steps; rolled back to step {state['step']} "
                  f"with the learning rate halved")
        return state["step"], train_batches(state["step"])

    n_dims = model.n_dims
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
    bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not (progress and ctx.is_main), unit="step", dynamic_ncols=True)
    say = bar.write if ctx.is_main else _quiet
    final: dict = {}
    step = start_step
    bad_steps = _NonFiniteSteps(device, state.get("n_bad_total", 0), state.get("n_bad_in_row", 0)) if run.resume_from \
        else _NonFiniteSteps(device)
    n_bad_logged = bad_steps.read()[0]
    window_start, window_images = time.perf_counter(), 0
    model.train()
    try:
        with _StopFlag() as stop:
            while step < cfg.train.steps:
                # Several processes must agree on stopping: they ask each other only at logging steps.
                if (step % cfg.train.log_every == 0 or not ctx.distributed) and ctx.any(stop.requested):
                    save(step, run_paths(run.path)["last"])
                    raise Interrupted(step, str(run.path))
                images, labels = next(batches)
                generator = step_generator(cfg.run.seed, step, device)
                x = prepare_batch(images, cfg, device, generator, flip=cfg.data.hflip, rank=ctx.rank,
                                  world_size=ctx.world_size)
                labels = labels.to(device, non_blocking=True)
                lr = lr_at(step, cfg) * lr_scale
                for group in optimizer.param_groups:
                    group["lr"] = lr
                y = labels if cfg.model.n_classes > 0 else None
                if compile_pending:  # torch.compile fails lazily, on the first call: fall back once, then never again
                    compile_pending = False
                    try:
                        log_prob, logits = forward(x, y)
                    except Exception as e:  # noqa: BLE001
                        warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training without it")
                        forward = wrapped
                        log_prob, logits = forward(x, y)
                else:
                    log_prob, logits = forward(x, y)
                bpd = bits_per_dim(log_prob, n_dims, cfg.data.n_bits).mean()
                loss = bpd
                if logits is not None:
                    loss = loss + cfg.train.class_weight * F.cross_entropy(logits, labels)
                grad_norm, finite = _update(loss, model, optimizer, lr, max_norm, cfg.train.weight_decay, ctx)
                bad_steps.record(finite)
                if ema is not None:
                    update_ema(ema, model, ema_decay_at(step, cfg.train.ema_decay))
                step += 1
                window_images += x.shape[0]
                bar.update(1)

                logging_due = step % cfg.train.log_every == 0 or step == cfg.train.steps
                # Before anything can be saved, too: a checkpoint must never follow a run past the limit.
                if logging_due or step % cfg.train.eval_every == 0 or step % cfg.train.checkpoint_every == 0:
                    n_bad_total, _, longest_bad_run = bad_steps.read()
                    if n_bad_total > n_bad_logged:
                        logger.log(step, "train", bad_steps=n_bad_total)
                        n_bad_logged = n_bad_total
                    if longest_bad_run > cfg.train.max_bad_steps:
                        step, batches = roll_back(step, longest_bad_run)
                        bad_steps.checked(clear_run=True)
                        bar.reset(total=cfg.train.steps)
                        bar.update(step)
                        window_start, window_images = time.perf_counter(), 0
                        continue
                    bad_steps.checked()
                if logging_due:
                    elapsed = time.perf_counter() - window_start
                    mean_bpd = ctx.sum_(bpd.detach().clone()).item() / ctx.world_size
                    values = {"bpd": mean_bpd, "lr": lr, "grad_norm": grad_norm.item(),
                              "images_per_s": ctx.world_size * window_images / max(elapsed, 1e-9)}
                    logger.log(step, "train", **values)
                    bar.set_postfix(bpd=f"{values['bpd']:.3f}", lr=f"{lr:.2e}",
                                    img_s=f"{values['images_per_s']:.0f}")
                    window_start, window_images = time.perf_counter(), 0
                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    with full_precision(eval_model):
                        final = evaluate(eval_model, test_set, cfg, device, ctx=ctx)
                    logger.log(step, "test", **final)
                    if cfg.train.memory_saving:  # measured, not assumed: how far the rebuilt inputs drift
                        with torch.no_grad():
                            drift = model.reconstruction_errors(x)
                        logger.log(step, "reconstruction", **{f"max_error_level{i}": e for i, e in enumerate(drift)})
                    say(f"step {step}: test bpd {final['bpd']:.4f} ± {final['bpd_stderr']:.4f}")
                    if final["bpd"] < best_bpd:
                        best_bpd = final["bpd"]
                        save(step, run_paths(run.path)["best"])
                if ctx.is_main and (step % cfg.train.sample_every == 0 or step == cfg.train.steps):
                    with full_precision(eval_model):
                        _write_samples(eval_model, cfg, step, run.path, logger, device)
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                    save(step, run_paths(run.path)["last"])
    finally:
        bar.close()
        hparams = {"dataset": cfg.data.dataset, "n_levels": cfg.model.n_levels, "n_steps": cfg.model.n_steps,
                   "hidden_channels": cfg.model.hidden_channels, "coupling": cfg.model.coupling,
                   "lr": cfg.train.lr, "batch_size": cfg.train.batch_size}
        logger.close(hparams, {"hparam/test_bpd": final["bpd"]} if final else None)
    if not identical_across_ranks(model, ctx):
        raise RuntimeError("the ranks finished with different weights; please report this with your config")
    return {"rank": ctx.rank, "run_dir": str(run.path), "step": step, "best_test_bpd": best_bpd, **{f"test_{k}": v for k, v in final.items()}}
