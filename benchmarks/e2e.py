"""End-to-end benchmark: a demo scan of the virtual slide through the whole pipeline with the shipped model.

Prints one JSON object: tiles/s, per-tile latency p50/p95 (source send -> stored), cells, flags, and the
sensitivity / false-flag figures against the planted truth. Run from the repository root:

    python benchmarks/e2e.py [--quick] [--workers N] [--procedure fast|reference]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 500 x 500 µm scan instead of the demo's 1.2 x 1.2 mm")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--procedure", choices=["fast", "reference"], default="fast")
    ap.add_argument("--out", type=Path, default=None, help="keep the store and report here")
    args = ap.parse_args()

    from scope_stream.demo.run import default_demo_config, run_demo

    cfg = default_demo_config()
    updates: dict[str, object] = {"classifier": cfg.classifier.model_copy(update={"procedure": args.procedure})}
    if args.quick:
        updates["scan"] = cfg.scan.model_copy(update={"x1_um": 500.0, "y1_um": 500.0, "reimage_budget": 2})
    if args.workers is not None:
        updates["pipeline"] = cfg.pipeline.model_copy(update={"n_workers": args.workers})
    cfg = cfg.model_copy(update=updates)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        report = run_demo(cfg, out, viewer=False)
    gt = report.get("ground_truth", {})
    result = {
        "benchmark": "e2e",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
        "workers": cfg.pipeline.n_workers,
        "procedure": args.procedure,
        "scan_um": [cfg.scan.x1_um - cfg.scan.x0_um, cfg.scan.y1_um - cfg.scan.y0_um],
        "tiles": report["tiles"],
        "cells": report["cells"],
        "flagged": len(report["flagged"]),
        "scan_seconds": report["speed"]["scan_seconds"],
        "tiles_per_s": report["speed"]["tiles_per_s"],
        "latency_ms": report["speed"]["latency_ms"],
        "wbc_per_s": round(report["cells"]["WBC"] / report["speed"]["scan_seconds"], 3)
        if report["speed"]["scan_seconds"]
        else None,
        "sensitivity": gt.get("sensitivity"),
        "false_flags_per_100_wbc": gt.get("false_flags_per_100_wbc"),
        "wbc_recall": gt.get("wbc_recall"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
