"""The feature-distance anomaly score and the combined flagging score (tiny real model, hand-made arrays)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scope_stream.classify.anomaly import AnomalyCalibration, top2_gap  # noqa: E402
from scope_stream.classify.classifier import DiffusionClassifier  # noqa: E402
from scope_stream.classify.evaluate import calibrate, holdout_set, training_set  # noqa: E402
from scope_stream.classify.features import FEATURE_BANK, FeatureBank, FeatureProbe  # noqa: E402
from scope_stream.classify.testing import make_tiny_model, toy_crops  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tinyfeat"), steps=120)


def _clusters(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    y = np.arange(n) % 2
    return centres[y] + rng.normal(0, 0.3, (n, 4)), y


def test_feature_bank_scores_a_cell_unlike_the_bank_higher_and_round_trips(tmp_path: Path) -> None:
    x, y = _clusters(60)
    bank = FeatureBank.fit(x, y, FeatureProbe(k=3))
    near = bank.distance(_clusters(4, seed=1)[0])
    far = bank.distance(np.array([[0.0, 0.0, 5.0, 5.0]]))
    assert far[0] > near.max()
    path = bank.save(tmp_path / FEATURE_BANK)
    again = FeatureBank.load(path, FeatureProbe(k=3))
    assert np.allclose(again.distance(x[:5]), bank.distance(x[:5]), atol=2e-3)  # float16 storage


def test_feature_bank_and_probe_errors() -> None:
    x, y = _clusters(10)
    bank = FeatureBank.fit(x, y, FeatureProbe(k=3))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        bank.distance(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        FeatureBank.fit(np.full((3, 4), np.nan), np.zeros(3), FeatureProbe(k=1))
    with pytest.raises(ValueError, match="only 10 cells"):
        FeatureBank.fit(x, y, FeatureProbe(k=11))
    with pytest.raises(ValueError, match="layer"):
        FeatureProbe(layer="middle")
    with pytest.raises(ValueError, match="equally long"):
        FeatureProbe(timesteps=[400, 300], noise_seeds=[1])


def _normal_cells(n: int, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    """Class scores of ``n`` normal cells: class 0 clearly best, top-2 gaps between 0.5 and 1."""
    rng = np.random.default_rng(seed)
    return rng, np.c_[np.full(n, 1.0), 1.5 + rng.uniform(0, 0.5, n), 2.0 + rng.uniform(0, 0.5, n)]


def test_combined_anomaly_is_calibrated_on_normal_cells_and_ranks_the_odd_cell_first() -> None:
    n = 200
    rng, scores = _normal_cells(n, 0)
    dist = rng.uniform(0.1, 0.3, n)  # normal cells' feature distances are small
    cal = AnomalyCalibration.fit(scores, np.zeros(n, dtype=int), feature_distance=dist, combine=("gap", "feature"))
    assert top2_gap(np.array([[1.0, 1.5, 3.0]]))[0] == pytest.approx(0.5)
    on_normal = cal.combined_anomaly(scores, dist)
    assert 0.03 < float(np.mean(on_normal >= 0.95)) < 0.08  # a 0.95 threshold flags about 5% of normal cells
    odd_scores = np.array([[1.0, 1.5, 2.2], [1.0, 1.02, 2.2], [1.0, 1.02, 2.2]])
    odd_dist = np.array([0.9, 0.2, 0.9])  # looks odd; explained ambiguously; both
    comb = cal.combined_anomaly(odd_scores, odd_dist)
    assert comb[2] > max(comb[0], comb[1]) and comb[2] > 0.99
    with pytest.raises(ValueError, match="feature distances"):
        cal.combined_anomaly(odd_scores)
    with pytest.raises(ValueError, match="unknown anomaly components"):
        AnomalyCalibration.fit(scores, np.zeros(n, dtype=int), combine=("vibes",))
    # a calibration written before the combined score existed still loads and flags on the relative score
    old = {k: v for k, v in cal.__dict__.items() if k in ("relative_ref", "abs_mean", "abs_std", "absolute_ref", "k")}
    legacy = AnomalyCalibration(**old)
    assert np.allclose(legacy.combined_anomaly(odd_scores), legacy.relative_anomaly(odd_scores))


def test_calibrating_with_a_feature_bank_makes_score_use_it(tiny: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    run = tiny.parent
    clf = DiffusionClassifier.load(model, device="cpu")
    bank_cells = training_set(run, clf.image_size, clf.classes, limit_per_class=12)
    assert not {str(p) for p in bank_cells.paths} & {str(p) for p in holdout_set(run, clf.image_size).paths}
    probe = FeatureProbe(layer="up0", timesteps=[300, 300], noise_seeds=[1, 2], k=3)
    calibrate(
        clf,
        holdout_set(run, clf.image_size),
        timesteps=(50, 150, 300),
        noises_per_timestep=1,
        bank_cells=bank_cells,
        probe=probe,
        combine=("gap", "relative", "feature"),
    )
    assert (model / FEATURE_BANK).is_file()
    saved = json.loads((model / "calibration.json").read_text())
    assert saved["features"]["probe"]["timesteps"] == [300, 300]
    assert saved["fast"]["anomaly"]["combine"] == ["gap", "relative", "feature"]

    again = DiffusionClassifier.load(model, device="cpu")
    assert again.feature_bank is not None and len(again.feature_bank.bank) == 24
    x, _ = toy_crops(6, 2, clf.image_size, seed=5)
    s = again.score(x)
    assert s.anomaly_feature is not None and s.feature_distance is not None and s.anomaly_gap is not None
    assert ((s.anomaly > 0) & (s.anomaly < 1)).all()
    plan_only = again.run(again.prepare(x), "fast").evaluations
    assert (s.evaluations == plan_only + 2).all()  # one evaluation per probe level on top of the plan
    calls = again.classify(x, [f"c{i}" for i in range(6)])
    assert [c.anomaly_score for c in calls] == pytest.approx(s.anomaly.tolist())

    # recalibrating without a bank removes the stale bank, and the model loads without it
    calibrate(again, holdout_set(run, clf.image_size), timesteps=(50, 150), noises_per_timestep=1)
    assert not (model / FEATURE_BANK).exists()
    plain = DiffusionClassifier.load(model, device="cpu")
    assert plain.feature_bank is None and plain.score(x).anomaly_feature is None


def test_a_calibration_that_names_a_missing_bank_is_a_clear_error(tiny: Path, tmp_path: Path) -> None:
    from scope_stream.classify.model import ModelError

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    cal = json.loads((model / "calibration.json").read_text())
    cal["features"] = {"probe": FeatureProbe().to_json(), "bank": FEATURE_BANK}
    (model / "calibration.json").write_text(json.dumps(cal))
    (model / FEATURE_BANK).unlink(missing_ok=True)
    with pytest.raises(ModelError, match=r"feature_bank\.safetensors is missing"):
        DiffusionClassifier.load(model, device="cpu")
    (model / FEATURE_BANK).write_bytes(b"not a bank")
    with pytest.raises(ValueError, match="not a feature bank"):
        DiffusionClassifier.load(model, device="cpu")


def test_calibrate_cli_rejects_unknown_or_impossible_combinations(tiny: Path) -> None:
    from typer.testing import CliRunner

    from scope_stream.cli.app import app

    base = ["calibrate", "--model", str(tiny), "--run", str(tiny.parent), "--device", "cpu"]
    res = CliRunner().invoke(app, [*base, "--combine", "gap,vibes"])
    assert res.exit_code != 0 and "vibes" in res.output
    res = CliRunner().invoke(app, [*base, "--combine", "feature", "--feature-bank", "0"])
    assert res.exit_code != 0 and "feature bank" in res.output
    res = CliRunner().invoke(app, [*base, "--feature-layer", "up9"])
    assert res.exit_code != 0 and "up9" in res.output
    res = CliRunner().invoke(app, [*base, "--precision", "fp8"])
    assert res.exit_code != 0 and "precision must be one of auto, fp32, bf16, got 'fp8'" in res.output


def test_precision_chooses_the_unet_arithmetic(tiny: Path) -> None:
    from scope_stream.classify.model import ModelError

    crops = toy_crops(6, 3, 16, seed=5)[0]
    auto = DiffusionClassifier.load(tiny, device="cpu")
    fp32 = DiffusionClassifier.load(tiny, device="cpu", precision="fp32")
    bf16 = DiffusionClassifier.load(tiny, device="cpu", precision="bf16")
    assert (auto.bf16, fp32.bf16, bf16.bf16) == (False, False, True)
    assert bf16.denoiser.bf16
    s_auto, s_fp32, s_bf16 = (c.score(crops).scores for c in (auto, fp32, bf16))
    np.testing.assert_array_equal(s_auto, s_fp32)  # on CPU, auto is float32
    assert not np.array_equal(s_fp32, s_bf16)  # bf16 really changes the arithmetic ...
    np.testing.assert_allclose(s_bf16, s_fp32, rtol=0.2)  # ... but not the errors' size
    with pytest.raises(ModelError, match="precision must be one of"):
        DiffusionClassifier.load(tiny, device="cpu", precision="half")


def test_probe_gap_pairs_the_runner_up_with_the_predicted_class_on_the_same_noises(tiny: Path) -> None:
    from scope_stream.classify.procedures import level_noises

    clf = DiffusionClassifier.load(tiny, device="cpu")
    clf.denoiser.centre_sigma = 0.22  # the probe must weight its errors as the classifier does
    x0 = clf.prepare(toy_crops(6, 2, clf.image_size, seed=7)[0])
    probe = FeatureProbe(layer="up0", timesteps=[250, 400], noise_seeds=[11, 12], k=3, runner_up=True)
    pred, other = np.zeros(6, dtype=np.int64), np.ones(6, dtype=np.int64)
    res = clf.probe_with(probe, x0, pred, other)
    assert res.pair_gap is not None and res.pair_gap.shape == (6,)
    noise = level_noises([11, 12], tuple(x0.shape[1:]))
    cells = np.repeat(np.arange(6), 2)
    ts, idx = np.tile([250, 400], 6), np.tile([0, 1], 6)
    e_pred = clf.denoiser.errors(x0, cells, np.zeros(12, dtype=np.int64), ts, noise, idx).reshape(6, 2).sum(1)
    e_other = clf.denoiser.errors(x0, cells, np.ones(12, dtype=np.int64), ts, noise, idx).reshape(6, 2).sum(1)
    np.testing.assert_allclose(res.pair_gap, (e_other - e_pred) / e_pred, rtol=1e-4)
    # the runner-up's pass does not leak into the features, which stay those of the predicted class
    alone = clf.features_with(probe, x0, pred)
    np.testing.assert_allclose(res.features, alone, rtol=1e-5, atol=1e-6)
    assert FeatureProbe.from_json(probe.to_json()).runner_up
    with pytest.raises(ValueError, match="6 cells but 5 runner-up classes"):
        clf.probe_with(probe, x0, pred, other[:5])
    assert not FeatureProbe.from_json({**probe.to_json(), "runner_up": False}).runner_up
    legacy = {k: v for k, v in probe.to_json().items() if k != "runner_up"}  # written before the field existed
    assert FeatureProbe.from_json(legacy).runner_up is False


def test_the_probe_gap_joins_the_combined_score() -> None:
    n = 200
    rng, scores = _normal_cells(n, 1)
    pgap = rng.uniform(0.3, 0.6, n)
    cal = AnomalyCalibration.fit(scores, np.zeros(n, dtype=int), probe_gap=pgap, combine=("gap", "probe_gap"))
    assert len(cal.probe_gap_ref) == n
    assert 0.03 < float(np.mean(cal.combined_anomaly(scores, probe_gap=pgap) >= 0.95)) < 0.08
    odd = np.array([[1.0, 1.75, 2.2], [1.0, 1.75, 2.2]])  # a typical top-2 gap
    comb = cal.combined_anomaly(odd, probe_gap=np.array([0.45, -0.05]))  # the second: runner-up wins at the probe
    assert comb[1] > 0.95 > comb[0]
    assert cal.probe_gap_anomaly(np.array([-0.05]))[0] > 0.99
    with pytest.raises(ValueError, match="probe gaps"):
        cal.combined_anomaly(odd)
    with pytest.raises(ValueError, match="probe gaps"):
        AnomalyCalibration.fit(scores, np.zeros(n, dtype=int), combine=("probe_gap",))
    with pytest.raises(ValueError, match="probe gaps must be 200 finite"):
        AnomalyCalibration.fit(scores, np.zeros(n, dtype=int), probe_gap=np.full(n, np.nan))
    with pytest.raises(ValueError, match="no probe-gap reference"):
        AnomalyCalibration.fit(scores, np.zeros(n, dtype=int)).probe_gap_anomaly(pgap)


def test_refitting_the_anomaly_score_keeps_every_classification(tiny: Path, tmp_path: Path) -> None:
    from scope_stream.classify.evaluate import refit_anomaly

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    run = tiny.parent
    clf = DiffusionClassifier.load(model, device="cpu")
    before = json.loads((model / "calibration.json").read_text())
    x, _ = toy_crops(6, 2, clf.image_size, seed=5)
    s0 = clf.score(x)
    probe = FeatureProbe(layer="up0", timesteps=[250, 250], noise_seeds=[1, 2], k=3, runner_up=True)
    refit_anomaly(
        clf,
        holdout_set(run, clf.image_size),
        bank_cells=training_set(run, clf.image_size, clf.classes, limit_per_class=12),
        probe=probe,
        combine=("gap", "probe_gap", "feature"),
        info={"anomaly_refit_on": "toy held-out cells"},
    )
    after = json.loads((model / "calibration.json").read_text())
    assert after["fast"]["plan"] == before["fast"]["plan"]
    assert after["fast"]["temperature"] == before["fast"]["temperature"]
    assert after["flags"] == before["flags"] and after["error_weighting"] == before["error_weighting"]
    assert after["features"]["probe"]["runner_up"] is True
    assert after["fast"]["anomaly"]["combine"] == ["gap", "probe_gap", "feature"]
    assert after["info"]["anomaly_refit_on"] == "toy held-out cells"

    again = DiffusionClassifier.load(model, device="cpu")
    s = again.score(x)
    np.testing.assert_array_equal(s.scores, s0.scores)
    np.testing.assert_allclose(s.probabilities, s0.probabilities)
    assert s.anomaly_probe_gap is not None and s.probe_gap is not None
    plan_only = again.run(again.prepare(x), "fast").evaluations
    assert (s.evaluations == plan_only + 4).all()  # two probe levels, predicted and runner-up class

    # an impossible design is refused before anything is written, and the model keeps its scoring
    files = {name: (model / name).read_bytes() for name in ("calibration.json", FEATURE_BANK)}
    with pytest.raises(ValueError, match="runner-up class"):
        refit_anomaly(
            again,
            holdout_set(run, clf.image_size),
            bank_cells=training_set(run, clf.image_size, clf.classes, limit_per_class=12),
            probe=FeatureProbe(layer="up0", timesteps=[250], noise_seeds=[1], k=3),
            combine=("gap", "probe_gap"),
        )
    assert files == {name: (model / name).read_bytes() for name in files}
    np.testing.assert_array_equal(again.score(x).anomaly, s.anomaly)

    bare = tmp_path / "bare"
    shutil.copytree(tiny, bare)
    (bare / "calibration.json").unlink()
    with pytest.raises(ValueError, match="not calibrated yet"):
        refit_anomaly(DiffusionClassifier.load(bare, device="cpu"), holdout_set(run, clf.image_size))


def test_calibrate_cli_refits_only_the_anomaly_score(tiny: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scope_stream.cli.app import app

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    before = json.loads((model / "calibration.json").read_text())
    base = ["calibrate", "--model", str(model), "--run", str(tiny.parent), "--device", "cpu"]
    res = CliRunner().invoke(app, [*base, "--combine", "gap,probe_gap", "--no-runner-up"])
    assert res.exit_code != 0 and "--runner-up" in res.output
    res = CliRunner().invoke(
        app, [*base, "--anomaly-only", "--feature-bank", "10", "--feature-timesteps", "250", "--feature-k", "3"]
    )
    assert res.exit_code == 0, res.output
    after = json.loads((model / "calibration.json").read_text())
    assert after["fast"]["plan"] == before["fast"]["plan"]
    assert after["fast"]["anomaly"]["combine"] == ["gap", "probe_gap", "feature"]
    assert after["features"]["probe"] == {
        "layer": "up0",
        "timesteps": [250],
        "noise_seeds": [801],
        "k": 3,
        "runner_up": True,
    }
    (model / "calibration.json").unlink()
    res = CliRunner().invoke(app, [*base, "--anomaly-only"])
    assert res.exit_code != 0 and "not calibrated yet" in " ".join(res.output.split())
