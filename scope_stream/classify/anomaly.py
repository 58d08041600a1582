"""Anomaly scores computed from per-class denoising scores (lower score = class explains the cell better).

* :func:`relative_score` -- CytoDiffusion's: how clearly the best class beats the others. With the
  class scores sorted ``e_1 <= e_2 <= ...`` and ``k = min(10, C - 1)``, it is the mean gap
  ``mean_j (e_j - e_1)`` over the next k classes minus the mean pairwise gap among those k classes.
  A cell that no class explains better than the rest scores low (so *lower* = more anomalous).
* :func:`absolute_score` -- how poorly even the best class explains the cell: the best score
  z-normalised with that class's mean and spread on calibration cells (*higher* = more anomalous).

:class:`AnomalyCalibration` turns either into a calibrated anomaly score in [0, 1]: the fraction
of calibration (normal) cells that look *less* anomalous, so a threshold of 0.95 flags about 5% of
normal cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AnomalyCalibration", "absolute_score", "relative_score"]


def _check_scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"class scores must be (N, C) with C >= 2, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("class scores contain NaN")
    return s


def relative_score(scores: np.ndarray, k: int = 10) -> np.ndarray:
    """CytoDiffusion's relative confidence per cell (N,): high = one class clearly best."""
    s = np.sort(_check_scores(scores), axis=1)
    kk = min(k, s.shape[1] - 1)
    nxt = s[:, 1 : kk + 1]
    gap = (nxt - s[:, :1]).mean(axis=1)
    if kk >= 2:
        diffs = np.abs(nxt[:, :, None] - nxt[:, None, :])
        iu = np.triu_indices(kk, 1)
        pair = diffs[:, iu[0], iu[1]].mean(axis=1)
    else:
        pair = np.zeros(len(s))
    return np.asarray(gap - pair)


def absolute_score(scores: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Best class's score, z-normalised per class with calibration ``mean``/``std`` (C,)."""
    s = _check_scores(scores)
    best = s.argmin(axis=1)
    return np.asarray((s[np.arange(len(s)), best] - mean[best]) / np.maximum(std[best], 1e-12))


@dataclass
class AnomalyCalibration:
    """Reference distributions of both scores on normal calibration cells."""

    relative_ref: list[float]  # sorted relative scores of calibration cells
    abs_mean: list[float]  # per class
    abs_std: list[float]
    absolute_ref: list[float]  # sorted absolute scores of calibration cells
    k: int = 10

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray, k: int = 10) -> AnomalyCalibration:
        s = _check_scores(scores)
        c = s.shape[1]
        mean = np.zeros(c)
        std = np.ones(c)
        for j in range(c):
            own = s[labels == j, j]
            if len(own) >= 2:
                mean[j], std[j] = float(own.mean()), float(own.std(ddof=1)) or 1.0
            elif len(own) == 1:
                mean[j] = float(own[0])
        rel = np.sort(relative_score(s, k))
        ab = np.sort(absolute_score(s, mean, std))
        return cls(rel.tolist(), mean.tolist(), std.tolist(), ab.tolist(), k)

    def relative_anomaly(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated relative anomaly in (0, 1): about the fraction of calibration cells more confident."""
        return 1.0 - _smooth_ecdf(np.asarray(self.relative_ref), relative_score(scores, self.k))

    def absolute_anomaly(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated absolute anomaly in (0, 1): about the fraction of calibration cells explained better."""
        ab = absolute_score(scores, np.asarray(self.abs_mean), np.asarray(self.abs_std))
        return _smooth_ecdf(np.asarray(self.absolute_ref), ab)


def _smooth_ecdf(ref: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A strictly increasing empirical CDF in (0, 1): linear between the sorted reference points at
    (i + 0.5) / n, with exponential tails beyond them (so cells outside the calibration range still rank)."""
    n = len(ref)
    if n == 0:
        return np.full(len(x), 0.5)
    pos = (np.arange(n) + 0.5) / n
    scale = float(np.std(ref)) or 1.0
    out = np.interp(x, ref, pos) if n > 1 else np.full(len(x), 0.5)
    lo, hi = x < ref[0], x > ref[-1]
    out[lo] = pos[0] * np.exp((x[lo] - ref[0]) / scale)
    out[hi] = 1.0 - (1.0 - pos[-1]) * np.exp(-(x[hi] - ref[-1]) / scale)
    return np.asarray(out)
