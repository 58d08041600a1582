"""Training configuration for the diffusion classifier (``configs/train-pbc.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .base import Section


class CanonicalSettings(Section):
    """How cell crops are made canonical (:class:`scope_stream.classify.canonical.CanonicalSpec`; the
    output size is the model's ``image_size``)."""

    cell_fraction: float = Field(default=0.62, gt=0.2, lt=1.0)  # the cell's diameter as a share of the crop
    context: Literal["keep", "mask"] = "mask"  # mask: outside the cell becomes the canonical background
    stain: Literal["none", "white", "macenko"] = "white"  # white: background white balance


class TrainConfig(Section):
    """Everything ``scope-stream train`` needs; a file with ``kind: train``.

    Training stops at ``steps`` or after ``max_minutes`` of wall-clock time, whichever comes first;
    the learning rate follows a linear warmup then a cosine decay over whichever budget is consumed
    faster, so a time-boxed run still ends with a small learning rate.
    """

    kind: Literal["train"] = "train"
    # diffusion: the classifier; baseline: the discriminative CNN; autoencoder: for the latent variant
    model_type: Literal["diffusion", "baseline", "autoencoder"] = "diffusion"
    data: Path | None = None  # None: $SCOPE_STREAM_DATA/pbc or <repo>/../shared/data/pbc
    out: Path = Path("runs/pbc")
    train_split: str | None = "train"  # None: every row of labels.csv
    classes: list[str] | None = None  # None: every label left after exclude_classes
    exclude_classes: list[str] = Field(default_factory=lambda: ["ig", "erythroblast"])
    holdout_fraction: float = Field(default=0.05, ge=0, lt=0.5)  # per class, kept out for calibration
    image_size: int = Field(default=32, ge=8, le=512)
    # architecture (UNet2DModel); attention_levels are indices into block_out_channels
    block_out_channels: list[int] = Field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = Field(default=1, ge=1, le=4)
    attention_levels: list[int] = Field(default_factory=lambda: [2])
    norm_num_groups: int = Field(default=32, ge=1)
    # latent variant: train an autoencoder (model_type: autoencoder, latent_channels > 0), then set
    # `autoencoder:` to its directory in the diffusion config; the UNet then works on its latents
    latent_channels: int = Field(default=4, ge=1, le=16)
    autoencoder: Path | None = None
    num_train_timesteps: int = Field(default=1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    # optimisation
    batch_size: int = Field(default=64, ge=1)
    steps: int = Field(default=3000, ge=1)
    max_minutes: float | None = Field(default=None, gt=0)
    lr: float = Field(default=4e-4, gt=0)
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    ema_decay: float = Field(default=0.999, ge=0, lt=1)  # with warmup: min(decay, (1+n)/(10+n))
    balanced_sampling: bool = True  # draw classes uniformly, then a cell of that class
    color_jitter: float = Field(default=0.05, ge=0, le=0.5)
    # optics augmentation (off by default): Gaussian blur of sigma U(0, blur_sigma_max) pixels at
    # image_size on a blur_probability share of crops, and a lamp/exposure gain of 1 +/- gain_jitter;
    # crops cut from a scanned slide are softer and dimmer than dataset crops
    blur_sigma_max: float = Field(default=0.0, ge=0, le=4)
    blur_probability: float = Field(default=0.5, ge=0, le=1)
    gain_jitter: float = Field(default=0.0, ge=0, le=0.5)
    # robustness to other microscopes (off by default): full rotation, zoom by exp(U(-s, s)), stain
    # perturbation in HED optical density, camera noise at white (in [-1, 1] units), and a JPEG round
    # trip at quality U(30, 90) on a jpeg_probability share of crops
    rotate: bool = False
    scale_jitter: float = Field(default=0.0, ge=0, le=0.5)
    hed_jitter: float = Field(default=0.0, ge=0, le=0.5)
    noise_std: float = Field(default=0.0, ge=0, le=0.2)
    jpeg_probability: float = Field(default=0.0, ge=0, le=1)
    # canonical cell crops (scope_stream.classify.canonical): every crop is found, centred, scaled to
    # one cell size and colour-normalised the same way in training, calibration, evaluation and the
    # pipeline; None: plain resizing of the whole crop (older models)
    canonical: CanonicalSettings | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = Field(default=None, ge=1)  # torch CPU threads (None: torch's default)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the UNet (CUDA)
    checkpoint_every: int = Field(default=250, ge=1)
    checkpoint_minutes: float = Field(default=5.0, gt=0)
    resume: bool = True
    log_every: int = Field(default=25, ge=1)

    def augmentation(self) -> dict[str, Any]:
        """Keyword arguments for :func:`scope_stream.classify.data.augment`."""
        return {
            "jitter": self.color_jitter,
            "blur_sigma_max": self.blur_sigma_max,
            "blur_probability": self.blur_probability,
            "gain_jitter": self.gain_jitter,
            "rotate": self.rotate,
            "scale_jitter": self.scale_jitter,
            "hed_jitter": self.hed_jitter,
            "noise_std": self.noise_std,
        }
