"""Canonical cell crops (scope_stream.classify.canonical) on hand-drawn synthetic cells and real PBC crops."""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np
import pytest

from scope_stream.classify.canonical import (
    CANONICAL_BACKGROUND,
    CanonicalSpec,
    NoCellError,
    canonical_batch,
    canonicalize,
    find_cell,
)
from scope_stream.datasets import pbc_root, read_labels_csv
from scope_stream.segment.stain import NUCLEUS_OD, RBC_OD

BG = np.array([240.0, 222.0, 205.0])  # a pale, PBC-like glass colour
CYTO_OD = np.array([0.45, 0.60, 0.30]) / np.linalg.norm([0.45, 0.60, 0.30])  # pale lilac-blue cytoplasm


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """Anti-aliased disc coverage in [0, 1]."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    d = np.hypot(yy - centre[0], xx - centre[1])
    return np.asarray(np.clip(radius - d + 0.5, 0.0, 1.0), np.float64)


def draw_cell(
    scale: float = 1.0,
    *,
    diameter: float = 50.0,
    side: float = 128.0,
    red_cells: bool = True,
    nucleus: bool = True,
    nucleus_od: np.ndarray = NUCLEUS_OD,
    bg: np.ndarray = BG,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """A crop of ``side*scale`` px with one white cell of ``diameter*scale`` px at its centre.

    The cell is a lilac cytoplasm disc holding a purple nucleus (60% of its diameter, a little off
    centre); pink red cells touch it. Returns the uint8 crop and the cell's true diameter in px.
    """
    n = round(side * scale)
    shape = (n, n)
    c = (n - 1) / 2.0
    d = diameter * scale
    od = np.zeros((n, n, 3))
    if red_cells:
        r_rbc = 0.3 * diameter * scale
        for ang in (0.3, 2.2, 4.0):
            dist = d / 2 + r_rbc - 0.5  # touching the white cell
            centre = (c + dist * math.sin(ang), c + dist * math.cos(ang))
            rim = _disc(shape, centre, r_rbc)
            od += (0.32 * rim - 0.12 * _disc(shape, centre, 0.4 * r_rbc))[:, :, None] * RBC_OD
    cell = _disc(shape, (c, c), d / 2)
    od = od * (1 - cell[:, :, None]) + (0.13 * cell)[:, :, None] * CYTO_OD
    if nucleus:
        nuc = _disc(shape, (c + 0.05 * d, c - 0.04 * d), 0.3 * d)
        od += (0.75 * nuc)[:, :, None] * nucleus_od
    img = bg * np.power(10.0, -od)
    img += np.random.default_rng(seed).normal(0.0, 1.5, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), d


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


SPEC = CanonicalSpec()


def test_known_diameter_found_and_normalised() -> None:
    crop, d = draw_cell()
    geo = find_cell(crop)
    assert geo.diameter_px == pytest.approx(d, rel=0.10)
    assert geo.centre == pytest.approx(((crop.shape[0] - 1) / 2, (crop.shape[1] - 1) / 2), abs=0.08 * d)
    assert geo.nucleus_diameter_px == pytest.approx(0.6 * d, rel=0.15)
    assert geo.mask.shape == crop.shape[:2] and geo.mask.dtype == bool
    assert not geo.touches_border
    assert geo.mask.sum() == pytest.approx(math.pi * d * d / 4, rel=0.2)

    cell = canonicalize(crop, SPEC)
    assert cell.image.shape == (64, 64, 3) and cell.image.dtype == np.uint8
    assert cell.scale == pytest.approx(SPEC.cell_fraction * 64 / geo.diameter_px)
    # the canonical image's cell, measured again, is cell_fraction of the output
    again = find_cell(cell.image)
    assert again.diameter_px == pytest.approx(SPEC.cell_fraction * 64, rel=0.10)
    assert again.centre == pytest.approx((31.5, 31.5), abs=3.0)
    # "mask": the touching red cells are gone; the corners are exactly the canonical background
    assert np.array_equal(cell.image[0, 0], np.rint(CANONICAL_BACKGROUND).astype(np.uint8))
    keep = canonicalize(crop, CanonicalSpec(context="keep")).image
    ring = np.hypot(*np.mgrid[-31.5:32.5, -31.5:32.5]) > 30  # beyond the cell: red cells stay with "keep"
    assert _mad(keep[ring], cell.image[ring]) > 5.0


def test_other_sizes_and_fractions() -> None:
    crop, _ = draw_cell()
    spec = CanonicalSpec(size=96, cell_fraction=0.5)
    out = canonicalize(crop, spec).image
    assert out.shape == (96, 96, 3)
    assert find_cell(out).diameter_px == pytest.approx(48.0, rel=0.10)


def test_scale_invariance() -> None:
    ref = canonicalize(draw_cell(1.0)[0], SPEC)
    for s in (0.5, 2.0):
        crop, d = draw_cell(s, seed=int(s * 10))
        cell = canonicalize(crop, SPEC)
        assert cell.geometry.diameter_px == pytest.approx(d, rel=0.10)
        assert _mad(cell.image, ref.image) < 6.0, f"scale {s}"


def test_tight_crop_is_padded_not_stretched() -> None:
    full, d = draw_cell(side=160.0)
    ref = canonicalize(full, SPEC)
    n = full.shape[0]
    c = round((n - 1) / 2)
    cut = round(0.3 * d)  # the crop's left edge cuts 20% of the cell's width off
    tight = full[c - round(0.7 * d) : c + round(0.7 * d), c - cut : c + round(0.7 * d)]
    geo = find_cell(tight)
    assert geo.touches_border
    assert geo.diameter_px == pytest.approx(d, rel=0.10)  # completed beyond the edge, not the cut width
    cell = canonicalize(tight, SPEC)
    assert cell.scale == pytest.approx(ref.scale, rel=0.10)
    # the part the crop lacks is background; the rest looks like the full crop's canonical view
    edge_out = 31.5 + (-0.5 - geo.centre[1]) * cell.scale  # output column of the crop's left edge
    assert 5 < edge_out < 25
    left = slice(0, max(1, int(edge_out) - 3))
    assert np.abs(cell.image[:, left].astype(float) - CANONICAL_BACKGROUND).max() <= 2.0
    right = slice(int(edge_out) + 4, 64)
    assert _mad(cell.image[:, right], ref.image[:, right]) < 8.0


def test_loose_bccd_like_box_around_tight_cell() -> None:
    # a box drawn tightly around the cell (corners show glass): the cell fills it
    full, d = draw_cell(side=160.0, red_cells=False)
    c = (full.shape[0] - 1) / 2
    half = d / 2 - 1  # the box edges graze the cell
    box = full[round(c - half) : round(c + half) + 1, round(c - half) : round(c + half) + 1]
    geo = find_cell(box)
    assert geo.diameter_px == pytest.approx(d, rel=0.10)
    assert geo.touches_border


@pytest.mark.parametrize("kind", ["gains", "yellow"])
def test_white_balance_invariance(kind: str) -> None:
    crop, _ = draw_cell()
    if kind == "gains":  # the whole image through another camera's channel gains
        tinted = np.clip(crop * np.array([0.85, 1.0, 0.7]), 0, 255).astype(np.uint8)
    else:  # yellow lamp: a tinted background, same stains
        tinted = draw_cell(bg=np.array([250.0, 240.0, 150.0]))[0]
    ref = canonicalize(crop, SPEC).image
    out = canonicalize(tinted, SPEC)
    assert _mad(out.image, ref) < 4.0
    none = canonicalize(tinted, CanonicalSpec(stain="none")).image
    assert _mad(none, ref) > 2 * _mad(out.image, ref)  # the colour correction did the work
    assert out.background[2] < 0.8 * out.background[0]  # the input's (yellowish) background is reported


def test_macenko_maps_stain_keeps_density() -> None:
    spec = CanonicalSpec(stain="macenko")
    pbc_like, _ = draw_cell(nucleus_od=np.array([0.50, 0.84, 0.22]) / np.linalg.norm([0.50, 0.84, 0.22]))
    bluer = np.array([0.49, 0.87, 0.08]) / np.linalg.norm([0.49, 0.87, 0.08])  # BCCD's blue-violet nuclei
    other, _ = draw_cell(nucleus_od=bluer, seed=3)
    a = canonicalize(pbc_like, spec)
    b = canonicalize(other, spec)
    assert np.array_equal(b.image, canonicalize(other, spec).image)  # deterministic
    centre = (slice(26, 38), slice(24, 36))  # inside the nucleus
    white = canonicalize(other, SPEC).image
    assert _mad(b.image[centre], a.image[centre]) < _mad(white[centre], a.image[centre])
    # concentrations are kept: the nucleus is about as dark as before
    lum_b = b.image[centre].astype(float).mean()
    lum_w = white[centre].astype(float).mean()
    assert lum_b == pytest.approx(lum_w, rel=0.15)


def test_input_types_agree() -> None:
    crop, _ = draw_cell()
    ref = canonicalize(crop, SPEC).image
    as_float = canonicalize(crop.astype(np.float32) / 255.0, SPEC).image
    as_16 = canonicalize(crop.astype(np.uint16) * 257, SPEC).image
    assert _mad(as_float, ref) < 1.0 and _mad(as_16, ref) < 1.0
    with pytest.raises(ValueError, match="RGB"):
        find_cell(crop[:, :, 0])


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("constant", "blank"),
        ("background", "no nuclear"),
        ("black", "black"),
        ("red_cells", "no nuclear"),
        ("small", "smaller than 16"),
    ],
)
def test_no_cell(name: str, reason: str) -> None:
    rng = np.random.default_rng(1)
    crops = {
        "constant": np.full((80, 80, 3), 200, np.uint8),
        "background": np.clip(BG + rng.normal(0, 2.0, (80, 80, 3)), 0, 255).astype(np.uint8),
        "black": rng.integers(0, 3, (80, 80, 3)).astype(np.uint8),
        "red_cells": draw_cell(nucleus=False)[0],
        "small": draw_cell(0.1)[0],
    }
    crop = crops[name]
    with pytest.raises(NoCellError, match=reason) as info:
        canonicalize(crop, SPEC)
    assert str(info.value).startswith(f"no white cell found in crop ({crop.shape[0]}x{crop.shape[1]}): ")
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args


def test_um_per_px() -> None:
    crop, d = draw_cell()
    cell = canonicalize(crop, SPEC, um_per_px=0.2)
    assert cell.diameter_um == pytest.approx(cell.geometry.diameter_px * 0.2)
    assert cell.diameter_um == pytest.approx(d * 0.2, rel=0.10)
    assert canonicalize(crop, SPEC).diameter_um is None
    with pytest.raises(ValueError, match="um_per_px"):
        canonicalize(crop, SPEC, um_per_px=-1.0)


def test_spec_json() -> None:
    spec = CanonicalSpec(size=48, cell_fraction=0.7, context="keep", stain="macenko")
    assert CanonicalSpec.from_json(spec.to_json()) == spec
    assert CanonicalSpec.from_json({}) == CanonicalSpec()
    bad: list[dict[str, Any]] = [
        {"size": 0},
        {"size": 64.5},
        {"size": True},
        {"cell_fraction": 1.5},
        {"cell_fraction": "big"},
        {"context": "blur"},
        {"stain": "reinhard"},
        {"sizes": 64},
    ]
    for d in bad:
        with pytest.raises(ValueError, match=r"size|cell_fraction|context|stain|unknown"):
            CanonicalSpec.from_json(d)


def test_batch() -> None:
    good, _ = draw_cell()
    other, _ = draw_cell(0.8, seed=5)
    empty = np.full((64, 64, 3), 220, np.uint8)
    crops = [good, empty, other]
    out = canonical_batch(crops, SPEC, on_error="skip", um_per_px=[0.2, 0.2, 0.25])
    assert out.images.shape == (2, 64, 64, 3) and out.images.dtype == np.uint8
    assert out.kept.tolist() == [0, 2]
    assert set(out.errors) == {1} and "blank" in out.errors[1]
    assert out.cells[1].diameter_um == pytest.approx(out.cells[1].diameter_px * 0.25)
    assert np.array_equal(out.images[0], canonicalize(good, SPEC).image)
    with pytest.raises(NoCellError, match="crop 1 "):
        canonical_batch(crops, SPEC)
    stacked = canonical_batch(np.stack([good, good]), SPEC, progress=True)
    assert stacked.kept.tolist() == [0, 1] and not stacked.errors
    none = canonical_batch([], SPEC)
    assert none.images.shape == (0, 64, 64, 3)
    with pytest.raises(ValueError, match="2 values for 3"):
        canonical_batch(crops, SPEC, um_per_px=[0.2, 0.2])


@pytest.mark.data
def test_pbc_crops_found() -> None:
    from PIL import Image

    root = pbc_root()
    if not (root / "labels.csv").is_file():
        pytest.skip(f"PBC data not found at {root}")
    rows = read_labels_csv(root)
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r.label, []).append(str(r.path))
    rng = np.random.default_rng(0)
    picked = [(lab, p) for lab in sorted(by) for p in rng.choice(by[lab], 25, replace=False)]
    assert len(picked) == 200
    found: dict[str, list[float]] = {}
    for lab, p in picked:
        crop = np.asarray(Image.open(p).convert("RGB"))
        try:
            geo = find_cell(crop)
        except NoCellError:
            continue
        found.setdefault(lab, []).append(geo.diameter_px / crop.shape[1])
    fracs = np.array([f for v in found.values() for f in v])
    assert fracs.size >= 198
    # plausible sizes: platelets ~20% of PBC's 25.6 µm crops, lymphocytes ~30%, monocytes up to ~65%
    assert float(((fracs >= 0.12) & (fracs <= 0.95)).mean()) >= 0.99
    for lab in ("basophil", "eosinophil", "ig", "monocyte", "neutrophil"):
        assert 0.35 <= float(np.median(found[lab])) <= 0.65, lab
