"""``scope-stream train``, ``scope-stream generate`` and ``scope-stream evaluate classifier``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .app import app, evaluate_app, fail

if TYPE_CHECKING:
    from scope_stream.classify.data import CropSet

PRECISION_HELP = (
    "UNet arithmetic: auto (bf16 on CUDA, float32 on CPU), fp32 (also TF32 off: GPU scores then match the "
    "CPU's, as a calibration made on a GPU for CPU use needs) or bf16."
)


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="A training config (kind: train).")],
    out: Annotated[Path | None, typer.Option(help="Override the output folder.")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the number of steps.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Override the wall-clock budget.")] = None,
) -> None:
    """Train the diffusion classifier (or the baseline CNN) on a folder with labels.csv."""
    from scope_stream.config import ConfigError, load_train_config

    try:
        cfg = load_train_config(config)
        if out is not None:
            cfg.out = out
        if steps is not None:
            cfg.steps = steps
        if max_minutes is not None:
            cfg.max_minutes = max_minutes
    except (ConfigError, ValueError) as exc:
        raise fail(str(exc)) from exc
    try:
        if cfg.model_type == "autoencoder":
            from scope_stream.classify.autoencoder import train_autoencoder

            train_autoencoder(cfg)
        elif cfg.model_type == "baseline":
            from scope_stream.classify.baseline import train_baseline

            train_baseline(cfg)
        else:
            from scope_stream.classify.train import train_diffusion

            train_diffusion(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option(help="Model directory to calibrate (writes calibration.json into it).")],
    run: Annotated[Path, typer.Option(help="The training run folder holding holdout.json.")],
    per_class: Annotated[int, typer.Option(help="At most this many held-out cells per class.")] = 50,
    noises: Annotated[int, typer.Option(help="Candidate noises per candidate timestep.")] = 2,
    false_flag_rate: Annotated[
        float,
        typer.Option(
            help="The anomaly flag threshold the model ships flags this share of normal held-out cells (0.15: "
            "a screening operating point, 0.85).",
            min=0.001,
            max=0.5,
        ),
    ] = 0.15,
    uncertain_flag_rate: Annotated[
        float,
        typer.Option(
            help="The uncertainty flag threshold the model ships flags this share of the temperature cells.",
            min=0.001,
            max=0.5,
        ),
    ] = 0.05,
    centre_sigma: Annotated[
        float,
        typer.Option(
            help="Weight the denoising error towards the crop centre: a Gaussian with this standard deviation, "
            "as a fraction of the crop side (0: CytoDiffusion's plain mean over the crop).",
            min=0.0,
            max=5.0,
        ),
    ] = 0.22,
    feature_bank: Annotated[
        int,
        typer.Option(
            help="Training cells per class in the feature bank of the feature-distance anomaly score "
            "(0: no bank, no feature score).",
            min=0,
        ),
    ] = 500,
    feature_layer: Annotated[str, typer.Option(help="UNet block the features come from: mid, upN or downN.")] = "up0",
    feature_timesteps: Annotated[
        str, typer.Option(help="Comma-separated timesteps the features are averaged over (one noise each).")
    ] = "250,250,250,250",
    feature_k: Annotated[int, typer.Option(help="The k of the k-nearest-neighbour distance.", min=1)] = 20,
    runner_up: Annotated[
        bool,
        typer.Option(
            help="The probe also denoises with the runner-up class at its timesteps (one more evaluation "
            "each): the paired probe_gap score."
        ),
    ] = True,
    combine: Annotated[
        str,
        typer.Option(
            help="Anomaly scores the flagging score joins (Fisher's method), comma-separated: relative "
            "(CytoDiffusion's), gap (top-2), feature (needs a feature bank), probe_gap (needs a feature bank "
            "and --runner-up). Empty: the relative score alone."
        ),
    ] = "gap,probe_gap,feature",
    anomaly_only: Annotated[
        bool,
        typer.Option(
            help="Refit only the anomaly scoring (feature bank, probe, combined score) of an already calibrated "
            "model: its fast plan and temperatures stay, so no classification changes."
        ),
    ] = False,
    temperature_share: Annotated[
        float,
        typer.Option(
            help="Share of the held-out cells kept out of choosing the fast plan: the temperatures are fitted "
            "on them alone (and their shifted copies), so the probabilities hold for cells the plan never saw.",
            min=0.0,
            max=0.9,
        ),
    ] = 0.5,
    shifted: Annotated[
        str,
        typer.Option(
            help="Comma-separated simulated shifts (scope_stream.classify.shifts) whose copies of the "
            "temperature cells join the temperature fit, so the probabilities hold on other microscopes "
            "too. Empty: none."
        ),
    ] = "combo",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
) -> None:
    """Fit temperature, fast-procedure plan, anomaly reference and flag thresholds on held-out train cells."""
    import json

    from scope_stream.classify.anomaly import COMPONENTS
    from scope_stream.classify.classifier import DiffusionClassifier
    from scope_stream.classify.evaluate import calibrate as do_calibrate
    from scope_stream.classify.evaluate import holdout_set, refit_anomaly, training_set
    from scope_stream.classify.features import FeatureProbe, layer_module
    from scope_stream.classify.model import ModelError

    parts = tuple(_parse_list(combine))
    bad = [c for c in parts if c not in COMPONENTS]
    if bad:
        raise fail(f"--combine: unknown anomaly score(s) {bad}; choose from {', '.join(COMPONENTS)}")
    if ("feature" in parts or "probe_gap" in parts) and feature_bank == 0:
        raise fail("--combine feature and probe_gap need a feature bank (--feature-bank > 0)")
    if "probe_gap" in parts and not runner_up:
        raise fail("--combine probe_gap needs --runner-up (the probe must run the runner-up class)")
    try:
        ts = [int(t) for t in _parse_list(feature_timesteps)]
        probe = FeatureProbe(feature_layer, ts, [801 + i for i in range(len(ts))], feature_k, runner_up)
        clf = DiffusionClassifier.load(model, device, precision)
        layer_module(clf.unet, feature_layer)
        if anomaly_only and clf.calibration is None:
            raise ValueError(f"--anomaly-only: {model} is not calibrated yet (run without --anomaly-only first)")
        cells = holdout_set(run, clf.image_size, per_class, canonical=clf.canonical)
        bank = (
            training_set(run, clf.image_size, clf.classes, feature_bank, canonical=clf.canonical)
            if feature_bank
            else None
        )
        shifted_cells = None
        shift_names = _parse_list(shifted) if temperature_share > 0 and not anomaly_only else []
        for k, name in enumerate(shift_names):
            part = holdout_set(run, clf.image_size, per_class, seed=k, canonical=clf.canonical, shift=name)
            shifted_cells = part if shifted_cells is None else _concat(shifted_cells, part)
    except (ModelError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc
    info = {
        "fitted_on": f"{len(cells)} cells held out of the training split ({run}/holdout.json)",
        "per_class": per_class,
    }
    try:
        if anomaly_only:
            info = {"anomaly_refit_on": info["fitted_on"], "anomaly_per_class": per_class}
            out = refit_anomaly(clf, cells, bank_cells=bank, probe=probe, combine=parts, info=info)
        else:
            out = do_calibrate(
                clf,
                cells,
                noises_per_timestep=noises,
                false_flag_rate=false_flag_rate,
                uncertain_flag_rate=uncertain_flag_rate,
                centre_sigma=centre_sigma,
                bank_cells=bank,
                probe=probe,
                combine=parts,
                info=info,
                temperature_share=temperature_share,
                shifted_cells=shifted_cells,
            )
    except ValueError as exc:  # CalibrationError included: nothing was written
        raise fail(str(exc)) from exc
    typer.echo(
        json.dumps(
            {
                "plan": out["fast"]["plan"],
                "temperature": out["fast"]["temperature"],
                "info": {k: v for k, v in out["info"].items() if "candidate" not in k},
            },
            indent=2,
        )
    )


def _concat(a: CropSet, b: CropSet) -> CropSet:
    import numpy as np

    from scope_stream.classify.data import CropSet

    return CropSet(np.concatenate([a.images, b.images]), a.labels + b.labels, a.paths + b.paths, a.refused | b.refused)


def _parse_list(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


@evaluate_app.command("classifier")
def evaluate_classifier(
    data: Annotated[Path, typer.Option(help="A folder with labels.csv (path,label[,split]).")],
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the metrics JSON.")],
    model: Annotated[Path | None, typer.Option(help="Model directory (default: the shipped model).")] = None,
    anomaly_classes: Annotated[str | None, typer.Option(help="Comma-separated labels counted as anomalies.")] = None,
    split: Annotated[str | None, typer.Option(help="Only rows of this split (default: all rows).")] = None,
    procedure: Annotated[str, typer.Option(help="fast or reference.")] = "fast",
    limit_per_class: Annotated[int | None, typer.Option(help="At most this many cells per label (seeded).")] = None,
    png: Annotated[Path | None, typer.Option(help="Reliability diagram PNG (default: next to the JSON).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
) -> None:
    """Accuracy, balanced accuracy, macro-F1, recalls, confusion, ECE, anomaly AUROC and a reliability PNG."""
    import json

    from scope_stream.classify.baseline import CnnClassifier, is_cnn_dir
    from scope_stream.classify.classifier import DEFAULT_MODEL_DIR, DiffusionClassifier
    from scope_stream.classify.data import load_crops
    from scope_stream.classify.evaluate import metrics_report
    from scope_stream.classify.model import ModelError
    from scope_stream.datasets import DatasetError

    if procedure not in ("fast", "reference"):
        raise fail(f"--procedure must be fast or reference, got {procedure!r}")
    model_dir = model if model is not None else DEFAULT_MODEL_DIR
    try:
        clf: CnnClassifier | DiffusionClassifier = (
            CnnClassifier(model_dir, device)
            if is_cnn_dir(model_dir)
            else DiffusionClassifier.load(model_dir, device, precision)
        )
        cells = load_crops(
            data,
            clf.image_size,
            split=split,
            limit_per_class=limit_per_class,
            progress=True,
            canonical=clf.canonical,
        )
    except (ModelError, DatasetError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc
    from rich.console import Console

    console = Console(stderr=True)
    console.print(f"scoring {len(cells)} cells with {clf.model_id} ({procedure}) ...")
    if cells.refused:
        console.print(f"[yellow]{len(cells.refused)} crops left out: no white cell found in them[/yellow]")
    s = clf.score(cells.images, procedure, canonical=False)  # type: ignore[arg-type]
    png_path = png if png is not None else json_out.with_suffix(".png")
    rep = metrics_report(
        clf.classes, cells.labels, s, _parse_list(anomaly_classes), png_path, f"{clf.model_id} ({procedure})"
    )
    rep.update(
        {
            "model_id": clf.model_id,
            "model_dir": str(model_dir),
            "procedure": procedure,
            "data": str(data),
            "split": split,
            "limit_per_class": limit_per_class,
            "canonical": clf.canonical.to_json() if clf.canonical is not None else None,
            "n_refused": len(cells.refused),
            "refused": dict(list(cells.refused.items())[:50]),
        }
    )
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(rep, indent=2), encoding="utf-8")
    keys = (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "ece_15",
        "anomaly_auroc",
        "evaluations_per_cell",
        "cells_per_s",
    )
    console.print_json(json.dumps({k: rep.get(k) for k in keys}))


@app.command()
def generate(
    label: Annotated[str, typer.Option(help="The class to sample.")],
    n: Annotated[int, typer.Option("-n", help="Number of cells.")] = 16,
    out: Annotated[Path, typer.Option(help="Grid PNG to write.")] = Path("generated.png"),
    model: Annotated[Path | None, typer.Option(help="Model directory (default: the shipped model).")] = None,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Sample synthetic cells of one class from the diffusion model into a grid PNG."""
    from scope_stream.classify.classifier import DiffusionClassifier
    from scope_stream.classify.generate import sample_cells, save_grid
    from scope_stream.classify.model import ModelError

    try:
        clf = DiffusionClassifier.load(model, device)
        imgs = sample_cells(clf, label, n, steps, seed)
    except (ModelError, ValueError) as exc:
        raise fail(str(exc)) from exc
    typer.echo(str(save_grid(imgs, out)))
