"""CytoDiffusion's procedure as its code does it (``classify.reference``): hand-computed toy cases, a tiny model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from scipy.stats import ttest_rel  # noqa: E402

from scope_stream.classify.procedures import Denoiser  # noqa: E402
from scope_stream.classify.reference import (  # noqa: E402
    CYTODIFFUSION_POLY4,
    FaithfulParams,
    TTADraw,
    apply_tta,
    classify_faithful,
    disc_mask,
    faithful_timesteps,
    fit_poly4,
    level_weights,
    poly4_time,
    prune_points,
    tta_views,
)

T = 1000
SIZE = 9


def linear_acp() -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float()


def gains(n_classes: int, wobble: float = 0.2) -> np.ndarray:
    """A known, level-dependent factor per class: a common trend in t times a class-specific wobble, so
    paired differences vary from level to level."""
    t = np.arange(T)
    return np.stack([(1 + t / T) * (1 + wobble * np.sin(0.7 * t + 1.3 * c)) for c in range(n_classes)])


class OffsetUNet(torch.nn.Module):
    """On x0 = 0, predicts the noise exactly plus ``gain[c, t] * offset[c]``: the error of class c at t is
    ``gain[c, t]**2 * mean(offset[c]**2)`` over the pixels that count."""

    def __init__(self, acp: torch.Tensor, offsets: torch.Tensor, wobble: float = 0.2) -> None:
        super().__init__()
        self.acp = acp
        self.offsets = offsets  # (C, H, W)
        self.gain = torch.as_tensor(gains(offsets.shape[0], wobble), dtype=torch.float32)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> SimpleNamespace:
        a = self.acp[t].view(-1, 1, 1, 1)
        eps = xt / (1 - a).sqrt()
        off = self.offsets[class_labels] * self.gain[class_labels, t].view(-1, 1, 1)
        return SimpleNamespace(sample=eps + off[:, None])


def toy_offsets() -> torch.Tensor:
    """Class 0: small inside the disc, huge outside; class 1: a little larger everywhere; class 2: far off."""
    inside = disc_mask(SIZE, SIZE, 20 / 45).bool()
    o = torch.empty(3, SIZE, SIZE)
    o[0] = torch.where(inside, torch.tensor(0.30), torch.tensor(3.0))
    o[1] = 0.31
    o[2] = 0.60
    return o


def hand_faithful(raw: np.ndarray, w: np.ndarray, p: FaithfulParams) -> tuple[np.ndarray, int, int, list[int]]:
    """CytoDiffusion's loop transcribed one level at a time for one cell: ``raw`` (C, L) unweighted errors.
    Returns (final scores, evaluations, levels visited, survivors)."""
    n_classes, n_lv = raw.shape
    alive = list(range(n_classes))
    norm = np.zeros((n_lv, n_classes))
    evals = 0
    final = np.zeros(n_classes)
    level = 0
    for level in range(n_lv):
        evals += len(alive)
        mse = raw[:, level] * w[level]
        row_min = min(mse[c] for c in alive)
        for c in range(n_classes):
            norm[level, c] = mse[c] - row_min if c in alive else norm[:level, c].sum() / level
        final = norm[: level + 1].sum(axis=0) / (level + 1)
        final = final / final.mean()
        leader = min(alive, key=lambda c: (final[c], c))
        if level >= p.first and level % p.every == 0:
            drop = []
            for c in alive:
                if c == leader:
                    continue
                pv = ttest_rel(norm[: level + 1, c], norm[: level + 1, leader]).pvalue
                if pv < p.p_drop and final[c] > final[leader]:
                    drop.append(c)
            alive = [c for c in alive if c not in drop]
            if len(alive) <= 1:
                break
    return final, evals, level + 1, alive


def toy_case(p: FaithfulParams, n_cells: int = 2, wobble: float = 0.2) -> tuple[Denoiser, torch.Tensor, np.ndarray]:
    """A real Denoiser over :class:`OffsetUNet`, zero cells, and the errors by hand (C, L) on the disc."""
    offsets = toy_offsets()
    den = Denoiser(OffsetUNet(linear_acp(), offsets, wobble), linear_acp(), centre_sigma=0.3)  # the disc replaces it
    ts = faithful_timesteps(p, T)
    mask = disc_mask(SIZE, SIZE, p.disc_radius_frac).bool()
    per_class = np.array([float((offsets[c][mask] ** 2).mean()) for c in range(3)])
    raw = gains(3, wobble)[:, ts] ** 2 * per_class[:, None]
    return den, torch.zeros(n_cells, 3, SIZE, SIZE), raw


PARAMS = {"n_levels": 40, "first": 10, "every": 5, "tta": False}


def test_toy_case_matches_hand_computation() -> None:
    p = FaithfulParams(**PARAMS)
    den, x0, raw = toy_case(p)
    w = level_weights(faithful_timesteps(p, T), CYTODIFFUSION_POLY4, T)
    final, evals, visited, alive = hand_faithful(raw, w, p)
    assert alive == [0, 1]  # class 2 is far off: dropped at the second t-test; 0 and 1 are too close to separate
    assert visited == 40 and evals == 3 * 16 + 2 * 24

    res = classify_faithful(den, x0, 3, p, T)
    np.testing.assert_allclose(res.scores, np.tile(final, (2, 1)), rtol=1e-4)
    assert res.evaluations.tolist() == [evals, evals] and res.levels.tolist() == [40, 40]
    assert den.evaluations == 2 * evals  # the disc-weighted errors are counted on the caller's Denoiser
    # the winner: lowest weighted mean error; scores are CytoDiffusion's (mean 1 over classes)
    weighted_mean = (raw * w)[:, :11].mean(axis=1)
    assert res.scores.argmin(axis=1).tolist() == [int(weighted_mean.argmin())] * 2 == [0, 0]
    np.testing.assert_allclose(res.scores.mean(axis=1), 1.0)


def test_disc_decides_and_poly_fit_path() -> None:
    # the whole crop (the disc covers it): class 0's huge outside error now counts and class 1 wins
    p = FaithfulParams(**PARAMS, disc_radius_frac=1.0)
    den, x0, raw = toy_case(p)
    final, evals, visited, alive = hand_faithful(raw, level_weights(faithful_timesteps(p, T), p.poly4, T), p)
    res = classify_faithful(den, x0, 3, p, T)
    assert alive == [1] and visited == 26
    np.testing.assert_allclose(res.scores[0], final, rtol=1e-4)
    assert res.scores.argmin(axis=1).tolist() == [1, 1] and res.evaluations.tolist() == [evals, evals]

    # poly4=None: fitted from the unweighted errors at the first `first` levels (no extra evaluations);
    # the spread between classes follows the smooth trend when the wobble is small
    p = FaithfulParams(**PARAMS, poly4=None)
    den, x0, raw = toy_case(p, wobble=0.02)
    ts = faithful_timesteps(p, T)
    poly = fit_poly4(ts[: p.first], np.tile(raw[None, :, : p.first], (2, 1, 1)), T)
    final, evals, _, _ = hand_faithful(raw, level_weights(ts, poly, T), p)
    res = classify_faithful(den, x0, 3, p, T)
    np.testing.assert_allclose(res.scores, np.tile(final, (2, 1)), rtol=1e-4)
    assert res.evaluations[0] == evals
    # a noisy spread over 10 levels extrapolates below zero: a clear error, not negative weights
    den, x0, _ = toy_case(p, wobble=0.2)
    with pytest.raises(ValueError, match=r"poly4=None.*not positive"):
        classify_faithful(den, x0, 3, p, T)


def test_fit_poly4_recovers_a_known_spread() -> None:
    poly = (1.0, 2.0, -0.5, 0.3, -0.2)
    ts = np.array([5, 90, 210, 333, 480, 512, 640, 777, 860, 990])
    spread = np.polynomial.polynomial.polyval(poly4_time(ts, T), poly)
    errors = spread[None, None, :] * np.array([-1.0, 0.0, 1.0])[None, :, None] + 7.0  # std across classes = spread
    errors = np.tile(errors, (3, 1, 1))
    np.testing.assert_allclose(fit_poly4(ts, errors, T), poly, atol=1e-8)
    with pytest.raises(ValueError, match="distinct timesteps"):
        fit_poly4(ts[:4], errors[:, :, :4], T)


def test_level_weights() -> None:
    w = level_weights(np.array([0, 500, 999]), CYTODIFFUSION_POLY4, T)
    s = np.array([1.0, 0.5, 0.001])
    np.testing.assert_allclose(w, 1 / np.polynomial.polynomial.polyval(s, CYTODIFFUSION_POLY4))
    assert (w > 0).all()
    with pytest.raises(ValueError, match="not positive"):
        level_weights(np.array([500]), (1.0, -3.0, 0.0, 0.0, 0.0), T)  # negative at t = 0 (s = 1)
    with pytest.raises(ValueError, match="not positive"):
        level_weights(np.array([500]), (0.5, -1.0, 0.0, 0.0, 0.0), T)  # zero at t = 500 (s = 0.5)
    with pytest.raises(ValueError, match="not positive"):  # only near t = T: rejected whatever t is asked for
        level_weights(np.array([0]), (-0.01, 1.0, 0.0, 0.0, 0.0), T)
    with pytest.raises(ValueError, match="5 finite"):
        level_weights(np.array([0]), (1.0, 2.0), T)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        level_weights(np.array([1000]), CYTODIFFUSION_POLY4, T)


def test_schedule_is_cytodiffusions() -> None:
    p = FaithfulParams()
    ts = faithful_timesteps(p, T)
    np.testing.assert_array_equal(np.sort(ts), np.sort(999 - np.linspace(1, 999, 2000, dtype=int)))
    assert not np.array_equal(ts, np.sort(ts))  # shuffled, deterministically
    np.testing.assert_array_equal(ts, faithful_timesteps(FaithfulParams(), T))
    pts = prune_points(p)
    assert pts[:3] == [20, 25, 30] and pts[-1] == 1995 and len(pts) == 396
    assert prune_points(FaithfulParams(first=21))[0] == 25
    assert (p.n_levels, p.first, p.every, p.p_drop, p.disc_radius_frac) == (2000, 20, 5, 2e-3, 20 / 45)
    assert (p.colour_jitter, p.hue_jitter, p.rotate, p.flip, p.tta) == (0.25, 0.125, True, True, True)


def test_disc_mask() -> None:
    m = disc_mask(450, 450, 20 / 45)
    assert m.shape == (450, 450) and set(m.unique().tolist()) == {0.0, 1.0}
    assert float(m.sum()) == pytest.approx(math.pi * 200**2, rel=0.005)
    # CytoDiffusion's mask on its 45-px latent: dist from (W//2, H//2) <= 20
    yy, xx = torch.meshgrid(torch.arange(45), torch.arange(45), indexing="ij")
    theirs = (torch.sqrt((xx - 22.0) ** 2 + (yy - 22.0) ** 2) <= 20).float()
    assert torch.equal(disc_mask(45, 45, 20 / 45), theirs)
    m32 = disc_mask(32, 32, 20 / 45)  # even sizes: symmetric about the true centre
    assert torch.equal(m32, m32.flip(0)) and torch.equal(m32, m32.T)
    with pytest.raises(ValueError):
        disc_mask(8, 8, 0.0)


def test_rotation_flips_and_colour() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 12, 12, generator=g) * 2 - 1
    assert torch.equal(apply_tta(x, TTADraw()), x)
    # counter-clockwise (torchvision's rotate): 90 degrees is rot90 up to interpolation
    torch.testing.assert_close(apply_tta(x, TTADraw(angle=90.0)), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_tta(x, TTADraw(angle=180.0)), x.flip(2).flip(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_tta(x, TTADraw(angle=360.0 + 270.0)), torch.rot90(x, -1, dims=(2, 3)))
    assert torch.equal(apply_tta(x, TTADraw(hflip=True)), x.flip(3))
    assert torch.equal(apply_tta(x, TTADraw(transpose=True)), x.transpose(2, 3))
    # an arbitrary angle keeps the centre's value and repeats the border (no black corners)
    flat = torch.full((1, 3, 11, 11), 0.4)
    flat[:, :, 5, 5] = -0.2
    r = apply_tta(flat, TTADraw(angle=37.0))
    assert float(r[0, 0, 5, 5]) < 0.3 and float(r[0, 0, 0, 0]) == pytest.approx(0.4)
    # colour: brightness in [0, 1] units; a hue turn of 1/3 takes red to green
    torch.testing.assert_close(apply_tta(x, TTADraw(brightness=1.1)), (((x + 1) / 2) * 1.1).clamp(0, 1) * 2 - 1)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    torch.testing.assert_close(apply_tta(red, TTADraw(hue=1 / 3)), red[:, [2, 0, 1]], atol=1e-5, rtol=0)
    grey = torch.zeros(1, 3, 4, 4)
    torch.testing.assert_close(apply_tta(grey, TTADraw(saturation=0.5, hue=0.2, contrast=1.2)), grey)
    with pytest.raises(ValueError, match="RGB"):
        apply_tta(torch.zeros(1, 4, 4, 4), TTADraw(contrast=0.9))


def test_tta_views_deterministic_per_seed() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    p = FaithfulParams()
    a = tta_views(x, 6, p, torch.Generator().manual_seed(1))
    b = tta_views(x, 6, p, torch.Generator().manual_seed(1))
    c = tta_views(x, 6, p, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(not torch.equal(a[i], x) for i in range(6))  # every level is augmented
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    off = tta_views(x, 4, FaithfulParams(tta=False), torch.Generator().manual_seed(1))
    assert all(torch.equal(v, x) for v in off)
    # geometry only: each view is a rotated/mirrored copy, so the disc keeps the same pixel values on average
    geo = tta_views(x, 4, FaithfulParams(colour_jitter=0.0, hue_jitter=0.0), torch.Generator().manual_seed(1))
    assert geo.shape == (4, 3, 3, 16, 16)


def test_tta_changes_scores_deterministically() -> None:
    p = FaithfulParams(n_levels=12, first=5, every=5)
    unet = OffsetUNet(linear_acp(), toy_offsets())
    x0 = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r1 = classify_faithful(Denoiser(unet, linear_acp()), x0, 3, p, T)
    r2 = classify_faithful(Denoiser(unet, linear_acp()), x0, 3, p, T)
    r3 = classify_faithful(Denoiser(unet, linear_acp()), x0, 3, FaithfulParams(n_levels=12, first=5, seed=1), T)
    r0 = classify_faithful(Denoiser(unet, linear_acp()), x0, 3, FaithfulParams(n_levels=12, first=5, tta=False), T)
    np.testing.assert_array_equal(r1.scores, r2.scores)
    assert not np.allclose(r1.scores, r3.scores) and not np.allclose(r1.scores, r0.scores)
    # a cell's scores do not depend on the other cells of the call
    one = classify_faithful(Denoiser(unet, linear_acp()), x0[1:], 3, p, T)
    np.testing.assert_array_equal(one.scores[0], r1.scores[1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scope_stream.classify.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_ref"), steps=40, feature_bank=False)


def test_tiny_model(tiny: Path) -> None:
    from scope_stream.classify.classifier import DiffusionClassifier
    from scope_stream.classify.testing import toy_crops

    clf = DiffusionClassifier.load(tiny, device="cpu")
    crops, _ = toy_crops(4, len(clf.classes), size=clf.image_size, seed=5)
    x0 = clf.prepare(crops)
    c = len(clf.classes)
    before = clf.denoiser.evaluations
    p = FaithfulParams(n_levels=40)
    res = classify_faithful(clf.denoiser, x0, c, p, clf.spec.num_train_timesteps)
    assert res.scores.shape == (4, c) and np.isfinite(res.scores).all()
    assert ((res.evaluations >= 21 * c) & (res.evaluations <= 40 * c)).all()
    assert clf.denoiser.evaluations - before == res.evaluations.sum()
    again = classify_faithful(clf.denoiser, x0, c, p, clf.spec.num_train_timesteps)
    np.testing.assert_array_equal(res.scores, again.scores)
