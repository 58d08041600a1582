"""Classifier throughput against batch size and precision (the fast procedure with its anomaly scoring); JSON.

    python benchmarks/gpu_throughput.py --model models/cytodiffusion-pbc-64-gpu --device cuda \
        --cells 4096 --max-batch 512,2048,8192 --json out.json

Each configuration classifies the same cells (training-split crops, repeated up to ``--cells``; canonical
crops when the model has a spec) once to warm up and then ``--repeats`` times, timed with the device
synchronised; reported: cells/s (median), UNet evaluations per cell, evaluations/s, and the share of
cells whose label equals the float32 reference run's (the first precision listed must be fp32 for that).
Runs on the CPU as well (``--device cpu --cells 64 --max-batch 64``), where it is the same engine's figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _output import emit  # benchmarks/ is on sys.path when a script runs


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=None, help="folder with labels.csv (default: PBC)")
    ap.add_argument("--split", default="train", help="cells to classify (never tuned on: any split serves)")
    ap.add_argument("--cells", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=0, help="cells per classify call (0: all at once)")
    ap.add_argument("--max-batch", default="512,2048,8192", help="UNet evaluations per forward pass")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from scope_stream.classify.classifier import DiffusionClassifier
    from scope_stream.classify.data import load_crops
    from scope_stream.datasets import pbc_root

    probe = DiffusionClassifier.load(args.model, args.device)
    per_class = max(1, args.cells // max(1, len(probe.classes)))
    cells = load_crops(
        args.data or pbc_root(),
        probe.image_size,
        split=args.split,
        classes=probe.classes,
        limit_per_class=per_class,
        canonical=probe.canonical,
    )
    reps = int(np.ceil(args.cells / len(cells)))
    images = np.concatenate([cells.images] * reps)[: args.cells]
    device = probe.device
    del probe
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    for precision in [p.strip() for p in args.precision.split(",") if p.strip()]:
        for mb in [int(b) for b in args.max_batch.split(",") if b.strip()]:
            clf = DiffusionClassifier.load(args.model, args.device, precision=precision, max_batch=mb)
            chunk = args.chunk or len(images)
            clf.score(images[: min(len(images), 256)], "fast", chunk=chunk, canonical=False)  # warm up
            times: list[float] = []
            s = None
            for _ in range(args.repeats):
                _sync(device)
                t0 = time.perf_counter()
                s = clf.score(images, "fast", chunk=chunk, canonical=False)
                _sync(device)
                times.append(time.perf_counter() - t0)
            assert s is not None
            if reference is None and precision == "fp32":
                reference = s.labels.copy()
            med = statistics.median(times)
            row = {
                "precision": precision,
                "max_batch": mb,
                "cells": len(images),
                "seconds_median": med,
                "cells_per_s": len(images) / med,
                "evaluations_per_cell": float(s.evaluations.mean()),
                "evaluations_per_s": float(s.evaluations.sum()) / med,
                "same_label_as_fp32": float(np.mean(s.labels == reference)) if reference is not None else None,
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del clf
    dev_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    best = max(rows, key=lambda r: r["cells_per_s"]) if rows else None
    out = {
        "benchmark": "gpu_throughput",
        "model": str(args.model),
        "device": device,
        "device_name": dev_name,
        "torch": torch.__version__,
        "rows": rows,
        "best": best,
    }
    emit(out, args.json)


if __name__ == "__main__":
    main()
