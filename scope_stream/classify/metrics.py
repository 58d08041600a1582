"""Classification metrics: accuracy, balanced accuracy, macro-F1, confusion matrix, ECE, AUROC."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "auroc",
    "balanced_accuracy",
    "confusion_matrix",
    "expected_calibration_error",
    "macro_f1",
    "reliability_diagram",
]


def _labels(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true and y_pred must be equally long 1-D arrays, got {t.shape} and {p.shape}")
    if len(t) == 0:
        raise ValueError("no samples")
    return t, p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = truth; labels outside 0..n-1 are ignored."""
    t, p = _labels(y_true, y_pred)
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    ok = (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_classes)
    np.add.at(m, (t[ok], p[ok]), 1)
    return m


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    t, p = _labels(y_true, y_pred)
    recalls = [float(np.mean(p[t == c] == c)) for c in np.unique(t)]
    return float(np.mean(recalls))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in ``y_true``."""
    t, p = _labels(y_true, y_pred)
    f1s = []
    for c in np.unique(t):
        tp = float(np.sum((p == c) & (t == c)))
        fp = float(np.sum((p == c) & (t != c)))
        fn = float(np.sum((p != c) & (t == c)))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|."""
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    if conf.shape != corr.shape or conf.ndim != 1 or len(conf) == 0:
        raise ValueError("confidence and correct must be equally long, non-empty 1-D arrays")
    if np.isnan(conf).any() or (conf < 0).any() or (conf > 1).any():
        raise ValueError("confidence must lie in [0, 1] and not be NaN")
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(corr[m].mean() - conf[m].mean())
    return float(ece)


def auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve (ties count half): P(score of a positive > score of a negative).

    ``weights`` (one per cell, >= 0): each positive-negative pair counts with the product of its two
    weights, as if each cell were repeated that often; use it to re-mix classes among the positives.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive).astype(bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and positive must be equally long 1-D arrays")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs positives and negatives, got {n_pos} and {n_neg}")
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    return _weighted_auroc(s, y, w)


def _weighted_auroc(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    if w.shape != s.shape or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"AUROC weights must be {len(s)} finite values >= 0, got shape {w.shape}")
    wp, wn = w[y], w[~y]
    if wp.sum() <= 0 or wn.sum() <= 0:
        raise ValueError("AUROC weights must give the positives and the negatives some weight")
    order = np.argsort(s[~y], kind="stable")
    neg = s[~y][order]
    cum = np.concatenate([[0.0], np.cumsum(wn[order])])
    lo = np.searchsorted(neg, s[y], side="left")
    hi = np.searchsorted(neg, s[y], side="right")
    below = cum[lo] + (cum[hi] - cum[lo]) / 2  # weight of negatives scored lower, ties half
    return float(np.sum(wp * below) / (wp.sum() * wn.sum()))


def reliability_diagram(
    confidence: np.ndarray, correct: np.ndarray, path: Path, n_bins: int = 15, title: str = ""
) -> Path:
    """Write a reliability-diagram PNG (accuracy vs confidence per bin, with the bin counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    centers = (np.arange(n_bins) + 0.5) / n_bins
    acc = np.array([corr[bins == b].mean() if (bins == b).any() else np.nan for b in range(n_bins)])
    cnt = np.array([(bins == b).sum() for b in range(n_bins)])
    ece = expected_calibration_error(conf, corr, n_bins)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(4.5, 5.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(centers, np.nan_to_num(acc), width=1 / n_bins, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} ECE={ece:.3f}".strip())
    ax.legend(loc="upper left")
    ax2.bar(centers, cnt, width=1 / n_bins, edgecolor="k")
    ax2.set_yscale("log")
    ax2.set_xlabel("confidence (top-class probability)")
    ax2.set_ylabel("cells")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confident_error_rate(confidence: np.ndarray, correct: np.ndarray, threshold: float = 0.95) -> float:
    """Share of all cells called with confidence >= ``threshold`` and wrong (the errors no one reviews)."""
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct).astype(bool)
    if conf.shape != corr.shape or conf.ndim != 1 or len(conf) == 0:
        raise ValueError(
            f"confidence and correct must be equally long, non-empty 1-D arrays, got {conf.shape} and {corr.shape}"
        )
    if np.isnan(conf).any():
        raise ValueError("confidence contains NaN")
    return float(np.mean((conf >= threshold) & ~corr))
