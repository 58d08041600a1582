"""Calibrating a trained model on held-out cells and evaluating it on a labelled folder."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .anomaly import AnomalyCalibration
from .calibration import CANDIDATE_TIMESTEPS, Calibration, fit_calibration
from .classifier import DiffusionClassifier, Procedure, Scores
from .data import CropSet, holdout_mask, load_crops, model_crops
from .features import FEATURE_BANK, FeatureBank, FeatureProbe
from .metrics import (
    auroc,
    balanced_accuracy,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    reliability_diagram,
)
from .model import CALIBRATION
from .procedures import collect_errors, level_noises

if TYPE_CHECKING:
    from .canonical import CanonicalSpec

__all__ = ["calibrate", "evaluate_scores", "holdout_set", "metrics_report", "training_set"]


def holdout_set(
    run_dir: Path,
    size: int,
    limit_per_class: int | None = None,
    seed: int = 0,
    *,
    canonical: CanonicalSpec | None = None,
    shift: str | None = None,
) -> CropSet:
    """The training cells a run held out (``holdout.json``), loaded at ``size``.

    ``canonical``: as canonical crops (cells in which none is found are left out, listed in
    ``refused``). ``shift``: re-rendered first by that simulated shift of :mod:`.shifts` (seeded), i.e.
    as another microscope might show them.
    """
    from PIL import Image

    info = json.loads((Path(run_dir) / "holdout.json").read_text(encoding="utf-8"))
    paths = [Path(p) for p in info["paths"]]
    labels = [p.parent.name for p in paths]
    data = Path(info["data"])
    lab_by_path = {}
    from scope_stream.datasets import read_labels_csv

    for row in read_labels_csv(data):
        lab_by_path[str(row.path)] = row.label
    labels = [lab_by_path.get(str(p), lab) for p, lab in zip(paths, labels, strict=True)]
    idx = np.arange(len(paths))
    if limit_per_class is not None:
        rng = np.random.default_rng(seed)
        keep: list[int] = []
        for lab in sorted(set(labels)):
            own = idx[np.array(labels) == lab]
            keep.extend(sorted(rng.permutation(own)[:limit_per_class].tolist()))
        idx = np.array(keep)
    raw = [np.asarray(Image.open(paths[i]).convert("RGB")) for i in idx]
    if shift is not None:
        from .shifts import apply_shift

        raw = apply_shift(shift, raw, seed)
    labs, kept_paths = [labels[i] for i in idx], [paths[i] for i in idx]
    if canonical is None:
        return CropSet(model_crops(raw, size, None), labs, kept_paths)
    from .canonical import canonical_batch

    batch = canonical_batch(raw, canonical, on_error="skip")
    kept = [int(i) for i in batch.kept]
    refused = {str(kept_paths[i]): reason for i, reason in batch.errors.items()}
    return CropSet(batch.images, [labs[i] for i in kept], [kept_paths[i] for i in kept], refused)


def training_set(
    run_dir: Path,
    size: int,
    classes: list[str],
    limit_per_class: int | None = None,
    seed: int = 0,
    *,
    canonical: CanonicalSpec | None = None,
) -> CropSet:
    """The cells a run trained on (its data folder and split, minus ``holdout.json``), of ``classes``."""
    info = json.loads((Path(run_dir) / "holdout.json").read_text(encoding="utf-8"))
    held = {str(Path(p)) for p in info["paths"]}
    # load_crops raises a DatasetError (a ValueError) naming the folder when nothing is left
    return load_crops(
        Path(info["data"]),
        size,
        split=info.get("split"),
        classes=classes,
        exclude_paths=held,
        limit_per_class=limit_per_class,
        seed=seed,
        canonical=canonical,
    )


def calibrate(
    clf: DiffusionClassifier,
    cells: CropSet,
    *,
    timesteps: tuple[int, ...] = CANDIDATE_TIMESTEPS,
    noises_per_timestep: int = 2,
    false_flag_rate: float = 0.05,
    uncertain_flag_rate: float | None = None,
    write: bool = True,
    info: dict[str, Any] | None = None,
    centre_sigma: float = 0.0,
    bank_cells: CropSet | None = None,
    probe: FeatureProbe | None = None,
    combine: tuple[str, ...] = (),
    temperature_share: float = 0.0,
    shifted_cells: CropSet | None = None,
) -> dict[str, Any]:
    """Fit the calibration of ``clf`` on labelled normal ``cells`` and write ``calibration.json``.

    Honest temperatures: ``temperature_share`` of each class's cells (chosen by a seeded hash of their
    paths) are kept out of choosing the fast plan and fit the temperatures alone, together with
    ``shifted_cells`` (shifted copies of those cells, as other microscopes show them); see
    :func:`.calibration.fit_calibration`. 0: everything on all cells (a temperature on its search bound
    is still refused).

    ``centre_sigma``: weight the denoising error towards the crop centre (see ``Denoiser``); from
    then on ``clf`` and every later load of the model classify with that weighting.

    ``bank_cells`` (training cells, labelled): build a feature bank from them with ``probe`` and
    write ``feature_bank.safetensors`` (see :mod:`.features`). ``combine``: the anomaly scores the
    flagging score joins (``relative``, ``gap``, ``feature``; empty: the relative score alone).
    """
    y = _known_labels(cells, clf.classes, "calibration cells")
    ts = [t for t in timesteps if t < clf.spec.num_train_timesteps]
    cand_t = [t for t in ts for _ in range(noises_per_timestep)]
    cand_seed = [1000 + i for i in range(len(cand_t))]
    t0 = time.perf_counter()
    clf.denoiser.centre_sigma = centre_sigma  # validated by the Denoiser
    x0 = clf.prepare(cells.images)
    noise = level_noises(cand_seed, tuple(x0.shape[1:]))
    errors = collect_errors(clf.denoiser, x0, len(clf.classes), cand_t, noise)
    tmask = None
    shifted = None
    if temperature_share > 0:
        if not 0 < temperature_share < 1:
            raise ValueError(f"temperature_share must lie in (0, 1), got {temperature_share}")
        tmask = holdout_mask(cells.paths, cells.labels, temperature_share, seed=17)
    if shifted_cells is not None:
        if tmask is None:
            raise ValueError("shifted calibration cells need a temperature_share > 0 (they fit the temperature)")
        temp_paths = {str(p) for p, m in zip(cells.paths, tmask, strict=True) if m}
        use = [i for i, p in enumerate(shifted_cells.paths) if str(p) in temp_paths]
        if not use:
            raise ValueError("none of the shifted cells is a copy of a temperature cell")
        sub = shifted_cells.subset(use)
        sx = clf.prepare(sub.images)
        shifted = (
            collect_errors(clf.denoiser, sx, len(clf.classes), cand_t, noise),
            _known_labels(sub, clf.classes, "shifted calibration cells"),
        )
    meta = {"seconds_collecting_errors": time.perf_counter() - t0, **(info or {})}
    cal = fit_calibration(
        errors,
        y,
        cand_t,
        cand_seed,
        num_train_timesteps=clf.spec.num_train_timesteps,
        false_flag_rate=false_flag_rate,
        uncertain_flag_rate=uncertain_flag_rate,
        info=meta,
        centre_sigma=centre_sigma,
        temperature_cells=tmask,
        shifted=shifted,
    )
    clf.calibration = cal
    clf.feature_bank = None
    if bank_cells is not None or combine:
        _fit_anomaly_scores(clf, cal, x0, y, bank_cells, probe, combine)
    return _finish_calibration(clf, cal, write)


def refit_anomaly(
    clf: DiffusionClassifier,
    cells: CropSet,
    *,
    bank_cells: CropSet | None = None,
    probe: FeatureProbe | None = None,
    combine: tuple[str, ...] = (),
    write: bool = True,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Refit only the anomaly scoring of a calibrated ``clf`` (feature bank, probe, combined score) on
    normal ``cells``, keeping its fast plan, temperatures and error weighting: a new anomaly design
    then changes no classification. Arguments as :func:`calibrate`."""
    cal = clf.calibration
    if cal is None:
        raise ValueError(f"{clf.model_dir} is not calibrated yet: run a full calibration first")
    y = _known_labels(cells, clf.classes, "calibration cells")
    old_bank = clf.feature_bank
    cal = copy.deepcopy(cal)  # the model keeps its scoring until the new one is complete
    clf.feature_bank = None
    cal.feature_probe = None
    cal.info.pop("feature_bank", None)
    cal.info.update(info or {})
    try:
        _fit_anomaly_scores(clf, cal, clf.prepare(cells.images), y, bank_cells, probe, combine)
    except BaseException:
        clf.feature_bank = old_bank
        raise
    clf.calibration = cal
    return _finish_calibration(clf, cal, write)


def _known_labels(cells: CropSet, classes: list[str], what: str) -> np.ndarray:
    """Class indices of ``cells``; a clear error naming the labels outside ``classes``."""
    y = cells.label_indices(classes)
    if (y < 0).any():
        unknown = sorted({lab for lab, k in zip(cells.labels, y, strict=True) if k < 0})
        raise ValueError(f"{what} have labels the model does not know: {unknown}")
    return np.asarray(y)


def _finish_calibration(clf: DiffusionClassifier, cal: Calibration, write: bool) -> dict[str, Any]:
    bank_path = clf.model_dir / FEATURE_BANK
    if write and clf.feature_bank is not None:
        clf.feature_bank.save(bank_path)
    elif write and bank_path.is_file():
        bank_path.unlink()  # a bank from an earlier calibration would no longer match this one
    out = cal.to_json()
    if write:
        path = clf.model_dir / CALIBRATION
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2), encoding="utf-8")
        tmp.replace(path)
    return out


def _fit_anomaly_scores(
    clf: DiffusionClassifier,
    cal: Calibration,
    x0: Any,
    y: np.ndarray,
    bank_cells: CropSet | None,
    probe: FeatureProbe | None,
    combine: tuple[str, ...],
) -> None:
    """Feature bank and the combined anomaly score, fitted on what the fast procedure really outputs
    for the calibration cells (their predicted class conditions the features, as in :meth:`score`).
    Writes nothing: :func:`_finish_calibration` saves the bank with the calibration."""
    if ("feature" in combine or "probe_gap" in combine) and bank_cells is None:
        raise ValueError("combining feature or probe_gap needs feature-bank cells (bank_cells)")
    if "probe_gap" in combine and not (probe or FeatureProbe()).runner_up:
        raise ValueError("combining probe_gap needs a probe that runs the runner-up class (runner_up=True)")
    distance = None
    if bank_cells is not None:
        by = _known_labels(bank_cells, clf.classes, "feature-bank cells")
        probe = probe or FeatureProbe()
        xb = clf.prepare(bank_cells.images)
        bank = FeatureBank.fit(clf.features_with(probe, xb, by), by, probe)
        clf.feature_bank = bank
        cal.feature_probe = probe
    fast = clf.run(x0, "fast").scores
    pair_gap = None
    if clf.feature_bank is not None:
        distance, pair_gap, _ = clf.probe(x0, fast)
    cal.fast_anomaly = AnomalyCalibration.fit(fast, y, feature_distance=distance, combine=combine, probe_gap=pair_gap)
    cal.info["anomaly_combine"] = list(combine)
    if bank_cells is not None and cal.feature_probe is not None:
        cal.info["feature_bank"] = {"n_cells": len(bank_cells), "probe": cal.feature_probe.to_json()}


def metrics_report(
    classes: list[str],
    labels: list[str],
    s: Scores,
    anomaly_classes: list[str],
    png: Path | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, recalls, confusion, ECE and anomaly AUROCs for scored cells.

    Cells whose label the model does not know count as errors for accuracy; they count as anomalies
    only when listed in ``anomaly_classes`` (other unknown labels are left out of the AUROC).
    """
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup.get(lab, -1) for lab in labels])
    pred = s.labels
    known = y >= 0
    rep: dict[str, Any] = {"n_cells": len(labels), "n_known": int(known.sum()), "classes": classes}
    if len(labels) == 0:
        raise ValueError("no cells to evaluate")
    rep["accuracy_all"] = float(np.mean(pred == y))
    if known.any():
        yk, pk = y[known], pred[known]
        rep["accuracy"] = float(np.mean(pk == yk))
        rep["balanced_accuracy"] = balanced_accuracy(yk, pk)
        rep["macro_f1"] = macro_f1(yk, pk)
        rep["per_class_recall"] = {classes[c]: float(np.mean(pk[yk == c] == c)) for c in np.unique(yk)}
        rep["confusion_matrix"] = confusion_matrix(yk, pk, len(classes)).tolist()
        conf = s.probabilities[known].max(axis=1)
        rep["ece_15"] = expected_calibration_error(conf, pk == yk, 15)
        rep["mean_confidence"] = float(conf.mean())
        if png is not None:
            reliability_diagram(conf, pk == yk, png, 15, title)
            rep["reliability_png"] = str(png)
    unknown = sorted({lab for lab, k in zip(labels, y, strict=True) if k < 0})
    rep["unknown_labels"] = unknown
    listed = np.array([lab in set(anomaly_classes) for lab in labels])
    use = known | listed
    if anomaly_classes and listed.any() and known.any():
        pos = listed[use]
        relative = s.anomaly_relative if s.anomaly_relative is not None else s.anomaly
        rep["anomaly_auroc"] = {
            "flagging": auroc(s.anomaly[use], pos),
            "relative": auroc(relative[use], pos),
            "absolute": auroc(s.anomaly_absolute[use], pos),
            "entropy": auroc(s.uncertainty[use], pos),
        }
        for name, extra in (("gap", s.anomaly_gap), ("feature", s.anomaly_feature), ("probe_gap", s.anomaly_probe_gap)):
            if extra is not None:
                rep["anomaly_auroc"][name] = auroc(extra[use], pos)
        rep["anomaly_classes"] = anomaly_classes
        rep["n_anomalies"] = int(listed.sum())
    rep["evaluations_per_cell"] = float(s.evaluations.mean())
    rep["seconds"] = s.seconds
    rep["cells_per_s"] = len(labels) / s.seconds if s.seconds > 0 else None
    return rep


def evaluate_scores(
    clf: DiffusionClassifier,
    cells: CropSet,
    anomaly_classes: list[str],
    procedure: Procedure = "fast",
    png: Path | None = None,
) -> tuple[dict[str, Any], Scores]:
    s = clf.score(cells.images, procedure, canonical=False)
    rep = metrics_report(clf.classes, cells.labels, s, anomaly_classes, png, f"{clf.model_id} ({procedure})")
    rep["procedure"] = procedure
    rep["model_id"] = clf.model_id
    return rep, s


def load_eval_cells(
    data: Path,
    size: int,
    split: str | None,
    limit_per_class: int | None,
    seed: int = 0,
    canonical: CanonicalSpec | None = None,
) -> CropSet:
    return load_crops(data, size, split=split, limit_per_class=limit_per_class, seed=seed, canonical=canonical)
