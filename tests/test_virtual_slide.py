"""The virtual slide: real cells, deterministic, seamless, truthful ground truth, two magnifications."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from scope_stream.acquire.sample import SAMPLE_DIR
from scope_stream.acquire.slide import (
    PlantedCell,
    SlideError,
    VirtualSlide,
    read_ground_truth,
    write_ground_truth,
)
from scope_stream.config.microscope import WBC_CLASSES, MicroscopeConfig
from scope_stream.vocabulary import Tile


@pytest.fixture(scope="module")
def slide() -> VirtualSlide:
    return VirtualSlide(MicroscopeConfig(seed=3))


def locate(image: np.ndarray, keep: np.ndarray, near_rc: tuple[float, float], search: int = 8) -> tuple[float, float]:
    """Where (row, col of the centre pixel) a cell's transmission template best matches the image."""
    from skimage.feature import match_template

    img = image.astype(np.float64) + 0.5
    bg = np.percentile(img.reshape(-1, 3), 90, axis=0)
    absorb = (-np.log(np.clip(img / bg, 1e-3, 1.0))).sum(axis=2)
    tmpl = (-np.log(np.clip(keep.astype(np.float64), 1e-3, 1.0))).sum(axis=2)
    half = tmpl.shape[0] // 2
    r, c = round(near_rc[0]), round(near_rc[1])
    r0, c0 = r - half - search, c - half - search
    win = absorb[max(0, r0) : r + half + search + 1, max(0, c0) : c + half + search + 1]
    score = match_template(win, tmpl)
    pr, pc = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(pr + max(0, r0) + half), float(pc + max(0, c0) + half)


def sharpness(img: np.ndarray) -> float:
    g = img.astype(np.float64).mean(axis=2)
    return float(np.abs(ndi.laplace(g)).mean())


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_field_other_seed_other_field(slide: VirtualSlide) -> None:
    a = slide.render(1234.5, 987.25, 160, 120, 0.5)
    again = VirtualSlide(MicroscopeConfig(seed=3)).render(1234.5, 987.25, 160, 120, 0.5)
    other = VirtualSlide(MicroscopeConfig(seed=4)).render(1234.5, 987.25, 160, 120, 0.5)
    assert a.shape == (120, 160, 3) and a.dtype == np.uint8
    assert np.array_equal(a, again)
    assert np.abs(a.astype(int) - other.astype(int)).mean() > 5


def test_render_does_not_depend_on_what_was_rendered_before() -> None:
    s1 = VirtualSlide(MicroscopeConfig(seed=5))
    s2 = VirtualSlide(MicroscopeConfig(seed=5))
    s2.render(3000, 2500, 200, 200, 0.5)  # warm other chunks first
    s2.render(1010, 990, 64, 64, 0.2)
    assert np.array_equal(s1.render(1000, 1000, 128, 96, 0.5), s2.render(1000, 1000, 128, 96, 0.5))


# ----------------------------------------------------------------------------- geometry
def test_planted_cell_drawn_where_truth_says_with_x_to_columns_y_to_rows(slide: VirtualSlide) -> None:
    """A white cell found by template matching lies within 1 px of its ground-truth position."""
    ps = 0.5
    cells = slide.ground_truth((500, 500, 3500, 2500), kinds=["WBC"])
    assert len(cells) > 20
    rng = np.random.default_rng(0)
    for cell in [cells[int(i)] for i in rng.choice(len(cells), 6, replace=False)]:
        # a field whose centre is off the cell by different amounts in x and y (and sub-pixel)
        fx, fy = cell.x_um - 23.3, cell.y_um + 11.7
        img = slide.render(fx, fy, 200, 160, ps)
        tile = Tile(img, slide_id="s", tile_id="t", seq=0, x_um=fx, y_um=fy, pixel_size_um=ps)
        row, col = tile.stage_to_px(cell.x_um, cell.y_um)
        assert col > 100 + 40 and row < 80 - 18  # x -> columns, y -> rows
        keep, _ = slide.cell_template(cell, ps)
        found = locate(img, keep, (row, col))
        assert math.hypot(found[0] - row, found[1] - col) <= 1.0, (cell, found, (row, col))


def test_field_halves_equal_the_whole_across_a_chunk_border(slide: VirtualSlide) -> None:
    """No seams: a field equals its two halves rendered separately (here split on a chunk border)."""
    ps = 0.5
    whole = slide.render(1000.0, 1300.0, 240, 120, ps)  # chunk border x = 1000 runs down the middle
    left = slide.render(1000.0 - 60 * ps, 1300.0, 120, 120, ps)
    right = slide.render(1000.0 + 60 * ps, 1300.0, 120, 120, ps)
    stitched = np.concatenate([left, right], axis=1).astype(int)
    diff = np.abs(whole.astype(int) - stitched)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.002
    # and no step across the border in the background (cells are drawn whole, not per chunk)
    assert abs(int(whole[:, 119].astype(int).mean()) - int(whole[:, 120].astype(int).mean())) < 25


def test_sprites_fade_to_nothing_at_their_edges(slide: VirtualSlide) -> None:
    """Soft masks: no square edges where a cell sprite ends."""
    cells = slide.ground_truth((1000, 1000, 1200, 1200))
    kinds = {c.kind for c in cells}
    assert kinds == {"WBC", "RBC", "platelet"} or kinds >= {"RBC", "platelet"}
    for cell in cells[:60]:
        for ps in (0.5, 0.2):
            keep, mask = slide.cell_template(cell, ps)
            ring = np.concatenate([keep[0], keep[-1], keep[:, 0], keep[:, -1]])
            assert ring.min() > 0.98, cell
            assert mask[mask.shape[0] // 2, mask.shape[1] // 2] > 0.5


def test_two_magnifications_show_the_same_place(slide: VirtualSlide) -> None:
    """50x (0.2 µm/px) of a place, binned to 20x scale, matches the 20x (0.5 µm/px) view of it."""
    x, y = 1700.0, 1100.0
    hi = slide.render(x, y, 250, 250, 0.2).astype(np.float64)  # 50 x 50 µm
    lo = slide.render(x, y, 100, 100, 0.5).astype(np.float64)  # the same 50 x 50 µm
    binned = ndi.zoom(ndi.gaussian_filter(hi, (1.1, 1.1, 0)), (0.4, 0.4, 1), order=1)
    assert binned.shape == lo.shape
    r = np.corrcoef(binned.mean(axis=2).ravel(), lo.mean(axis=2).ravel())[0, 1]
    assert r > 0.9
    # more detail: a 50x field of the same pixel count spans 2.5x less
    wide = slide.render(x, y, 250, 250, 0.5)
    assert sharpness(hi.astype(np.uint8)) != sharpness(wide)


def test_defocus_blurs_progressively(slide: VirtualSlide) -> None:
    s = [sharpness(slide.render(2000, 1500, 128, 128, 0.5, z_offset_um=z)) for z in (0.0, 2.0, 6.0)]
    assert s[0] > s[1] > s[2]
    assert np.array_equal(slide.render(2000, 1500, 64, 64, 0.5, 0.0), slide.render(2000, 1500, 64, 64, 0.5, -0.0))


def test_render_labels_match_the_truth(slide: VirtualSlide) -> None:
    ps = 0.5
    wbc = slide.ground_truth((1000, 1000, 3000, 2000), kinds=["WBC"])
    checked = 0
    for target in wbc[:5]:
        fx, fy = target.x_um + 7.1, target.y_um - 4.3
        labels, cells = slide.render_labels(fx, fy, 120, 100, ps)
        assert labels.shape == (100, 120) and labels.max() == len(cells)
        x_left, y_top = fx - 60 * ps, fy - 50 * ps
        for i, cell in enumerate(cells):
            rr, cc = np.nonzero(labels == i + 1)
            if cell.kind != "WBC" or rr.min() == 0 or cc.min() == 0 or rr.max() == 99 or cc.max() == 119:
                continue
            # centroid of the drawn mask, in µm, against the planted position
            assert abs(x_left + (cc.mean() + 0.5) * ps - cell.x_um) < 0.6
            assert abs(y_top + (rr.mean() + 0.5) * ps - cell.y_um) < 0.6
            checked += 1
    assert checked >= 5


# ----------------------------------------------------------------------------- ground truth
def test_ground_truth_white_cells_and_abnormal_share() -> None:
    s = VirtualSlide(MicroscopeConfig(seed=1, abnormal_fraction=0.25))
    cells = s.ground_truth(kinds=["WBC", "platelet"])
    x0, y0, x1, y1 = s.bounds_um
    assert all(x0 <= c.x_um < x1 and y0 <= c.y_um < y1 for c in cells)
    assert len({c.cell_id for c in cells}) == len(cells)
    wbc = [c for c in cells if c.kind == "WBC"]
    plt = [c for c in cells if c.kind == "platelet"]
    area_mm2 = (x1 - x0) * (y1 - y0) / 1e6
    assert 0.7 * 60 * area_mm2 < len(wbc) < 1.1 * 60 * area_mm2  # a few are dropped where cells collide
    assert len(plt) > 200 * area_mm2
    assert all(c.label in WBC_CLASSES for c in wbc) and all(c.label == "platelet" for c in plt)
    assert all(c.abnormal == (c.label in ("ig", "erythroblast")) for c in wbc)
    share = sum(c.abnormal for c in wbc) / len(wbc)
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(wbc))
    assert {c.label for c in wbc if c.abnormal} == {"ig", "erythroblast"}
    assert all(5.0 < c.diameter_um < 20.0 for c in wbc)
    assert all(c.source.startswith("pbc/images/") for c in cells)
    # no two white cells overlap
    pts = np.array([[c.x_um, c.y_um] for c in wbc])
    d = np.hypot(*(pts[:, None, :] - pts[None, :, :]).transpose(2, 0, 1))
    assert d[np.triu_indices(len(pts), 1)].min() > 12.0


def test_no_abnormal_cells_when_fraction_is_zero() -> None:
    s = VirtualSlide(MicroscopeConfig(seed=2, abnormal_fraction=0.0))
    assert not any(c.abnormal for c in s.ground_truth((0, 0, 2000, 2000), kinds=["WBC"]))


def test_red_cells_cover_about_the_configured_share(slide: VirtualSlide) -> None:
    labels, cells = slide.render_labels(2000, 1500, 400, 400, 0.5)
    covered = (labels > 0).mean()
    assert 0.2 < covered < 0.5  # rbc_coverage 0.35 (minus overlaps, plus white cells and platelets)
    assert sum(c.kind == "RBC" for c in cells) > 100


def test_ground_truth_round_trips_through_csv_and_json(slide: VirtualSlide, tmp_path: Path) -> None:
    cells = slide.ground_truth((0, 0, 600, 600), kinds=["WBC", "platelet"])
    for name in ("truth.csv", "truth.json"):
        path = write_ground_truth(cells, tmp_path / name)
        assert read_ground_truth(path) == cells
    with (tmp_path / "truth.csv").open() as fh:
        assert next(csv.reader(fh)) == list(PlantedCell.__dataclass_fields__)
    with pytest.raises(SlideError, match=r"\.csv or \.json"):
        write_ground_truth(cells, tmp_path / "truth.txt")


# ----------------------------------------------------------------------------- errors and sources
def test_bad_requests_are_clear_errors(slide: VirtualSlide, tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="at least 1x1"):
        slide.render(0, 0, 0, 10, 0.5)
    with pytest.raises(SlideError, match="pixel_size_um"):
        slide.render(0, 0, 10, 10, 0.0)
    with pytest.raises(SlideError, match="finite"):
        slide.render(float("nan"), 0, 10, 10, 0.5)
    with pytest.raises(SlideError, match="unknown cell kinds"):
        slide.ground_truth(kinds=["erythrocyte"])
    with pytest.raises(SlideError, match="no cell"):
        slide.cell_template("W9999.9999.0", 0.5)
    with pytest.raises(SlideError, match=r"pbc/labels\.csv"):
        VirtualSlide(MicroscopeConfig(data_dir=tmp_path))


def test_outside_the_smear_is_empty_glass(slide: VirtualSlide) -> None:
    img = slide.render(-300.0, 1500.0, 64, 64, 0.5)  # left of the slide, within stage travel
    assert (
        img.reshape(-1, 3).std(axis=0).max() < 3
        and abs(img.reshape(-1, 3).mean(axis=0) - np.array([240, 218, 194])).max() < 8
    )


def test_bccd_red_cells_option() -> None:
    s = VirtualSlide(MicroscopeConfig(seed=3, rbc_source="bccd"))
    assert len(s.bank.rbcs) >= 10
    assert all(sp.source.startswith("bccd/JPEGImages/") for sp in s.bank.rbcs)
    _, cells = s.render_labels(1500, 1500, 200, 200, 0.5)
    assert sum(c.kind == "RBC" for c in cells) > 20


def test_packaged_sample_is_small_attributed_and_held_out() -> None:
    files = [p for p in SAMPLE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 3_000_000
    attribution = (SAMPLE_DIR / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "CC BY 4.0" in attribution and "MIT" in attribution and "Acevedo" in attribution
    assert "Permission is hereby granted" in (SAMPLE_DIR / "LICENSE-BCCD.txt").read_text(encoding="utf-8")
    with (SAMPLE_DIR / "pbc" / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    labels = {r["label"] for r in rows}
    assert labels == {*WBC_CLASSES, "platelet"}
    assert all(r["split"] == "val" for r in rows)
    assert all((SAMPLE_DIR / "pbc" / r["path"]).is_file() for r in rows)
    assert len(list((SAMPLE_DIR / "bccd" / "JPEGImages").glob("*.jpg"))) >= 2


@pytest.mark.data
def test_full_data_uses_only_the_val_split(shared_data: Path) -> None:
    from scope_stream.datasets import read_labels_csv

    s = VirtualSlide(MicroscopeConfig(seed=0, data_dir=shared_data, rbc_source_images=12))
    split = {r.path.relative_to(shared_data).as_posix(): r.split for r in read_labels_csv(shared_data / "pbc")}
    cells = s.ground_truth((0, 0, 1500, 1500), kinds=["WBC", "platelet"])
    assert len(cells) > 50
    assert {split[c.source] for c in cells} == {"val"}
    assert {split[sp.source] for sp in s.bank.rbcs} == {"val"}
    img = s.render(700, 700, 128, 128, 0.5)
    assert img.shape == (128, 128, 3)
