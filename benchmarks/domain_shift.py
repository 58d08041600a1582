"""Domain shift: how each classifier holds up when PBC cells are re-rendered as another lab's microscope
would show them (``scope_stream.classify.shifts``), and what it says about BCCD's foreign-lab cells.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/domain_shift.py \\
        --model models/cytodiffusion-pbc-32-gpu --model models/cnn-baseline-pbc-32 \\
        --per-class 5 --shifts scale_0.6,stain_bccd --json runs/domain-shift.json

For each model and each shift (plus ``none``): cells, cells refused by the model's canonical cropping,
balanced accuracy over the model's classes (cells of other classes left out), ECE, the confident error
rate (confidence >= 0.95 and wrong, as a share of all known-class cells), mean confidence, the share
flagged (anomaly >= the flag threshold the pipeline would use: the model's calibrated one where it
vouches for it, else the flag config's fallback 0.85)
among known-class cells and among the ``--anomaly-classes`` cells, and the anomaly AUROC of the latter
against the known classes. BCCD (no labels: another lab's camera, stain and magnification): WBC boxes
enlarged 1.25x, classified; confidence, predicted classes, flags and anomaly scores. Prints JSON on
stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _output import emit  # benchmarks/ is on sys.path when a script runs

from scope_stream.classify.shifts import NONE, SHIFTS, apply_shift

CONFIDENT = 0.95
COMMON_SIZE = 128  # variable-size crops are brought to this size first (PBC's own) on the fallback path


# ---------------------------------------------------------------------------------------------- data
def load_pbc(data: Path, split: str, per_class: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """``per_class`` random raw crops (as stored, not resized) of every label in ``split``."""
    from PIL import Image

    from scope_stream.datasets import read_labels_csv

    rows = read_labels_csv(data, split=split)
    if not rows:
        raise SystemExit(f"no cells of split {split!r} in {data}/labels.csv")
    by_label: dict[str, list[Path]] = {}
    for r in rows:
        by_label.setdefault(r.label, []).append(r.path)
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    labels: list[str] = []
    for label in sorted(by_label):
        paths = sorted(by_label[label])
        for i in sorted(rng.choice(len(paths), size=min(per_class, len(paths)), replace=False).tolist()):
            with Image.open(paths[i]) as im:
                crops.append(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
            labels.append(label)
    return crops, labels


def load_bccd(root: Path, n_fields: int, enlarge: float = 1.25) -> list[np.ndarray]:
    """Square crops around the WBC boxes of the first ``n_fields`` annotated fields (side = the box's longer
    side x ``enlarge``); parts outside the field are filled with the field's background colour."""
    from PIL import Image

    from scope_stream.datasets import read_voc

    crops: list[np.ndarray] = []
    for xml in sorted((root / "Annotations").glob("*.xml"))[:n_fields]:
        img_path = root / "JPEGImages" / f"{xml.stem}.jpg"
        if not img_path.is_file():
            continue
        _, boxes = read_voc(xml)
        wbcs = [b for b in boxes if b.name.upper() == "WBC"]
        if not wbcs:
            continue
        with Image.open(img_path) as im:
            field = np.asarray(im.convert("RGB"), dtype=np.uint8)
        lum = field.astype(np.float32).mean(axis=2)
        bg = np.median(field[lum >= np.quantile(lum, 0.85)], axis=0).astype(np.uint8)
        h, w = field.shape[:2]
        for b in wbcs:
            side = max(8, round(max(b.x1 - b.x0, b.y1 - b.y0) * enlarge))
            x0 = round((b.x0 + b.x1) / 2 - side / 2)
            y0 = round((b.y0 + b.y1) / 2 - side / 2)
            out = np.empty((side, side, 3), dtype=np.uint8)
            out[:] = bg
            sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
            if sx1 > sx0 and sy1 > sy0:
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = field[sy0:sy1, sx0:sx1]
            crops.append(out)
    return crops


# ---------------------------------------------------------------------------------------------- models
def load_model(path: Path, device: str) -> Any:
    from scope_stream.classify.baseline import CnnClassifier, is_cnn_dir
    from scope_stream.classify.classifier import DiffusionClassifier

    if is_cnn_dir(path):
        return CnnClassifier(path, device)
    return DiffusionClassifier.load(path, device=device)


def flag_thresholds(model: Any, anomaly: float | None) -> tuple[float, float]:
    """(anomaly, uncertainty) flag thresholds as the pipeline resolves them: ``anomaly`` if given, else the
    model's calibrated ones where it vouches for them (``model.flag_thresholds()``), else the flag config's
    fallbacks (0.85 / 0.6)."""
    from scope_stream.config.classify import FlagConfig

    cfg = FlagConfig() if anomaly is None else FlagConfig(anomaly_threshold=anomaly)
    own = getattr(model, "flag_thresholds", None)
    model_flags = own() if callable(own) else None
    resolve = getattr(cfg, "resolved", None)
    if callable(resolve):
        cfg = resolve(model_flags)
    a, u = cfg.anomaly_threshold, cfg.uncertainty_threshold
    return float(a if a is not None else 0.85), float(u if u is not None else 0.6)


def _resize(crop: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if crop.shape[0] == size and crop.shape[1] == size:
        return crop
    im = Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return np.asarray(im, dtype=np.uint8)


def prepare(model: Any, crops: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Raw crops of any size -> the model's input images ``(K, S, S, 3)``, the kept indices and the refused
    crops' reasons: the model's canonical cropping where it has one, else every crop resized."""
    spec = getattr(model, "canonical", None)
    if spec is not None:
        from scope_stream.classify.canonical import canonical_batch

        batch = canonical_batch(list(crops), spec, on_error="skip")
        errors = {int(k): str(v) for k, v in dict(batch.errors).items()}
        return np.asarray(batch.images, dtype=np.uint8), np.asarray(batch.kept, dtype=np.int64), errors
    from scope_stream.classify.data import resize_crops

    size = model.image_size
    if not crops:
        return np.zeros((0, size, size, 3), dtype=np.uint8), np.zeros(0, dtype=np.int64), {}
    shapes = {c.shape for c in crops}
    common = crops[0].shape[0] if len(shapes) == 1 and crops[0].shape[0] == crops[0].shape[1] else COMMON_SIZE
    stack = np.stack([_resize(np.asarray(c, dtype=np.uint8), common) for c in crops])
    return resize_crops(stack, size), np.arange(len(crops), dtype=np.int64), {}


def score(model: Any, images: np.ndarray) -> Any:
    """``model.score`` on model-input images (no second canonical cropping where ``score`` would do one)."""
    if "canonical" in inspect.signature(model.score).parameters:
        return model.score(images, "fast", canonical=False)
    return model.score(images, "fast")


# ---------------------------------------------------------------------------------------------- metrics
def _reasons(errors: dict[int, str]) -> dict[str, int]:
    return dict(Counter(e.split(":")[0][:80] for e in errors.values()).most_common(5))


def pbc_metrics(
    model: Any,
    labels: Sequence[str],
    crops: Sequence[np.ndarray],
    anomaly_classes: Sequence[str],
    thresholds: tuple[float, float],
) -> dict[str, Any]:
    from scope_stream.classify.metrics import (
        auroc,
        balanced_accuracy,
        confident_error_rate,
        expected_calibration_error,
    )

    t0 = time.perf_counter()
    out, kept, s = _prepare_and_score(model, crops)
    if s is None:
        return out
    lab = [labels[i] for i in kept]
    lookup = {c: i for i, c in enumerate(model.classes)}
    y = np.array([lookup.get(v, -1) for v in lab], dtype=np.int64)
    known = y >= 0
    unknown = np.array([v in set(anomaly_classes) for v in lab], dtype=bool)
    conf = s.probabilities.max(axis=1)
    flagged = s.anomaly >= thresholds[0]
    uncertain = s.uncertainty >= thresholds[1]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if known.any():
        correct = s.labels[known] == y[known]
        out.update(
            n_known=int(known.sum()),
            accuracy=float(correct.mean()),
            balanced_accuracy=balanced_accuracy(y[known], s.labels[known]),
            ece=expected_calibration_error(conf[known], correct),
            confident_error_rate=confident_error_rate(conf[known], correct, CONFIDENT),
            confident_share=float(np.mean(conf[known] >= CONFIDENT)),
            mean_confidence=float(conf[known].mean()),
            flagged_known=float(flagged[known].mean()),
            uncertain_known=float(uncertain[known].mean()),
            mean_anomaly_known=float(s.anomaly[known].mean()),
        )
    if unknown.any():
        out.update(
            n_anomaly_classes=int(unknown.sum()),
            mean_confidence_anomaly_classes=float(conf[unknown].mean()),
            flagged_anomaly_classes=float(flagged[unknown].mean()),
            mean_anomaly_anomaly_classes=float(s.anomaly[unknown].mean()),
        )
    if known.any() and unknown.any():
        both = known | unknown
        out["anomaly_auroc"] = auroc(s.anomaly[both], unknown[both])
    out["evaluations_per_cell"] = float(np.mean(s.evaluations))
    return out


def _prepare_and_score(model: Any, crops: Sequence[np.ndarray]) -> tuple[dict[str, Any], np.ndarray, Any]:
    """The model's input for ``crops`` and its scores (None when every crop was refused), with the counts."""
    images, kept, errors = prepare(model, crops)
    out: dict[str, Any] = {"n_cells": len(crops), "n_refused": len(crops) - len(kept)}
    if errors:
        out["refused_reasons"] = _reasons(errors)
    return out, kept, score(model, images) if len(kept) else None


def bccd_metrics(model: Any, crops: Sequence[np.ndarray], thresholds: tuple[float, float]) -> dict[str, Any]:
    t0 = time.perf_counter()
    out, kept, s = _prepare_and_score(model, crops)
    if s is None:
        return out
    conf = s.probabilities.max(axis=1)
    flagged = s.anomaly >= thresholds[0]
    uncertain = s.uncertainty >= thresholds[1]
    counts = Counter(model.classes[int(k)] for k in s.labels)
    out.update(
        seconds=round(time.perf_counter() - t0, 2),
        mean_confidence=float(conf.mean()),
        confident_share=float(np.mean(conf >= CONFIDENT)),
        predicted=[{"class": c, "share": round(counts[c] / len(kept), 4)} for c in model.classes],
        flagged_anomalous=float(flagged.mean()),
        flagged_uncertain=float(uncertain.mean()),
        flagged_any=float((flagged | uncertain).mean()),
        mean_anomaly=float(s.anomaly.mean()),
    )
    feat = getattr(s, "anomaly_feature", None)
    if feat is not None:  # the pipeline's "unfamiliar" flag and the slide's domain check over these cells
        from scope_stream.classify.domain import UNFAMILIAR, domain_check
        from scope_stream.config.classify import FlagConfig

        unfamiliar = np.asarray(feat) >= FlagConfig().unfamiliar_threshold
        out["flagged_unfamiliar"] = float(unfamiliar.mean())
        out["domain_check"] = domain_check([[UNFAMILIAR]] * int(unfamiliar.sum()) + [[]] * int((~unfamiliar).sum()))
    return out


def summarise(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, res in models.items():
        shifted = {k: v for k, v in res["shifts"].items() if k != NONE and "balanced_accuracy" in v}
        row: dict[str, Any] = {}
        base = res["shifts"].get(NONE, {})
        if "balanced_accuracy" in base:
            row["none"] = {k: base[k] for k in ("balanced_accuracy", "confident_error_rate", "ece")}
        if shifted:
            worst_ba = min(shifted, key=lambda k: shifted[k]["balanced_accuracy"])
            worst_cer = max(shifted, key=lambda k: shifted[k]["confident_error_rate"])
            row["worst_balanced_accuracy"] = {"shift": worst_ba, "value": shifted[worst_ba]["balanced_accuracy"]}
            row["worst_confident_error_rate"] = {
                "shift": worst_cer,
                "value": shifted[worst_cer]["confident_error_rate"],
            }
        if "bccd" in res and "mean_confidence" in res["bccd"]:
            b = res["bccd"]
            row["bccd"] = {k: b[k] for k in ("n_cells", "confident_share", "flagged_anomalous", "mean_anomaly")}
        summary[name] = row
    return summary


# ---------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from scope_stream.datasets import bccd_root, pbc_root

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", required=True, help="model directory (repeatable)")
    ap.add_argument("--data", type=Path, default=None, help="folder with labels.csv (default: PBC)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--per-class", type=int, default=30, help="cells per label, all labels (default 30)")
    ap.add_argument("--shifts", default="all", help=f"comma list or 'all' ({', '.join(SHIFTS)})")
    ap.add_argument("--anomaly-classes", default="ig,erythroblast")
    ap.add_argument("--anomaly-threshold", type=float, default=None, help="default: the model's own")
    ap.add_argument("--bccd", type=Path, default=None, help="BCCD folder (default: ../shared/data/bccd if present)")
    ap.add_argument("--bccd-fields", type=int, default=100, help="BCCD fields to crop WBCs from (0: skip BCCD)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(SHIFTS) if args.shifts == "all" else [s.strip() for s in args.shifts.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHIFTS and s != NONE]
    if unknown:
        ap.error(f"unknown shift(s) {', '.join(unknown)}; known: {', '.join(SHIFTS)}")
    shifts = [NONE, *[s for s in names if s != NONE]]
    anomaly_classes = [c.strip() for c in args.anomaly_classes.split(",") if c.strip()]
    data = args.data or pbc_root()
    bccd = args.bccd if args.bccd is not None else bccd_root()
    use_bccd = args.bccd_fields > 0 and (bccd / "Annotations").is_dir()
    if args.bccd is not None and args.bccd_fields > 0 and not use_bccd:
        ap.error(f"{bccd} has no Annotations/ folder")

    t_start = time.perf_counter()
    console = Console(stderr=True)
    crops, labels = load_pbc(data, args.split, args.per_class, args.seed)
    models = {str(p): load_model(p, args.device) for p in args.model}
    thresholds = {k: flag_thresholds(m, args.anomaly_threshold) for k, m in models.items()}
    results: dict[str, dict[str, Any]] = {
        k: {
            "model_id": m.model_id,
            "kind": type(m).__name__,
            "classes": list(m.classes),
            "image_size": int(m.image_size),
            "canonical": getattr(m, "canonical", None) is not None,
            "anomaly_threshold": thresholds[k][0],
            "uncertainty_threshold": thresholds[k][1],
            "shifts": {},
        }
        for k, m in models.items()
    }
    n_steps = len(shifts) * len(models) + (len(models) if use_bccd else 0)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    ) as bar:  # fmt: skip
        task = bar.add_task("domain shift", total=n_steps)
        for shift in shifts:
            shifted = apply_shift(shift, crops, args.seed)
            for key, model in models.items():
                bar.update(task, description=f"{shift} · {Path(key).name}")
                results[key]["shifts"][shift] = pbc_metrics(model, labels, shifted, anomaly_classes, thresholds[key])
                bar.advance(task)
        if use_bccd:
            bccd_crops = load_bccd(bccd, args.bccd_fields)
            for key, model in models.items():
                bar.update(task, description=f"bccd · {Path(key).name}")
                results[key]["bccd"] = bccd_metrics(model, bccd_crops, thresholds[key])
                bar.advance(task)

    out: dict[str, Any] = {
        "data": str(data),
        "split": args.split,
        "per_class": args.per_class,
        "labels": dict(Counter(labels)),
        "anomaly_classes": anomaly_classes,
        "seed": args.seed,
        "shifts": shifts,
        "confident_threshold": CONFIDENT,
        "bccd": {"folder": str(bccd), "fields": args.bccd_fields, "box_enlarge": 1.25} if use_bccd else None,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "seconds": round(time.perf_counter() - t_start, 1),
        "models": results,
        "summary": summarise(results),
    }
    emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
