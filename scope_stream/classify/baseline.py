"""An honest discriminative baseline: a small CNN trained on the same cells, same split, same input size.

Its model directory has ``model.safetensors`` + ``config.json`` (``format: scope-stream-cnn/1``) and a
``calibration.json`` with a temperature fitted on the same held-out training cells. It exposes the
same ``score()`` as :class:`DiffusionClassifier`, so ``scope-stream evaluate classifier`` measures both
alike. Its anomaly scores are the standard ones for discriminative models: ``anomaly`` = 1 - maximum
softmax probability, ``anomaly_absolute`` = minus the maximum logit.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scope_stream.config.train import TrainConfig

from .calibration import fit_temperature, softmax_neg
from .classifier import Scores
from .data import augment, check_crops, model_crops, resize_crops, to_model_input
from .model import CONFIG, WEIGHTS, ModelError, canonical_of, pick_device

if TYPE_CHECKING:
    from .canonical import CanonicalSpec

__all__ = ["CnnClassifier", "build_cnn", "is_cnn_dir", "train_baseline"]

FORMAT = "scope-stream-cnn/1"


def build_cnn(n_classes: int, width: int = 32) -> Any:
    """Conv-BN-ReLU x 2 per stage, three stages (width, 2w, 4w), global average pooling, linear head."""
    import torch.nn as nn

    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    w = width
    return nn.Sequential(
        *stage(3, w),
        nn.MaxPool2d(2),
        *stage(w, 2 * w),
        nn.MaxPool2d(2),
        *stage(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(4 * w, n_classes),
    )


def is_cnn_dir(path: Path) -> bool:
    p = Path(path) / CONFIG
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("format") == FORMAT
    except json.JSONDecodeError:
        return False


def train_baseline(cfg: TrainConfig, width: int = 32, progress: bool = True) -> Path:
    """Train the CNN on ``cfg``'s data/split/classes (hold-out as for the diffusion model); returns its dir."""
    import torch
    from safetensors.torch import save_file

    from .train import canonical_spec, jpeg_copies, pick_jpeg, prepare_training

    device, _, crops, hold = prepare_training(cfg, progress)
    classes = sorted(set(crops.labels)) if cfg.classes is None else list(cfg.classes)
    train, cal = crops.subset(~hold), crops.subset(hold)
    y = torch.as_tensor(train.label_indices(classes))
    imgs = torch.from_numpy(train.images)
    jpeg = torch.from_numpy(jpeg_copies(train.images, cfg.seed)) if cfg.jpeg_probability > 0 else None
    torch.manual_seed(cfg.seed)
    net = build_cnn(len(classes), width).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay or 1e-4)
    by_class = [np.flatnonzero(y.numpy() == k) for k in range(len(classes))]
    t0 = time.monotonic()
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    step = 0
    net.train()
    while step < cfg.steps and time.monotonic() - t0 < budget:
        rng = np.random.default_rng([cfg.seed, step])
        ks = rng.integers(0, len(classes), cfg.batch_size)
        idx = np.array([by_class[k][rng.integers(0, len(by_class[k]))] for k in ks])
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        batch = pick_jpeg(imgs, jpeg, idx, rng, cfg.jpeg_probability)
        x = augment(to_model_input(batch, device), gen, **cfg.augmentation())
        frac = min(1.0, max(step / cfg.steps, (time.monotonic() - t0) / budget))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = torch.nn.functional.cross_entropy(net(x), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if progress and step % cfg.log_every == 0:
            print(
                f"baseline step {step} loss {loss.item():.4f} {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True
            )
    out = Path(cfg.out) / "model"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(
        json.dumps(
            {
                "format": FORMAT,
                "classes": classes,
                "image_size": cfg.image_size,
                "canonical": canonical_spec(cfg).to_json() if cfg.canonical is not None else None,
                "width": width,
                "name": "cnn-baseline",
                "steps": step,
                "minutes": (time.monotonic() - t0) / 60,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    clf = CnnClassifier(out, device)
    logits = clf.logits(cal.images)
    temp = fit_temperature(-logits, cal.label_indices(classes))
    (out / "calibration.json").write_text(
        json.dumps({"format": FORMAT, "temperature": temp, "fitted_on": f"{len(cal)} held-out train cells"}, indent=2),
        encoding="utf-8",
    )
    print(f"baseline done: {step} steps in {(time.monotonic() - t0) / 60:.1f} min -> {out}", flush=True)
    return out


class CnnClassifier:
    """The baseline CNN with the classifier interface used by evaluation (``score``)."""

    def __init__(self, model_dir: Path, device: str = "auto") -> None:
        import torch
        from safetensors.torch import load_file

        self.model_dir = Path(model_dir)
        if not is_cnn_dir(self.model_dir):
            raise ModelError(f"{self.model_dir} is not a baseline CNN directory")
        cfg = json.loads((self.model_dir / CONFIG).read_text(encoding="utf-8"))
        self.classes: list[str] = list(cfg["classes"])
        self.image_size: int = int(cfg["image_size"])
        self.canonical: CanonicalSpec | None = canonical_of(cfg.get("canonical"), self.model_dir)
        self.device = pick_device(device)
        self.net = build_cnn(len(self.classes), int(cfg.get("width", 32)))
        self.net.load_state_dict(load_file(str(self.model_dir / WEIGHTS)))
        self.net.to(self.device).eval()
        digest = hashlib.sha256((self.model_dir / WEIGHTS).read_bytes()).hexdigest()[:10]
        self.model_id = f"cnn-baseline-{digest}"
        cal = self.model_dir / "calibration.json"
        self.temperature = json.loads(cal.read_text(encoding="utf-8"))["temperature"] if cal.is_file() else 1.0
        self._torch = torch

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits for model-input images ``(N, S, S, 3)`` (canonical crops where the model has a spec)."""
        torch = self._torch
        x = to_model_input(resize_crops(check_crops(images), self.image_size), self.device)
        outs = []
        with torch.inference_mode():
            for i in range(0, x.shape[0], 256):
                outs.append(self.net(x[i : i + 256]).float().cpu().numpy())
        return np.concatenate(outs).astype(np.float64)

    def score(
        self,
        crops: np.ndarray | Sequence[np.ndarray],
        procedure: str = "fast",
        *,
        canonical: bool = True,
        um_per_px: float | None = None,
    ) -> Scores:
        """Scores for raw crops (``canonical=False``: already the model's input images), as the diffusion
        classifier's :meth:`~.classifier.DiffusionClassifier.score`."""
        t0 = time.perf_counter()
        images = model_crops(crops, self.image_size, self.canonical, um_per_px) if canonical else np.asarray(crops)
        logits = self.logits(images)
        probs = softmax_neg(-logits, self.temperature)
        srt = np.sort(probs, axis=1)
        ent = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1) / math.log(len(self.classes))
        return Scores(
            -logits,
            probs,
            probs.argmax(axis=1),
            np.clip(ent, 0, 1),
            srt[:, -1] - srt[:, -2],
            1.0 - srt[:, -1],
            -logits.max(axis=1),
            np.zeros(len(probs)),
            np.ones(len(probs), dtype=np.int64),
            time.perf_counter() - t0,
        )
