"""The worker's analysis stage on a real smear field with a tiny real diffusion model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scope_stream.analysis import CellAnalyzer, build_analyzer
from scope_stream.config import ScopeStreamConfig
from scope_stream.datasets import BCCD_UM_PER_PX, bccd_root
from scope_stream.vocabulary import CellKind, Tile


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scope_stream.classify.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), steps=40)


def _bccd_tile(name: str, tile_id: str) -> Tile:
    from PIL import Image

    px = np.asarray(Image.open(bccd_root() / "JPEGImages" / name).convert("RGB"))
    return Tile(px, slide_id="s", tile_id=tile_id, seq=0, x_um=100, y_um=200, pixel_size_um=BCCD_UM_PER_PX)


@pytest.mark.data
def test_analyzer_segments_classifies_and_batches_across_tiles(tiny_model: Path) -> None:
    cfg = ScopeStreamConfig.model_validate(
        {"classifier": {"model": str(tiny_model)}, "flags": {"abnormal_classes": ["neutrophil", "lymphocyte"]}}
    )
    analyzer = build_analyzer(cfg, "cpu")
    tiles = [_bccd_tile("BloodImage_00000.jpg", "a"), _bccd_tile("BloodImage_00001.jpg", "b")]
    results = analyzer.analyze(tiles)
    assert [r.tile_id for r in results] == ["a", "b"]
    for res in results:
        wbcs = [c for c in res.cells if c.kind == CellKind.WBC]
        assert wbcs, "a BCCD field holds a white cell"
        assert [c.cell_id for c in res.calls] == [c.cell_id for c in wbcs] == res.crop_cell_ids
        assert res.crops.shape == (len(wbcs), analyzer.classifier.image_size, analyzer.classifier.image_size, 3)
        # every class is on the abnormal list, so every classified cell is flagged
        assert {f.cell_id for f in res.flags} == {c.cell_id for c in wbcs}
        assert {"segment", "classify"} <= set(res.timings_ms)
        assert any(c.kind == CellKind.RBC for c in res.cells)


@pytest.mark.data
def test_segment_only_analyzer_makes_no_calls() -> None:
    res = CellAnalyzer(ScopeStreamConfig(), None).analyze([_bccd_tile("BloodImage_00000.jpg", "a")])[0]
    assert res.cells and not res.calls and not res.flags and res.crops.shape[0] == 0


def test_analyzer_on_an_empty_tile(tiny_model: Path) -> None:
    cfg = ScopeStreamConfig.model_validate({"classifier": {"model": str(tiny_model)}})
    blank = Tile(
        np.full((64, 64, 3), 230, np.uint8), slide_id="s", tile_id="t", seq=0, x_um=0, y_um=0, pixel_size_um=0.5
    )
    (res,) = build_analyzer(cfg, "cpu").analyze([blank])
    assert res.cells == [] and res.calls == [] and res.crops.shape[0] == 0


def test_classifier_settings_reach_the_worker(tiny_model: Path) -> None:
    cfg = ScopeStreamConfig.model_validate(
        {"classifier": {"model": str(tiny_model), "precision": "bf16", "max_batch": 7}}
    )
    clf = build_analyzer(cfg, "cpu").classifier
    assert clf is not None and clf.bf16 and clf.denoiser.bf16 and clf.denoiser.max_batch == 7
    assert (
        build_analyzer(
            ScopeStreamConfig.model_validate({"classifier": {"model": str(tiny_model)}}), "cpu"
        ).classifier.bf16
        is False
    )
    with pytest.raises(ValueError, match="precision"):
        ScopeStreamConfig.model_validate({"classifier": {"precision": "fp8"}})
