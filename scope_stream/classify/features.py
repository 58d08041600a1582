"""The probe scores: a second look at each classified cell through the diffusion UNet.

The denoising-error scores say how well each *known* class explains a cell; a cell between classes
(an immature granulocyte between a band neutrophil and a monocyte) can still be explained well by
one of them. So after classification each cell is noised at a few (timestep, noise) pairs and run
through the UNet again, conditioned on its predicted class:

* **feature distance** -- one layer's activations are pooled (mean and standard deviation per channel)
  and averaged over the pairs; the score is the cosine distance to the k-th nearest of a bank of
  training cells (deep k-nearest-neighbour out-of-distribution detection, Sun et al., ICML 2022):
  how unlike the training cells the cell *looks* to the network.
* **paired gap** (``runner_up=True``, one more evaluation per pair) -- the runner-up class denoises the
  same noised cells; ``(e_runner_up - e_predicted) / e_predicted`` over the pairs is a second top-2
  gap at the probe's (informative, middle) timesteps, paired by sharing every noise. The fast plan's
  own gap rests on whatever levels decided the class; this one always has all the probe's levels.

* :class:`FeatureProbe` -- which layer, which (timestep, noise) pairs, which k, whether the runner-up runs.
* :func:`probe_cells` -- features ``(N, D)`` and paired gaps ``(N,)``.
* :class:`FeatureBank` -- the standardised, unit-length training features; :meth:`FeatureBank.distance`
  scores cells (higher = more unlike the training cells). Saved as ``feature_bank.safetensors``
  next to the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .procedures import level_noises, weighted_error

if TYPE_CHECKING:
    import torch

__all__ = [
    "FEATURE_BANK",
    "FeatureBank",
    "FeatureProbe",
    "ProbeResult",
    "layer_module",
    "probe_cells",
]

FEATURE_BANK = "feature_bank.safetensors"


@dataclass
class FeatureProbe:
    """Where the features come from: ``layer`` (``mid``, ``upN`` or ``downN`` of the diffusers UNet),
    the (timestep, noise seed) pairs they are averaged over, and ``k`` of the k-nearest-neighbour distance;
    ``runner_up``: also denoise with the runner-up class at the same pairs (the paired gap)."""

    layer: str = "up0"
    timesteps: list[int] = field(default_factory=lambda: [400, 400, 400, 400])
    noise_seeds: list[int] = field(default_factory=lambda: [801, 802, 803, 804])
    k: int = 20
    runner_up: bool = False

    def __post_init__(self) -> None:
        if not self.timesteps or len(self.timesteps) != len(self.noise_seeds):
            raise ValueError("FeatureProbe needs equally long, non-empty timesteps and noise_seeds")
        if self.k < 1:
            raise ValueError(f"FeatureProbe.k must be >= 1, got {self.k}")
        _parse_layer(self.layer)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeatureProbe:
        return cls(
            layer=str(d["layer"]),
            timesteps=[int(t) for t in d["timesteps"]],
            noise_seeds=[int(s) for s in d["noise_seeds"]],
            k=int(d["k"]),
            runner_up=bool(d.get("runner_up", False)),
        )


def _parse_layer(layer: str) -> tuple[str, int]:
    if layer == "mid":
        return "mid", 0
    for kind in ("up", "down"):
        if layer.startswith(kind) and layer[len(kind) :].isdigit():
            return kind, int(layer[len(kind) :])
    raise ValueError(f"feature layer must be 'mid', 'upN' or 'downN', got {layer!r}")


def layer_module(unet: Any, layer: str) -> Any:
    """The UNet block named by ``layer``."""
    kind, i = _parse_layer(layer)
    if kind == "mid":
        return unet.mid_block
    blocks = unet.up_blocks if kind == "up" else unet.down_blocks
    if i >= len(blocks):
        raise ValueError(f"feature layer {layer!r}: the UNet has only {len(blocks)} {kind} blocks")
    return blocks[i]


@dataclass
class ProbeResult:
    """What :func:`probe_cells` measures per cell."""

    features: np.ndarray  # (N, D) pooled features, averaged over the probe's pairs
    pair_gap: np.ndarray | None  # (N,) (e_runner_up - e_predicted) / e_predicted; None without a runner-up
    evaluations_per_cell: int  # UNet evaluations the probe spent on each cell


def probe_cells(
    unet: Any,
    acp: torch.Tensor,
    x0: torch.Tensor,
    cond: np.ndarray,
    probe: FeatureProbe,
    *,
    runner_up: np.ndarray | None = None,
    weight: torch.Tensor | None = None,
    max_batch: int = 256,
    bf16: bool = False,
) -> ProbeResult:
    """Run the probe on cells ``x0`` conditioned on classes ``cond``: pooled activations of ``probe.layer``
    (``(N, 2 * channels)`` float32, channel means then stds) and, with ``runner_up`` classes, the paired gap
    of their denoising errors (``weight``: the error's pixel weights, :meth:`.Denoiser.error_weight`)."""
    import torch

    n = x0.shape[0]
    if len(cond) != n:
        raise ValueError(f"got {n} cells but {len(cond)} class conditions")
    if runner_up is not None and len(runner_up) != n:
        raise ValueError(f"got {n} cells but {len(runner_up)} runner-up classes")
    captured: list[torch.Tensor] = []

    def grab(_m: Any, _i: Any, out: Any) -> None:
        h = (out[0] if isinstance(out, tuple) else out).float()
        captured.append(torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1))

    device = x0.device
    dev_type = "cuda" if device.type == "cuda" else "cpu"
    noise = level_noises(probe.noise_seeds, tuple(x0.shape[1:])).to(device)
    acp = acp.to(device)
    w = weight.to(device) if weight is not None else None
    total: torch.Tensor | None = None
    errs = np.zeros((2, n), dtype=np.float64)

    def denoise(xt: torch.Tensor, tt: torch.Tensor, classes: np.ndarray, eps: torch.Tensor) -> np.ndarray:
        labels = torch.as_tensor(np.asarray(classes), device=device, dtype=torch.long)
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=bf16):
            pred = unet(xt, tt, class_labels=labels).sample
        return np.asarray(weighted_error(pred, eps, w).double().cpu().numpy())

    handle = layer_module(unet, probe.layer).register_forward_hook(grab)
    try:
        with torch.inference_mode():
            for j, t in enumerate(probe.timesteps):
                parts = []
                for s in range(0, n, max_batch):
                    sl = slice(s, min(n, s + max_batch))
                    xb = x0[sl]
                    a = acp[int(t)]
                    xt = a.sqrt() * xb + (1 - a).sqrt() * noise[j]
                    tt = torch.full((len(xb),), int(t), device=device, dtype=torch.long)
                    captured.clear()
                    errs[0, sl] += denoise(xt, tt, cond[sl], noise[j])
                    parts.append(captured[-1])
                    if runner_up is not None:
                        errs[1, sl] += denoise(xt, tt, runner_up[sl], noise[j])
                f = torch.cat(parts) if parts else torch.zeros(0, 1, device=device)
                total = f if total is None else total + f
    finally:
        handle.remove()
    if total is None:
        return ProbeResult(np.zeros((n, 0), dtype=np.float32), None, 0)
    out = (total / len(probe.timesteps)).cpu().numpy().astype(np.float32)
    if not np.isfinite(out).all() or not np.isfinite(errs).all():
        raise FloatingPointError("the model produced non-finite features (NaN in input or weights?)")
    if runner_up is None:
        return ProbeResult(out, None, len(probe.timesteps))
    return ProbeResult(out, (errs[1] - errs[0]) / np.maximum(errs[0], 1e-12), 2 * len(probe.timesteps))


@dataclass
class FeatureBank:
    """Training cells' features, standardised (``centre``, ``scale``) and scaled to unit length."""

    probe: FeatureProbe
    centre: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    bank: np.ndarray  # (M, D) unit rows
    labels: np.ndarray  # (M,) class index of each bank cell

    def __post_init__(self) -> None:
        m, d = self.bank.shape if self.bank.ndim == 2 else (0, 0)
        if self.bank.ndim != 2 or m == 0:
            raise ValueError(f"a feature bank needs a non-empty (M, D) array, got shape {self.bank.shape}")
        if self.centre.shape != (d,) or self.scale.shape != (d,) or self.labels.shape != (m,):
            raise ValueError("feature bank centre/scale/labels do not match its (M, D) features")
        if self.probe.k > m:
            raise ValueError(f"k = {self.probe.k} nearest neighbours but only {m} cells in the bank")

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, probe: FeatureProbe) -> FeatureBank:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) == 0:
            raise ValueError(f"features must be a non-empty (M, D) array, got shape {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or infinity")
        centre = f.mean(axis=0)
        scale = f.std(axis=0) + 1e-6
        bank = _unit((f - centre) / scale)
        return cls(
            probe,
            centre.astype(np.float32),
            scale.astype(np.float32),
            bank.astype(np.float32),
            np.asarray(labels, dtype=np.int64),
        )

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def distance(self, features: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """Cosine distance (``1 - similarity``) of each cell to its k-th nearest bank cell (N,)."""
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got shape {f.shape}")
        q = _unit((f - self.centre) / self.scale)
        k = self.probe.k
        out = np.empty(len(q), dtype=np.float64)
        for s in range(0, len(q), chunk):
            sim = q[s : s + chunk] @ self.bank.T
            out[s : s + chunk] = 1.0 - np.partition(sim, -k, axis=1)[:, -k]
        return out

    # ------------------------------------------------------------------ files
    def save(self, path: Path) -> Path:
        """Write the bank (float16 features) atomically; the probe goes into ``calibration.json``."""
        import torch
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_suffix(".tmp")
        save_file(
            {
                "centre": torch.from_numpy(self.centre.astype(np.float32)),
                "scale": torch.from_numpy(self.scale.astype(np.float32)),
                "bank": torch.from_numpy(self.bank.astype(np.float16)),
                "labels": torch.from_numpy(self.labels.astype(np.int64)),
            },
            str(tmp),
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path, probe: FeatureProbe) -> FeatureBank:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            d = load_file(str(path))
            return cls(
                probe,
                d["centre"].float().numpy(),
                d["scale"].float().numpy(),
                d["bank"].float().numpy(),
                d["labels"].numpy(),
            )
        except (KeyError, OSError, RuntimeError, SafetensorError) as exc:
            raise ValueError(f"{path} is not a feature bank: {exc}") from exc


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
