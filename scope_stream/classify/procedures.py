"""Classification by denoising error: CytoDiffusion's reference procedure and our fast procedure.

Both compare classes *paired*: at each noise level the same timestep and the same noise are used
for every class, so the class-to-class differences are not drowned in the noise of the estimate.

* :func:`classify_reference` follows CytoDiffusion's ``diffusion_discriminator.py``: up to 2,000
  noise levels evenly spaced over the training timesteps, visited in shuffled order; after the first
  20 levels, every 5 levels a paired t-test of each surviving class against the current leader drops
  the class when p < 0.002 and its mean error is higher. One cell at a time, errors unweighted.
* :func:`classify_fast` uses a short, fixed list of informative (timestep, noise) pairs learned on
  calibration data, batches every cell and every surviving class into the same forward passes, and
  prunes after a few levels with a gap threshold learned on calibration data.

Both return a :class:`ProcResult`: per-class scores (lower = more likely; the weighted mean
denoising error over the levels each class was evaluated at) and the network evaluations spent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "Denoiser",
    "FastPlan",
    "ProcResult",
    "ReferenceParams",
    "centre_weights",
    "classify_fast",
    "classify_reference",
    "collect_errors",
    "level_noises",
    "weighted_error",
]


@dataclass
class ProcResult:
    """``scores`` (N, C): weighted mean error per class; ``evaluations`` (N,): UNet evaluations per cell."""

    scores: np.ndarray
    evaluations: np.ndarray
    levels: np.ndarray  # noise levels visited per cell (max over classes)


@dataclass
class ReferenceParams:
    """CytoDiffusion's defaults."""

    n_levels: int = 2000
    first: int = 20
    every: int = 5
    p_drop: float = 0.002
    seed: int = 0


@dataclass
class FastPlan:
    """The fast procedure's learned plan: ordered (timestep, noise seed) pairs, weights, pruning."""

    timesteps: list[int]
    noise_seeds: list[int]
    weights: list[float]
    prune_after: int = 2  # levels evaluated for every class before pruning
    prune_delta: float = math.inf  # drop classes whose stage-1 score exceeds the leader's by more

    def __post_init__(self) -> None:
        n = len(self.timesteps)
        if n == 0 or len(self.noise_seeds) != n or len(self.weights) != n:
            raise ValueError("FastPlan needs equally long, non-empty timesteps, noise_seeds and weights")
        if not 1 <= self.prune_after <= n:
            raise ValueError(f"prune_after must be in 1..{n}, got {self.prune_after}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["prune_delta"] = None if math.isinf(self.prune_delta) else self.prune_delta
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FastPlan:
        d = dict(d)
        if d.get("prune_delta") is None:
            d["prune_delta"] = math.inf
        return cls(**d)

    @classmethod
    def default(cls, num_train_timesteps: int = 1000, n: int = 6) -> FastPlan:
        """Before calibration: n levels spread over the informative t <= 56% of the schedule."""
        ts = np.linspace(0.06, 0.56, n) * num_train_timesteps
        return cls([int(t) for t in ts], list(range(n)), [1.0] * n, prune_after=n, prune_delta=math.inf)


def level_noises(seeds: list[int], shape: int | tuple[int, ...]) -> torch.Tensor:
    """One standard-normal noise of ``shape`` (an int S means ``(3, S, S)``) per seed (deterministic)."""
    import torch

    shp = (3, shape, shape) if isinstance(shape, int) else tuple(shape)
    out = torch.empty(len(seeds), *shp)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(*shp, generator=torch.Generator().manual_seed(int(s) + 7919))
    return out


def centre_weights(height: int, width: int, sigma_frac: float) -> torch.Tensor:
    """A ``(height, width)`` Gaussian weight map centred on the crop, mean 1; ``sigma_frac`` is the
    standard deviation as a fraction of the shorter side (``<= 0``: uniform weights).

    Crops are centred on the segmented cell, so weighting the denoising error towards the centre
    scores the cell rather than its surroundings (red cells, background), which differ between
    smears, stains and scanners far more than the white cell itself does.
    """
    import torch

    if sigma_frac <= 0:
        return torch.ones(height, width)
    sigma = sigma_frac * min(height, width)
    yy = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    xx = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    w = torch.exp(-(yy[:, None] ** 2 + xx[None, :] ** 2) / (2 * sigma * sigma))
    return w / w.mean()


def weighted_error(pred: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The denoising error per cell ``(B,)``: ``mean(w * (eps - pred)**2)`` over channels and pixels
    (``weight``: ``(H, W)`` pixel weights, or None for the plain mean)."""
    sq = (pred.float() - eps).pow(2)
    return (sq if weight is None else sq * weight).mean(dim=(1, 2, 3))


class Denoiser:
    """Batched denoising errors ``mean(w * (eps - eps_theta(x_t, t, c))**2)`` for (cell, class, level) triples.

    ``w`` is :func:`centre_weights` with ``centre_sigma`` (0: the plain mean, as CytoDiffusion does).
    """

    def __init__(
        self,
        unet: Any,
        acp: torch.Tensor,
        device: str = "cpu",
        *,
        max_batch: int = 256,
        bf16: bool = False,
        centre_sigma: float = 0.0,
    ) -> None:
        self.unet = unet
        self.centre_sigma = centre_sigma
        self.acp = acp.to(device)
        self.device = device
        self.max_batch = max_batch
        self.bf16 = bf16
        self.evaluations = 0
        self.forward_passes = 0
        #: feed the UNet channels-last batches (set where its weights are channels-last: the CPU)
        self.channels_last = False

    @property
    def centre_sigma(self) -> float:
        """Width of the centre weighting as a fraction of the crop side (0: the plain mean)."""
        return self._centre_sigma

    @centre_sigma.setter
    def centre_sigma(self, value: float) -> None:
        if not 0.0 <= value < 10.0:
            raise ValueError(f"centre_sigma must be >= 0 (a fraction of the crop side), got {value}")
        self._centre_sigma = float(value)

    def error_weight(self, height: int, width: int) -> torch.Tensor | None:
        """The pixel weights of the error for ``height x width`` inputs, on the device (None: the plain mean)."""
        if self.centre_sigma <= 0:
            return None
        return centre_weights(height, width, self.centre_sigma).to(self.device)

    def errors(
        self,
        x0: torch.Tensor,
        cell: np.ndarray,
        cls: np.ndarray,
        t: np.ndarray,
        noise: torch.Tensor,
        noise_idx: np.ndarray,
    ) -> np.ndarray:
        """Error for each triple ``(x0[cell[i]], class cls[i], timestep t[i], noise[noise_idx[i]])``."""
        import torch

        m = len(cell)
        out = np.empty(m, dtype=np.float64)
        dev_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        weight = self.error_weight(x0.shape[-2], x0.shape[-1])
        with torch.inference_mode():
            for s in range(0, m, self.max_batch):
                sl = slice(s, min(m, s + self.max_batch))
                ci = torch.as_tensor(cell[sl], device=self.device)
                tt = torch.as_tensor(t[sl], device=self.device, dtype=torch.long)
                eps = noise[torch.as_tensor(noise_idx[sl], device=noise.device)].to(self.device)
                a = self.acp[tt].view(-1, 1, 1, 1)
                xt = a.sqrt() * x0[ci] + (1 - a).sqrt() * eps
                if self.channels_last:
                    xt = xt.contiguous(memory_format=torch.channels_last)
                labels = torch.as_tensor(cls[sl], device=self.device, dtype=torch.long)
                with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=self.bf16):
                    pred = self.unet(xt, tt, class_labels=labels).sample
                out[sl] = weighted_error(pred, eps, weight).double().cpu().numpy()
                self.forward_passes += 1
        self.evaluations += m
        if not np.isfinite(out).all():
            raise FloatingPointError("the model produced non-finite denoising errors (NaN in input or weights?)")
        return out


def collect_errors(
    den: Denoiser, x0: torch.Tensor, n_classes: int, timesteps: list[int], noise: torch.Tensor
) -> np.ndarray:
    """Full error tensor ``(N, C, L)``: every cell x class x (timestep, noise) pair (for calibration)."""
    n, levels = x0.shape[0], len(timesteps)
    cell, cls, lev = np.meshgrid(np.arange(n), np.arange(n_classes), np.arange(levels), indexing="ij")
    errs = den.errors(x0, cell.ravel(), cls.ravel(), np.asarray(timesteps)[lev.ravel()], noise, lev.ravel())
    return errs.reshape(n, n_classes, levels)


def reference_levels(params: ReferenceParams, num_train_timesteps: int) -> np.ndarray:
    """Timesteps evenly spaced over training, in a shuffled (seeded) order."""
    ts = np.linspace(0, num_train_timesteps - 1, params.n_levels).round().astype(np.int64)
    rng = np.random.default_rng(params.seed)
    return ts[rng.permutation(len(ts))]


def classify_reference(
    den: Denoiser,
    x0: torch.Tensor,
    n_classes: int,
    params: ReferenceParams | None = None,
    num_train_timesteps: int = 1000,
    noise: torch.Tensor | None = None,
) -> ProcResult:
    """CytoDiffusion's procedure, one cell at a time (see the module docstring)."""
    from scipy.stats import ttest_rel

    p = params or ReferenceParams()
    levels = reference_levels(p, num_train_timesteps)
    if noise is None:
        noise = level_noises([p.seed * 1_000_003 + i for i in range(len(levels))], tuple(x0.shape[1:]))
    n = x0.shape[0]
    scores = np.zeros((n, n_classes))
    evals = np.zeros(n, dtype=np.int64)
    visited_out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        errs = np.full((n_classes, len(levels)), np.nan)
        counts = np.zeros(n_classes, dtype=np.int64)
        alive = list(range(n_classes))
        visited = 0
        while visited < len(levels) and len(alive) > 1:
            chunk = p.first if visited == 0 else p.every
            lv = np.arange(visited, min(len(levels), visited + chunk))
            cls_grid, lev_grid = np.meshgrid(np.array(alive), lv, indexing="ij")
            e = den.errors(
                x0, np.full(cls_grid.size, i), cls_grid.ravel(), levels[lev_grid.ravel()], noise, lev_grid.ravel()
            )
            errs[cls_grid.ravel(), lev_grid.ravel()] = e
            counts[alive] += len(lv)
            evals[i] += e.size
            visited = int(lv[-1]) + 1
            if len(alive) <= 1:
                break
            means = {c: float(np.mean(errs[c, :visited])) for c in alive}
            leader = min(alive, key=lambda c: means[c])
            keep = [leader]
            for c in alive:
                if c == leader:
                    continue
                d = errs[c, :visited] - errs[leader, :visited]
                if np.allclose(d, d[0]):
                    pval = 0.0 if d[0] > 0 else 1.0
                else:
                    pval = float(ttest_rel(errs[c, :visited], errs[leader, :visited]).pvalue)
                if pval < p.p_drop and means[c] > means[leader]:
                    continue
                keep.append(c)
            alive = sorted(keep)
        # the winner saw every visited level; a dropped class is scored by its paired gap to the winner
        # over the levels it saw, so every class's score is on the winner's scale (paired comparison)
        winner = min(alive, key=lambda c: float(np.mean(errs[c, :visited])))
        base = float(np.mean(errs[winner, :visited]))
        for c in range(n_classes):
            m = int(counts[c])
            scores[i, c] = base + float(np.mean(errs[c, :m] - errs[winner, :m])) if m else np.inf
        visited_out[i] = visited
    return ProcResult(scores, evals, visited_out)


def classify_fast(den: Denoiser, x0: torch.Tensor, n_classes: int, plan: FastPlan) -> ProcResult:
    """The fast procedure: plan levels, all cells and surviving classes batched together (module docstring)."""
    n = x0.shape[0]
    levels = len(plan.timesteps)
    noise = level_noises(plan.noise_seeds, tuple(x0.shape[1:]))
    ts = np.asarray(plan.timesteps, dtype=np.int64)
    w = np.asarray(plan.weights, dtype=np.float64)
    k1 = plan.prune_after
    # stage 1: every class at the first k1 levels
    cell, cls, lev = np.meshgrid(np.arange(n), np.arange(n_classes), np.arange(k1), indexing="ij")
    e1 = den.errors(x0, cell.ravel(), cls.ravel(), ts[lev.ravel()], noise, lev.ravel()).reshape(n, n_classes, k1)
    wsum = np.zeros((n, n_classes)) + w[:k1].sum()
    acc = (e1 * w[:k1]).sum(axis=2)
    evals = np.full(n, n_classes * k1, dtype=np.int64)
    s1 = acc / wsum
    alive = np.zeros((n, n_classes), dtype=bool)
    if k1 < levels:
        alive = s1 - s1.min(axis=1, keepdims=True) <= plan.prune_delta
        alive &= alive.sum(axis=1, keepdims=True) > 1  # a lone survivor needs no more evidence
        ci, cc = np.nonzero(alive)
        if len(ci):
            rest = np.arange(k1, levels)
            cell2 = np.repeat(ci, len(rest))
            cls2 = np.repeat(cc, len(rest))
            lev2 = np.tile(rest, len(ci))
            e2 = den.errors(x0, cell2, cls2, ts[lev2], noise, lev2)
            np.add.at(acc, (cell2, cls2), e2 * w[lev2])
            np.add.at(wsum, (cell2, cls2), w[lev2])
            np.add.at(evals, cell2, 1)
    visited = np.where(evals > n_classes * k1, levels, k1)
    return ProcResult(paired_prune_scores(acc / wsum, s1, alive), evals, visited)


def paired_prune_scores(final: np.ndarray, stage1: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Scores after pruning, on one scale: survivors keep their full-plan score; a pruned class gets
    the winner's score plus its stage-1 gap to the winner (paired over the stage-1 levels)."""
    out = stage1.copy()
    rows = np.flatnonzero(alive.any(axis=1))
    if len(rows):
        fin = np.where(alive[rows], final[rows], np.inf)
        win = fin.argmin(axis=1)
        base = final[rows, win] - stage1[rows, win]
        out[rows] = stage1[rows] + base[:, None]
        out[rows] = np.where(alive[rows], final[rows], out[rows])
    return out
