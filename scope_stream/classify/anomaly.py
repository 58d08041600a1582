"""Anomaly scores computed from per-class denoising scores (lower score = class explains the cell better).

* :func:`relative_score` -- CytoDiffusion's: how clearly the best class beats the others. With the
  class scores sorted ``e_1 <= e_2 <= ...`` and ``k = min(10, C - 1)``, it is the mean gap
  ``mean_j (e_j - e_1)`` over the next k classes minus the mean pairwise gap among those k classes.
  A cell that no class explains better than the rest scores low (so *lower* = more anomalous).
* :func:`absolute_score` -- how poorly even the best class explains the cell: the best score
  z-normalised with that class's mean and spread on calibration cells (*higher* = more anomalous).
* :func:`top2_gap` -- how far the runner-up class trails the best one, relative to the best
  score (*lower* = more anomalous): the plain two-class form of the relative score.
* the feature distance of :mod:`.features` -- how unlike the training cells the cell looks to the
  UNet (*higher* = more anomalous).
* the paired gap of :mod:`.features` (``probe_gap``) -- the top-2 gap again, measured at the probe's
  timesteps with the same noises for both classes (*lower* = more anomalous).

:class:`AnomalyCalibration` turns each into a calibrated anomaly score in [0, 1]: the fraction
of calibration (normal) cells that look *less* anomalous, so a threshold of 0.95 flags about 5% of
normal cells. Its :meth:`AnomalyCalibration.combined_anomaly` joins the calibrated scores named
in ``combine`` with Fisher's method (a calibrated score ``a`` is one minus a p-value under normal
cells, so ``-sum(log(1 - a))`` is Fisher's statistic) and calibrates the statistic the same way:
that is the score flags use when the calibration has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["COMPONENTS", "AnomalyCalibration", "absolute_score", "relative_score", "top2_gap"]

#: the scores :meth:`AnomalyCalibration.combined_anomaly` can combine
COMPONENTS = ("relative", "gap", "feature", "probe_gap")


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


def top2_gap(scores: np.ndarray) -> np.ndarray:
    """``(e_2 - e_1) / e_1`` per cell (N,): how far the runner-up trails the best class (high = confident)."""
    s = np.sort(_check_scores(scores), axis=1)
    return np.asarray((s[:, 1] - s[:, 0]) / np.maximum(np.abs(s[:, 0]), 1e-12))


@dataclass
class AnomalyCalibration:
    """Reference distributions of the anomaly scores on normal calibration cells."""

    relative_ref: list[float]  # sorted relative scores of calibration cells
    abs_mean: list[float]  # per class
    abs_std: list[float]
    absolute_ref: list[float]  # sorted absolute scores of calibration cells
    k: int = 10
    gap_ref: list[float] = field(default_factory=list)  # sorted top-2 gaps of calibration cells
    feature_ref: list[float] = field(default_factory=list)  # sorted feature distances of calibration cells
    combine: list[str] = field(default_factory=list)  # components of the combined score (empty: relative)
    combined_ref: list[float] = field(default_factory=list)  # sorted combined values of calibration cells
    probe_gap_ref: list[float] = field(default_factory=list)  # sorted paired probe gaps of calibration cells

    @classmethod
    def fit(
        cls,
        scores: np.ndarray,
        labels: np.ndarray,
        k: int = 10,
        *,
        feature_distance: np.ndarray | None = None,
        combine: tuple[str, ...] = (),
        probe_gap: np.ndarray | None = None,
    ) -> AnomalyCalibration:
        """Fit on normal calibration cells: ``scores (N, C)``, true ``labels (N,)``; optionally their
        ``feature_distance (N,)``, ``probe_gap (N,)`` and the components the combined score joins."""
        s = _check_scores(scores)
        unknown = [c for c in combine if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown anomaly components {unknown}; choose from {list(COMPONENTS)}")
        if "feature" in combine and feature_distance is None:
            raise ValueError("combining the feature score needs the calibration cells' feature distances")
        if "probe_gap" in combine and probe_gap is None:
            raise ValueError("combining the probe gap needs the calibration cells' probe gaps (a runner-up probe)")
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
        out = cls(rel.tolist(), mean.tolist(), std.tolist(), ab.tolist(), k, np.sort(top2_gap(s)).tolist())
        for name, values in (("feature distances", feature_distance), ("probe gaps", probe_gap)):
            if values is None:
                continue
            v = np.asarray(values, dtype=np.float64)
            if v.shape != (len(s),) or not np.isfinite(v).all():
                raise ValueError(f"{name} must be {len(s)} finite values, got shape {v.shape}")
        if feature_distance is not None:
            out.feature_ref = np.sort(np.asarray(feature_distance, dtype=np.float64)).tolist()
        if probe_gap is not None:
            out.probe_gap_ref = np.sort(np.asarray(probe_gap, dtype=np.float64)).tolist()
        if combine:
            out.combine = list(combine)
            out.combined_ref = np.sort(out._fisher_statistic(s, feature_distance, probe_gap)).tolist()
        return out

    def relative_anomaly(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated relative anomaly in (0, 1): about the fraction of calibration cells more confident."""
        return 1.0 - _smooth_ecdf(np.asarray(self.relative_ref), relative_score(scores, self.k))

    def absolute_anomaly(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated absolute anomaly in (0, 1): about the fraction of calibration cells explained better."""
        ab = absolute_score(scores, np.asarray(self.abs_mean), np.asarray(self.abs_std))
        return _smooth_ecdf(np.asarray(self.absolute_ref), ab)

    def gap_anomaly(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated top-2 gap anomaly in (0, 1)."""
        if not self.gap_ref:
            raise ValueError("this calibration has no top-2 gap reference (recalibrate the model)")
        return 1.0 - _smooth_ecdf(np.asarray(self.gap_ref), top2_gap(scores))

    def feature_anomaly(self, distance: np.ndarray) -> np.ndarray:
        """Calibrated feature-distance anomaly in (0, 1)."""
        if not self.feature_ref:
            raise ValueError("this calibration has no feature-distance reference (calibrate with a feature bank)")
        return _smooth_ecdf(np.asarray(self.feature_ref), np.asarray(distance, dtype=np.float64))

    def probe_gap_anomaly(self, probe_gap: np.ndarray) -> np.ndarray:
        """Calibrated paired probe gap anomaly in (0, 1)."""
        if not self.probe_gap_ref:
            raise ValueError("this calibration has no probe-gap reference (calibrate with a runner-up probe)")
        return 1.0 - _smooth_ecdf(np.asarray(self.probe_gap_ref), np.asarray(probe_gap, dtype=np.float64))

    def _fisher_statistic(
        self, scores: np.ndarray, distance: np.ndarray | None, probe_gap: np.ndarray | None = None
    ) -> np.ndarray:
        parts = []
        for c in self.combine:
            if c == "relative":
                parts.append(self.relative_anomaly(scores))
            elif c == "gap":
                parts.append(self.gap_anomaly(scores))
            elif c == "probe_gap":
                if probe_gap is None:
                    raise ValueError("the combined anomaly score needs the probe gaps")
                parts.append(self.probe_gap_anomaly(probe_gap))
            else:
                if distance is None:
                    raise ValueError("the combined anomaly score needs feature distances")
                parts.append(self.feature_anomaly(distance))
        # Fisher's method: each calibrated score is 1 - (p-value under normal cells)
        return np.asarray(-np.log(np.clip(1.0 - np.asarray(parts), 1e-300, None)).sum(axis=0))

    def combined_anomaly(
        self, scores: np.ndarray, distance: np.ndarray | None = None, probe_gap: np.ndarray | None = None
    ) -> np.ndarray:
        """The flagging score in (0, 1): Fisher's combination of the calibrated ``combine`` components,
        calibrated again on the calibration cells (without ``combine``: the relative anomaly)."""
        if not self.combine:
            return self.relative_anomaly(scores)
        return _smooth_ecdf(np.asarray(self.combined_ref), self._fisher_statistic(scores, distance, probe_gap))


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
