"""The class-conditional diffusion model: a diffusers ``UNet2DModel`` plus its noise schedule.

A model directory holds ``model.safetensors`` (UNet weights), ``config.json`` (:class:`ModelSpec`:
architecture, classes, input size, schedule) and, once calibrated, ``calibration.json``.
Torch and diffusers are imported lazily by the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .canonical import CanonicalSpec

__all__ = [
    "ModelError",
    "ModelSpec",
    "alphas_cumprod",
    "build_unet",
    "canonical_of",
    "load_unet",
    "model_id_of",
    "pick_device",
    "save_unet",
]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CALIBRATION = "calibration.json"


class ModelError(ValueError):
    """A model directory or model input that cannot be used."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: architecture, classes, input size and noise schedule."""

    classes: list[str]
    image_size: int = 32
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = 1
    attention_levels: list[int] = field(default_factory=lambda: [1])  # indices of levels with self-attention
    norm_num_groups: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    name: str = "cytodiffusion"
    latent_channels: int = 0  # 0: pixel space; else the UNet works on autoencoder latents (latent variant)
    latent_size: int = 0
    #: the canonical-crop spec (``CanonicalSpec.to_json()``) every input goes through; None: plain resizing
    canonical: dict[str, Any] | None = None

    @property
    def sample_channels(self) -> int:
        return self.latent_channels or 3

    @property
    def sample_size(self) -> int:
        return self.latent_size or self.image_size

    def to_json(self) -> dict[str, Any]:
        return {"format": "scope-stream-diffusion/1", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        data = {k: v for k, v in data.items() if k != "format"}
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ModelError(f"model config has unknown keys {sorted(unknown)}")
        if not data.get("classes"):
            raise ModelError("model config lists no classes")
        return cls(**data)

    def validate(self) -> None:
        if len(self.classes) < 1 or len(set(self.classes)) != len(self.classes):
            raise ModelError(f"classes must be distinct and non-empty, got {self.classes}")
        if self.sample_size % (2 ** (len(self.block_out_channels) - 1)) != 0:
            raise ModelError(
                f"UNet input size {self.sample_size} must be divisible by 2**(levels-1) = "
                f"{2 ** (len(self.block_out_channels) - 1)}"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ModelError(
                f"block_out_channels {self.block_out_channels} must be multiples of {self.norm_num_groups}"
            )
        if self.prediction_type != "epsilon":
            raise ModelError("only epsilon prediction is supported")


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other values are passed through (checked)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return device


def build_unet(spec: ModelSpec) -> Any:
    """A fresh class-conditional ``UNet2DModel`` for ``spec`` (one class embedding per class)."""
    from diffusers import UNet2DModel

    spec.validate()
    n = len(spec.block_out_channels)
    down = tuple("AttnDownBlock2D" if i in spec.attention_levels else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if (n - 1 - i) in spec.attention_levels else "UpBlock2D" for i in range(n))
    return UNet2DModel(
        sample_size=spec.sample_size,
        in_channels=spec.sample_channels,
        out_channels=spec.sample_channels,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=spec.norm_num_groups,
        num_class_embeds=len(spec.classes),
        attention_head_dim=min(32, spec.block_out_channels[-1]),
    )


def alphas_cumprod(spec: ModelSpec) -> torch.Tensor:
    """The schedule's cumulative alphas (float32, length ``num_train_timesteps``)."""
    from diffusers import DDPMScheduler

    sched: Any = DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_schedule=spec.beta_schedule)
    return sched.alphas_cumprod.float().clone()


def save_unet(out_dir: Path, unet: Any | dict[str, torch.Tensor], spec: ModelSpec) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir`` atomically (temp file, rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = unet if isinstance(unet, dict) else unet.state_dict()
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    tmp = out_dir / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(out_dir / WEIGHTS)
    tmpc = out_dir / (CONFIG + ".tmp")
    tmpc.write_text(json.dumps(spec.to_json(), indent=2), encoding="utf-8")
    tmpc.replace(out_dir / CONFIG)
    return out_dir


def read_spec(model_dir: Path) -> ModelSpec:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise ModelError(f"{path} not found: a model directory needs {CONFIG} and {WEIGHTS}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    return ModelSpec.from_json(data)


def load_unet(model_dir: Path, device: str = "cpu") -> tuple[Any, ModelSpec]:
    """Load a model directory written by :func:`save_unet`; the UNet is in eval mode on ``device``."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    wpath = model_dir / WEIGHTS
    if not wpath.is_file():
        raise ModelError(f"{wpath} not found")
    unet: Any = build_unet(spec)
    state = load_file(str(wpath))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"{wpath} does not match {CONFIG}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    unet.to(device).eval()
    unet.requires_grad_(False)
    return unet, spec


def canonical_of(data: dict[str, Any] | None, model_dir: Path) -> CanonicalSpec | None:
    """The canonical-crop spec a model's config holds (None: the model resizes whole crops)."""
    if data is None:
        return None
    from .canonical import CanonicalSpec

    try:
        return CanonicalSpec.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{Path(model_dir) / CONFIG}: bad canonical crop spec: {exc}") from exc


def model_id_of(model_dir: Path) -> str:
    """``<name>-<first 10 hex of sha256 of the weights>``: changes whenever the weights do."""
    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    h = hashlib.sha256()
    with (model_dir / WEIGHTS).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return f"{spec.name}-{h.hexdigest()[:10]}"
