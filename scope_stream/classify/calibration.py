"""Calibration on held-out cells: temperature, the fast procedure's plan, anomaly reference, flag thresholds.

Everything is fitted from one error tensor ``E (N, C, L)``: every calibration cell x class x
candidate (timestep, noise) pair. The fast procedure only ever evaluates pairs of that grid with
the same noises, so its behaviour on the calibration cells can be replayed exactly from ``E``
(:func:`simulate_fast`), which is how its levels, pruning threshold and temperature are chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .anomaly import AnomalyCalibration
from .features import FEATURE_BANK, FeatureProbe
from .procedures import FastPlan, paired_prune_scores

__all__ = [
    "CANDIDATE_TIMESTEPS",
    "Calibration",
    "CalibrationError",
    "fit_calibration",
    "fit_temperature",
    "simulate_fast",
    "softmax_neg",
]

#: candidate timesteps (of 1,000) for the fast plan; class separation lives at low and middle t
CANDIDATE_TIMESTEPS: tuple[int, ...] = (20, 50, 100, 150, 200, 300, 400, 500, 650, 850)


def softmax_neg(scores: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(-temperature * scores)`` row-wise, numerically stable."""
    z = -temperature * np.asarray(scores, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _nll(scores: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax_neg(scores, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None))))


class CalibrationError(ValueError):
    """A calibration that cannot be trusted (e.g. a temperature fitted on the search bound)."""


def fit_temperature(scores: np.ndarray, labels: np.ndarray, *, strict: bool = False) -> float:
    """The temperature minimising the negative log-likelihood of the true labels (log-space search).

    ``strict``: a minimum on (within 1% of the log-range of) either search bound is an error, not a
    result: it means the likelihood has no interior optimum, typically because every cell it was
    fitted on is classified right with a wide margin (the cells chose the plan, or trained the model),
    and the "calibrated" probabilities would all be 0 or 1.
    """
    from scipy.optimize import minimize_scalar

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    ok = y >= 0
    if ok.sum() < 2:
        raise ValueError("fitting a temperature needs at least two labelled cells")
    s, y = s[ok], y[ok]
    spread = float(np.median(np.abs(s - s.mean(axis=1, keepdims=True)))) or 1.0
    lo, hi = math.log(1e-3 / spread), math.log(1e3 / spread)
    res = minimize_scalar(lambda lt: _nll(s, y, math.exp(lt)), bounds=(lo, hi), method="bounded")
    # no interior optimum: the minimum sits on a bound, or the likelihood is as good at the upper bound
    # (a plateau where every probability has rounded to 1); checked only when asked (the plan search fits
    # hundreds of temperatures and wants none of this)
    if strict and (
        min(res.x - lo, hi - res.x) < 0.01 * (hi - lo) or _nll(s, y, math.exp(hi)) <= float(res.fun) + 1e-12
    ):
        wrong = int((s.argmin(axis=1) != y).sum())
        raise CalibrationError(
            f"the temperature fit ended on its search bound ({math.exp(res.x):.3g}; range "
            f"{math.exp(lo):.3g}..{math.exp(hi):.3g}) on {len(y)} cells of which {wrong} are misclassified: "
            "the likelihood has no interior optimum. Calibrate on cells that neither trained the model nor "
            "chose the plan, with enough of them (and shifted copies) that some are called wrong"
        )
    return float(math.exp(res.x))


def simulate_fast(
    errors: np.ndarray, plan_idx: list[int], weights: np.ndarray, prune_after: int, prune_delta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Replay the fast procedure on a full error tensor: (scores (N, C), evaluations (N,))."""
    e = errors[:, :, plan_idx]
    w = weights[plan_idx]
    n, c, k = e.shape
    k1 = prune_after
    acc = (e[:, :, :k1] * w[:k1]).sum(axis=2)
    wsum = np.full((n, c), w[:k1].sum())
    evals = np.full(n, c * k1)
    s1 = acc / wsum
    alive = np.zeros((n, c), dtype=bool)
    if k1 < k:
        alive = s1 - s1.min(axis=1, keepdims=True) <= prune_delta
        alive &= alive.sum(axis=1, keepdims=True) > 1
        acc = acc + alive * (e[:, :, k1:] * w[k1:]).sum(axis=2)
        wsum = wsum + alive * w[k1:].sum()
        evals = evals + alive.sum(axis=1) * (k - k1)
    return paired_prune_scores(acc / wsum, s1, alive), evals


def _balanced_acc(scores: np.ndarray, labels: np.ndarray) -> float:
    pred = scores.argmin(axis=1)
    return float(np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)]))


@dataclass
class Calibration:
    """What ``calibration.json`` holds (see :meth:`to_json`)."""

    fast_plan: FastPlan
    fast_temperature: float
    fast_anomaly: AnomalyCalibration
    reference_temperature: float
    reference_anomaly: AnomalyCalibration
    anomaly_threshold: float
    uncertainty_threshold: float
    info: dict[str, Any]
    centre_sigma: float = 0.0  # error weighting the whole calibration was fitted with (see Denoiser)
    feature_probe: FeatureProbe | None = None  # set when the model directory holds a feature bank

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": "scope-stream-calibration/1",
            "fast": {
                "plan": self.fast_plan.to_json(),
                "temperature": self.fast_temperature,
                "anomaly": self.fast_anomaly.__dict__,
            },
            "reference": {"temperature": self.reference_temperature, "anomaly": self.reference_anomaly.__dict__},
            "flags": {"anomaly_threshold": self.anomaly_threshold, "uncertainty_threshold": self.uncertainty_threshold},
            "error_weighting": {"kind": "centre_gaussian", "sigma_frac": self.centre_sigma},
            "info": self.info,
        }
        if self.feature_probe is not None:
            out["features"] = {"probe": self.feature_probe.to_json(), "bank": FEATURE_BANK}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            fast_plan=FastPlan.from_json(d["fast"]["plan"]),
            fast_temperature=float(d["fast"]["temperature"]),
            fast_anomaly=AnomalyCalibration(**d["fast"]["anomaly"]),
            reference_temperature=float(d["reference"]["temperature"]),
            reference_anomaly=AnomalyCalibration(**d["reference"]["anomaly"]),
            anomaly_threshold=float(d["flags"]["anomaly_threshold"]),
            uncertainty_threshold=float(d["flags"]["uncertainty_threshold"]),
            info=dict(d.get("info", {})),
            # files written before error weighting existed were fitted with the plain mean
            centre_sigma=float(d.get("error_weighting", {}).get("sigma_frac", 0.0)),
            feature_probe=FeatureProbe.from_json(d["features"]["probe"]) if "features" in d else None,
        )


def _uncertainty(p: np.ndarray) -> np.ndarray:
    c = p.shape[1]
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return np.asarray(np.clip(h / math.log(c), 0, 1))


def fit_calibration(
    errors: np.ndarray,
    labels: np.ndarray,
    timesteps: list[int],
    noise_seeds: list[int],
    *,
    num_train_timesteps: int = 1000,
    max_levels: int = 12,
    tolerance: float = 0.005,
    false_flag_rate: float = 0.05,
    uncertain_flag_rate: float | None = None,
    info: dict[str, Any] | None = None,
    centre_sigma: float = 0.0,
    temperature_cells: np.ndarray | None = None,
    shifted: tuple[np.ndarray, np.ndarray] | None = None,
) -> Calibration:
    """Fit everything from ``errors (N, C, L)`` over candidate pairs (``timesteps[l]``, ``noise_seeds[l]``).

    ``centre_sigma`` is only recorded: the error weighting ``errors`` were collected with.

    Honest temperatures: ``temperature_cells`` (a boolean mask over the N cells) keeps those cells out
    of choosing the plan (steps 1-3) and fits the temperatures and the uncertainty threshold on them
    alone, together with ``shifted`` = (errors, labels) of shifted copies of cells (another microscope
    simulated), so that the probabilities are calibrated for cells the plan never saw and for other
    labs' cells. Without it, everything is fitted on all cells, as before. Either way a temperature on
    its search bound raises :class:`CalibrationError`.

    1. Per-level weights ``1 / mean error`` (each level contributes on the same scale).
    2. Greedy forward selection of levels minimising the tempered NLL; the plan keeps the shortest
       prefix whose balanced accuracy is within ``tolerance`` of the best prefix's.
    3. ``prune_after``/``prune_delta``: the cheapest stage-1 length whose gap threshold (1.25 x the
       largest true-class gap among cells the full plan gets right) keeps every such cell's class.
    4. Temperatures for the fast and (approximately, from the grid weighted to a uniform density
       in t) the reference scores; anomaly reference distributions; thresholds at
       ``false_flag_rate`` of calibration cells (the uncertainty threshold at ``uncertain_flag_rate`` of the
       temperature cells, when given).
    """
    unc_rate = false_flag_rate if uncertain_flag_rate is None else uncertain_flag_rate
    e_all = np.asarray(errors, dtype=np.float64)
    y_all = np.asarray(labels)
    if e_all.ndim != 3 or len(y_all) != e_all.shape[0]:
        raise ValueError("errors must be (N, C, L) with one label per cell")
    if len(timesteps) != e_all.shape[2] or len(noise_seeds) != e_all.shape[2]:
        raise ValueError("errors, labels, timesteps and noise_seeds do not match")
    if temperature_cells is None:
        tmask = np.zeros(len(y_all), dtype=bool)
    else:
        tmask = np.asarray(temperature_cells, dtype=bool)
        if tmask.shape != y_all.shape or tmask.all() or not tmask.any():
            raise ValueError("temperature_cells must mark some, not all, of the cells")
    e, y = e_all[~tmask], y_all[~tmask]
    e_t, y_t = (e_all[tmask], y_all[tmask]) if tmask.any() else (e, y)
    if shifted is not None:
        se, sy = np.asarray(shifted[0], dtype=np.float64), np.asarray(shifted[1])
        if se.ndim != 3 or se.shape[1:] != e_all.shape[1:] or len(sy) != len(se):
            raise ValueError(f"shifted errors {se.shape} do not match the calibration errors {e_all.shape}")
        e_t, y_t = np.concatenate([e_t, se]), np.concatenate([y_t, sy])
    n, c, n_levels = e.shape
    w = 1.0 / e.mean(axis=(0, 1))
    chosen: list[int] = []
    curve: list[float] = []
    for _ in range(min(max_levels, n_levels)):
        best, best_v = -1, math.inf
        for j in range(n_levels):
            if j in chosen:
                continue
            idx = [*chosen, j]
            s = (e[:, :, idx] * w[idx]).sum(axis=2) / w[idx].sum()
            v = _nll(s, y, fit_temperature(s, y))
            if v < best_v:
                best, best_v = j, v
        chosen.append(best)
        s = (e[:, :, chosen] * w[chosen]).sum(axis=2) / w[chosen].sum()
        curve.append(_balanced_acc(s, y))
    top = max(curve)
    k = next(i + 1 for i, a in enumerate(curve) if a >= top - tolerance)
    plan_idx = chosen[:k]
    full, _ = simulate_fast(e, plan_idx, w, k, math.inf)
    right = full.argmin(axis=1) == y
    best_plan: tuple[float, int, float] = (float(c * k), k, math.inf)
    for k1 in range(1, k):
        s1 = (e[:, :, plan_idx[:k1]] * w[plan_idx[:k1]]).sum(axis=2) / w[plan_idx[:k1]].sum()
        gap = s1[np.arange(n), y] - s1.min(axis=1)
        delta = 1.25 * float(gap[right].max()) if right.any() else math.inf
        _, ev = simulate_fast(e, plan_idx, w, k1, delta)
        if ev.mean() < best_plan[0]:
            best_plan = (float(ev.mean()), k1, delta)
    _, k1, delta = best_plan
    plan = FastPlan(
        [int(timesteps[i]) for i in plan_idx],
        [int(noise_seeds[i]) for i in plan_idx],
        [float(w[i]) for i in plan_idx],
        prune_after=k1,
        prune_delta=delta,
    )
    fast_s, fast_ev = simulate_fast(e, plan_idx, w, k1, delta)
    fast_t, _ = simulate_fast(e_t, plan_idx, w, k1, delta)
    t_fast = fit_temperature(fast_t, y_t, strict=True)
    # reference: unweighted mean error under a uniform density of t (grid points weighted by their span)
    ts = np.asarray(timesteps, dtype=np.float64)
    order = np.argsort(ts)
    edges = np.concatenate([[0.0], (ts[order][1:] + ts[order][:-1]) / 2, [num_train_timesteps - 1.0]])
    span = np.empty(n_levels)
    span[order] = np.diff(edges)
    ref_s = (e * span).sum(axis=2) / span.sum()
    t_ref = fit_temperature((e_t * span).sum(axis=2) / span.sum(), y_t, strict=True)
    # anomaly references: every clean held-out cell (shifted copies are not the "normal" to compare with)
    clean_fast, _ = simulate_fast(e_all, plan_idx, w, k1, delta)
    fast_anom = AnomalyCalibration.fit(clean_fast, y_all)
    ref_anom = AnomalyCalibration.fit((e_all * span).sum(axis=2) / span.sum(), y_all)
    unc = _uncertainty(softmax_neg(fast_t, t_fast))
    meta = dict(info or {})
    meta.update(
        {
            "n_cells": int(n),
            "candidate_timesteps": [int(t) for t in timesteps],
            "candidate_noise_seeds": [int(s) for s in noise_seeds],
            "greedy_order": [int(timesteps[i]) for i in chosen],
            "greedy_balanced_accuracy": curve,
            "fast_balanced_accuracy_on_calibration": _balanced_acc(fast_s, y),
            "fast_mean_evaluations_on_calibration": float(fast_ev.mean()),
            "reference_grid_balanced_accuracy_on_calibration": _balanced_acc(ref_s, y),
            "false_flag_rate": false_flag_rate,
            "uncertain_flag_rate": unc_rate,
            "n_plan_cells": len(y),
            "n_temperature_cells": int(tmask.sum()) if tmask.any() else len(y),
            "n_shifted_temperature_cells": len(shifted[1]) if shifted is not None else 0,
            "fast_balanced_accuracy_on_temperature_cells": _balanced_acc(fast_t, y_t),
            "temperature_fitted_on": (
                "held-out cells that did not choose the plan" + (" and shifted copies" if shifted is not None else "")
                if tmask.any()
                else "the cells that chose the plan"
            ),
        }
    )
    return Calibration(
        plan,
        t_fast,
        fast_anom,
        t_ref,
        ref_anom,
        anomaly_threshold=1.0 - false_flag_rate,
        uncertainty_threshold=float(np.quantile(unc, 1.0 - unc_rate)),
        info=meta,
        centre_sigma=centre_sigma,
    )
