"""Reference (CytoDiffusion) vs fast classification procedure on the same cells; prints JSON.

    nice -n 10 .venv/bin/python benchmarks/classifier.py --model models/cytodiffusion-pbc-32 \
        --split val --per-class 8 --json runs/bench-classifier.json

Reports, for each procedure: UNet evaluations per cell, cells/s (wall clock, this machine), accuracy and
balanced accuracy over the model's classes, plus the speed-ups and the agreement of the two labels.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _output import emit  # benchmarks/ is on sys.path when a script runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=None, help="folder with labels.csv (default: PBC)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--per-class", type=int, default=8, help="cells per known class (reference is slow)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--quick", action="store_true", help="2 cells per class (a smoke run)")
    ap.add_argument(
        "--faithful", action="store_true", help="also CytoDiffusion's own procedure (classify_faithful; slow)"
    )
    args = ap.parse_args()
    if args.quick:
        args.per_class = 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from scope_stream.classify.classifier import DiffusionClassifier
    from scope_stream.classify.data import load_crops
    from scope_stream.classify.metrics import balanced_accuracy
    from scope_stream.datasets import pbc_root

    clf = DiffusionClassifier.load(args.model, args.device)
    data = args.data or pbc_root()
    cells = load_crops(
        data,
        clf.image_size,
        split=args.split,
        classes=clf.classes,
        limit_per_class=args.per_class,
        seed=args.seed,
        canonical=clf.canonical,
    )
    y = cells.label_indices(clf.classes)
    out: dict[str, object] = {
        "model_id": clf.model_id,
        "device": clf.device,
        "n_cells": len(cells),
        "data": str(data),
        "split": args.split,
        "per_class": args.per_class,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "fast_plan": clf.fast_plan.to_json(),
    }
    results = {}
    for proc in ("fast", "reference"):
        clf.denoiser.forward_passes = 0
        t0 = time.perf_counter()
        s = clf.score(cells.images, proc, canonical=False)  # type: ignore[arg-type]
        dt = time.perf_counter() - t0
        results[proc] = s
        out[proc] = {
            "evaluations_per_cell": float(s.evaluations.mean()),
            "evaluations_min_max": [int(s.evaluations.min()), int(s.evaluations.max())],
            "forward_passes": clf.denoiser.forward_passes,
            "seconds": dt,
            "cells_per_s": len(cells) / dt,
            "accuracy": float(np.mean(s.labels == y)),
            "balanced_accuracy": balanced_accuracy(y, s.labels),
        }
        print(f"{proc}: {out[proc]}", file=sys.stderr, flush=True)
    f, r = out["fast"], out["reference"]
    assert isinstance(f, dict) and isinstance(r, dict)
    out["evaluation_reduction_x"] = r["evaluations_per_cell"] / f["evaluations_per_cell"]
    out["wall_clock_speedup_x"] = f["cells_per_s"] / r["cells_per_s"]
    out["accuracy_loss_points"] = 100 * (r["accuracy"] - f["accuracy"])
    out["balanced_accuracy_loss_points"] = 100 * (r["balanced_accuracy"] - f["balanced_accuracy"])
    out["label_agreement"] = float(np.mean(results["fast"].labels == results["reference"].labels))
    if args.faithful:
        from scope_stream.classify.reference import FaithfulParams, classify_faithful

        x0 = clf.prepare(cells.images)
        before = clf.denoiser.evaluations
        t0 = time.perf_counter()
        res = classify_faithful(clf.denoiser, x0, len(clf.classes), FaithfulParams(), clf.spec.num_train_timesteps)
        dt = time.perf_counter() - t0
        labels = res.scores.argmin(axis=1)
        fa = {
            "evaluations_per_cell": float(res.evaluations.mean()),
            "evaluations_min_max": [int(res.evaluations.min()), int(res.evaluations.max())],
            "seconds": dt,
            "cells_per_s": len(cells) / dt,
            "accuracy": float(np.mean(labels == y)),
            "balanced_accuracy": balanced_accuracy(y, labels),
            "denoiser_evaluations": clf.denoiser.evaluations - before,
        }
        out["faithful"] = fa
        # the fast procedure's probe (the anomaly scoring) is counted in its evaluations; the faithful one has none
        out["faithful_vs_fast"] = {
            "evaluation_reduction_x": fa["evaluations_per_cell"] / f["evaluations_per_cell"],
            "wall_clock_speedup_x": f["cells_per_s"] / fa["cells_per_s"],
            "accuracy_loss_points": 100 * (fa["accuracy"] - f["accuracy"]),
            "label_agreement": float(np.mean(results["fast"].labels == labels)),
        }
        print(f"faithful: {fa}", file=sys.stderr, flush=True)
    emit(out, args.json)


if __name__ == "__main__":
    main()
