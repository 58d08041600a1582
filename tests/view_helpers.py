"""Helpers for the view and napari tests: real tiles, real results, written to a real SlideStore."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from scope_stream.vocabulary import Cell, CellCall, CellKind, Flag, FlagReason, Tile, TileResult

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "ig", "erythroblast", "platelet")


def make_tile(i: int, x_um: float, y_um: float, *, size: int = 128, p: float = 0.5, kind: str = "scan") -> Tile:
    """A tile whose pixels encode its index (so a test can find it on the mosaic)."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 0] = (40 + 7 * i) % 256
    pixels[..., 1] = 100
    pixels[..., 2] = 200
    return Tile(
        pixels,
        slide_id="s1",
        tile_id=f"{'r' if kind == 'reimage' else 't'}{i:04d}",
        seq=i,
        x_um=x_um,
        y_um=y_um,
        pixel_size_um=p,
        objective="20x" if kind == "scan" else "50x",
        kind=kind,  # type: ignore[arg-type]
    )


def make_result(
    tile: Tile,
    cells_px: list[tuple[float, float]],
    labels: list[str],
    *,
    flagged: set[int] | None = None,
    uncertainty: float = 0.2,
    crop_px: int = 32,
) -> TileResult:
    """Cells at the given (row, col) pixel centroids, classified with ``labels``; ``flagged`` indices get flags."""
    flagged = flagged or set()
    cells, calls, flags, crops, crop_ids = [], [], [], [], []
    for k, ((r, c), lab) in enumerate(zip(cells_px, labels, strict=True)):
        cid = f"{tile.tile_id}-c{k}"
        x, y = tile.px_to_stage(r, c)
        cells.append(
            Cell(
                cell_id=cid,
                tile_id=tile.tile_id,
                slide_id=tile.slide_id,
                kind=CellKind.WBC,
                bbox=(int(r) - 5, int(c) - 5, int(r) + 5, int(c) + 5),
                centroid_px=(r, c),
                x_um=x,
                y_um=y,
                area_px=80.0,
            )
        )
        probs = {cl: (0.65 if cl == lab else 0.35 / (len(CLASSES) - 1)) for cl in CLASSES}
        unc = uncertainty + 0.05 * k
        calls.append(
            CellCall(
                cell_id=cid,
                label=lab,
                probabilities=probs,
                uncertainty=min(unc, 1.0),
                margin=0.5,
                anomaly_score=0.1 + 0.2 * k,
                model_id="test",
            )
        )
        if k in flagged:
            flags.append(
                Flag(
                    cell_id=cid,
                    tile_id=tile.tile_id,
                    slide_id=tile.slide_id,
                    reasons=[FlagReason.ANOMALY],
                    score=0.5 + 0.1 * k + 0.01 * tile.seq,
                    label=lab,
                    x_um=x,
                    y_um=y,
                )
            )
        crop = np.full((crop_px, crop_px, 3), (30 * k) % 256, np.uint8)
        crops.append(crop)
        crop_ids.append(cid)
    return TileResult(
        slide_id=tile.slide_id,
        tile_id=tile.tile_id,
        cells=cells,
        calls=calls,
        flags=flags,
        crops=np.stack(crops) if crops else np.zeros((0, crop_px, crop_px, 3), np.uint8),
        crop_cell_ids=crop_ids,
    )


def grid_positions(n: int, *, cols: int = 3, step_um: float = 60.0, x0: float = 100.0, y0: float = 200.0) -> list:
    return [(x0 + (i % cols) * step_um, y0 + (i // cols) * step_um) for i in range(n)]


def write_scan(path: Path, n_tiles: int = 4, *, done: bool = True, size: int = 128) -> list[tuple[Tile, TileResult]]:
    """A finished (or still scanning) store of ``n_tiles`` tiles, 2 cells each, the first cell flagged."""
    from scope_stream.config import StoreConfig
    from scope_stream.store import SlideStore

    store = SlideStore.open_or_create(path, slide_id="s1", config=StoreConfig(commit_every=1))
    out = []
    for i, (x, y) in enumerate(grid_positions(n_tiles)):
        tile = make_tile(i, x, y, size=size)
        res = make_result(tile, [(30.0, 40.0), (90.0, 70.0)], [CLASSES[i % 6], "neutrophil"], flagged={0})
        store.write_result(res, tile=tile)
        out.append((tile, res))
    if done:
        store.mark_done({})
    return out


def close(a: float, b: float, tol: float = 1e-6) -> bool:
    return math.isclose(a, b, abs_tol=tol)
