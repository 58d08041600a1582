"""Transport benchmark: the scope-stream pipeline next to raw pyzmq PUSH/PULL, measured in the same run.

Prints one JSON object (``scope-stream bench`` collects it). Tiles are 2048x2048x3 uint8 (12.6 MB) by
default. Three measurements:

* ``raw_push_pull`` -- a PUSH in this process to a PULL in a spawned process, tcp loopback, zero-copy,
  SNDHWM/RCVHWM = ``tile_hwm``: the ceiling for moving tiles between two processes here;
* ``pipeline`` -- TileSource -> broker -> N passthrough workers -> broker -> sink -> slide store (tile
  pixels not kept: ``store.save_tiles: false``), timed from the first send to the last ``tile.done``;
  plus per-tile latency (source send -> committed in the store) under that load, and paced (one tile at
  a time);
* ``pipeline_store_pixels`` -- the same with the tile pixels written to the OME-Zarr store
  (blosc-lz4), i.e. the sink's disk path included.

Usage: ``python benchmarks/transport.py [--tiles 200] [--workers 2] [--size 2048] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scope_stream.config import ScopeStreamConfig  # noqa: E402
from scope_stream.transport.events import EventSubscriber  # noqa: E402
from scope_stream.transport.pipeline import LocalPipeline  # noqa: E402
from scope_stream.transport.protocol import tile_frames  # noqa: E402
from scope_stream.vocabulary import Tile  # noqa: E402


def make_tiles(n_distinct: int, size: int, channels: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (size, size, channels) if channels > 1 else (size, size)
    return [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(n_distinct)]


def tile(pixels: np.ndarray, slide: str, i: int) -> Tile:
    return Tile(pixels, slide_id=slide, tile_id=f"t{i}", seq=i, x_um=float(i), y_um=0.0, pixel_size_um=0.5)


# ----------------------------------------------------------------------------------- raw
def _puller(endpoint_q: Any, result_q: Any, n: int, hwm: int, transport: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, hwm)
    if transport == "ipc":
        endpoint = f"ipc://{tempfile.mkdtemp(prefix='scope-stream-raw-')}/pull"
        s.bind(endpoint)
    else:
        endpoint = f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}"
    endpoint_q.put(endpoint)
    nbytes = 0
    for _ in range(n):
        frames = s.recv_multipart(copy=False)
        nbytes += len(frames[-1])
    result_q.put({"t_end": time.time(), "bytes": nbytes})
    s.close(0)
    ctx.term()


def raw_push_pull(pixels: list[np.ndarray], n: int, hwm: int, transport: str = "tcp") -> dict[str, Any]:
    mpc = mp.get_context("spawn")
    eq, rq = mpc.Queue(), mpc.Queue()
    proc = mpc.Process(target=_puller, args=(eq, rq, n, hwm, transport))
    proc.start()
    endpoint = eq.get(timeout=60)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.LINGER, -1)
    s.connect(endpoint)
    time.sleep(0.2)  # let it connect
    frames = [tile_frames(tile(p, "raw", i)) for i, p in enumerate(pixels)]
    t0 = time.time()
    for i in range(n):
        s.send_multipart(frames[i % len(frames)], copy=False)
    res = rq.get(timeout=600)
    proc.join(30)
    s.close()
    ctx.term()
    secs = res["t_end"] - t0
    return {
        "tiles": n,
        "transport": transport,
        "seconds": round(secs, 3),
        "tiles_per_s": round(n / secs, 2),
        "mb_per_s": round(res["bytes"] / secs / 1e6, 1),
    }


# ------------------------------------------------------------------------------ pipeline
def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    a = np.asarray(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p95": round(float(np.percentile(a, 95)), 2),
        "max": round(float(a.max()), 2),
    }


def pipeline(
    pixels: list[np.ndarray],
    n: int,
    workers: int,
    save_tiles: bool,
    transport: str,
    paced: int,
    hwm: int,
    spool_bytes: int = 0,
) -> dict[str, Any]:
    cfg = ScopeStreamConfig()
    tmp = Path(tempfile.mkdtemp(prefix="scope-stream-bench-"))
    cfg.store.root = tmp / "scans"
    cfg.store.save_tiles = save_tiles
    cfg.pipeline.transport = transport  # type: ignore[assignment]
    cfg.pipeline.device = "cpu"
    cfg.pipeline.tile_hwm = hwm
    cfg.pipeline.n_workers = workers
    cfg.pipeline.spool_dir = tmp / "spool"
    cfg.pipeline.spool_max_bytes = spool_bytes  # 0 (default here): a saturating source is held back, not spooled
    tile_bytes = pixels[0].nbytes
    with LocalPipeline(cfg, analyzer_spec="scope_stream.transport.stages:passthrough") as p:
        sub = EventSubscriber(p.events_endpoint, ["tile.done", "pipeline.stats"])
        if sub.wait_for(lambda t, _: t == "pipeline.stats", 20) is None:
            raise RuntimeError("no events from the pipeline")
        done: dict[str, float] = {}
        latencies: dict[str, float] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                ev = sub.recv(0.1)
                if ev is None or ev[0] != "tile.done":
                    continue
                key = f"{ev[1]['slide_id']}/{ev[1]['tile_id']}"
                with lock:
                    done[key] = time.time()
                    latencies[key] = float(ev[1]["latency_ms"])

        th = threading.Thread(target=listen, daemon=True)
        th.start()
        src = p.source()

        def wait_for(keys: list[str], timeout: float = 600) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with lock:
                    if all(k in done for k in keys):
                        return
                time.sleep(0.002)
            raise RuntimeError(f"{sum(k not in done for k in keys)} tiles never reported done")

        # warm-up
        for i in range(min(4, n)):
            src.send(tile(pixels[i % len(pixels)], "warm", i))
        wait_for([f"warm/t{i}" for i in range(min(4, n))])
        # saturated: send as fast as the pipeline accepts
        t0 = time.time()
        for i in range(n):
            src.send(tile(pixels[i % len(pixels)], "load", i))
        keys = [f"load/t{i}" for i in range(n)]
        wait_for(keys)
        t_end = max(done[k] for k in keys)
        secs = t_end - t0
        loaded = [latencies[k] for k in keys]
        # paced: one tile at a time
        paced_lat = []
        for i in range(paced):
            src.send(tile(pixels[i % len(pixels)], "paced", i))
            wait_for([f"paced/t{i}"])
            paced_lat.append(latencies[f"paced/t{i}"])
        stats = p.stats()
        src.close()
        stop.set()
        th.join(2)
        sub.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "tiles": n,
        "workers": workers,
        "transport": transport,
        "save_tiles": save_tiles,
        "seconds": round(secs, 3),
        "tiles_per_s": round(n / secs, 2),
        "mb_per_s": round(n * tile_bytes / secs / 1e6, 1),
        "latency_ms_loaded": _percentiles(loaded),
        "latency_ms_paced": _percentiles(paced_lat),
        "spooled": stats["counts"].get("spooled", 0),
        "rejected": stats["rejected_total"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, default=200)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hwm", type=int, default=8)
    ap.add_argument("--paced", type=int, default=20)
    ap.add_argument("--transport", choices=["tcp", "ipc"], default="tcp")
    ap.add_argument("--no-store-pixels", action="store_true", help="skip the pipeline_store_pixels run")
    ap.add_argument("--spool-gb", type=float, default=0.0, help="let the broker spool to disk (default: off)")
    ap.add_argument("--quick", action="store_true", help="30 tiles, 5 paced (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.tiles, args.paced = 30, 5
    pixels = make_tiles(4, args.size, args.channels)
    out: dict[str, Any] = {
        "benchmark": "transport",
        "tile_shape": list(pixels[0].shape),
        "tile_dtype": "uint8",
        "tile_mb": round(pixels[0].nbytes / 1e6, 2),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out["raw_push_pull"] = raw_push_pull(pixels, args.tiles, args.hwm, args.transport)
    spool = int(args.spool_gb * 1e9)
    out["pipeline"] = pipeline(pixels, args.tiles, args.workers, False, args.transport, args.paced, args.hwm, spool)
    out["ratio_pipeline_vs_raw"] = round(out["pipeline"]["tiles_per_s"] / out["raw_push_pull"]["tiles_per_s"], 3)
    if not args.no_store_pixels:
        out["pipeline_store_pixels"] = pipeline(
            pixels, args.tiles, args.workers, True, args.transport, args.paced, args.hwm, spool
        )
        out["ratio_store_pixels_vs_raw"] = round(
            out["pipeline_store_pixels"]["tiles_per_s"] / out["raw_push_pull"]["tiles_per_s"], 3
        )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
