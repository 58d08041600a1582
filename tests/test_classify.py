"""The diffusion classifier: training, both procedures, calibration, metrics, flags, CLI (tiny real models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scope_stream.classify.anomaly import AnomalyCalibration, relative_score  # noqa: E402
from scope_stream.classify.classifier import DiffusionClassifier  # noqa: E402
from scope_stream.classify.data import check_crops, holdout_mask, resize_crops  # noqa: E402
from scope_stream.classify.flags import flag_call  # noqa: E402
from scope_stream.classify.metrics import (  # noqa: E402
    auroc,
    balanced_accuracy,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
)
from scope_stream.classify.testing import make_tiny_model, tiny_train_config, toy_crops, write_toy_folder  # noqa: E402
from scope_stream.config.classify import FlagConfig  # noqa: E402
from scope_stream.config.train import TrainConfig  # noqa: E402
from scope_stream.vocabulary import Cell, CellCall, CellKind, FlagReason  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), steps=150)


@pytest.fixture(scope="module")
def clf(tiny: Path) -> DiffusionClassifier:
    return DiffusionClassifier.load(tiny, device="cpu")


# ------------------------------------------------------------------------------ training
def test_tiny_model_trains_and_loss_falls(tmp_path: Path) -> None:
    from scope_stream.classify.train import train_diffusion

    data = write_toy_folder(tmp_path / "data", ["a", "b"], per_class=20)
    res = train_diffusion(tiny_train_config(data, tmp_path / "run", 40), progress=False)
    losses = res["losses"]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:4])
    for sub in ("raw", "ema"):
        assert (tmp_path / "run" / sub / "model.safetensors").is_file()
        assert json.loads((tmp_path / "run" / sub / "config.json").read_text())["classes"] == ["a", "b"]
    # the held-out cells are recorded and were not trained on
    held = json.loads((tmp_path / "run" / "holdout.json").read_text())["paths"]
    assert len(held) == 8


def test_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    from scope_stream.classify.train import train_diffusion

    data = write_toy_folder(tmp_path / "data", ["a", "b"], per_class=10)
    train_diffusion(tiny_train_config(data, tmp_path / "run", 3), progress=False)
    res = train_diffusion(tiny_train_config(data, tmp_path / "run", 5), progress=False)
    assert len(res["losses"]) == 2  # steps 3 and 4 only
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5
    other = tiny_train_config(data, tmp_path / "run", 6, block_out_channels=[8, 16])
    with pytest.raises(ValueError, match="different model"):
        train_diffusion(other, progress=False)


def test_ema_follows_the_trained_weights(tmp_path: Path) -> None:
    """Two steps by hand: ema_n = d_n * ema_(n-1) + (1 - d_n) * raw_n with d_n = min(decay, (1+n)/(10+n))."""
    from safetensors.torch import load_file

    from scope_stream.classify.model import build_unet
    from scope_stream.classify.train import spec_from_config, train_diffusion

    data = write_toy_folder(tmp_path / "data", ["a", "b"], per_class=10)
    cfg = tiny_train_config(data, tmp_path / "run", 1)
    train_diffusion(cfg, progress=False)
    torch.manual_seed(cfg.seed)
    init = build_unet(spec_from_config(cfg, ["a", "b"])).state_dict()
    raw1 = load_file(str(tmp_path / "run" / "raw" / "model.safetensors"))
    ema1 = load_file(str(tmp_path / "run" / "ema" / "model.safetensors"))
    d1 = min(cfg.ema_decay, 2 / 11)
    moved = 0
    for k, v in init.items():
        torch.testing.assert_close(ema1[k], d1 * v.float() + (1 - d1) * raw1[k], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(raw1[k], v.float()))
    assert moved > 10  # the step changed the weights, so the check above compares different tensors
    train_diffusion(tiny_train_config(data, tmp_path / "run", 2), progress=False)  # resume: step 2
    raw2 = load_file(str(tmp_path / "run" / "raw" / "model.safetensors"))
    ema2 = load_file(str(tmp_path / "run" / "ema" / "model.safetensors"))
    d2 = min(cfg.ema_decay, 3 / 12)
    for k in init:
        torch.testing.assert_close(ema2[k], d2 * ema1[k] + (1 - d2) * raw2[k], rtol=1e-5, atol=1e-6)


def test_lr_schedule_warms_up_and_decays_to_the_time_budget() -> None:
    from scope_stream.classify.train import lr_at

    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=1000, max_minutes=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 10, 0) == pytest.approx(1e-3, rel=1e-3)
    assert lr_at(cfg, 20, 600) == pytest.approx(1e-4)  # time budget spent -> floor
    assert lr_at(cfg, 500, 0) == pytest.approx(1e-4 + 0.5 * 9e-4)


# ------------------------------------------------------------------------------ classification
def test_toy_two_class_problem_is_classified_correctly(clf: DiffusionClassifier) -> None:
    x, y = toy_crops(30, 2, 16, seed=11)
    for proc in ("fast", "reference"):
        s = clf.score(x, proc)  # type: ignore[arg-type]
        assert np.mean(s.labels == y) >= 0.95, proc
        assert np.allclose(s.probabilities.sum(axis=1), 1)


def test_fast_and_reference_agree_on_clear_cases_with_far_fewer_evaluations(clf: DiffusionClassifier) -> None:
    x, _ = toy_crops(20, 2, 16, seed=12)
    fast = clf.score(x, "fast")
    ref = clf.score(x, "reference")
    assert np.mean(fast.labels == ref.labels) >= 0.95
    assert fast.evaluations.mean() * 5 <= ref.evaluations.mean()
    assert (ref.evaluations >= 20 * 2).all()  # the reference's first 20 levels for both classes


def test_classify_returns_cell_calls_and_resizes(clf: DiffusionClassifier) -> None:
    x, y = toy_crops(4, 2, 16, seed=13)
    big = resize_crops(x, 40)  # other sizes are resized to the model's input
    calls = clf.classify(big, ["c0", "c1", "c2", "c3"])
    assert [c.cell_id for c in calls] == ["c0", "c1", "c2", "c3"]
    for call, k in zip(calls, y, strict=True):
        assert isinstance(call, CellCall)
        assert call.label == clf.classes[k]
        assert call.model_id == clf.model_id and call.evaluations > 0
        assert 0 <= call.uncertainty <= 1 and 0 <= call.margin <= 1
    assert clf.classify(np.zeros((0, 16, 16, 3), np.uint8), []) == []


def test_bad_inputs_give_clear_errors(clf: DiffusionClassifier) -> None:
    x, _ = toy_crops(2, 2, 16)
    with pytest.raises(ValueError, match="cell_ids"):
        clf.classify(x, ["only-one"])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        clf.classify(x[..., 0], ["a", "b"])
    bad = x.astype(np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clf.classify(bad, ["a", "b"])
    with pytest.raises(ValueError, match="procedure"):
        clf.score(x, "slow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"0\.\.255"):
        check_crops(np.full((1, 8, 8, 3), 300, dtype=np.int32))


def test_calibration_rejects_unknown_labels(clf: DiffusionClassifier) -> None:
    from scope_stream.classify.data import CropSet
    from scope_stream.classify.evaluate import calibrate

    x, _ = toy_crops(4, 2, 16)
    cells = CropSet(x, ["lymphocyte", "neutrophil", "martian", "lymphocyte"], [Path(f"{i}") for i in range(4)])
    with pytest.raises(ValueError, match="martian"):
        calibrate(clf, cells, write=False)


def test_calibration_file_holds_plan_temperature_and_thresholds(tiny: Path) -> None:
    cal = json.loads((tiny / "calibration.json").read_text())
    assert cal["fast"]["temperature"] > 0 and cal["reference"]["temperature"] > 0
    plan = cal["fast"]["plan"]
    assert 1 <= plan["prune_after"] <= len(plan["timesteps"])
    assert cal["flags"]["anomaly_threshold"] == pytest.approx(0.95)


def test_model_dir_errors(tmp_path: Path) -> None:
    from scope_stream.classify.model import ModelError

    with pytest.raises(ModelError, match="not found"):
        DiffusionClassifier.load(tmp_path / "nope", device="cpu")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        DiffusionClassifier.load(tmp_path / "m", device="cpu")


# ------------------------------------------------------------------------------ metrics and scores
def test_metrics_on_hand_made_examples() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0, 0, 0, 1, 1, 0])
    assert balanced_accuracy(y, p) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert confusion_matrix(y, p, 2).tolist() == [[3, 1], [1, 1]]
    f0, f1 = 2 * 3 / (6 + 1 + 1), 2 * 1 / (2 + 1 + 1)
    assert macro_f1(y, p) == pytest.approx((f0 + f1) / 2)
    # ECE: bin [0.8,0.867) holds 0.8,0.8 (1 right) -> |0.5-0.8|; bin [0.933,1] holds 1.0 (right) -> 0
    conf = np.array([0.8, 0.8, 1.0])
    right = np.array([1, 0, 1])
    assert expected_calibration_error(conf, right, 15) == pytest.approx(2 / 3 * 0.3)
    assert expected_calibration_error(np.array([0.7, 0.7]), np.array([1, 0]), 15) == pytest.approx(0.2)
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    # positives 0.8, 0.1 vs negatives 0.9, 0.2: only 0.8 > 0.2 of the four pairs
    assert auroc(np.array([0.9, 0.2, 0.8, 0.1]), np.array([0, 0, 1, 1])) == 0.25
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        expected_calibration_error(np.array([np.nan]), np.array([1]))


def test_weighted_auroc_counts_pairs_by_weight() -> None:
    # positives 0.8 (weight 3) and 0.1 (weight 1) vs negatives 0.9, 0.2: only the pair (0.8, 0.2) is
    # ordered right, and it counts 3 of the (3 + 1) * 2 = 8 weighted pairs
    s, y = np.array([0.9, 0.2, 0.8, 0.1]), np.array([0, 0, 1, 1])
    assert auroc(s, y, weights=np.array([1.0, 1.0, 3.0, 1.0])) == pytest.approx(3 / 8)
    # equal weights change nothing, ties included; integer weights are repeated cells
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)
    pos = rng.random(40) < 0.4
    assert auroc(scores, pos, weights=np.full(40, 2.5)) == pytest.approx(auroc(scores, pos))
    reps = rng.integers(0, 4, 40)
    assert auroc(scores, pos, weights=reps.astype(float)) == pytest.approx(
        auroc(np.repeat(scores, reps), np.repeat(pos, reps))
    )
    with pytest.raises(ValueError, match="weights must be 4 finite values >= 0"):
        auroc(s, y, weights=np.array([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="weights must be 4"):
        auroc(s, y, weights=np.ones(3))
    with pytest.raises(ValueError, match="some weight"):
        auroc(s, y, weights=np.array([1.0, 1.0, 0.0, 0.0]))


def test_relative_score_follows_cytodiffusion() -> None:
    # best 1.0, others 2,3,4: mean gap (1+2+3)/3 = 2; pairwise |2-3|,|2-4|,|3-4| mean 4/3 -> 2/3
    s = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    rel = relative_score(s)
    assert rel[0] == pytest.approx(2 - 4 / 3)
    assert rel[1] == pytest.approx(0.0)
    cal = AnomalyCalibration.fit(np.array([[1.0, 3.0, 3.0, 3.0], [1.0, 2.5, 2.5, 2.5]]), np.array([0, 0]))
    anom = cal.relative_anomaly(s)
    assert anom[1] > anom[0]  # the cell no class explains better is the anomalous one
    with pytest.raises(ValueError, match="NaN"):
        relative_score(np.array([[np.nan, 1.0]]))


def test_metrics_report_counts_unknown_labels_as_errors_and_listed_ones_as_anomalies(
    clf: DiffusionClassifier,
) -> None:
    from scope_stream.classify.evaluate import metrics_report

    x, y = toy_crops(12, 2, 16, seed=3)
    s = clf.score(x, "fast")
    labels = [clf.classes[k] for k in y]
    labels[0] = "ig"
    labels[1] = "unknown-thing"
    rep = metrics_report(clf.classes, labels, s, ["ig"])
    assert rep["n_known"] == 10
    assert rep["accuracy_all"] <= 10 / 12
    assert rep["n_anomalies"] == 1 and rep["unknown_labels"] == ["ig", "unknown-thing"]
    assert 0 <= rep["anomaly_auroc"]["relative"] <= 1


def test_holdout_is_stratified_and_deterministic() -> None:
    paths = [Path(f"/x/{i}.jpg") for i in range(100)]
    labels = ["a"] * 60 + ["b"] * 40
    m1 = holdout_mask(paths, labels, 0.1, seed=0)
    assert m1[:60].sum() == 6 and m1[60:].sum() == 4
    assert (holdout_mask(list(reversed(paths)), list(reversed(labels)), 0.1)[::-1] == m1).all()


# ------------------------------------------------------------------------------ flags
def _cell() -> Cell:
    return Cell(
        cell_id="c1",
        tile_id="t1",
        slide_id="s1",
        kind=CellKind.WBC,
        bbox=(0, 0, 10, 10),
        centroid_px=(5.0, 5.0),
        x_um=1.0,
        y_um=2.0,
        area_px=80.0,
    )


def _call(anomaly: float, unc: float, label: str = "neutrophil") -> CellCall:
    return CellCall(
        cell_id="c1",
        label=label,
        probabilities={"neutrophil": 0.7, "lymphocyte": 0.3},
        uncertainty=unc,
        margin=0.4,
        anomaly_score=anomaly,
        model_id="m",
    )


def test_flag_call_reasons() -> None:
    cfg = FlagConfig(anomaly_threshold=0.95, uncertainty_threshold=0.6, abnormal_classes=["lymphocyte"])
    assert flag_call(_cell(), _call(0.5, 0.2), cfg) is None
    f = flag_call(_cell(), _call(0.99, 0.7), cfg)
    assert f is not None and f.reasons == [FlagReason.ANOMALY, FlagReason.UNCERTAIN] and f.score == 0.99
    assert (f.x_um, f.y_um, f.label) == (1.0, 2.0, "neutrophil")
    f2 = flag_call(_cell(), _call(0.1, 0.1, label="lymphocyte"), cfg)
    assert f2 is not None and f2.reasons == [FlagReason.ABNORMAL_CLASS]
    with pytest.raises(ValueError, match="not"):
        flag_call(_cell().model_copy(update={"cell_id": "other"}), _call(0.1, 0.1), cfg)


# ------------------------------------------------------------------------------ CLI, generate, baseline
def test_evaluate_classifier_cli_writes_metrics_and_png(tiny: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scope_stream.cli import app

    data = write_toy_folder(tmp_path / "data", ["lymphocyte", "neutrophil", "ig"], per_class=6, seed=4)
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "classifier",
            "--data",
            str(data),
            "--json",
            str(out),
            "--model",
            str(tiny),
            "--anomaly-classes",
            "ig",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["n_cells"] == 18 and rep["n_known"] == 12
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class_recall", "confusion_matrix", "ece_15"):
        assert key in rep
    assert set(rep["anomaly_auroc"]) == {"flagging", "relative", "absolute", "entropy", "gap", "feature"}
    assert out.with_suffix(".png").stat().st_size > 1000
    bad = CliRunner().invoke(
        app,
        [
            "evaluate",
            "classifier",
            "--data",
            str(tmp_path / "none"),
            "--json",
            str(out),
            "--model",
            str(tiny),
            "--device",
            "cpu",
        ],
    )
    assert bad.exit_code == 2 and "labels.csv" in bad.output


def test_generate_samples_of_a_known_label(clf: DiffusionClassifier, tmp_path: Path) -> None:
    from scope_stream.classify.generate import sample_cells, save_grid

    imgs = sample_cells(clf, "neutrophil", n=4, steps=5)
    assert imgs.shape == (4, 16, 16, 3) and imgs.dtype == np.uint8
    assert save_grid(imgs, tmp_path / "g.png").is_file()
    with pytest.raises(ValueError, match="unknown label"):
        sample_cells(clf, "dragon")


def test_baseline_cnn_trains_and_scores(tmp_path: Path) -> None:
    from scope_stream.classify.baseline import CnnClassifier, train_baseline

    data = write_toy_folder(tmp_path / "data", ["a", "b"], per_class=20)
    cfg = tiny_train_config(data, tmp_path / "cnn", 30, model_type="baseline", lr=3e-3)
    model = train_baseline(cfg, width=8, progress=False)
    cnn = CnnClassifier(model, "cpu")
    x, y = toy_crops(20, 2, 16, seed=9)
    s = cnn.score(x)
    assert np.mean(s.labels == y) >= 0.9
    assert math.isfinite(cnn.temperature)


@pytest.mark.data
def test_pbc_crops_load_when_data_present() -> None:
    from scope_stream.classify.data import load_crops
    from scope_stream.datasets import pbc_root

    if not (pbc_root() / "labels.csv").is_file():
        pytest.skip("PBC data not present")
    cells = load_crops(pbc_root(), 32, split="val", classes=["basophil"], limit_per_class=3)
    assert cells.images.shape == (3, 32, 32, 3) and cells.labels == ["basophil"] * 3


def test_calibration_replay_matches_the_fast_procedure(clf: DiffusionClassifier) -> None:
    from scope_stream.classify.calibration import simulate_fast
    from scope_stream.classify.procedures import FastPlan, classify_fast, collect_errors, level_noises

    x, _ = toy_crops(8, 2, 16, seed=21)
    x0 = clf.prepare(x)
    plan = FastPlan([60, 200, 400], [5, 6, 7], [1.0, 2.0, 0.5], prune_after=1, prune_delta=0.002)
    fast = classify_fast(clf.denoiser, x0, 2, plan)
    e = collect_errors(clf.denoiser, x0, 2, plan.timesteps, level_noises(plan.noise_seeds, tuple(x0.shape[1:])))
    scores, evals = simulate_fast(e, [0, 1, 2], np.asarray(plan.weights), 1, 0.002)
    assert np.allclose(scores, fast.scores, rtol=1e-4)
    assert (evals == fast.evaluations).all()


def test_pruned_classes_are_scored_on_the_winners_scale() -> None:
    from scope_stream.classify.procedures import paired_prune_scores

    stage1 = np.array([[1.0, 1.1, 3.0]])
    final = np.array([[2.0, 1.8, 9.9]])  # class 1 wins after more levels; class 2 was pruned
    alive = np.array([[True, True, False]])
    out = paired_prune_scores(final, stage1, alive)
    assert out[0, 0] == 2.0 and out[0, 1] == 1.8
    assert out[0, 2] == pytest.approx(1.8 + (3.0 - 1.1))


# ------------------------------------------------------------------------------ centre-weighted error
def test_centre_weights_peak_in_the_middle_and_average_one() -> None:
    from scope_stream.classify.procedures import centre_weights

    w = centre_weights(32, 32, 0.22).numpy()
    assert w.mean() == pytest.approx(1.0, rel=1e-5)
    assert w[15:17, 15:17].min() > 2.0 > 0.05 > w[0, 0]
    assert np.allclose(w, w[::-1, :]) and np.allclose(w, w[:, ::-1])  # symmetric about the centre
    assert (centre_weights(16, 16, 0.0).numpy() == 1.0).all()  # 0: CytoDiffusion's plain mean


def test_centre_weighting_discounts_what_happens_at_the_crop_border(clf: DiffusionClassifier) -> None:
    """The same cell with its surroundings changed: a plain mean error moves, a centre-weighted one far less."""
    import torch

    from scope_stream.classify.procedures import Denoiser, collect_errors, level_noises

    x, _ = toy_crops(4, 2, 16, seed=3)
    x0 = clf.prepare(x)
    moved = x0.clone()
    moved[..., :3, :] = torch.rand_like(moved[..., :3, :]) * 2 - 1  # new "background" along one edge
    noise = level_noises([11, 12], tuple(x0.shape[1:]))

    def change(sigma: float) -> float:
        den = Denoiser(clf.unet, clf.denoiser.acp, "cpu", centre_sigma=sigma)
        a = collect_errors(den, x0, 2, [100, 300], noise)
        b = collect_errors(den, moved, 2, [100, 300], noise)
        return float(np.abs(b - a).mean() / a.mean())

    assert change(0.15) < 0.5 * change(0.0)
    with pytest.raises(ValueError, match="centre_sigma"):
        Denoiser(clf.unet, clf.denoiser.acp, "cpu", centre_sigma=-1.0)


def test_calibration_records_its_error_weighting_and_old_files_mean_uniform(clf: DiffusionClassifier) -> None:
    from scope_stream.classify.calibration import Calibration

    assert clf.calibration is not None
    d = clf.calibration.to_json()
    d["error_weighting"]["sigma_frac"] = 0.2
    assert Calibration.from_json(d).centre_sigma == 0.2
    del d["error_weighting"]
    assert Calibration.from_json(d).centre_sigma == 0.0


def test_calibrating_with_centre_weighting_sticks_to_the_model(tiny: Path, tmp_path: Path) -> None:
    import shutil

    from scope_stream.classify.evaluate import calibrate as do_calibrate
    from scope_stream.classify.evaluate import holdout_set

    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    c = DiffusionClassifier.load(model, device="cpu")
    cells = holdout_set(tiny.parent, c.image_size, 4)
    out = do_calibrate(c, cells, timesteps=(50, 200), noises_per_timestep=1, centre_sigma=0.25)
    assert out["error_weighting"]["sigma_frac"] == 0.25
    assert DiffusionClassifier.load(model, device="cpu").denoiser.centre_sigma == 0.25


def test_the_default_model_ships_inside_the_wheel(repo_root: Path) -> None:
    """A wheel carries the default model where the classifier looks for it outside a checkout."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from scope_stream.classify.classifier import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME

    cfg = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))
    include = cfg["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert include[f"models/{DEFAULT_MODEL_NAME}"] == f"scope_stream/_models/{DEFAULT_MODEL_NAME}"
    assert repo_root / "models" / DEFAULT_MODEL_NAME == DEFAULT_MODEL_DIR  # in a checkout: the repo's models/
    assert (DEFAULT_MODEL_DIR / "config.json").is_file() and (DEFAULT_MODEL_DIR / "calibration.json").is_file()
