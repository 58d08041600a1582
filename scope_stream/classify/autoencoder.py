"""The latent variant: a small ``AutoencoderKL`` of our own, trained on the same cells.

CytoDiffusion runs its diffusion model in a latent space. Here an autoencoder with ``n`` levels
downsamples by ``2**(n-1)`` (64x64x3 -> 16x16x4 with three levels), and the diffusion UNet works on
its latents: 16x fewer positions than 64x64 pixels. Train it with ``model_type: autoencoder``, then
point a diffusion config at it with ``autoencoder: <dir>``; the model directory then holds the
autoencoder in ``autoencoder/`` and classification encodes crops before denoising.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scope_stream.config.train import TrainConfig

from .data import augment, to_model_input
from .model import CONFIG, WEIGHTS, ModelError

__all__ = ["AESpec", "build_autoencoder", "encode", "load_autoencoder", "save_autoencoder", "train_autoencoder"]

AE_FORMAT = "scope-stream-autoencoder/1"


@dataclass
class AESpec:
    """Architecture of the autoencoder and the latent scaling fitted after training."""

    image_size: int = 64
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 1.0

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.block_out_channels) - 1)


def build_autoencoder(spec: AESpec) -> Any:
    from diffusers import AutoencoderKL

    n = len(spec.block_out_channels)
    if spec.image_size % 2 ** (n - 1):
        raise ModelError(f"autoencoder image_size {spec.image_size} must be divisible by {2 ** (n - 1)}")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.norm_num_groups,
        sample_size=spec.image_size,
    )


def save_autoencoder(out_dir: Path, vae: Any, spec: AESpec) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in vae.state_dict().items()}, str(out_dir / WEIGHTS))
    (out_dir / CONFIG).write_text(json.dumps({"format": AE_FORMAT, **asdict(spec)}, indent=2), encoding="utf-8")
    return out_dir


def load_autoencoder(ae_dir: Path, device: str = "cpu") -> tuple[Any, AESpec]:
    from safetensors.torch import load_file

    ae_dir = Path(ae_dir)
    cfg_path = ae_dir / CONFIG
    if not cfg_path.is_file():
        raise ModelError(f"{cfg_path} not found: not an autoencoder directory")
    data = json.loads(cfg_path.read_text(encoding="utf-8"))
    if data.pop("format", None) != AE_FORMAT:
        raise ModelError(f"{cfg_path} is not an autoencoder config ({AE_FORMAT})")
    spec = AESpec(**data)
    vae: Any = build_autoencoder(spec)
    vae.load_state_dict(load_file(str(ae_dir / WEIGHTS)))
    vae.to(device).eval()
    vae.requires_grad_(False)
    return vae, spec


def encode(vae: Any, spec: AESpec, x: Any, sample: bool = False, generator: Any = None) -> Any:
    """Images in [-1, 1] ``(B, 3, S, S)`` -> scaled latents ``(B, C, S/f, S/f)`` (mean, or a sample)."""
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z * spec.scaling_factor


def train_autoencoder(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train the autoencoder on ``cfg``'s cells (L1 + MSE reconstruction + small KL); returns its directory."""
    import torch

    from .train import prepare_training

    device, _, crops, hold = prepare_training(cfg, progress)
    images = torch.from_numpy(crops.subset(~hold).images)
    spec = AESpec(
        image_size=cfg.image_size,
        block_out_channels=list(cfg.block_out_channels),
        latent_channels=cfg.latent_channels or 4,
        norm_num_groups=cfg.norm_num_groups,
    )
    torch.manual_seed(cfg.seed)
    vae: Any = build_autoencoder(spec).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    t0 = time.monotonic()
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    step = 0
    while step < cfg.steps and time.monotonic() - t0 < budget:
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.integers(0, len(images), cfg.batch_size)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        x = augment(to_model_input(images[idx], device), gen, **cfg.augmentation())
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if progress and step % cfg.log_every == 0:
            print(f"autoencoder step {step} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    vae.eval()
    with torch.no_grad():
        sample = to_model_input(images[: min(512, len(images))], device)
        z = torch.cat([vae.encode(sample[i : i + 64]).latent_dist.mean for i in range(0, len(sample), 64)])
        spec.scaling_factor = float(1.0 / z.std().clamp_min(1e-6))
    out = save_autoencoder(Path(cfg.out) / "autoencoder", vae, spec)
    print(
        f"autoencoder done: {step} steps, latent {spec.latent_channels}x{spec.latent_size}x{spec.latent_size}, "
        f"scale {spec.scaling_factor:.3f} -> {out}",
        flush=True,
    )
    return out
