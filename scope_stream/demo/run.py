"""The main job: scan a virtual slide live, classify every white cell, flag, re-image, report.

:func:`run_demo` starts the virtual microscope (a real MMCore with Python devices), the pipeline
(broker, workers, sink as processes), optionally napari with the plugin, scans the slide through
pymmcore-plus's MDA engine with adaptive re-imaging of flagged cells, and writes the store, a
``report.json`` and a ``report.html``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scope_stream import __version__
from scope_stream.config import ScopeStreamConfig

__all__ = ["DemoProgress", "default_demo_config", "run_demo"]

log = logging.getLogger(__name__)

ANALYZER = "scope_stream.analysis:build_analyzer"


def default_demo_config() -> ScopeStreamConfig:
    """The embedded default of ``scope-stream demo`` (``configs/demo.yaml`` holds the same values)."""
    return ScopeStreamConfig.model_validate(
        {
            "slide_id": "demo-slide",
            "microscope": {"seed": 7, "wbc_per_mm2": 120.0, "abnormal_fraction": 0.15},
            "scan": {
                "backend": "virtual",
                "x0_um": 0,
                "y0_um": 0,
                "x1_um": 1200,
                "y1_um": 1200,
                "overlap": 0.12,
                "objective": "20x",
                "adaptive": True,
                "reimage_objective": "50x",
                "reimage_budget": 8,
            },
            "pipeline": {"n_workers": 2},
            "store": {"root": "scans"},
        }
    )


@dataclass
class DemoProgress:
    """Live counters, fed by the pipeline's events (thread-safe enough for display: ints only)."""

    tiles_done: int = 0
    reimages_done: int = 0
    cells: int = 0
    flagged: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    last_label: str = ""

    def on_event(self, topic: str, payload: dict[str, Any]) -> None:
        if topic == "tile.done":
            self.tiles_done += 1
            self.cells += int(payload.get("n_cells") or 0)
            if payload.get("status") == "failed":
                self.failed += 1
            lat = payload.get("latency_ms")
            if lat is not None:
                self.latencies_ms.append(float(lat))
        elif topic == "reimage.done":
            self.reimages_done += 1
        elif topic == "cell.flagged" and payload.get("kind", "scan") == "scan":
            self.flagged += 1
            self.last_label = str(payload.get("label", ""))


def _follow(endpoint: str, progress: DemoProgress, stop: threading.Event) -> None:
    from scope_stream.transport.events import EventSubscriber

    with EventSubscriber(endpoint, ["tile.", "reimage.", "cell.flagged"]) as sub:
        while not stop.is_set():
            item = sub.recv(timeout=0.2)
            if item is not None:
                progress.on_event(*item)


def run_demo(
    cfg: ScopeStreamConfig,
    out_dir: Path,
    *,
    viewer: bool = False,
    on_progress: Callable[[DemoProgress, int], None] | None = None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Run the whole demo; returns the report (also written to ``out_dir/report.json`` and ``.html``)."""
    root_level = logging.getLogger().level
    import pymmcore_plus  # noqa: F401  (its import sets the root logger to DEBUG)

    logging.getLogger().setLevel(root_level)

    from scope_stream.acquire.plan import ScanPlan
    from scope_stream.acquire.scan import PymmcorePlusBackend, ScanSession
    from scope_stream.acquire.slide import VirtualSlide
    from scope_stream.store import SlideStore
    from scope_stream.transport import LocalPipeline

    from .report import build_report, write_html, write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store_path = out_dir / f"{cfg.slide_id}.zarr"
    if store_path.exists():
        if not overwrite:
            raise FileExistsError(f"{store_path} exists; pass overwrite=True or choose another --out")
        shutil.rmtree(store_path)

    slide = VirtualSlide(cfg.microscope)  # the same seed as the microscope's: the ground truth
    plan = ScanPlan.from_config(cfg)
    n_planned = len(plan)
    progress = DemoProgress()
    stop = threading.Event()
    t_start = time.perf_counter()
    with LocalPipeline(cfg, store_path, analyzer_spec=ANALYZER) as pipe:
        follower = threading.Thread(target=_follow, args=(pipe.events_endpoint, progress, stop), daemon=True)
        follower.start()
        assert pipe.endpoints is not None  # started by the context manager
        backend = PymmcorePlusBackend.virtual(cfg)
        session = ScanSession(cfg, backend, pipe.endpoints.frontend, events_endpoint=pipe.events_endpoint, plan=plan)
        t_scan = time.perf_counter()
        session.start()  # the scan runs on its own thread; the control endpoint is up
        try:
            if viewer:
                _run_viewer(pipe, session, store_path)
            while True:
                try:
                    scan_report = session.wait(timeout=0.25)
                    break
                except TimeoutError:
                    if on_progress is not None:
                        on_progress(progress, n_planned)
        except KeyboardInterrupt:
            session.cancel()
            raise
        scan_seconds = time.perf_counter() - t_scan
        pipe.wait_idle(timeout=120)
        time.sleep(0.3)  # let the last events arrive
        stop.set()
        follower.join(timeout=2)
        if on_progress is not None:
            on_progress(progress, n_planned)
        stats = pipe.stats()

    store = SlideStore.open(store_path)
    run_info = {
        "scope_stream": __version__,
        "model": (cfg.classifier.model and str(cfg.classifier.model)) or "models/ (shipped)",
        "procedure": cfg.classifier.procedure,
        "workers": cfg.pipeline.n_workers,
        "flags": cfg.flags.model_dump(mode="json"),
        "microscope": {"seed": cfg.microscope.seed, "abnormal_fraction": cfg.microscope.abnormal_fraction},
        "scan": cfg.scan.model_dump(mode="json"),
        "scan_seconds": scan_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "reimages": scan_report.reimages,
        "scan_errors": scan_report.errors,
        "pipeline": {k: stats.get(k) for k in ("accepted", "stored", "duplicates", "failed", "redispatched")},
    }
    truth = slide.ground_truth(region=_region(cfg), kinds=("WBC",))
    report = build_report(store, truth, run=run_info, latencies_ms=progress.latencies_ms)
    write_report(report, out_dir)
    write_html(report, store, out_dir)
    return report


def _region(cfg: ScopeStreamConfig) -> tuple[float, float, float, float]:
    margin = 600.0  # more than a field: the planted cells of every field that was imaged
    s = cfg.scan
    return (s.x0_um - margin, s.y0_um - margin, s.x1_um + margin, s.y1_um + margin)


def _run_viewer(pipe: Any, session: Any, store_path: Path) -> None:
    """napari with the plugin docked and connected; returns when the window is closed."""
    import napari
    from scope_stream_napari import launch

    viewer = napari.Viewer(title="scope-stream demo")
    launch(viewer, events=pipe.events_endpoint, control=session.control_endpoint, store=store_path)
    napari.run()
    log.info("viewer closed; the scan (if still running) finishes headless")
