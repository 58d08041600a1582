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


def _canonical_copy(model: Path, dest: Path) -> Path:
    """The tiny model with a canonical-crop spec at its own size (trained on toy crops, so only the path
    through canonical crops is under test here, not its accuracy)."""
    import json
    import shutil

    out = dest / "canonical-model"
    shutil.copytree(model, out)
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    cfg["canonical"] = {"size": cfg["image_size"], "cell_fraction": 0.62, "context": "mask", "stain": "white"}
    (out / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return out


@pytest.mark.data
def test_canonical_model_gets_canonical_crops_cut_at_the_training_scale(tiny_model: Path, tmp_path: Path) -> None:
    from scope_stream.classify.canonical import canonical_batch

    model = _canonical_copy(tiny_model, tmp_path)
    cfg = ScopeStreamConfig.model_validate({"classifier": {"model": str(model)}})
    analyzer = build_analyzer(cfg, "cpu")
    assert analyzer.classifier is not None and analyzer.classifier.canonical is not None
    tile = _bccd_tile("BloodImage_00000.jpg", "a")
    res = analyzer.analyze([tile])[0]
    wbcs = [c for c in res.cells if c.kind == CellKind.WBC]
    assert wbcs and len(res.calls) == len(res.crop_cell_ids) == len(wbcs) - analyzer.refused
    size = analyzer.classifier.image_size
    assert res.crops.shape == (len(res.calls), size, size, 3)
    # the stored crops are exactly the canonical crops of the cells cut at 0.2 µm/px
    from scope_stream.segment import extract_crops

    raw = extract_crops(tile, [c for c in wbcs if c.cell_id in set(res.crop_cell_ids)], cfg.segment.crop_um, 128)
    np.testing.assert_array_equal(res.crops, canonical_batch(raw, analyzer.classifier.canonical).images)


def test_canonical_model_leaves_a_cell_without_a_cell_unclassified(tiny_model: Path, tmp_path: Path) -> None:
    from scope_stream.vocabulary import Cell

    model = _canonical_copy(tiny_model, tmp_path)
    analyzer = build_analyzer(ScopeStreamConfig.model_validate({"classifier": {"model": str(model)}}), "cpu")
    blank = Tile(
        np.full((256, 256, 3), 230, np.uint8), slide_id="s", tile_id="t", seq=0, x_um=0, y_um=0, pixel_size_um=0.2
    )
    ghost = Cell(
        cell_id="t:0", tile_id="t", slide_id="s", kind=CellKind.WBC, centroid_px=(128.0, 128.0),
        bbox=(120, 120, 136, 136), area_px=200, x_um=0.0, y_um=0.0,
    )  # fmt: skip
    kept, crops = analyzer._canonical(blank, [ghost], np.full((1, 128, 128, 3), 230, np.uint8), 0.2)
    assert kept == [] and crops.shape[0] == 0 and analyzer.refused == 1


def test_unfamiliar_cells_are_flagged_with_their_own_reason() -> None:
    from scope_stream.classify.flags import flag_call
    from scope_stream.config.classify import FlagConfig
    from scope_stream.vocabulary import Cell, CellCall, FlagReason

    cell = Cell(
        cell_id="c", tile_id="t", slide_id="s", kind=CellKind.WBC, centroid_px=(5.0, 5.0),
        bbox=(0, 0, 10, 10), area_px=50, x_um=1.0, y_um=2.0,
    )  # fmt: skip

    def call(unfamiliarity: float | None) -> CellCall:
        return CellCall(
            cell_id="c", label="a", probabilities={"a": 0.99, "b": 0.01}, uncertainty=0.05, margin=0.98,
            anomaly_score=0.1, model_id="m", unfamiliarity=unfamiliarity,
        )  # fmt: skip

    cfg = FlagConfig(anomaly_threshold=0.85, uncertainty_threshold=0.6)
    assert flag_call(cell, call(None), cfg) is None
    assert flag_call(cell, call(0.5), cfg) is None
    flag = flag_call(cell, call(0.97), cfg)
    assert flag is not None and flag.reasons == [FlagReason.UNFAMILIAR] and flag.score == pytest.approx(0.97)
    assert flag_call(cell, call(0.97), FlagConfig(unfamiliar_threshold=0.99)) is None
