"""CytoDiffusion's classification procedure as its code does it (``classify_faithful``).

:func:`.procedures.classify_reference` keeps CytoDiffusion's level schedule and t-test pruning but
scores the plain, unweighted mean error over the whole crop, without test-time augmentation. The
original (Deltadahl/CytoDiffusion, ``train_and_test/diffusion_discriminator.py``, ``log_validation``,
run with the flags of ``train_and_test/test_in_domain.sh``) differs in four ways, all reproduced here:

1. *Disc mask.* The squared error is summed only over a centred disc of radius ``--radius=20`` on the
   45 x 45 latent (``--resolution=360`` / 8), i.e. 20/45 of the input width; the corners are ignored.
2. *Per-level weight* ``1 / poly4(s)``, ``s = (1000 - t) / 1000``, where ``poly4`` is a 4th-order
   polynomial fitted to the *median over images of the standard deviation across classes* of the
   unweighted error at each level (their script fits it at the end of a run, on the first
   ``min_noise_trials`` levels of every image, and prints the coefficients for the next run's
   ``--poly_coeff``); the default coefficients are hard-coded in the script (:data:`CYTODIFFUSION_POLY4`).
   So each level counts in proportion to how far apart the classes typically are at that level.
3. *Test-time augmentation at every level*: a rotation by ``random.randint(0, 359)`` degrees, a
   diagonal mirror with probability 1/2 (``--random_full_rotation``), a horizontal flip with
   probability 1/2 (``--random_flip``) and ``ColorJitter(brightness=0.25, contrast=0.25,
   saturation=0.25, hue=0.125)`` (``--jitter_strength=0.25``, hue half of it), plus fresh noise.
4. *Normalised scores.* At each level the weighted errors of the surviving classes have their minimum
   subtracted; a pruned class's later rows are its running mean (so its mean freezes when it is
   dropped); the score is the mean over levels divided by its mean over classes.

Pruning: after level index ``i`` (0-based) with ``i >= min_noise_trials (20)`` and ``i % 5 == 0``, a
paired t-test (``scipy.stats.ttest_rel``) of each surviving class against the leader (lowest score
among survivors) drops the class when ``p < 2e-3`` and its score is higher; it stops when one class
is left or after ``n_noise_lvls = 2000`` levels (starting steps ``np.linspace(1, 999, 2000,
dtype=int)``, shuffled once; ``t = 999 - step``). The t-test on the min-subtracted rows equals the
t-test on the weighted errors (the subtracted minimum is common to both classes of a pair).

Deliberate differences from the original, each documented where it happens: the noise and the
augmentation of a level depend only on ``(seed, level)`` (the same for every cell of a call, so a
cell's scores do not depend on its batch; theirs come from unseeded global generators); rotation is
bilinear with the border repeated (theirs: nearest neighbour, black corners); the disc is centred at
the true centre ``((H-1)/2, (W-1)/2)`` (theirs at ``(H//2, W//2)``: the same for odd sizes); the error
is the mean over the disc rather than its sum (a constant factor: every step is scale-free).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .procedures import Denoiser, ProcResult, level_noises

if TYPE_CHECKING:
    import torch

__all__ = [
    "CYTODIFFUSION_POLY4",
    "FaithfulParams",
    "TTADraw",
    "apply_tta",
    "classify_faithful",
    "disc_mask",
    "draw_tta",
    "faithful_timesteps",
    "fit_poly4",
    "level_weights",
    "poly4_time",
    "prune_points",
    "tta_views",
]

#: ``a0..a4`` of CytoDiffusion's default ``poly4(s) = a0 + a1 s + ... + a4 s^4`` (``diffusion_discriminator.py``,
#: ``custom_weighting_poly4``, used when ``--poly_coeff`` is not given, as in all their test scripts). Fitted on
#: their Stable-Diffusion latents; only its shape over ``s`` matters (scores are scale-free). Positive on [0, 1]:
#: 0.93 at s = 0 (t = T), 5.35 at s = 0.68 (t = 320), 2.76 at s = 1 (t = 0).
CYTODIFFUSION_POLY4: tuple[float, ...] = (
    0.9270553940204841,
    9.836536887830196,
    -4.6840608002246205,
    6.018538389994896,
    -9.339786177681749,
)


@dataclass
class FaithfulParams:
    """CytoDiffusion's settings (``test_in_domain.sh`` flags on ``diffusion_discriminator.py``) as defaults."""

    #: ``--n_noise_lvls=2000``: at most this many noise levels per cell
    n_levels: int = 2000
    #: ``--min_noise_trials=20``: no pruning before level index 20 (so at least 21 levels for every class)
    first: int = 20
    #: ``noise_idx % 5 == 0``: prune at level indices that are multiples of 5 (hard-coded)
    every: int = 5
    #: ``p_value < 2e-3`` (hard-coded)
    p_drop: float = 2e-3
    #: ours: seeds the level order, the noises and the augmentations (theirs are unseeded)
    seed: int = 0
    #: ``--radius=20`` on the 45-px latent of ``--resolution=360``; scaled to the input's shorter side
    disc_radius_frac: float = 20 / 45
    #: ``a0..a4`` of the level-weight polynomial in ``s = (T - t) / T`` (default: theirs, :data:`CYTODIFFUSION_POLY4`);
    #: ``None``: fitted as their script fits it (:func:`fit_poly4`) on the cells at hand, from their unweighted errors
    #: at the first ``first`` levels, which every class is evaluated at anyway (no extra evaluations; the scores of a
    #: cell then depend on the other cells of the call)
    poly4: tuple[float, ...] | None = CYTODIFFUSION_POLY4
    #: test-time augmentation at every level (theirs: always on)
    tta: bool = True
    #: ``--random_full_rotation``: rotation by ``randint(0, 359)`` degrees and a diagonal mirror with probability 1/2
    rotate: bool = True
    #: ``--random_flip``: horizontal flip with probability 1/2
    flip: bool = True
    #: ``--jitter_strength=0.25``: brightness, contrast and saturation factors uniform in ``[1 - j, 1 + j]``
    colour_jitter: float = 0.25
    #: hue shift uniform in ``[-h, h]`` (their ``hue=jitter_strength / 2``)
    hue_jitter: float = 0.125

    def __post_init__(self) -> None:
        if self.n_levels < 1 or self.first < 0 or self.every < 1:
            raise ValueError(
                f"FaithfulParams: n_levels >= 1, first >= 0 and every >= 1 required, "
                f"got {self.n_levels}, {self.first}, {self.every}"
            )
        if not 0.0 < self.p_drop < 1.0:
            raise ValueError(f"FaithfulParams: p_drop must be in (0, 1), got {self.p_drop}")
        if not self.disc_radius_frac > 0:
            raise ValueError(f"FaithfulParams: disc_radius_frac must be > 0, got {self.disc_radius_frac}")
        if self.poly4 is not None:
            self.poly4 = tuple(float(a) for a in self.poly4)
            if len(self.poly4) != 5:
                raise ValueError(f"FaithfulParams: poly4 needs 5 coefficients a0..a4, got {len(self.poly4)}")
        if not 0.0 <= self.colour_jitter < 1.0 or not 0.0 <= self.hue_jitter <= 0.5:
            raise ValueError(
                f"FaithfulParams: colour_jitter must be in [0, 1) and hue_jitter in [0, 0.5], "
                f"got {self.colour_jitter}, {self.hue_jitter}"
            )


# ---------------------------------------------------------------------------------------------- schedule


def faithful_timesteps(params: FaithfulParams, num_train_timesteps: int = 1000) -> np.ndarray:
    """The timesteps of the levels in visiting order: starting steps ``linspace(1, T-1, n)`` truncated to
    integers (their ``np.linspace(..., dtype=int)``), ``t = T - 1 - step`` (their ``scheduler.timesteps``
    with 1000 inference steps runs 999..0), shuffled with ``seed``; so ``t`` covers ``0 .. T-2``."""
    big_t = int(num_train_timesteps)
    if big_t < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    steps = np.linspace(1, big_t - 1, params.n_levels).astype(np.int64)
    ts = (big_t - 1) - steps
    rng = np.random.default_rng(params.seed)
    return ts[rng.permutation(len(ts))]


def prune_points(params: FaithfulParams) -> list[int]:
    """Level indices (0-based) after which the t-test runs: ``i >= first`` and ``i % every == 0``."""
    return [i for i in range(params.n_levels) if i >= params.first and i % params.every == 0]


def poly4_time(timesteps: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
    """The polynomial's argument ``s = (T - t) / T`` (their ``(1000 - t) / 1000``): 0 at pure noise, 1 at t = 0."""
    t = np.asarray(timesteps, dtype=np.float64)
    return (num_train_timesteps - t) / num_train_timesteps


def _poly_eval(poly4: tuple[float, ...] | list[float] | np.ndarray, s: np.ndarray) -> np.ndarray:
    a = np.asarray(poly4, dtype=np.float64)
    if a.shape != (5,) or not np.isfinite(a).all():
        raise ValueError(f"poly4 needs 5 finite coefficients a0..a4, got {poly4!r}")
    return np.polynomial.polynomial.polyval(s, a)


def level_weights(
    timesteps: np.ndarray,
    poly4: tuple[float, ...] | list[float] | np.ndarray,
    num_train_timesteps: int = 1000,
) -> np.ndarray:
    """Weights ``1 / poly4(s)`` of the levels at ``timesteps`` (``s``: :func:`poly4_time`).

    The polynomial must be positive at every timestep ``0 <= t < T`` (else the weights would change sign
    or blow up): a ``ValueError`` names where it is not. (Theirs adds 1e-10 and asserts ``weight >= 0``.)
    """
    t = np.asarray(timesteps)
    if t.size and (t.min() < 0 or t.max() >= num_train_timesteps):
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {t.min()}..{t.max()}")
    grid = np.arange(num_train_timesteps)
    values = _poly_eval(poly4, poly4_time(grid, num_train_timesteps))
    bad = np.flatnonzero(values <= 0)
    if len(bad):
        raise ValueError(
            f"poly4 {tuple(float(a) for a in poly4)} is not positive on [0, {num_train_timesteps}): "
            f"{values[bad[0]]:.4g} at t={int(grid[bad[0]])} ({len(bad)} timesteps <= 0); level weights 1/poly4 "
            "need a positive polynomial"
        )
    return 1.0 / _poly_eval(poly4, poly4_time(t, num_train_timesteps))


def fit_poly4(timesteps: np.ndarray, errors: np.ndarray, num_train_timesteps: int = 1000) -> tuple[float, ...]:
    """CytoDiffusion's fit of the level-weight polynomial (end of ``log_validation``).

    ``errors``: unweighted errors ``(N, C, L)`` of N cells, C classes, at the L levels ``timesteps``.
    Per cell and level the standard deviation across classes (ddof 1, pandas' default); per level the
    median over cells; a least-squares degree-4 fit in ``s`` (:func:`poly4_time`). Returns ``a0..a4``.
    """
    e = np.asarray(errors, dtype=np.float64)
    t = np.asarray(timesteps)
    if e.ndim != 3 or e.shape[2] != len(t):
        raise ValueError(f"errors must be (N, C, L) with L = {len(t)} timesteps, got {e.shape}")
    if e.shape[1] < 2:
        raise ValueError("fitting poly4 needs at least 2 classes (it fits the spread between classes)")
    if len(np.unique(t)) < 5:
        raise ValueError(f"fitting a degree-4 polynomial needs >= 5 distinct timesteps, got {len(np.unique(t))}")
    spread = np.median(e.std(axis=1, ddof=1), axis=0)  # (L,)
    coeffs = np.polyfit(poly4_time(t, num_train_timesteps), spread, 4)
    return tuple(float(c) for c in coeffs[::-1])


# ---------------------------------------------------------------------------------------------- disc


def disc_mask(h: int, w: int, radius_frac: float) -> torch.Tensor:
    """``(h, w)`` float weights: 1 inside the centred disc of radius ``radius_frac * min(h, w)``, 0 outside
    (so it sums to the disc's area in pixels). Centred at ``((h-1)/2, (w-1)/2)``; CytoDiffusion's
    ``dist_from_center <= radius`` about ``(h//2, w//2)`` is the same disc for odd sizes."""
    import torch

    if h < 1 or w < 1 or not radius_frac > 0:
        raise ValueError(f"disc_mask needs h, w >= 1 and radius_frac > 0, got {h}, {w}, {radius_frac}")
    r = radius_frac * min(h, w)
    yy = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    xx = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    mask = ((yy[:, None] ** 2 + xx[None, :] ** 2) <= r * r).to(torch.float32)
    if mask.sum() == 0:
        raise ValueError(f"disc_mask: radius {r:.3g} px covers no pixel of a {h} x {w} input")
    return mask


class _DiscDenoiser(Denoiser):
    """``base``'s network and settings, the error averaged over the disc instead of ``base``'s weighting;
    the evaluations it spends are counted on ``base`` too."""

    def __init__(self, base: Denoiser, radius_frac: float) -> None:
        super().__init__(base.unet, base.acp, base.device, max_batch=base.max_batch, bf16=base.bf16)
        self.base = base
        self.radius_frac = radius_frac
        self.channels_last = base.channels_last

    def error_weight(self, height: int, width: int) -> torch.Tensor:
        # mean(w * sq) over all pixels with w = mask * (pixels / area) is the mean of sq inside the disc
        m = disc_mask(height, width, self.radius_frac)
        return (m * (m.numel() / m.sum())).to(self.device)

    def errors(
        self,
        x0: torch.Tensor,
        cell: np.ndarray,
        cls: np.ndarray,
        t: np.ndarray,
        noise: torch.Tensor,
        noise_idx: np.ndarray,
    ) -> np.ndarray:
        ev, fp = self.evaluations, self.forward_passes
        out = super().errors(x0, cell, cls, t, noise, noise_idx)
        self.base.evaluations += self.evaluations - ev
        self.base.forward_passes += self.forward_passes - fp
        return out


# ---------------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class TTADraw:
    """One level's augmentation (identity by default), applied in CytoDiffusion's order: colour jitter
    (the four factors in ``order``: 0 brightness, 1 contrast, 2 saturation, 3 hue, as torchvision's
    ``ColorJitter`` shuffles them), horizontal flip, diagonal mirror (transpose), rotation."""

    angle: float = 0.0  # degrees, counter-clockwise as displayed (torchvision's ``rotate``)
    transpose: bool = False
    hflip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: tuple[int, ...] = (0, 1, 2, 3)

    @property
    def colour(self) -> bool:
        return (self.brightness, self.contrast, self.saturation, self.hue) != (1.0, 1.0, 1.0, 0.0)


def draw_tta(n: int, params: FaithfulParams, generator: torch.Generator) -> list[TTADraw]:
    """``n`` levels' augmentations from ``generator``. Every level draws the same random numbers whatever
    the flags, so switching one augmentation off leaves the others' draws unchanged."""
    import torch

    out: list[TTADraw] = []
    j, hj = params.colour_jitter, params.hue_jitter
    for _ in range(n):
        angle = int(torch.randint(0, 360, (1,), generator=generator).item())  # random.randint(0, 359)
        u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
        order = tuple(int(k) for k in torch.randperm(4, generator=generator).tolist())
        if not params.tta:
            out.append(TTADraw())
            continue
        out.append(
            TTADraw(
                angle=float(angle) if params.rotate else 0.0,
                transpose=params.rotate and u[0] > 0.5,
                hflip=params.flip and u[1] > 0.5,
                brightness=1.0 + (2 * u[2] - 1) * j,
                contrast=1.0 + (2 * u[3] - 1) * j,
                saturation=1.0 + (2 * u[4] - 1) * j,
                hue=(2 * u[5] - 1) * hj,
                order=order,
            )
        )
    return out


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of ``(N, 3, H, W)`` in [0, 1], ``(N, 1, H, W)`` (torchvision's ``rgb_to_grayscale``)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of ``(N, 3, H, W)`` in [0, 1] by ``shift`` turns (RGB -> HSV -> RGB)."""
    import torch

    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    v = maxc
    cr = maxc - minc
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0 + shift, 1.0)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i, 6).long()
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    table = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    out = torch.zeros_like(x)
    for k, (rr, gg, bb) in table.items():
        sel = (i == k).unsqueeze(1)
        out = torch.where(sel, torch.stack([rr, gg, bb], dim=1), out)
    return out.clamp(0.0, 1.0)


def _colour(x: torch.Tensor, d: TTADraw) -> torch.Tensor:
    """torchvision ``ColorJitter`` semantics on ``(N, 3, H, W)`` in [-1, 1] (computed in [0, 1])."""
    y = ((x + 1) / 2).clamp(0.0, 1.0)
    for k in d.order:
        if k == 0 and d.brightness != 1.0:
            y = (y * d.brightness).clamp(0.0, 1.0)
        elif k == 1 and d.contrast != 1.0:
            mean = _grey(y).mean(dim=(1, 2, 3), keepdim=True)
            y = (d.contrast * y + (1 - d.contrast) * mean).clamp(0.0, 1.0)
        elif k == 2 and d.saturation != 1.0:
            y = (d.saturation * y + (1 - d.saturation) * _grey(y)).clamp(0.0, 1.0)
        elif k == 3 and d.hue != 0.0:
            y = _shift_hue(y, d.hue)
    return y * 2 - 1


def apply_tta(x0: torch.Tensor, draw: TTADraw) -> torch.Tensor:
    """``draw`` applied to every cell of ``x0`` ``(N, C, H, W)`` (model input in [-1, 1]).

    Colour jitter needs RGB pixels (``C == 3``). The rotation is bilinear about the centre and repeats the
    border pixels outside the source (the crop's flat background), as our training's rotation does;
    CytoDiffusion's ``TF.rotate`` is nearest-neighbour and fills black.
    """
    import torch

    from .data import rotate_zoom

    x = x0
    if draw.colour:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"colour jitter needs RGB pixel input (N, 3, H, W), got {tuple(x.shape)}; "
                "set colour_jitter=0 and hue_jitter=0 for latent models"
            )
        x = _colour(x, draw)
    if draw.hflip:
        x = x.flip(-1)
    if draw.transpose:
        x = x.transpose(-2, -1)
    angle = draw.angle % 360.0
    if angle:
        n = x.shape[0]
        rad = torch.full((n,), math.radians(angle), dtype=x.dtype, device=x.device)
        x = rotate_zoom(x, rad, torch.ones(n, dtype=x.dtype, device=x.device))
    return x.contiguous()


def tta_views(x0: torch.Tensor, n: int, params: FaithfulParams, generator: torch.Generator) -> torch.Tensor:
    """``(n, N, C, H, W)``: ``n`` levels' augmented copies of the cells ``x0`` (the draws of :func:`draw_tta`;
    the same generator state gives the same views)."""
    import torch

    draws = draw_tta(n, params, generator)
    if not draws:
        return x0.new_zeros((0, *x0.shape))
    return torch.stack([apply_tta(x0, d) for d in draws])


# ---------------------------------------------------------------------------------------------- procedure


def _scores(norm_sum: np.ndarray, levels: int) -> np.ndarray:
    """Their final row: the mean over levels of the min-subtracted rows (``norm_sum``: their sum over the
    ``levels`` levels), divided by its mean over classes."""
    final: np.ndarray = norm_sum / levels
    mean = final.mean(axis=-1, keepdims=True)
    out: np.ndarray = np.where(mean > 0, final / np.where(mean > 0, mean, 1.0), final)
    return out


def classify_faithful(
    den: Denoiser,
    x0: torch.Tensor,
    n_classes: int,
    params: FaithfulParams | None = None,
    num_train_timesteps: int = 1000,
) -> ProcResult:
    """CytoDiffusion's procedure as its code does it (module docstring); all cells batched together.

    ``den`` supplies the network, schedule, device and batching; its error weighting is replaced by the
    disc (its evaluation counters still count). ``ProcResult.scores`` are CytoDiffusion's normalised
    scores (lower = more likely; mean 1 over the classes of a cell). Their prediction is the lowest-scoring
    *surviving* class; a class dropped earlier whose frozen score is not above the winner's (rare) is
    lifted to just above it, so ``argmin(scores)`` is their prediction.
    """
    import torch
    from scipy.stats import ttest_rel

    p = params or FaithfulParams()
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    n = int(x0.shape[0])
    ts = faithful_timesteps(p, num_train_timesteps)
    n_lv = len(ts)
    scores = np.zeros((n, n_classes))
    evals = np.zeros(n, dtype=np.int64)
    visited = np.zeros(n, dtype=np.int64)
    if n == 0 or n_classes == 1:
        return ProcResult(scores, evals, visited)
    weights = level_weights(ts, p.poly4, num_train_timesteps) if p.poly4 is not None else None
    if weights is None and p.first < 5:
        raise ValueError("poly4=None fits the polynomial on the first `first` levels: needs first >= 5")
    disc = _DiscDenoiser(den, p.disc_radius_frac)
    draws = draw_tta(n_lv, p, torch.Generator().manual_seed(p.seed))
    shape = tuple(int(s) for s in x0.shape[1:])

    raw = np.full((n, n_classes, n_lv), np.nan)  # unweighted disc errors
    norm = np.zeros((n, n_classes, n_lv))  # their mse_latent_normalized rows
    norm_sum = np.zeros((n, n_classes))  # the rows' running sum
    alive = np.ones((n, n_classes), dtype=bool)
    done = np.zeros(n, dtype=bool)
    cuts = [*prune_points(p), n_lv - 1]
    start = 0
    for end in sorted({int(c) for c in cuts}):
        if end < start:
            continue
        cells = np.flatnonzero(~done)
        if len(cells) == 0:
            break
        lv = np.arange(start, end + 1)
        xa = x0[torch.as_tensor(cells, device=x0.device)]
        views = torch.cat([apply_tta(xa, draws[int(level)]) for level in lv])  # view j * len(cells) + k
        noise = level_noises([p.seed * 1_000_003 + int(level) for level in lv], shape)
        kk, cc, jj = np.nonzero(np.broadcast_to(alive[cells][:, :, None], (len(cells), n_classes, len(lv))))
        e = disc.errors(views, jj * len(cells) + kk, cc, ts[lv[jj]], noise, jj)
        raw[cells[kk], cc, lv[jj]] = e
        np.add.at(evals, cells[kk], 1)
        if weights is None:  # the first segment: every class at levels 0..end of every cell
            poly = fit_poly4(ts[: p.first], raw[:, :, : p.first], num_train_timesteps)
            try:
                weights = level_weights(ts, poly, num_train_timesteps)
            except ValueError as exc:
                raise ValueError(
                    f"poly4=None: the polynomial fitted on the first {p.first} levels of {n} cells is unusable "
                    f"({exc}); fit on more cells or levels, or pass poly4 (e.g. CYTODIFFUSION_POLY4)"
                ) from exc
        assert weights is not None
        for level in lv:  # their per-level normalisation, in order (a pruned class repeats its running mean)
            wl = raw[cells, :, level] * weights[level]
            al = alive[cells]
            row_min = np.where(al, wl, np.inf).min(axis=1, keepdims=True)
            past = norm_sum[cells] / level if level > 0 else np.zeros((len(cells), n_classes))
            row = np.where(al, wl - row_min, past)
            norm[cells, :, level] = row
            norm_sum[cells] += row
        visited[cells] = end + 1
        final = _scores(norm_sum[cells], end + 1)
        scores[cells] = final
        if end >= p.first and end % p.every == 0:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                for k, ci in enumerate(cells):
                    live = np.flatnonzero(alive[ci])
                    leader = int(live[np.argmin(final[k, live])])
                    others = live[live != leader]
                    if len(others) == 0:
                        continue
                    a = norm[ci, others, : end + 1]
                    b = np.broadcast_to(norm[ci, leader, : end + 1], a.shape)
                    pv = ttest_rel(a, b, axis=1).pvalue
                    drop = others[(np.asarray(pv) < p.p_drop) & (final[k, others] > final[k, leader])]
                    alive[ci, drop] = False
            done[cells] = alive[cells].sum(axis=1) <= 1
        start = end + 1
    # their prediction is the lowest-scoring survivor; keep argmin(scores) on it
    for i in range(n):
        live = np.flatnonzero(alive[i])
        win = int(live[np.argmin(scores[i, live])])
        low = ~alive[i] & (scores[i] <= scores[i, win])
        scores[i, low] = np.nextafter(scores[i, win], np.inf)
    return ProcResult(scores, evals, visited)
