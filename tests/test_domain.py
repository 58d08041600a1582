"""The slide's domain check: the share of classified white cells that look unlike the training cells."""

from __future__ import annotations

import pytest

from scope_stream.classify.domain import domain_check


def test_familiar_unfamiliar_and_empty_slides() -> None:
    ok = domain_check([["anomaly"], [], [], ["unfamiliar"]] + [[]] * 16)
    assert ok["n_classified"] == 20 and ok["n_unfamiliar"] == 1 and ok["share_unfamiliar"] == 0.05
    assert ok["trusted"] is True and "familiar ground" in ok["message"]
    bad = domain_check([["unfamiliar", "uncertain"]] * 6 + [[]] * 4, limit=0.25)
    assert bad["trusted"] is False and bad["share_unfamiliar"] == 0.6
    assert "do not trust the differential" in bad["message"]
    empty = domain_check([])
    assert empty["trusted"] is None and empty["share_unfamiliar"] is None
    with pytest.raises(ValueError, match="limit"):
        domain_check([], limit=0)


def test_store_summary_carries_the_domain_check(tmp_path: object) -> None:
    from pathlib import Path

    import numpy as np

    from scope_stream.store import SlideStore
    from scope_stream.vocabulary import Cell, CellCall, CellKind, Flag, FlagReason, Tile, TileResult

    tile = Tile(np.zeros((32, 32, 3), np.uint8), slide_id="s", tile_id="t0", seq=0, x_um=0, y_um=0, pixel_size_um=0.5)
    cells, calls, flags = [], [], []
    for i in range(4):
        cid = f"t0:{i}"
        cells.append(
            Cell(cell_id=cid, tile_id="t0", slide_id="s", kind=CellKind.WBC, bbox=(0, 0, 4, 4),
                 centroid_px=(2.0 + 8 * i, 2.0), x_um=4.0 * i, y_um=0.0, area_px=16)
        )  # fmt: skip
        calls.append(
            CellCall(cell_id=cid, label="a", probabilities={"a": 1.0}, uncertainty=0.0, margin=1.0,
                     anomaly_score=0.1, model_id="m", unfamiliarity=0.99 if i < 3 else 0.1)
        )  # fmt: skip
        if i < 3:
            flags.append(Flag(cell_id=cid, tile_id="t0", slide_id="s", reasons=[FlagReason.UNFAMILIAR], score=0.99,
                              label="a", x_um=4.0 * i, y_um=0.0))  # fmt: skip
    res = TileResult(
        slide_id="s", tile_id="t0", cells=cells, calls=calls, flags=flags,
        crops=np.zeros((4, 8, 8, 3), np.uint8), crop_cell_ids=[c.cell_id for c in cells],
    )  # fmt: skip
    store = SlideStore.open_or_create(Path(str(tmp_path)) / "s.zarr", slide_id="s")
    assert store.write_result(res, tile=tile) is True
    dc = store.compute_summary()["domain_check"]
    assert dc["n_classified"] == 4 and dc["n_unfamiliar"] == 3 and dc["trusted"] is False
