"""The classifier's CPU engine: channels-first against channels-last UNet evaluations, in one run; prints JSON.

    python benchmarks/cpu_engine.py --per-class 4 --threads 2

Classifies the same `val` cells (canonical crops where the model has a spec) with the fast procedure and its
anomaly scoring twice: with the UNet in channels-first memory (the engine before) and in channels-last (the
default on the CPU now), alternating to share the machine's noise. Reports cells/s of each, their ratio, and
how far the two agree: labels, the largest score and probability differences.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from scope_stream.classify.classifier import DiffusionClassifier
    from scope_stream.classify.data import load_crops
    from scope_stream.datasets import pbc_root

    clf = DiffusionClassifier.load(args.model, "cpu")
    cells = load_crops(
        args.data or pbc_root(),
        clf.image_size,
        split=args.split,
        classes=clf.classes,
        limit_per_class=args.per_class,
        canonical=clf.canonical,
    )

    def run(channels_last: bool) -> tuple[float, object]:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        clf.unet.to(memory_format=fmt)
        clf.denoiser.channels_last = channels_last
        t0 = time.perf_counter()
        s = clf.score(cells.images, "fast", canonical=False)
        return time.perf_counter() - t0, s

    times: dict[bool, list[float]] = {False: [], True: []}
    scores: dict[bool, object] = {}
    for _ in range(args.repeats):
        for cl in (False, True):
            dt, s = run(cl)
            times[cl].append(dt)
            scores[cl] = s
    a, b = scores[False], scores[True]
    n = len(cells)
    first = {cl: n / min(t) for cl, t in times.items()}
    out = {
        "benchmark": "cpu_engine",
        "model_id": clf.model_id,
        "cells": n,
        "torch_threads": args.threads,
        "channels_first_cells_per_s": first[False],
        "channels_last_cells_per_s": first[True],
        "speedup_x": first[True] / first[False],
        "same_label": float(np.mean(a.labels == b.labels)),  # type: ignore[attr-defined]
        "max_score_diff": float(np.max(np.abs(a.scores - b.scores))),  # type: ignore[attr-defined]
        "max_probability_diff": float(np.max(np.abs(a.probabilities - b.probabilities))),  # type: ignore[attr-defined]
        "max_anomaly_diff": float(np.max(np.abs(a.anomaly - b.anomaly))),  # type: ignore[attr-defined]
        "evaluations_per_cell": float(np.mean(b.evaluations)),  # type: ignore[attr-defined]
    }
    emit(out, args.json)


if __name__ == "__main__":
    main()
