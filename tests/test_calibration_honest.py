"""Honest calibration: the temperature is fitted on cells that did not choose the plan (and shifted copies),
a fit on the search bound is an error, and the flag thresholds a model ships are the ones the pipeline uses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scope_stream.classify.calibration import CalibrationError, fit_calibration, fit_temperature, softmax_neg
from scope_stream.config.classify import FALLBACK_ANOMALY_THRESHOLD, FlagConfig


def _scores(n: int, c: int, gap: float, wrong: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Errors-like scores: the true class lower by ``gap`` (noisy); ``wrong`` cells have another class lowest."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    s = 1.0 + 0.05 * rng.standard_normal((n, c))
    s[np.arange(n), y] -= gap
    for i in range(wrong):
        other = (y[i] + 1) % c
        s[i, other] = s[i, y[i]] - 0.02
    return s, y


def test_temperature_on_the_bound_is_an_error_when_strict() -> None:
    s, y = _scores(60, 4, gap=0.5, wrong=0)  # every cell right by a wide margin: no interior optimum
    t = fit_temperature(s, y)  # the lenient fit (used inside the greedy plan search) still returns
    assert t > 0
    with pytest.raises(CalibrationError, match="search bound"):
        fit_temperature(s, y, strict=True)


def test_temperature_is_interior_when_some_cells_are_wrong() -> None:
    s, y = _scores(200, 4, gap=0.05, wrong=20, seed=1)
    t = fit_temperature(s, y, strict=True)
    p = softmax_neg(s, t)
    conf = p.max(axis=1)
    assert 0.3 < float(conf.mean()) < 0.999  # neither uniform nor all-certain
    assert float(np.std(conf)) > 0.01  # the uncertainty spreads


def _grid(n: int, c: int, levels: int, seed: int, flip: float) -> tuple[np.ndarray, np.ndarray]:
    """A full (N, C, L) error tensor: the true class lower; ``flip`` of cells lower under another class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    e = 0.2 + 0.02 * rng.standard_normal((n, c, levels))
    e[np.arange(n), y, :] -= 0.03
    bad = rng.random(n) < flip
    e[bad, (y[bad] + 1) % c, :] -= 0.05
    return np.abs(e), y


def test_fit_calibration_keeps_temperature_cells_out_of_the_plan_and_uses_shifted_copies() -> None:
    e, y = _grid(120, 3, 6, seed=2, flip=0.0)
    ts, seeds = [50, 100, 200, 400, 600, 850], list(range(6))
    # on clean cells alone every cell is right: the honest fit must be refused, not land on the bound
    with pytest.raises(CalibrationError):
        fit_calibration(e, y, ts, seeds)
    tmask = np.zeros(len(y), dtype=bool)
    tmask[::2] = True
    shifted = _grid(80, 3, 6, seed=3, flip=0.25)
    cal = fit_calibration(e, y, ts, seeds, temperature_cells=tmask, shifted=shifted)
    info = cal.info
    assert info["n_plan_cells"] == 60 and info["n_temperature_cells"] == 60
    assert info["n_shifted_temperature_cells"] == 80
    assert "shifted" in info["temperature_fitted_on"]
    assert math.isfinite(cal.fast_temperature) and cal.fast_temperature > 0
    assert 0 < cal.uncertainty_threshold < 1  # not the degenerate 1e-51 of an on-bound temperature
    # the plan is the same as one fitted on the plan cells alone (temperature cells take no part in it)
    e_plan, y_plan = e[~tmask], y[~tmask]
    alone = fit_calibration(e_plan, y_plan, ts, seeds, temperature_cells=np.arange(60) < 1, shifted=shifted)
    assert alone.info["greedy_order"][:1] == info["greedy_order"][:1]


def test_fit_calibration_rejects_bad_masks_and_shapes() -> None:
    e, y = _grid(20, 3, 4, seed=4, flip=0.3)
    ts, seeds = [50, 100, 200, 400], [0, 1, 2, 3]
    with pytest.raises(ValueError, match="some, not all"):
        fit_calibration(e, y, ts, seeds, temperature_cells=np.ones(20, dtype=bool))
    with pytest.raises(ValueError, match="shifted errors"):
        fit_calibration(e, y, ts, seeds, temperature_cells=np.arange(20) < 10, shifted=(e[:, :2], y))


def test_flag_thresholds_come_from_the_model_unless_the_config_sets_them() -> None:
    model = {"anomaly_threshold": 0.9, "uncertainty_threshold": 0.35}
    cfg = FlagConfig()
    assert cfg.anomaly == FALLBACK_ANOMALY_THRESHOLD and cfg.uncertainty == 0.6  # unresolved: the fallbacks
    r = cfg.resolved(model)
    assert (r.anomaly_threshold, r.uncertainty_threshold) == (0.9, 0.35)
    own = FlagConfig(anomaly_threshold=0.8).resolved(model)
    assert (own.anomaly_threshold, own.uncertainty_threshold) == (0.8, 0.35)
    none = FlagConfig().resolved(None)
    assert (none.anomaly_threshold, none.uncertainty_threshold) == (FALLBACK_ANOMALY_THRESHOLD, 0.6)


def test_old_calibrations_ship_no_thresholds_new_ones_do(tmp_path: object) -> None:
    from pathlib import Path

    from scope_stream.classify.classifier import DiffusionClassifier
    from scope_stream.classify.testing import make_tiny_model

    model_dir = make_tiny_model(Path(str(tmp_path)), steps=40, feature_bank=False)
    clf = DiffusionClassifier.load(model_dir, device="cpu")
    assert clf.calibration is not None
    got = clf.flag_thresholds()
    assert got is not None and got["uncertainty_threshold"] == clf.calibration.uncertainty_threshold
    clf.calibration.info.pop("n_temperature_cells")  # as written before honest temperatures
    assert clf.flag_thresholds() is None
