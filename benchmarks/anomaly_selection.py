"""Which flagging score? Anomaly AUROCs of candidate scores on the selection set, never `val`; prints JSON.

    nice -n 10 .venv/bin/python benchmarks/anomaly_selection.py --model models/cytodiffusion-pbc-32-gpu \
        --run runs/pbc-gpu --threads 2 --json runs/anomaly-selection.json

The selection set holds the run's held-out normal cells (``holdout.json``: never trained on; the
calibration cells are among them) against training-split cells of the classes the model left out
(default ig + erythroblast, ``--per-abnormal`` each, never trained on). Candidate scores:

* ``fast_gap`` / ``fast_relative``: the top-2 gap and CytoDiffusion's relative score from the fast plan
  (what the pipeline computes);
* ``feature_tT``: the k-NN distance in pooled UNet features (the model's probe layer, four noises) at
  timestep T, against a bank of ``--bank-per-class`` training cells per class;
* ``probe_gap_tT``: the paired top-2 gap at the same four (timestep, noise) pairs (predicted against
  runner-up class, see ``scope_stream.classify.features``);
* ``full_gap`` / ``full_relative``: the same error scores from every class at every ``--full-levels``
  timestep (``--full-noises`` noises each, no pruning), on every ``--full-every``-th cell (costly);
* ``A+B``: Fisher's combination of ranks, each turned into an upper-tail p-value against the selection
  set's own normal cells (an in-sample rank transform: fine for comparing designs, not a calibration).

Each AUROC is given over all abnormal cells, per abnormal class, and ``val_mix``: with the abnormal
classes weighted as the ``val`` split mixes them (from ``labels.csv`` counts only, no `val` image).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _output import emit  # benchmarks/ is on sys.path when a script runs


def neg_log_p(score: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """``-log`` of each cell's upper-tail p-value among the normal cells' scores."""
    ref = np.sort(score[normal])
    rank = np.searchsorted(ref, score, side="right")
    return np.asarray(-np.log(np.clip(1 - (rank - 0.5) / len(ref), 0.5 / len(ref), 1.0)))


def report(scores: dict[str, np.ndarray], kinds: np.ndarray, mix: dict[str, float]) -> dict[str, Any]:
    """AUROC of each score: all abnormal cells, each abnormal class, and the `val` mix."""
    from scope_stream.classify.metrics import auroc

    abnormal = kinds != "normal"
    normal = ~abnormal
    counts = {k: int(np.sum(kinds == k)) for k in mix}
    weight = np.array([1.0 if k == "normal" else mix.get(k, 0.0) / max(counts.get(k, 1), 1) for k in kinds])
    out: dict[str, Any] = {}
    for name, s in scores.items():
        row = {"all": auroc(s, abnormal), "val_mix": auroc(s, abnormal, weights=weight)}
        for k in mix:
            keep = normal | (kinds == k)
            row[k] = auroc(s[keep], abnormal[keep])
        out[name] = {key: round(v, 4) for key, v in row.items()}
    return out


def combos(scores: dict[str, np.ndarray], normal: np.ndarray, gap: str, others: list[str]) -> dict[str, np.ndarray]:
    """``gap`` joined (Fisher) with each of ``others``, and with all of them."""
    nl = {k: neg_log_p(scores[k], normal) for k in [gap, *others]}
    out = {f"{gap}+{k}": nl[gap] + nl[k] for k in others}
    if len(others) > 1:
        out[f"{gap}+" + "+".join(others)] = nl[gap] + sum(nl[k] for k in others)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--run", type=Path, required=True, help="its training run (holdout.json names the held-out cells)")
    ap.add_argument("--abnormal", default="ig,erythroblast", help="left-out classes that play the abnormal cells")
    ap.add_argument("--per-abnormal", type=int, default=200, help="training-split cells per abnormal class")
    ap.add_argument("--normal-per-class", type=int, default=None, help="held-out cells per class (default: all)")
    ap.add_argument("--bank-per-class", type=int, default=500, help="training cells per class in the feature bank")
    ap.add_argument("--probe-timesteps", default="250,400", help="feature-probe timesteps to compare")
    ap.add_argument("--full-levels", default="", help="timesteps for the unpruned error scores (empty: skip)")
    ap.add_argument("--full-noises", type=int, default=2, help="noises per full-level timestep")
    ap.add_argument("--full-every", type=int, default=2, help="unpruned scores on every N-th selection cell")
    ap.add_argument("--seed", type=int, default=3, help="picks the abnormal cells")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: 8 normal, 12 abnormal and 24 bank cells per class"
    )
    args = ap.parse_args()
    if args.quick:
        args.normal_per_class, args.per_abnormal, args.bank_per_class = 8, 12, 24

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from scope_stream.classify.anomaly import relative_score, top2_gap
    from scope_stream.classify.classifier import DiffusionClassifier
    from scope_stream.classify.data import load_crops
    from scope_stream.classify.evaluate import holdout_set, training_set
    from scope_stream.classify.features import FeatureBank, FeatureProbe
    from scope_stream.classify.procedures import collect_errors, level_noises
    from scope_stream.datasets import read_labels_csv

    t_start = time.perf_counter()
    clf = DiffusionClassifier.load(args.model, args.device)
    abnormal_classes = [c for c in args.abnormal.split(",") if c]
    if not abnormal_classes:
        raise SystemExit("--abnormal names no class")
    known = [c for c in abnormal_classes if c in clf.classes]
    if known:
        raise SystemExit(f"--abnormal {known}: the model was trained on these, they cannot play abnormal cells")
    holdout = args.run / "holdout.json"
    if not holdout.is_file():
        raise SystemExit(
            f"{holdout} not found: --run must be the training run of the model (it names its held-out cells)"
        )
    info = json.loads(holdout.read_text(encoding="utf-8"))
    data = Path(info["data"])
    normals = holdout_set(args.run, clf.image_size, args.normal_per_class)
    train = load_crops(data, clf.image_size, split="train", classes=abnormal_classes)
    labs = np.array(train.labels)
    rng = np.random.default_rng(args.seed)
    idx: list[int] = []
    for c in abnormal_classes:
        own = np.flatnonzero(labs == c)
        idx += sorted(rng.permutation(own)[: args.per_abnormal].tolist())
    abnormal = train.subset(idx)
    kinds = np.array(["normal"] * len(normals) + list(abnormal.labels))
    normal = kinds == "normal"
    truth = np.concatenate([normals.label_indices(clf.classes), np.full(len(abnormal), -1)])  # -1: abnormal
    val_counts = {c: 0 for c in abnormal_classes}
    for row in read_labels_csv(data):
        if row.split == "val" and row.label in val_counts:
            val_counts[row.label] += 1
    total = sum(val_counts.values())  # no `val` split: weight the abnormal classes equally
    mix = {c: (n / total if total else 1 / len(val_counts)) for c, n in val_counts.items()}

    x0 = clf.prepare(np.concatenate([normals.images, abnormal.images]))
    t0 = time.perf_counter()
    fast = np.concatenate([clf.run(x0[s : s + 128], "fast").scores for s in range(0, len(x0), 128)])
    fast_seconds = time.perf_counter() - t0
    pred = fast.argmin(axis=1)
    scores: dict[str, np.ndarray] = {"fast_gap": -top2_gap(fast), "fast_relative": -relative_score(fast)}

    bank_cells = training_set(args.run, clf.image_size, clf.classes, args.bank_per_class)
    xb = clf.prepare(bank_cells.images)
    yb = bank_cells.label_indices(clf.classes)
    layer = clf.feature_bank.probe.layer if clf.feature_bank is not None else "up0"
    feature_names = []
    runner_up = np.argsort(fast, axis=1, kind="stable")[:, 1]
    for t in [int(v) for v in args.probe_timesteps.split(",") if v]:
        probe = FeatureProbe(layer=layer, timesteps=[t] * 4, noise_seeds=[801, 802, 803, 804], k=20, runner_up=True)
        bank = FeatureBank.fit(clf.features_with(probe, xb, yb), yb, probe)
        res = clf.probe_with(probe, x0, pred, runner_up)
        assert res.pair_gap is not None
        scores[f"feature_t{t}"] = bank.distance(res.features)
        scores[f"probe_gap_t{t}"] = -res.pair_gap
        feature_names.append(f"feature_t{t}")
    scores |= combos(scores, normal, "fast_gap", feature_names)
    for t in [int(v) for v in args.probe_timesteps.split(",") if v]:  # the probe's design: both of its scores
        nl = [neg_log_p(scores[k], normal) for k in ("fast_gap", f"probe_gap_t{t}", f"feature_t{t}")]
        scores[f"fast_gap+probe_gap_t{t}+feature_t{t}"] = sum(nl)
    out: dict[str, Any] = {
        "model_id": clf.model_id,
        "run": str(args.run),
        "n_normal": int(normal.sum()),
        "n_abnormal": {c: int(np.sum(kinds == c)) for c in abnormal_classes},
        "val_mix": {c: round(v, 4) for c, v in mix.items()},
        "bank_cells": len(bank_cells),
        "feature_layer": layer,
        "held_out_accuracy": float(np.mean(pred[normal] == truth[normal])),
        "fast_evaluations_note": f"fast plan on {len(x0)} cells in {fast_seconds:.0f} s",
        "auroc": report(scores, kinds, mix),
    }

    levels = [int(v) for v in args.full_levels.split(",") if v]
    if levels:
        every = np.arange(0, len(x0), max(args.full_every, 1))
        ts = [t for t in levels for _ in range(args.full_noises)]
        noise = level_noises(list(range(901, 901 + len(ts))), tuple(x0.shape[1:]))
        t0 = time.perf_counter()
        err = np.concatenate(
            [
                collect_errors(clf.denoiser, x0[every[s : s + 64]], len(clf.classes), ts, noise)
                for s in range(0, len(every), 64)
            ]
        )
        mean = err.mean(axis=2)
        kept_normal = normal[every]
        sub = {k: v[every] for k, v in scores.items() if k in ("fast_gap", *feature_names)}
        sub["full_gap"], sub["full_relative"] = -top2_gap(mean), -relative_score(mean)
        sub |= combos(sub, kept_normal, "fast_gap", feature_names)
        sub |= combos(sub, kept_normal, "full_gap", feature_names)
        out["full_levels"] = {
            "timesteps": levels,
            "noises_per_timestep": args.full_noises,
            "evaluations_per_cell": len(ts) * len(clf.classes),
            "n_cells": len(every),
            "seconds": round(time.perf_counter() - t0, 1),
            "held_out_accuracy": float(np.mean(mean[kept_normal].argmin(axis=1) == truth[every][kept_normal])),
            "auroc": report(sub, kinds[every], mix),
        }
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    emit(out, args.json)


if __name__ == "__main__":
    main()
