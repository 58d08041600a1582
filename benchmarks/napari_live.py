"""Responsiveness of the napari widget while a scan streams in; prints JSON.

    nice -n 10 xvfb-run -a .venv/bin/python benchmarks/napari_live.py --tiles 300 --rate 10 --size 512

A writer process commits tiles (RGB, ``--size`` px, two cells each, one flagged) to a real slide
store at ``--rate`` tiles/s, as the pipeline's sink does from its own process; a real napari viewer
with the Scope Stream widget follows the store. Measured on the GUI thread:

* ``tick_ms``: wall time of each 50 ms timer tick that applied updates (median, p95, max);
* ``loop_lag_ms``: how late a 20 ms probe timer fires (the event loop's responsiveness: what a user
  feels when panning or clicking), median / p95 / max;
* ``display_latency_ms``: commit of a tile in the store -> tile pasted on the mosaic;
* ``layers``: number of napari layers at the end (the mosaic stays one layer however many tiles).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _output import emit  # benchmarks/ is on sys.path when a script runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def _writer(path: str, n: int, rate: float, size: int, cols: int, step: float, p: float, q: Any) -> None:
    """The sink's part, in its own process: commit ``n`` tiles at ``rate``/s; put each commit time on ``q``."""
    from view_helpers import make_result, make_tile

    from scope_stream.config import StoreConfig
    from scope_stream.store import SlideStore

    store = SlideStore.open_or_create(path, slide_id="bench", config=StoreConfig(commit_every=1))
    t0 = time.monotonic()
    for i in range(n):
        tile = make_tile(i, (i % cols) * step, (i // cols) * step, size=size, p=p)
        res = make_result(tile, [(30.0, 40.0), (90.0, 70.0)], ["ig", "neutrophil"], flagged={0})
        store.write_result(res, tile=tile)
        q.put(time.time())
        delay = t0 + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    q.put(None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=300)
    ap.add_argument("--rate", type=float, default=10.0, help="tiles per second")
    ap.add_argument("--size", type=int, default=512, help="tile side in pixels")
    ap.add_argument("--cols", type=int, default=20, help="tiles per scan row")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the GUI thread into this file")
    args = ap.parse_args()

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from scope_stream.config import StoreConfig
    from scope_stream.store import SlideStore

    tmp = Path(tempfile.mkdtemp(prefix="scope-stream-bench-"))
    path = tmp / "bench.zarr"
    p = 0.5
    step = args.size * p * 0.9
    rows = -(-args.tiles // args.cols)
    store = SlideStore.open_or_create(path, slide_id="bench", config=StoreConfig(commit_every=1))
    store.set_metadata(region_um=[0.0, 0.0, (args.cols - 1) * step, (rows - 1) * step])

    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("scope-stream", "Scope Stream")
    widget.open_store(path)
    app = QApplication.instance()
    assert app is not None

    commits: list[float] = []
    lags: list[float] = []
    lag_at: list[float] = []
    latencies: list[float] = []
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    proc = ctx.Process(
        target=_writer, args=(str(path), args.tiles, args.rate, args.size, args.cols, step, p, q), daemon=True
    )

    last = [time.monotonic()]
    first_shown: list[float] = []
    seen = [0]

    def probe() -> None:
        now = time.monotonic()
        lags.append(max(0.0, (now - last[0]) - 0.020) * 1000.0)
        lag_at.append(now)
        last[0] = now
        wall_now = time.time()
        if widget.n_tiles and not first_shown:
            first_shown.append(now)
        while seen[0] < widget.n_tiles and seen[0] < len(commits):
            latencies.append((wall_now - commits[seen[0]]) * 1000.0)
            seen[0] += 1

    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(probe)
    # let the viewer settle before measuring
    t_end = time.monotonic() + 2.0
    while time.monotonic() < t_end:
        app.processEvents()
        time.sleep(0.01)
    last[0] = time.monotonic()
    timer.start()
    prof = None
    if args.profile is not None:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t_start = time.monotonic()
    proc.start()
    deadline = time.monotonic() + args.tiles / args.rate + 120.0
    finished = False
    while (not finished or widget.n_tiles < args.tiles) and time.monotonic() < deadline:
        while not q.empty():
            item = q.get()
            if item is None:
                finished = True
            else:
                commits.append(item)
        app.processEvents()
        time.sleep(0.002)
    proc.join(10)
    if prof is not None:
        prof.disable()
        prof.dump_stats(str(args.profile))
    wall = time.monotonic() - t_start
    timer.stop()
    ticks = [t * 1000.0 for t in widget.tick_seconds[1:]]  # the first tick creates the layers
    result = {
        "benchmark": "napari_live",
        "tiles": args.tiles,
        "tiles_shown": widget.n_tiles,
        "rate_tiles_per_s": args.rate,
        "achieved_commit_rate_tiles_per_s": (
            round((len(commits) - 1) / (commits[-1] - commits[0]), 2) if len(commits) > 1 else None
        ),
        "tile_px": args.size,
        "wall_s": round(wall, 2),
        "tick_ms": {
            "n": len(ticks),
            "median": round(_pct(ticks, 50), 2),
            "p95": round(_pct(ticks, 95), 2),
            "max": round(max(ticks, default=float("nan")), 2),
        },
        "loop_lag_max_at_s": round(lag_at[int(np.argmax(lags))] - t_start, 2) if lags else None,
        "first_tile_shown_at_s": round(first_shown[0] - t_start, 2) if first_shown else None,
        "loop_lag_ms": {
            "median": round(_pct(lags, 50), 2),
            "p95": round(_pct(lags, 95), 2),
            "max": round(max(lags, default=float("nan")), 2),
        },
        "display_latency_ms": {
            "median": round(_pct(latencies, 50), 1),
            "p95": round(_pct(latencies, 95), 1),
            "max": round(max(latencies, default=float("nan")), 1),
        },
        "mosaic_px": list(widget.canvas.shape) if widget.canvas is not None else None,
        "mosaic_um_per_px": widget.canvas.scale_um if widget.canvas is not None else None,
        "layers": len(viewer.layers),
        "errors": widget.errors[:5],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "napari": napari.__version__},
    }
    widget.shutdown()
    viewer.close()
    emit(result, args.json)


if __name__ == "__main__":
    main()
