"""The worker's analysis stage: segment -> crop -> classify -> flag, batched across tiles.

A pipeline worker builds one :class:`CellAnalyzer` in its own process from the import spec
``"scope_stream.analysis:build_analyzer"`` (see ``docs/protocol.md``) and hands it batches of tiles.
White cells of every tile in a batch are classified in one call, so the classifier's forward passes
stay full however few cells each tile holds.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from scope_stream.config import ScopeStreamConfig
from scope_stream.vocabulary import Cell, CellCall, CellKind, Flag, Tile, TileResult

if TYPE_CHECKING:
    from scope_stream.classify.classifier import DiffusionClassifier

__all__ = ["CANONICAL_SOURCE_UM_PER_PX", "CellAnalyzer", "build_analyzer", "build_segment_only_analyzer"]

#: the scale white cells are cut from a tile at before a canonical-crop model makes them canonical: PBC's
#: (a 128 px crop covers 25.6 µm), so a cell reaches the canonical step as sharp as the training crops were
CANONICAL_SOURCE_UM_PER_PX = 0.2

log = logging.getLogger(__name__)


class CellAnalyzer:
    """Segments every tile, classifies its white cells with the diffusion classifier and flags them.

    With ``classifier=None`` it only segments (cells, no calls, no flags): useful where no model is
    wanted, e.g. counting red cells.
    """

    def __init__(self, config: ScopeStreamConfig, classifier: DiffusionClassifier | None) -> None:
        self.config = config
        self.classifier = classifier
        #: the flag thresholds in force: the config's where set, else the model's calibrated ones
        self.flags = config.flags.resolved(classifier.flag_thresholds() if classifier is not None else None)
        #: white cells left unclassified because the classifier found no cell in their crop
        self.refused = 0
        self.name = "segment+classify" if classifier is not None else "segment"

    def analyze(self, tiles: list[Tile]) -> list[TileResult]:
        from scope_stream.segment import extract_crops, segment_tile

        seg = self.config.segment
        canonical = self.classifier.canonical if self.classifier is not None else None
        crop_px = self.classifier.image_size if self.classifier is not None else seg.crop_px
        if canonical is not None:
            crop_px = round(seg.crop_um / CANONICAL_SOURCE_UM_PER_PX)  # cut at the training crops' scale
        per_tile: list[tuple[Tile, list[Cell], list[Cell], np.ndarray, float]] = []
        for tile in tiles:
            t0 = time.perf_counter()
            cells = segment_tile(tile, seg)
            wbcs = [c for c in cells if c.kind == CellKind.WBC]
            crops = extract_crops(tile, wbcs, seg.crop_um, crop_px)
            if canonical is not None and len(wbcs):
                wbcs, crops = self._canonical(tile, wbcs, crops, seg.crop_um / crop_px)
            per_tile.append((tile, cells, wbcs, crops, (time.perf_counter() - t0) * 1e3))

        calls: list[CellCall] = []
        classify_ms = 0.0
        n_wbc = sum(len(w) for _, _, w, _, _ in per_tile)
        if self.classifier is not None and n_wbc:
            t0 = time.perf_counter()
            all_crops = np.concatenate([c for *_, c, _ in per_tile if len(c)], axis=0)
            ids = [cell.cell_id for _, _, wbcs, _, _ in per_tile for cell in wbcs]
            calls = self.classifier.classify(
                all_crops, ids, procedure=self.config.classifier.procedure, canonical=canonical is None
            )
            classify_ms = (time.perf_counter() - t0) * 1e3

        results: list[TileResult] = []
        offset = 0
        for tile, cells, wbcs, crops, seg_ms in per_tile:
            tile_calls = calls[offset : offset + len(wbcs)] if self.classifier is not None else []
            offset += len(wbcs)
            flags = self._flags(wbcs, tile_calls) if self.classifier is not None else []
            share = len(wbcs) / n_wbc if n_wbc else 0.0
            results.append(
                TileResult(
                    slide_id=tile.slide_id,
                    tile_id=tile.tile_id,
                    cells=cells,
                    calls=tile_calls,
                    flags=flags,
                    crops=crops if self.classifier is not None else crops[:0],
                    crop_cell_ids=[c.cell_id for c in wbcs] if self.classifier is not None else [],
                    timings_ms={"segment": round(seg_ms, 3), "classify": round(classify_ms * share, 3)},
                )
            )
        return results

    def _canonical(
        self, tile: Tile, wbcs: list[Cell], crops: np.ndarray, um_per_px: float
    ) -> tuple[list[Cell], np.ndarray]:
        """The white cells' canonical crops; a cell in whose crop the classifier finds no cell is left
        unclassified (it stays among the tile's cells) and logged, never the whole tile."""
        from scope_stream.classify.canonical import canonical_batch

        assert self.classifier is not None and self.classifier.canonical is not None
        batch = canonical_batch(crops, self.classifier.canonical, um_per_px=um_per_px, on_error="skip")
        for i, reason in batch.errors.items():
            log.warning("tile %s: cell %s left unclassified: %s", tile.tile_id, wbcs[i].cell_id, reason)
        self.refused += len(batch.errors)
        return [wbcs[int(i)] for i in batch.kept], batch.images

    def _flags(self, wbcs: list[Cell], calls: list[CellCall]) -> list[Flag]:
        from scope_stream.classify.flags import flag_call

        flags: list[Flag] = []
        for cell, call in zip(wbcs, calls, strict=True):
            flag = flag_call(cell, call, self.flags)
            if flag is not None:
                flags.append(flag)
        return flags

    def close(self) -> None:
        self.classifier = None


def build_analyzer(config: ScopeStreamConfig, device: str = "cpu") -> CellAnalyzer:
    """The default worker stage: segmentation + the diffusion classifier of ``config.classifier``."""
    from scope_stream.classify.classifier import DiffusionClassifier

    want = config.classifier.device if config.classifier.device != "auto" else device
    cc = config.classifier
    clf = DiffusionClassifier.load(cc.model, device=want, precision=cc.precision, max_batch=cc.max_batch)
    log.info(
        "analyzer: %s on %s (%s), procedure %s",
        clf.model_id,
        clf.device,
        "bf16" if clf.bf16 else "float32",
        cc.procedure,
    )
    return CellAnalyzer(config, clf)


def build_segment_only_analyzer(config: ScopeStreamConfig, device: str = "cpu") -> CellAnalyzer:
    """A worker stage that segments but does not classify."""
    return CellAnalyzer(config, None)
