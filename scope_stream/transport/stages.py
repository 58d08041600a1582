"""Pluggable worker stages (*analyzers*) and two real stand-ins.

An analyzer turns a batch of tiles into one :class:`~scope_stream.vocabulary.TileResult` per tile.
Workers build it in their own process from an import spec ``"package.module:factory"``, called as
``factory(config: ScopeStreamConfig, device: str) -> Analyzer``, so nothing unpicklable crosses
processes. The real segment -> classify analyzer is ``scope_stream.analysis:build_analyzer``.

Stand-ins (options from ``pipeline.stage_options``):

* ``passthrough`` -- an empty result per tile. Options: ``delay_ms`` (per batch), ``fail_tile_ids``
  (raise on these), ``crash_tile_ids`` (the process exits on these: a poison tile),
  ``hang_tile_ids`` (never return: a hung analyzer).
* ``threshold`` -- a cheap but real analysis: dark blobs (stained nuclei) become WBC cells with
  crops, a two-class call ("small"/"large" by area) with its uncertainty, and flags for uncertain
  cells (``flags.uncertainty_threshold``) or very dark ones (option ``flag_darkness``, default 0.9:
  the blob's mean darkness on the tile's 0..1 range); options ``threshold`` (0.35) and
  ``min_area_px`` (12); same failure options.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import numpy as np

from scope_stream.vocabulary import Cell, CellCall, CellKind, Flag, FlagReason, Tile, TileResult

if TYPE_CHECKING:
    from scope_stream.config import ScopeStreamConfig

__all__ = [
    "DEFAULT_ANALYZER",
    "Analyzer",
    "PassthroughAnalyzer",
    "ThresholdAnalyzer",
    "load_analyzer",
    "passthrough",
    "resolve_analyzer_spec",
    "threshold",
]

log = logging.getLogger(__name__)

#: The real analyzer, wired by the integrator.
DEFAULT_ANALYZER = "scope_stream.analysis:build_analyzer"
FALLBACK_ANALYZER = "scope_stream.transport.stages:threshold"


@runtime_checkable
class Analyzer(Protocol):
    """What a worker runs: one result per tile, in the same order; ``close()`` frees devices."""

    def analyze(self, tiles: list[Tile]) -> list[TileResult]: ...

    def close(self) -> None: ...


def resolve_analyzer_spec(spec: str) -> str:
    """``auto`` -> the real analyzer if it is installed, else the ``threshold`` stand-in (with a warning)."""
    if spec != "auto":
        return spec
    module = DEFAULT_ANALYZER.split(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return DEFAULT_ANALYZER
    log.warning("%s is not available yet; workers use the stand-in %s", DEFAULT_ANALYZER, FALLBACK_ANALYZER)
    return FALLBACK_ANALYZER


def load_analyzer(spec: str, config: ScopeStreamConfig, device: str) -> Analyzer:
    """Import ``package.module:factory`` and call it with ``(config, device)``."""
    spec = resolve_analyzer_spec(spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"analyzer spec {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import analyzer module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ValueError(f"{module_name} has no callable {attr!r}")
    analyzer = factory(config, device)
    if not hasattr(analyzer, "analyze") or not hasattr(analyzer, "close"):
        raise ValueError(f"{spec} returned {type(analyzer).__name__}, which has no analyze()/close()")
    return cast("Analyzer", analyzer)


class _FailureOptions:
    """Test and drill options shared by the stand-ins."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.delay_s = float(options.get("delay_ms", 0)) / 1000.0
        self.fail = {str(t) for t in options.get("fail_tile_ids", [])}
        self.crash = {str(t) for t in options.get("crash_tile_ids", [])}
        self.hang = {str(t) for t in options.get("hang_tile_ids", [])}

    def before(self, tiles: list[Tile]) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        for t in tiles:
            if t.tile_id in self.crash:
                log.error("stage option crash_tile_ids: exiting on tile %s", t.tile_id)
                os._exit(13)
            if t.tile_id in self.hang:
                log.error("stage option hang_tile_ids: hanging on tile %s", t.tile_id)
                while True:
                    time.sleep(3600)
            if t.tile_id in self.fail:
                raise RuntimeError(f"stage option fail_tile_ids: failing on tile {t.tile_id}")


class PassthroughAnalyzer:
    """Returns an empty result per tile (transport benchmarks, tests)."""

    def __init__(self, options: dict[str, Any], name: str = "passthrough") -> None:
        self.opts = _FailureOptions(options)
        self.name = name

    def analyze(self, tiles: list[Tile]) -> list[TileResult]:
        self.opts.before(tiles)
        return [TileResult(slide_id=t.slide_id, tile_id=t.tile_id, worker=self.name) for t in tiles]

    def close(self) -> None:
        pass


def passthrough(config: ScopeStreamConfig, device: str) -> PassthroughAnalyzer:
    """Factory of the passthrough stand-in."""
    return PassthroughAnalyzer(config.pipeline.stage_options)


class ThresholdAnalyzer:
    """Dark blobs -> WBC cells with crops, a two-class call and flags (a real, cheap analysis)."""

    def __init__(self, config: ScopeStreamConfig, device: str) -> None:
        opts = config.pipeline.stage_options
        self.opts = _FailureOptions(opts)
        self.level = float(opts.get("threshold", 0.35))  # fraction of the tile's intensity range
        self.min_area = int(opts.get("min_area_px", 12))
        self.crop_px = int(config.segment.crop_px)
        self.uncertainty_threshold = float(config.flags.uncertainty)
        self.flag_darkness = float(opts.get("flag_darkness", 0.9))  # darker blobs are flagged as anomalies
        self.device = device

    def analyze(self, tiles: list[Tile]) -> list[TileResult]:
        self.opts.before(tiles)
        return [self._one(t) for t in tiles]

    def _one(self, tile: Tile) -> TileResult:
        from scipy import ndimage

        t0 = time.perf_counter()
        px = tile.pixels.astype(np.float32)
        gray = px.mean(axis=2) if px.ndim == 3 else px
        lo, hi = float(gray.min()), float(gray.max())
        cells: list[Cell] = []
        calls: list[CellCall] = []
        flags: list[Flag] = []
        crops: list[np.ndarray] = []
        crop_ids: list[str] = []
        if hi > lo:
            norm = (gray - lo) / (hi - lo)
            labels, _n = ndimage.label(norm < self.level)
            slices = ndimage.find_objects(labels)
            for i, sl in enumerate(slices, start=1):
                if sl is None:
                    continue
                mask = labels[sl] == i
                area = int(mask.sum())
                if area < self.min_area:
                    continue
                rows, cols = np.nonzero(mask)
                r = float(rows.mean() + sl[0].start)
                c = float(cols.mean() + sl[1].start)
                x, y = tile.px_to_stage(r, c)
                cid = f"{tile.tile_id}:{len(cells)}"
                bbox = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
                cells.append(
                    Cell(
                        cell_id=cid,
                        tile_id=tile.tile_id,
                        slide_id=tile.slide_id,
                        kind=CellKind.WBC,
                        bbox=bbox,
                        centroid_px=(r, c),
                        x_um=x,
                        y_um=y,
                        area_px=float(area),
                        contour=[(float(bbox[0]), float(bbox[1])), (float(bbox[2]), float(bbox[3]))],
                        features={"darkness": float(1.0 - norm[sl][mask].mean())},
                    )
                )
                p_large = 1.0 / (1.0 + math.exp(-(area - 80.0) / 20.0))
                probs = {"small": 1.0 - p_large, "large": p_large}
                ent = -sum(p * math.log(p) for p in probs.values() if p > 0) / math.log(2)
                darkness = float(1.0 - norm[sl][mask].mean())
                label = max(probs, key=lambda k: probs[k])
                call = CellCall(
                    cell_id=cid,
                    label=label,
                    probabilities=probs,
                    uncertainty=min(1.0, max(0.0, ent)),
                    margin=abs(probs["large"] - probs["small"]),
                    anomaly_score=darkness,
                    model_id="threshold-stand-in",
                    evaluations=1,
                )
                calls.append(call)
                reasons = []
                if call.uncertainty > self.uncertainty_threshold:
                    reasons.append(FlagReason.UNCERTAIN)
                if darkness >= self.flag_darkness:
                    reasons.append(FlagReason.ANOMALY)
                if reasons:
                    flags.append(
                        Flag(
                            cell_id=cid,
                            tile_id=tile.tile_id,
                            slide_id=tile.slide_id,
                            reasons=reasons,
                            score=max(call.uncertainty, darkness),
                            label=label,
                            x_um=x,
                            y_um=y,
                        )
                    )
                crops.append(self._crop(tile.pixels, r, c))
                crop_ids.append(cid)
        crop_arr = np.stack(crops) if crops else np.zeros((0, self.crop_px, self.crop_px, 3), np.uint8)
        return TileResult(
            slide_id=tile.slide_id,
            tile_id=tile.tile_id,
            cells=cells,
            calls=calls,
            flags=flags,
            crops=crop_arr,
            crop_cell_ids=crop_ids,
            timings_ms={"analyze": (time.perf_counter() - t0) * 1000.0},
            worker=f"threshold@{self.device}",
        )

    def _crop(self, pixels: np.ndarray, r: float, c: float) -> np.ndarray:
        s = self.crop_px
        img = pixels if pixels.ndim == 3 else pixels[..., None]
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        img = img[..., :3]
        if img.dtype != np.uint8:
            m = float(img.max()) or 1.0
            img = (img.astype(np.float32) * (255.0 / m)).astype(np.uint8)
        r0, c0 = round(r) - s // 2, round(c) - s // 2
        out = np.zeros((s, s, 3), np.uint8)
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + s, img.shape[0]), min(c0 + s, img.shape[1])
        out[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = img[rr0:rr1, cc0:cc1]
        return out

    def close(self) -> None:
        pass


def threshold(config: ScopeStreamConfig, device: str) -> ThresholdAnalyzer:
    """Factory of the threshold stand-in."""
    return ThresholdAnalyzer(config, device)
