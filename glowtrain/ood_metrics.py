"""Out-of-distribution metrics for two sets of scores (higher = more out-of-distribution), and the bootstrap
typicality test of a whole set (Nalisnick et al., "Detecting out-of-distribution inputs to deep generative
models using typicality", 2019). Pure numpy."""

from __future__ import annotations

import math

import numpy as np


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Area under the ROC curve with outliers as positives: P(outlier > inlier) + P(tie) / 2 (Mann-Whitney)."""
    inliers, outliers = np.asarray(inliers, float), np.asarray(outliers, float)
    ranks = _average_ranks(np.concatenate([inliers, outliers]))
    n_in, n_out = len(inliers), len(outliers)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


def average_precision(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Area under the precision-recall curve, higher scores detected first: the sum over distinct thresholds of
    (recall gained) x (precision there); tied scores enter together."""
    scores = np.concatenate([positives, negatives]).astype(float)
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_each_value = np.r_[np.nonzero(scores[1:] != scores[:-1])[0], len(scores) - 1]  # inf - inf is NaN
    true_pos = np.cumsum(labels)[last_of_each_value]
    detected = last_of_each_value + 1
    precision = true_pos / detected
    recall = true_pos / len(positives)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_out(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Average precision of finding the outliers (high scores first)."""
    return average_precision(np.asarray(outliers, float), np.asarray(inliers, float))


def aupr_in(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Average precision of finding the inliers (low scores first)."""
    return average_precision(-np.asarray(inliers, float), -np.asarray(outliers, float))


def fpr_at_tpr(inliers: np.ndarray, outliers: np.ndarray, tpr: float = 0.95) -> float:
    """Share of outliers accepted when images scoring <= t are accepted, t the smallest inlier score that
    accepts at least `tpr` of the inliers."""
    ordered = np.sort(np.asarray(inliers, float))
    threshold = ordered[max(0, math.ceil(tpr * len(ordered) - 1e-9) - 1)]
    return float(np.mean(np.asarray(outliers, float) <= threshold))


_METRICS = {"auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out, "fpr_at_95_tpr": fpr_at_tpr}
OOD_METRICS = tuple(_METRICS)


def ood_metrics(inliers: np.ndarray, outliers: np.ndarray) -> dict[str, float | None]:
    """AUROC, AUPR-in, AUPR-out and FPR at 95% TPR, with high scores meaning out-of-distribution; None where a
    score is NaN (a broken likelihood): sorted, a NaN ranks as the most out-of-distribution in both directions, so
    an image the model could not score would count as detected either way. An infinite score ranks as it is."""
    if np.isnan(inliers).any() or np.isnan(outliers).any():
        return dict.fromkeys(OOD_METRICS)
    return {name: metric(inliers, outliers) for name, metric in _METRICS.items()}


def typicality_test(batch: np.ndarray, reference: np.ndarray, n_bootstrap: int = 10_000, seed: int = 0,
                    chunk_elements: int = 10_000_000) -> dict[str, float]:
    """Is the batch's mean NLL as far from the reference's mean (the entropy estimate) as that of a random batch
    of the same size drawn with replacement from the reference? statistic = |mean(batch) - mean(reference)|,
    p = (1 + #bootstrap statistics >= it) / (1 + n_bootstrap). Draws are made in chunks to bound memory. A NaN in
    either set, or an infinite entropy, leaves the statistic and p None: no comparison with NaN is true (p would be
    the smallest), and draws holding the infinite value match any statistic (p near 1)."""
    batch, reference = np.asarray(batch, float), np.asarray(reference, float)
    entropy = float(reference.mean())
    statistic = abs(float(batch.mean()) - entropy)
    if not math.isfinite(entropy) or math.isnan(statistic):
        return {"statistic": None, "p_value": None, "n_images": len(batch), "n_bootstrap": n_bootstrap,
                "entropy_bpd": entropy if math.isfinite(entropy) else None}
    rng = np.random.default_rng(seed)
    rows = max(1, chunk_elements // len(batch))
    at_least = 0
    for start in range(0, n_bootstrap, rows):
        draws = reference[rng.integers(0, len(reference), size=(min(rows, n_bootstrap - start), len(batch)))]
        at_least += int(np.sum(np.abs(draws.mean(1) - entropy) >= statistic))
    return {"statistic": statistic, "p_value": (1 + at_least) / (1 + n_bootstrap), "n_images": len(batch),
            "n_bootstrap": n_bootstrap, "entropy_bpd": entropy}
