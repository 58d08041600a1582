"""Synthetic Romanowsky-stained smear fields with exact ground truth, at any pixel size.

Used by the tests (and handy for benchmarks): a *scene* is a list of cells placed in stage µm; it can be
rendered as any field of view at any pixel size, so the same cells can be seen by overlapping tiles or
at two magnifications. The image model is Beer-Lambert: each object adds optical density along a
stain direction (red cells: eosin with a central pallor; white cells: a pale cytoplasm and a lobed
purple nucleus; platelets: a small purple disk), blurred a little by the optics, with mild noise.
It is deliberately simple: the real-data figures come from BCCD and the virtual slide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from scope_stream.vocabulary import CellKind

__all__ = ["SynthCell", "random_scene", "render_scene"]

_OD_RBC = np.array([0.10, 0.20, 0.19], np.float32)  # orange-pink, BCCD-like
_OD_NUC = np.array([0.30, 0.52, 0.09], np.float32)  # blue-violet nucleus
_OD_CYTO = np.array([0.05, 0.08, 0.05], np.float32)  # pale lilac cytoplasm
_OD_PLT = np.array([0.20, 0.30, 0.04], np.float32)  # purple platelet
_BACKGROUND = np.array([210.0, 212.0, 208.0], np.float32)


@dataclass(frozen=True)
class SynthCell:
    """One planted object: kind, centre (stage µm), radius (µm) and, for white cells, nuclear lobes."""

    kind: CellKind
    x_um: float
    y_um: float
    radius_um: float
    lobes: tuple[tuple[float, float, float], ...] = field(default_factory=tuple)  # (dx, dy, r) µm


def random_scene(
    width_um: float,
    height_um: float,
    n_wbc: int = 3,
    n_rbc: int = 40,
    n_platelets: int = 6,
    seed: int = 0,
    x0_um: float = 0.0,
    y0_um: float = 0.0,
) -> list[SynthCell]:
    """Non-overlapping cells in the rectangle ``(x0, y0) - (x0 + width, y0 + height)`` (µm).

    White cells are placed first (radius 5.5-7 µm, 1-4 lobes), then red cells (radius 3.5-4 µm) and
    platelets (radius 1-1.4 µm), each kept at least 1 µm from the others; placements that do not fit
    after many tries are skipped, so a crowded request may return fewer cells.
    """
    rng = np.random.default_rng(seed)
    cells: list[SynthCell] = []

    def fits(x: float, y: float, r: float) -> bool:
        return all(math.hypot(x - c.x_um, y - c.y_um) >= r + c.radius_um + 1.0 for c in cells)

    def place(kind: CellKind, n: int, rmin: float, rmax: float) -> None:
        for _ in range(n):
            for _try in range(200):
                r = float(rng.uniform(rmin, rmax))
                x = float(rng.uniform(x0_um + r, x0_um + width_um - r))
                y = float(rng.uniform(y0_um + r, y0_um + height_um - r))
                if fits(x, y, r):
                    lobes: tuple[tuple[float, float, float], ...] = ()
                    if kind == CellKind.WBC:
                        k = int(rng.integers(1, 5))
                        if k == 1:
                            lobes = ((0.0, 0.0, 0.62 * r),)
                        else:
                            a0 = float(rng.uniform(0, 2 * math.pi))
                            lobes = tuple(
                                (
                                    0.33 * r * math.cos(a0 + 2 * math.pi * j / k),
                                    0.33 * r * math.sin(a0 + 2 * math.pi * j / k),
                                    0.36 * r,
                                )
                                for j in range(k)
                            )
                    cells.append(SynthCell(kind, x, y, r, lobes))
                    break

    place(CellKind.WBC, n_wbc, 5.5, 7.0)
    place(CellKind.RBC, n_rbc, 3.5, 4.0)
    place(CellKind.PLATELET, n_platelets, 1.0, 1.4)
    return cells


def render_scene(
    cells: list[SynthCell],
    x_um: float,
    y_um: float,
    width_px: int,
    height_px: int,
    pixel_size_um: float,
    seed: int = 0,
    noise: float = 1.0,
) -> np.ndarray:
    """The field CENTRED at stage ``(x_um, y_um)`` as ``(height_px, width_px, 3)`` uint8.

    Stage x grows with the column and y with the row, as for :class:`~scope_stream.vocabulary.Tile`.
    ``noise`` is the standard deviation of the added Gaussian noise in grey levels.
    """
    ps = float(pixel_size_um)
    xs = x_um + (np.arange(width_px) + 0.5 - width_px / 2.0) * ps
    ys = y_um + (np.arange(height_px) + 0.5 - height_px / 2.0) * ps
    od = np.zeros((height_px, width_px, 3), np.float32)
    margin = 8.0
    for c in cells:
        if c.x_um + c.radius_um + margin < xs[0] or c.x_um - c.radius_um - margin > xs[-1]:
            continue
        if c.y_um + c.radius_um + margin < ys[0] or c.y_um - c.radius_um - margin > ys[-1]:
            continue
        c0 = max(0, int(np.searchsorted(xs, c.x_um - c.radius_um - 1.0)))
        c1 = min(width_px, int(np.searchsorted(xs, c.x_um + c.radius_um + 1.0)) + 1)
        r0 = max(0, int(np.searchsorted(ys, c.y_um - c.radius_um - 1.0)))
        r1 = min(height_px, int(np.searchsorted(ys, c.y_um + c.radius_um + 1.0)) + 1)
        if r1 <= r0 or c1 <= c0:
            continue
        dx = xs[c0:c1][None, :] - c.x_um
        dy = ys[r0:r1][:, None] - c.y_um
        d = np.hypot(dx, dy)
        inside = (d <= c.radius_um).astype(np.float32)
        win = od[r0:r1, c0:c1]
        if c.kind == CellKind.RBC:
            thickness = 1.0 - 0.55 * np.exp(-((d / (0.45 * c.radius_um)) ** 2))  # central pallor
            win += (inside * thickness)[..., None] * _OD_RBC
        elif c.kind == CellKind.PLATELET:
            win += inside[..., None] * _OD_PLT
        else:
            win += inside[..., None] * _OD_CYTO
            nucleus = np.zeros_like(inside)
            for lx, ly, lr in c.lobes:
                nucleus = np.maximum(nucleus, (np.hypot(dx - lx, dy - ly) <= lr).astype(np.float32))
            win += nucleus[..., None] * _OD_NUC
    sigma = max(0.3, 0.25 / ps)  # optical blur ~0.25 µm
    od = ndi.gaussian_filter(od, (sigma, sigma, 0), mode="nearest")
    img = _BACKGROUND * np.power(10.0, -od, dtype=np.float32)
    if noise > 0:
        img = img + np.random.default_rng(seed).normal(0.0, noise, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
