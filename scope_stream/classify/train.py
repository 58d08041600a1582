"""Training the class-conditional diffusion model (epsilon prediction, EMA, resumable checkpoints).

Layout of ``cfg.out``::

    checkpoint/raw.safetensors  checkpoint/ema.safetensors  checkpoint/optimizer.safetensors
    checkpoint/state.json       (step, elapsed seconds, optimizer param groups, config)
    raw/  ema/                  loadable model directories (model.safetensors + config.json)
    holdout.json                the training cells held out for calibration (never trained on)
    train_log.jsonl             one line per log interval: step, loss, lr, cells/s

Every write goes through a temporary file and a rename, so a killed run never leaves a broken
checkpoint; ``resume: true`` continues from the last one with the same data order.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scope_stream.config.train import TrainConfig
from scope_stream.datasets import pbc_root

from .data import CropSet, augment, holdout_mask, load_crops, to_model_input
from .model import ModelSpec, alphas_cumprod, build_unet, pick_device, save_unet

if TYPE_CHECKING:
    from .canonical import CanonicalSpec

__all__ = [
    "TrainResult",
    "canonical_spec",
    "jpeg_copies",
    "lr_at",
    "prepare_training",
    "spec_from_config",
    "train_diffusion",
]

log = logging.getLogger(__name__)


class TrainResult(dict[str, Any]):
    """Summary of a run: ``steps``, ``final_loss``, ``minutes``, ``out``, ``ema_dir``, ``raw_dir``."""


def spec_from_config(cfg: TrainConfig, classes: list[str], latent: tuple[int, int] = (0, 0)) -> ModelSpec:
    """The model spec for ``cfg``; ``latent`` = (channels, size) of the autoencoder's latents, if any."""
    return ModelSpec(
        latent_channels=latent[0],
        latent_size=latent[1],
        classes=list(classes),
        image_size=cfg.image_size,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_levels=list(cfg.attention_levels),
        norm_num_groups=cfg.norm_num_groups,
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        canonical=canonical_spec(cfg).to_json() if cfg.canonical is not None else None,
    )


def canonical_spec(cfg: TrainConfig) -> CanonicalSpec:
    """The canonical-crop spec of a training config (its ``canonical`` section at ``image_size``)."""
    from .canonical import CanonicalSpec

    if cfg.canonical is None:
        raise ValueError("the training config has no 'canonical' section")
    c = cfg.canonical
    return CanonicalSpec(size=cfg.image_size, cell_fraction=c.cell_fraction, context=c.context, stain=c.stain)


def lr_at(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warmup, then cosine decay to ``lr * min_lr_ratio`` over the step or time budget."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = step / cfg.steps
    if cfg.max_minutes:
        frac = max(frac, elapsed_s / (cfg.max_minutes * 60.0))
    frac = min(1.0, max(0.0, frac))
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))


def jpeg_copies(images: np.ndarray, seed: int, quality: tuple[int, int] = (30, 90)) -> np.ndarray:
    """Each crop after a JPEG round trip at a quality drawn uniformly from ``quality`` (made once per run;
    training swaps a crop for its copy on a ``jpeg_probability`` share of draws)."""
    import io

    from PIL import Image

    rng = np.random.default_rng([seed, 7])
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def pick_jpeg(images: Any, jpeg: Any, idx: np.ndarray, rng: np.random.Generator, probability: float) -> Any:
    """The batch ``images[idx]``, each crop swapped for its JPEG copy with ``probability`` (no draw when off)."""
    if jpeg is None or probability <= 0:
        return images[idx]
    import torch

    swap = torch.from_numpy(rng.random(len(idx)) < probability)[:, None, None, None].to(images.device)
    return torch.where(swap, jpeg[idx], images[idx])


def resolve_data(cfg: TrainConfig) -> Path:
    data = cfg.data if cfg.data is not None else pbc_root()
    if not (Path(data) / "labels.csv").is_file():
        raise FileNotFoundError(f"training data {data} has no labels.csv (set 'data:' in the config)")
    return Path(data)


def prepare_training(cfg: TrainConfig, progress: bool = True) -> tuple[str, Path, CropSet, np.ndarray]:
    """What every trainer starts with: torch threads, the device, the data folder, its crops at the model
    size and the hold-out mask, so diffusion model, baseline and autoencoder hold out the same cells."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    data = resolve_data(cfg)
    crops = load_crops(
        data,
        cfg.image_size,
        split=cfg.train_split,
        classes=cfg.classes,
        exclude=cfg.exclude_classes,
        progress=progress,
        canonical=canonical_spec(cfg) if cfg.canonical is not None else None,
    )
    return device, data, crops, holdout_mask(crops.paths, crops.labels, cfg.holdout_fraction, seed=cfg.seed)


def _save_optimizer(opt: Any, path: Path) -> list[dict[str, Any]]:
    import torch
    from safetensors.torch import save_file

    sd = opt.state_dict()
    flat: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            flat[f"{idx}.{k}"] = torch.as_tensor(v).detach().float().contiguous().cpu()
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp))
    tmp.replace(path)
    return [{k: v for k, v in g.items()} for g in sd["param_groups"]]


def _load_optimizer(opt: Any, path: Path, groups: list[dict[str, Any]]) -> None:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    state: dict[int, dict[str, Any]] = {}
    for key, v in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def train_diffusion(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train (or resume) the diffusion model described by ``cfg``; returns a summary."""
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(cfg.out)
    ck = out / "checkpoint"
    ck.mkdir(parents=True, exist_ok=True)
    device, data, crops, hold = prepare_training(cfg, progress)
    use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.startswith("cuda"))
    classes = sorted(set(crops.labels)) if cfg.classes is None else list(cfg.classes)
    missing = [c for c in classes if c not in set(crops.labels)]
    if missing:
        raise ValueError(f"classes {missing} have no training images in {data}")
    _write_json(
        out / "holdout.json",
        {
            "data": str(data),
            "split": cfg.train_split,
            "paths": [str(p) for p, h in zip(crops.paths, hold, strict=True) if h],
        },
    )
    train = crops.subset(~hold)
    y_all = train.label_indices(classes)
    # uint8 crops: on a GPU they live there (a few hundred MB at most), so a batch is gathered without a copy
    on_gpu = device.startswith("cuda")
    images = torch.from_numpy(train.images).to(device if on_gpu else "cpu")
    jpeg = torch.from_numpy(jpeg_copies(train.images, cfg.seed)) if cfg.jpeg_probability > 0 else None
    if jpeg is not None and on_gpu:
        jpeg = jpeg.to(device)
    by_class = [np.flatnonzero(y_all == k) for k in range(len(classes))]

    vae: Any = None
    latent = (0, 0)
    if cfg.autoencoder is not None:
        from .autoencoder import encode, load_autoencoder

        vae, ae_spec = load_autoencoder(cfg.autoencoder, device)
        if ae_spec.image_size != cfg.image_size:
            raise ValueError(
                f"autoencoder {cfg.autoencoder} expects {ae_spec.image_size}px crops, not {cfg.image_size}"
            )
        latent = (ae_spec.latent_channels, ae_spec.latent_size)
    spec = spec_from_config(cfg, classes, latent)
    torch.manual_seed(cfg.seed)
    unet: Any = build_unet(spec).to(device)
    ema = {k: v.detach().clone().float() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    acp = alphas_cumprod(spec).to(device)
    step, elapsed = 0, 0.0
    state_path = ck / "state.json"
    if cfg.resume and state_path.is_file():
        st = json.loads(state_path.read_text(encoding="utf-8"))
        if st.get("classes") != classes or ModelSpec.from_json(st.get("spec", {"classes": []})) != spec:
            raise ValueError(f"{state_path} was written for a different model or class list; use a new 'out'")
        unet.load_state_dict(load_file(str(ck / "raw.safetensors")))
        ema = {k: v.to(device) for k, v in load_file(str(ck / "ema.safetensors")).items()}
        _load_optimizer(opt, ck / "optimizer.safetensors", st["param_groups"])
        step, elapsed = int(st["step"]), float(st["elapsed_s"])
        log.info("resumed from step %d (%.1f min)", step, elapsed / 60)
    ema = {k: v.to(device) for k, v in ema.items()}
    n_params = sum(p.numel() for p in unet.parameters())
    model_fn: Any = torch.compile(unet) if cfg.compile else unet

    def save_all() -> None:
        save_file(
            {k: v.detach().float().contiguous().cpu() for k, v in unet.state_dict().items()},
            str(ck / "raw.safetensors.tmp"),
        )
        (ck / "raw.safetensors.tmp").replace(ck / "raw.safetensors")
        save_file({k: v.float().contiguous().cpu() for k, v in ema.items()}, str(ck / "ema.safetensors.tmp"))
        (ck / "ema.safetensors.tmp").replace(ck / "ema.safetensors")
        groups = _save_optimizer(opt, ck / "optimizer.safetensors")
        _write_json(
            state_path,
            {
                "step": step,
                "elapsed_s": elapsed,
                "classes": classes,
                "spec": spec.to_json(),
                "param_groups": groups,
                "config": cfg.model_dump(mode="json"),
                "n_params": n_params,
            },
        )
        save_unet(out / "raw", unet, spec)
        save_unet(out / "ema", ema, spec)
        if cfg.autoencoder is not None:
            for sub in ("raw", "ema"):
                dst = out / sub / "autoencoder"
                dst.mkdir(exist_ok=True)
                for name in ("model.safetensors", "config.json"):
                    shutil.copyfile(Path(cfg.autoencoder) / name, dst / name)

    log_fh = (out / "train_log.jsonl").open("a", encoding="utf-8")
    interactive = progress and sys.stderr.isatty()
    budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes else math.inf
    header = (
        f"training {n_params / 1e6:.2f}M-param UNet on {len(train)} cells ({len(classes)} classes: "
        f"{', '.join(classes)}), {int(hold.sum())} held out; device {device}"
        f"{' bf16' if use_bf16 else ''}; from step {step} to {cfg.steps} or {cfg.max_minutes} min"
    )
    print(header, flush=True)
    losses: list[float] = []
    last_ck = time.monotonic()
    t_start = time.monotonic() - elapsed
    prog = None
    task = None
    if interactive:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        prog = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        prog.start()
        task = prog.add_task("train", total=cfg.steps, completed=step, info="")
    unet.train()
    # The EMA update as two fused list operations (one per step, not two kernels per tensor): the state
    # dict's tensors share storage with the parameters, so these lists stay current as the optimiser steps.
    live = unet.state_dict()
    float_keys = [k for k, v in live.items() if v.dtype.is_floating_point]
    other_keys = [k for k, v in live.items() if not v.dtype.is_floating_point]
    ema_float = [ema[k] for k in float_keys]
    live_float = [live[k].detach() for k in float_keys]
    t_log = time.monotonic()
    n_log = 0
    try:
        while step < cfg.steps and elapsed < budget_s:
            rng = np.random.default_rng([cfg.seed, step])
            if cfg.balanced_sampling:
                ks = rng.integers(0, len(classes), cfg.batch_size)
                idx = np.array([by_class[k][rng.integers(0, len(by_class[k]))] for k in ks])
            else:
                idx = rng.integers(0, len(train), cfg.batch_size)
            gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
            x0 = augment(
                to_model_input(pick_jpeg(images, jpeg, idx, rng, cfg.jpeg_probability), device),
                gen,
                **cfg.augmentation(),
            )
            if vae is not None:
                with torch.no_grad():
                    x0 = encode(vae, ae_spec, x0, sample=True, generator=gen)
            labels = torch.as_tensor(y_all[idx], device=device)
            if on_gpu:  # the batch's noise drawn where it is used: no CPU draw and copy per step
                gdev = torch.Generator(device=device).manual_seed(int(rng.integers(0, 2**62)))
                noise = torch.randn(x0.shape, generator=gdev, device=device)
                t = torch.randint(0, spec.num_train_timesteps, (x0.shape[0],), generator=gdev, device=device)
            else:  # the CPU draws as before, so earlier CPU runs replay exactly
                noise = torch.randn(x0.shape, generator=gen).to(device)
                t = torch.randint(0, spec.num_train_timesteps, (x0.shape[0],), generator=gen).to(device)
            a = acp[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            lr = lr_at(cfg, step, elapsed)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(
                device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=use_bf16
            ):
                pred = model_fn(xt, t, class_labels=labels).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_mul_(ema_float, decay)
                torch._foreach_add_(ema_float, live_float, alpha=1 - decay)
                for k in other_keys:
                    ema[k].copy_(live[k])
            losses.append(float(loss.item()))
            n_log += x0.shape[0]
            elapsed = time.monotonic() - t_start
            if step % cfg.log_every == 0 or step == cfg.steps:
                rate = n_log / max(1e-9, time.monotonic() - t_log)
                mean = float(np.mean(losses[-cfg.log_every :]))
                rec = {"step": step, "loss": mean, "lr": lr, "cells_per_s": rate, "elapsed_min": elapsed / 60}
                log_fh.write(json.dumps(rec) + "\n")
                log_fh.flush()
                if not interactive:
                    print(
                        f"step {step} loss {mean:.4f} lr {lr:.2e} {rate:.1f} cells/s {elapsed / 60:.1f} min", flush=True
                    )
                t_log, n_log = time.monotonic(), 0
            if prog is not None and task is not None:
                prog.update(task, completed=step, info=f"loss {np.mean(losses[-20:]):.4f} lr {lr:.1e}")
            if step % cfg.checkpoint_every == 0 or time.monotonic() - last_ck > cfg.checkpoint_minutes * 60:
                save_all()
                last_ck = time.monotonic()
    finally:
        if prog is not None:
            prog.stop()
        save_all()
        log_fh.close()
    final = float(np.mean(losses[-50:])) if losses else float("nan")
    print(
        f"done: step {step}, loss {final:.4f}, {elapsed / 60:.1f} min; models in {out / 'ema'} and {out / 'raw'}",
        flush=True,
    )
    return TrainResult(
        steps=step,
        final_loss=final,
        minutes=elapsed / 60,
        out=str(out),
        ema_dir=str(out / "ema"),
        raw_dir=str(out / "raw"),
        losses=losses,
        n_params=n_params,
    )
