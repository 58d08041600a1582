"""``DiffusionClassifier``: load a model directory and turn cell crops into :class:`CellCall` objects."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from scope_stream.vocabulary import CellCall

from .anomaly import AnomalyCalibration, relative_score
from .calibration import Calibration, softmax_neg
from .data import check_crops, model_crops, resize_crops, to_model_input
from .features import FEATURE_BANK, FeatureBank, FeatureProbe, ProbeResult, probe_cells
from .model import CALIBRATION, ModelError, alphas_cumprod, canonical_of, load_unet, model_id_of, pick_device
from .procedures import Denoiser, FastPlan, ProcResult, ReferenceParams, classify_fast, classify_reference

if TYPE_CHECKING:
    from .canonical import CanonicalSpec

__all__ = ["DEFAULT_MODEL_DIR", "PRECISIONS", "DiffusionClassifier", "Scores"]

#: UNet arithmetic: "auto" (bf16 autocast on CUDA, float32 on CPU), "fp32" or "bf16".
PRECISIONS = ("auto", "fp32", "bf16")
#: the shipped model's name: ``models/<name>`` in a checkout, ``scope_stream/_models/<name>`` in an installed wheel
DEFAULT_MODEL_NAME = "cytodiffusion-pbc-64-gpu"


def _default_model_dir() -> Path:
    here = Path(__file__).resolve()
    checkout = here.parents[2] / "models" / DEFAULT_MODEL_NAME
    return checkout if checkout.is_dir() else here.parents[1] / "_models" / DEFAULT_MODEL_NAME


#: the shipped model
DEFAULT_MODEL_DIR = _default_model_dir()

Procedure = Literal["fast", "reference"]


@dataclass
class Scores:
    """Everything the classifier computes for a batch of crops (arrays over cells)."""

    scores: np.ndarray  # (N, C) weighted mean denoising error per class (lower = better)
    probabilities: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,) index of the predicted class
    uncertainty: np.ndarray  # (N,) normalised entropy
    margin: np.ndarray  # (N,) top-2 probability gap
    anomaly: np.ndarray  # (N,) the flagging anomaly score in [0, 1] (the calibration's combined score)
    anomaly_absolute: np.ndarray  # (N,) calibrated absolute anomaly score in [0, 1]
    relative_raw: np.ndarray  # (N,) raw CytoDiffusion relative score (high = confident)
    evaluations: np.ndarray  # (N,) UNet evaluations per cell
    seconds: float
    anomaly_relative: np.ndarray | None = None  # (N,) calibrated CytoDiffusion relative anomaly in [0, 1]
    anomaly_gap: np.ndarray | None = None  # (N,) calibrated top-2 gap anomaly (None: not calibrated)
    anomaly_feature: np.ndarray | None = None  # (N,) calibrated feature-distance anomaly (None: no bank)
    feature_distance: np.ndarray | None = None  # (N,) raw k-NN cosine distance in UNet features
    anomaly_probe_gap: np.ndarray | None = None  # (N,) calibrated paired probe gap anomaly (None: no runner-up)
    probe_gap: np.ndarray | None = None  # (N,) raw paired probe gap (high = confident)


class DiffusionClassifier:
    """A class-conditional diffusion model used as a classifier (CytoDiffusion-style).

    Use :meth:`load`; :meth:`classify` returns one :class:`CellCall` per crop, :meth:`score` the raw arrays.
    """

    def __init__(self, model_dir: Path, device: str = "auto", max_batch: int = 256, precision: str = "auto") -> None:
        import torch

        if precision not in PRECISIONS:
            raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        #: bf16 autocast for the UNet ("auto": on CUDA only). "fp32" on CUDA also turns TF32 off, so that GPU
        #: scores match the CPU's float32 ones (a calibration fitted on a GPU for CPU use needs that).
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.startswith("cuda"))
        if precision == "fp32" and self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.unet, self.spec = load_unet(self.model_dir, self.device)
        if self.device == "cpu":
            # channels-last convolutions: 1.3x the UNet evaluations per second on the 2-core CPU for the 64 px
            # model, 1.10x cells/s end to end, the same labels (probabilities within 3e-5; benchmarks/cpu_engine.py)
            self.unet.to(memory_format=torch.channels_last)
        self.classes: list[str] = list(self.spec.classes)
        self.image_size: int = self.spec.image_size
        #: the canonical-crop spec every raw crop goes through (None: plain resizing, older models)
        self.canonical: CanonicalSpec | None = canonical_of(self.spec.canonical, self.model_dir)
        self.model_id: str = model_id_of(self.model_dir)
        self.calibration: Calibration | None = None
        cal_path = self.model_dir / CALIBRATION
        if cal_path.is_file():
            try:
                self.calibration = Calibration.from_json(json.loads(cal_path.read_text(encoding="utf-8")))
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelError(f"{cal_path} cannot be read: {exc}") from exc
        self.vae: Any = None
        if self.spec.latent_channels:
            from .autoencoder import load_autoencoder

            self.vae, self.ae_spec = load_autoencoder(self.model_dir / "autoencoder", self.device)
        sigma = self.calibration.centre_sigma if self.calibration is not None else 0.0
        self.denoiser = Denoiser(
            self.unet, alphas_cumprod(self.spec), self.device, max_batch=max_batch, bf16=self.bf16, centre_sigma=sigma
        )
        self.denoiser.channels_last = self.device == "cpu"
        self.reference_params = ReferenceParams()
        self.feature_bank: FeatureBank | None = None
        if self.calibration is not None and self.calibration.feature_probe is not None:
            bank_path = self.model_dir / FEATURE_BANK
            if not bank_path.is_file():
                raise ModelError(f"{cal_path} uses a feature bank but {bank_path} is missing")
            self.feature_bank = FeatureBank.load(bank_path, self.calibration.feature_probe)
        self._torch = torch

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls, path: Path | None = None, device: str = "auto", precision: str = "auto", max_batch: int = 256
    ) -> DiffusionClassifier:
        """Load a model directory (``None``: the shipped model in ``models/``); ``precision``: auto, fp32, bf16;
        ``max_batch``: UNet evaluations per forward pass."""
        model_dir = Path(path) if path is not None else DEFAULT_MODEL_DIR
        if not model_dir.is_dir():
            raise ModelError(f"model directory {model_dir} not found")
        return cls(model_dir, device, max_batch=max_batch, precision=precision)

    def flag_thresholds(self) -> dict[str, float] | None:
        """The flag thresholds this model's calibration ships (``calibration.json`` → ``flags``), or None
        where there are none it can vouch for: an uncalibrated model, or one calibrated before
        temperatures were fitted on cells that did not choose the plan (its uncertainty threshold was
        degenerate)."""
        cal = self.calibration
        if cal is None or "n_temperature_cells" not in cal.info:
            return None
        return {"anomaly_threshold": cal.anomaly_threshold, "uncertainty_threshold": cal.uncertainty_threshold}

    @property
    def fast_plan(self) -> FastPlan:
        if self.calibration is not None:
            return self.calibration.fast_plan
        return FastPlan.default(self.spec.num_train_timesteps)

    def temperature(self, procedure: Procedure) -> float:
        if self.calibration is None:
            return 1.0 / 0.002  # uncalibrated: a gap of 0.002 in mean error is one nat
        if procedure == "fast":
            return self.calibration.fast_temperature
        return self.calibration.reference_temperature

    def _anomaly_cal(self, procedure: Procedure) -> AnomalyCalibration | None:
        if self.calibration is None:
            return None
        return self.calibration.fast_anomaly if procedure == "fast" else self.calibration.reference_anomaly

    # ------------------------------------------------------------------ work
    def model_crops(self, crops: np.ndarray | Sequence[np.ndarray], um_per_px: float | None = None) -> np.ndarray:
        """Raw cell crops (an ``(N, H, W, 3)`` array or a list of crops of any size) as the model's input
        images: canonical crops when the model has a canonical spec (a crop without a cell raises
        :class:`~.canonical.NoCellError` naming it), else the crops resized."""
        return model_crops(crops, self.image_size, self.canonical, um_per_px)

    def prepare(self, crops: np.ndarray) -> Any:
        """Validate, resize and convert model-input images ``(N, H, W, 3)`` to model input on the device."""
        arr = resize_crops(check_crops(crops), self.image_size)
        x = to_model_input(arr, self.device)
        if self.vae is None:
            return x
        from .autoencoder import encode

        with self._torch.inference_mode():
            return self._torch.cat([encode(self.vae, self.ae_spec, x[i : i + 64]) for i in range(0, len(x), 64)])

    def run(self, x0: Any, procedure: Procedure = "fast") -> ProcResult:
        if procedure == "fast":
            return classify_fast(self.denoiser, x0, len(self.classes), self.fast_plan)
        if procedure == "reference":
            return classify_reference(
                self.denoiser, x0, len(self.classes), self.reference_params, self.spec.num_train_timesteps
            )
        raise ValueError(f"procedure must be 'fast' or 'reference', got {procedure!r}")

    def features_with(self, probe: FeatureProbe, x0: Any, cond: np.ndarray) -> np.ndarray:
        """Pooled UNet features for any ``probe`` (see :func:`.features.probe_cells`)."""
        return self.probe_with(probe, x0, cond).features

    def probe_with(
        self, probe: FeatureProbe, x0: Any, cond: np.ndarray, runner_up: np.ndarray | None = None
    ) -> ProbeResult:
        """Features and, with ``runner_up`` classes, paired gaps for any ``probe`` (:func:`.features.probe_cells`)."""
        weight = self.denoiser.error_weight(x0.shape[-2], x0.shape[-1])
        res = probe_cells(
            self.unet, self.denoiser.acp, x0, cond, probe, runner_up=runner_up, weight=weight, bf16=self.bf16
        )
        self.denoiser.evaluations += len(cond) * res.evaluations_per_cell
        return res

    def probe(self, x0: Any, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
        """The feature bank's probe on classified cells: k-NN feature distances (N,), paired gaps (N,) when
        the probe runs the runner-up class (else None), and the UNet evaluations it took per cell."""
        if self.feature_bank is None:
            raise ModelError(f"{self.model_dir} has no feature bank (calibrate with --feature-bank)")
        probe = self.feature_bank.probe
        order = np.argsort(scores, axis=1, kind="stable")
        runner_up = order[:, 1] if probe.runner_up and scores.shape[1] > 1 else None
        res = self.probe_with(probe, x0, order[:, 0], runner_up)
        return self.feature_bank.distance(res.features), res.pair_gap, res.evaluations_per_cell

    def score(
        self,
        crops: np.ndarray | Sequence[np.ndarray],
        procedure: Procedure = "fast",
        chunk: int = 128,
        *,
        canonical: bool = True,
        um_per_px: float | None = None,
    ) -> Scores:
        """Classify crops and return every per-cell quantity as arrays.

        Raw crops go through :meth:`model_crops` first; ``canonical=False`` when they already are the
        model's input images (e.g. a :class:`~.data.CropSet` loaded with the model's canonical spec).

        With a feature bank, each cell also gets one UNet evaluation per probe level, conditioned on
        its predicted class, for the feature-distance anomaly score, and one more per level for the
        runner-up class when the probe measures the paired gap (counted in ``evaluations``).
        """
        t0 = time.perf_counter()
        images = self.model_crops(crops, um_per_px) if canonical else np.asarray(crops)
        x0 = self.prepare(images)
        parts = [self.run(x0[i : i + chunk], procedure) for i in range(0, x0.shape[0], chunk)]
        scores = np.concatenate([p.scores for p in parts]) if parts else np.zeros((0, len(self.classes)))
        evals = np.concatenate([p.evaluations for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        distance = pair_gap = None
        if self.feature_bank is not None and len(scores):
            distance, pair_gap, per_cell = self.probe(x0, scores)
            evals = evals + per_cell
        return self.finish(scores, evals, procedure, time.perf_counter() - t0, distance, pair_gap)

    def finish(
        self,
        scores: np.ndarray,
        evals: np.ndarray,
        procedure: Procedure,
        seconds: float = 0.0,
        feature_distance: np.ndarray | None = None,
        probe_gap: np.ndarray | None = None,
    ) -> Scores:
        """Probabilities, uncertainty and anomaly scores from per-class scores (and the probe's feature
        distances and paired gaps)."""
        c = len(self.classes)
        probs = softmax_neg(scores, self.temperature(procedure)) if len(scores) else np.zeros((0, c))
        srt = np.sort(probs, axis=1)
        margin = srt[:, -1] - (srt[:, -2] if c > 1 else 0.0)
        ent = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)
        unc = np.clip(ent / math.log(c), 0.0, 1.0) if c > 1 else np.zeros(len(probs))
        cal = self._anomaly_cal(procedure)
        anom_rel = anom_gap = anom_feat = anom_pgap = None
        if c < 2 or len(scores) == 0:
            rel = np.zeros(len(scores))
            anom = np.zeros(len(scores))
            anom_abs = np.zeros(len(scores))
        else:
            rel = relative_score(scores)
            if cal is not None:
                anom_rel = cal.relative_anomaly(scores)
                anom_abs = cal.absolute_anomaly(scores)
                anom_gap = cal.gap_anomaly(scores) if cal.gap_ref else None
                if feature_distance is not None and cal.feature_ref:
                    anom_feat = cal.feature_anomaly(feature_distance)
                if probe_gap is not None and cal.probe_gap_ref:
                    anom_pgap = cal.probe_gap_anomaly(probe_gap)
                anom = cal.combined_anomaly(scores, feature_distance, probe_gap)
            else:  # uncalibrated: squash the relative score by the typical best error
                scale = np.maximum(scores.min(axis=1), 1e-12)
                anom = 1.0 / (1.0 + np.maximum(rel, 0) / (0.05 * scale))
                anom_abs = np.zeros(len(scores))
        return Scores(
            scores,
            probs,
            probs.argmax(axis=1),
            unc,
            np.clip(margin, 0, 1),
            anom,
            anom_abs,
            rel,
            evals,
            seconds,
            anom_rel,
            anom_gap,
            anom_feat,
            feature_distance,
            anom_pgap,
            probe_gap,
        )

    def classify(
        self,
        crops: np.ndarray | Sequence[np.ndarray],
        cell_ids: list[str],
        procedure: Procedure = "fast",
        *,
        canonical: bool = True,
        um_per_px: float | None = None,
    ) -> list[CellCall]:
        """One :class:`CellCall` per crop (raw crops, made the model's input by :meth:`model_crops`;
        ``canonical=False`` when they already are its input images)."""
        if len(cell_ids) != len(crops):
            raise ValueError(f"got {len(crops)} crops but {len(cell_ids)} cell_ids")
        if len(cell_ids) == 0:
            return []
        s = self.score(crops, procedure, canonical=canonical, um_per_px=um_per_px)
        calls = []
        for i, cid in enumerate(cell_ids):
            p = s.probabilities[i]
            p = p / p.sum()
            probs = {name: float(v) for name, v in zip(self.classes, p, strict=True)}
            calls.append(
                CellCall(
                    cell_id=str(cid),
                    label=self.classes[int(s.labels[i])],
                    probabilities=probs,
                    uncertainty=float(s.uncertainty[i]),
                    margin=float(s.margin[i]),
                    anomaly_score=float(s.anomaly[i]),
                    model_id=self.model_id,
                    evaluations=int(s.evaluations[i]),
                    unfamiliarity=float(s.anomaly_feature[i]) if s.anomaly_feature is not None else None,
                )
            )
        return calls

    def __repr__(self) -> str:
        return (
            f"DiffusionClassifier({self.model_id}, classes={self.classes}, image_size={self.image_size}, "
            f"device={self.device}, calibrated={self.calibration is not None})"
        )
