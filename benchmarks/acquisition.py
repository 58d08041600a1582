"""Acquisition-side figures for docs/acquisition.md; prints one JSON object.

    nice -n 10 .venv/bin/python benchmarks/acquisition.py [--frames 40] [--size 2048]

* ``mda_callback_us``: time the pymmcore-plus acquisition thread spends in the listener's ``frameReady``
  slot per frame (attached mode: the frame is only queued; conversion and sending happen on the relay).
* ``listener_to_pipeline``: synthetic ``size x size x 3`` uint8 frames handed to the pycromanager listener
  as pycromanager's image processor would, through ThreadedSink -> TileSource -> a real LocalPipeline
  (passthrough analyzer, tile pixels not stored), until the pipeline reports the slide finished: frames/s
  and MB/s of the whole path on this machine.
* ``follower_latency_ms``: a pycromanager Python-backend acquisition on the virtual microscope followed by
  the DatasetFeed follower (poll 50 ms): time from the image reaching pycromanager's image processor to
  the follower handing its tile to the sink.
* ``virtual_scan``: a 5 x 5 survey (512 x 512 camera, no real-time delays) through ScanSession with each
  backend into a LocalPipeline (passthrough): survey tiles per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def mda_callback_cost(size: int, frames: int) -> dict[str, float]:
    import useq

    from scope_stream.acquire.listen import PymmcorePlusListener

    class Null:
        def send(self, tile: Any) -> None:
            pass

    listener = PymmcorePlusListener(Null(), slide_id="bench", objective="20x")
    # attached mode without a core: the slot the core would call, and the relay thread behind it
    listener._thread = threading.Thread(target=listener._relay, daemon=True)
    listener._thread.start()
    img = np.zeros((size, size, 3), np.uint8)
    costs = []
    for i in range(frames):
        ev = useq.MDAEvent(x_pos=float(i), y_pos=0.0, index={"p": i})
        t0 = time.perf_counter()
        listener._on_frame(img, ev, {"pixel_size_um": 0.5})
        costs.append((time.perf_counter() - t0) * 1e6)
    listener.close(60)
    return {"median": round(statistics.median(costs), 1), "p95": round(pct(costs, 95), 1), "frames": frames}


def listener_to_pipeline(size: int, frames: int, root: Path) -> dict[str, Any]:
    from scope_stream.acquire.listen import ThreadedSink
    from scope_stream.acquire.listen.pycromanager import PycromanagerListener, default_namer
    from scope_stream.config import ScopeStreamConfig
    from scope_stream.transport import LocalPipeline, TileSource

    cfg = ScopeStreamConfig.model_validate(
        {
            "slide_id": "bench-listener",
            "pipeline": {"n_workers": 1, "analyzer": "scope_stream.transport.stages:passthrough"},
            "store": {"root": str(root), "save_tiles": False, "mosaic_downsample": 0},
        }
    )
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    with LocalPipeline(cfg, store_path=root / "bench-listener.zarr") as pipe:
        assert pipe.endpoints is not None
        endpoint = pipe.endpoints.frontend
        sink = ThreadedSink(lambda: TileSource.from_config(endpoint, cfg))
        listener = PycromanagerListener(sink, slide_id="bench-listener", backend="python", namer=default_namer("b"))
        t0 = time.perf_counter()
        for i in range(frames):
            meta = {
                "Axes": {"position": i},
                "XPosition_um_Intended": float(i),
                "YPosition_um_Intended": 0.0,
                "PixelSize_um": 0.5,
                "PixelType": "RGB32",
            }
            listener(img, meta)
        listener.close(600)
        summary = sink.call("finish", "bench-listener", timeout=600)
        dt = time.perf_counter() - t0
        sink.close()
    mb = frames * img.nbytes / 1e6
    return {
        "frames": frames,
        "frame_mb": round(img.nbytes / 1e6, 2),
        "seconds": round(dt, 2),
        "frames_per_s": round(frames / dt, 2),
        "mb_per_s": round(mb / dt, 1),
        "stored": summary.get("n_tiles"),
    }


def follower_latency(n: int) -> dict[str, Any]:
    from scope_stream.acquire.listen import DatasetFeed, DatastoreFollower, default_namer
    from scope_stream.acquire.pycromanager_compat import pycromanager_python_backend
    from scope_stream.acquire.virtual import build_virtual_core, close_core
    from scope_stream.config.microscope import MicroscopeConfig

    core = build_virtual_core(MicroscopeConfig(camera_width=512, camera_height=512, realtime=False))
    arrived: dict[int, float] = {}
    sent: dict[int, float] = {}

    class Sink:
        def send(self, tile: Any) -> None:
            sent[int(tile.metadata["axes"]["position"])] = time.perf_counter()

    def note(image: Any, metadata: dict[str, Any]) -> Any:
        arrived[int(metadata["Axes"]["position"])] = time.perf_counter()
        return image, metadata

    try:
        with pycromanager_python_backend(core) as pm:
            acq = pm.acquisition(image_process_fn=note)
            fol = DatastoreFollower(
                DatasetFeed(acq.get_dataset()),
                Sink(),
                slide_id="f",
                poll_ms=50,
                backend="python",
                namer=default_namer("f"),
            ).start()
            t0 = time.perf_counter()
            for i in range(n):
                acq.acquire({"axes": {"position": i}, "x": 1000.0 + 100 * i, "y": 1000.0})
            acq.mark_finished()
            acq.await_completion()
            dt = time.perf_counter() - t0
            fol.wait_finished(60)
            fol.stop()
    finally:
        close_core(core)
    lat = [(sent[i] - arrived[i]) * 1000 for i in range(n) if i in sent and i in arrived]
    return {
        "images": n,
        "streamed": len(sent),
        "p50": round(pct(lat, 50), 1),
        "p95": round(pct(lat, 95), 1),
        "max": round(max(lat), 1),
        "acquisition_images_per_s": round(n / dt, 1),
    }


def virtual_scan(root: Path) -> dict[str, Any]:
    from scope_stream.acquire.scan import PycromanagerBackend, PymmcorePlusBackend, ScanSession
    from scope_stream.acquire.virtual import build_virtual_core, close_core
    from scope_stream.config import ScopeStreamConfig
    from scope_stream.transport import LocalPipeline

    out: dict[str, Any] = {}
    base = {
        "microscope": {"camera_width": 512, "camera_height": 512, "realtime": False},
        "scan": {
            "x0_um": 1000,
            "y0_um": 1000,
            "x1_um": 1000 + 3.5 * 230.4 + 256,
            "y1_um": 1000 + 3.5 * 230.4 + 256,
            "overlap": 0.1,
            "adaptive": False,
            "control": False,
        },
        "pipeline": {"n_workers": 1, "analyzer": "scope_stream.transport.stages:passthrough"},
        "store": {"root": str(root), "mosaic_downsample": 0},
    }
    with LocalPipeline(ScopeStreamConfig.model_validate({**base, "slide_id": "x"})) as pipe:
        assert pipe.endpoints is not None
        for name in ("pymmcore-plus", "pycromanager"):
            cfg = ScopeStreamConfig.model_validate({**base, "slide_id": f"bench-{name}"})
            core = build_virtual_core(cfg.microscope)
            try:
                backend = PymmcorePlusBackend(core) if name == "pymmcore-plus" else PycromanagerBackend(core)
                t0 = time.perf_counter()
                rep = ScanSession(cfg, backend, pipe.endpoints.frontend).run()
                dt = time.perf_counter() - t0
            finally:
                close_core(core)
            out[name] = {
                "tiles": rep.n_scan_tiles,
                "seconds": round(dt, 2),
                "tiles_per_s": round(rep.n_scan_tiles / dt, 2),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--follow", type=int, default=20)
    args = ap.parse_args()
    import os

    result: dict[str, Any] = {"cpus": os.cpu_count(), "frame_size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result["mda_callback_us"] = mda_callback_cost(args.size, args.frames)
        result["listener_to_pipeline"] = listener_to_pipeline(args.size, args.frames, root)
        result["follower_latency_ms"] = follower_latency(args.follow)
        result["virtual_scan"] = virtual_scan(root)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
