"""Bits/dim over a whole split, with dequantisation noise fixed per image so every evaluation agrees."""

from __future__ import annotations

import math
import sys

import torch
from tqdm import tqdm

from glowtrain.config import Config, derived_seed
from glowtrain.distributed import Context
from glowtrain.flows import widest_float
from glowtrain.loaders import make_eval_batches
from glowtrain.model import Glow
from glowtrain.objective import Objective
from glowtrain.precision import full_float32

EVAL_NOISE_SEED = 12345  # fixed, so every evaluation of a checkpoint sees the same dequantisation


def per_image_noise(indices: list[int], shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Dequantisation noise keyed by each image's index in the split: the same however the split is batched
    or sharded over ranks."""
    generators = [torch.Generator(device=device).manual_seed(derived_seed(seed, index)) for index in indices]
    draws = [torch.rand(shape, generator=generator, device=device) for generator in generators]
    return torch.stack(draws)


def importance_weighted_bpd(bpd: torch.Tensor, n_dims: int) -> torch.Tensor:
    """(S, N) single-draw bounds in bits/dim -> (N,) the importance-weighted bound over the S draws.

    Each draw's bpd is -log w_s / (D ln 2) up to a constant, with w_s = p(x + u_s) / q(u_s | x), so
    -log mean_s w_s (Burda et al.'s bound, tighter as S grows) is computed from them directly.
    """
    log_weights = -bpd * (n_dims * math.log(2.0))
    log_mean = torch.logsumexp(log_weights, 0) - math.log(bpd.shape[0])
    return -log_mean / (n_dims * math.log(2.0))


def _mean_and_stderr(total: float, total_sq: float, n: int) -> tuple[float, float | None]:
    """The mean and its standard error; None for one image, which has no spread to estimate one from."""
    mean = total / n
    if n < 2:
        return mean, None
    variance = max(0.0, total_sq / n - mean**2) if math.isfinite(mean) else math.nan  # max() would hide a NaN
    return mean, math.sqrt(variance / (n - 1))


def mean_text(mean: float, stderr: float | None) -> str:
    """'2.3456 ± 0.0012', or '2.3456 (one image, no error bar)' where there is no standard error."""
    return f"{mean:.4f} ± {stderr:.4f}" if stderr is not None else f"{mean:.4f} (one image, no error bar)"


@torch.inference_mode()
@full_float32()  # bits/dim must not depend on the GPU generation (precision.py)
def evaluate(model: Glow | Objective, dataset, cfg: Config, device: torch.device, seed: int = EVAL_NOISE_SEED,
             ctx: Context | None = None, n_dequant: int = 1, progress: bool = False) -> dict:
    """bits/dim over the whole split (mean of per-image bpd), and the mean over its images of every other term
    the objective reports (class_ce and accuracy for class-conditional models; ObjectiveOutput).

    With `n_dequant` S > 1, each image gets S dequantisation draws (seeds seed .. seed + S - 1): `bpd` is
    then the single-draw bound averaged over them, and `bpd_iw` the importance-weighted bound; the other
    terms are the first draw's. Under torchrun each rank scores its share and the sums are all-reduced.
    `progress`: a bar on stderr (this rank's images), gone when done."""
    ctx = ctx or Context(device=device)
    objective = model if isinstance(model, Objective) else Objective(model, cfg.data.n_bits)
    was_training = objective.training
    objective.eval()
    wide = widest_float(device)
    sums = torch.zeros(5, dtype=wide, device=device)  # bpd, bpd^2, images, iw bpd, iw bpd^2
    term_sums: dict[str, torch.Tensor] = {}  # every other term, summed over the images
    mine = list(range(ctx.rank, len(dataset), ctx.world_size))
    batch_size = cfg.train.eval_batch_size
    batches = make_eval_batches(dataset, batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                n_workers=cfg.data.n_workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=len(mine), desc="evaluating", unit="img", leave=False, file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    for start, (images, labels) in zip(range(0, len(mine), batch_size), batches):
        bar.update(len(images))
        # From pinned memory, queued: a blocking copy would wait for the batch before.
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        draws = []
        for draw in range(n_dequant):
            noise = per_image_noise(mine[start : start + len(images)], tuple(images.shape[1:]), seed + draw, device)
            terms = objective(images, labels, noise).terms
            draws.append(terms["bpd"].to(wide))
            if draw == 0:
                _add_terms(term_sums, terms, len(images), wide)
        bpd, iw = torch.stack(draws).mean(0), importance_weighted_bpd(torch.stack(draws), objective.model.n_dims)
        count = torch.full((), len(images), dtype=wide, device=device)  # new_tensor would copy from host memory
        sums += torch.stack([bpd.sum(), (bpd**2).sum(), count, iw.sum(), (iw**2).sum()])
    bar.close()
    objective.train(was_training)
    return _split_means(sums, term_sums, n_dequant, ctx)


def _add_terms(term_sums: dict[str, torch.Tensor], terms: dict[str, torch.Tensor], n_images: int,
               wide: torch.dtype) -> None:
    """Add a batch's terms other than bpd to their sums over images; a batch's mean () counts for each image."""
    for name, value in terms.items():
        if name != "bpd":
            total = value.to(wide).expand(n_images).sum()
            term_sums[name] = term_sums[name] + total if name in term_sums else total


def _split_means(sums: torch.Tensor, term_sums: dict[str, torch.Tensor], n_dequant: int, ctx: Context) -> dict:
    """The per-rank sums, all-reduced, as means (and standard errors for the bits/dim)."""
    names = ctx.share(list(term_sums), group=ctx.host_group)  # rank 0's: a rank may have no images of its own
    own = [term_sums.get(name, sums.new_zeros(())).reshape(1) for name in names]
    totals = ctx.sum_(torch.cat([sums, *own])).tolist()
    (total_bpd, total_sq, n_images, total_iw, total_iw_sq), term_totals = totals[:5], totals[5:]
    n_images = int(n_images)
    mean, stderr = _mean_and_stderr(total_bpd, total_sq, n_images)
    result = {"bpd": mean, "bpd_stderr": stderr, "n_images": n_images}
    if n_dequant > 1:
        result["bpd_iw"], result["bpd_iw_stderr"] = _mean_and_stderr(total_iw, total_iw_sq, n_images)
    result.update({name: total / n_images for name, total in zip(names, term_totals)})
    return result
