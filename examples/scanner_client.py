"""A minimal slide-scanner client for scope-stream: push your own tiles, receive the results as events.

It speaks the documented wire protocol (docs/protocol.md) with nothing but pyzmq, json and numpy, so it
doubles as a reference for clients in other languages (C#, Java, C++: any ZeroMQ binding):

* a DEALER socket to the pipeline's **frontend**: ``scan`` (announce the slide), one ``tile`` message per
  field -- ``[JSON header, raw pixels]`` -- each answered by an ``ack`` (or a ``reject`` with a reason),
  and ``finish``, answered by ``finished`` with the slide summary once every tile is stored;
* a SUB socket to the **events** endpoint: ``tile.done``, ``cell.flagged``, ``slide.done``... as
  ``[topic, JSON]``.

Run it against a pipeline (``scope-stream run`` prints its endpoints)::

    python examples/scanner_client.py --frontend tcp://127.0.0.1:5555 --events tcp://127.0.0.1:5558 \
        --slide my-slide [--folder tiles/]        # a folder with tiles.csv (file,x_um,y_um,pixel_size_um)

Without ``--folder`` it sends a few synthetic tiles. The pipeline's reply to each request is matched
by ``req``; tiles are acknowledged by ``(slide_id, tile_id)``; at most ``window`` tiles are in flight.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

PROTOCOL_VERSION = 1


def header(type_: str, **fields: Any) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, "type": type_, **fields}).encode("utf-8")


class ScannerClient:
    """Push tiles of one slide into a scope-stream pipeline and collect its events."""

    def __init__(self, frontend: str, events: str | None = None, *, window: int = 8, timeout_s: float = 60.0) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, window + 1)  # tiles are big: keep ZeroMQ's own queue small
        self.sock.connect(frontend)
        self.window = window
        self.timeout_s = timeout_s
        self.unacked: dict[str, float] = {}
        self.rejected: list[dict[str, Any]] = []
        self.replies: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        self._stop = threading.Event()
        self._sub_thread: threading.Thread | None = None
        self._subscribed = threading.Event()
        if events is not None:
            self._sub_thread = threading.Thread(target=self._listen, args=(events,), daemon=True)
            self._sub_thread.start()
            self._subscribed.wait(5.0)

    # ---- events (SUB)
    def _listen(self, endpoint: str) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")  # every topic; b"cell." would give cell.flagged only
        monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sub.connect(endpoint)
        if monitor.poll(5000):
            monitor.recv_multipart()
            time.sleep(0.05)  # the subscription travels right after the handshake
        self._subscribed.set()
        while not self._stop.is_set():
            if not sub.poll(100):
                continue
            topic, body = sub.recv_multipart()
            event = json.loads(body)
            self.events.append((topic.decode(), event))
            if self.on_event is not None:
                self.on_event(topic.decode(), event)
        sub.disable_monitor()
        monitor.close(0)
        sub.close(0)

    # ---- replies (DEALER)
    def _poll(self, timeout_ms: int) -> None:
        if not self.sock.poll(timeout_ms):
            return
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = json.loads(frames[0])
            if reply["type"] == "ack" and "tile_id" in reply:
                self.unacked.pop(reply["tile_id"], None)
            elif reply["type"] == "reject":
                self.rejected.append(reply)
                self.unacked.pop(str(reply.get("tile_id")), None)
                if reply.get("req") is not None:
                    self.replies[str(reply["req"])] = reply
            if reply.get("req") is not None:
                self.replies[str(reply["req"])] = reply

    def _request(self, type_: str, **fields: Any) -> dict[str, Any]:
        req = f"{type_}-{time.monotonic_ns()}"
        self.sock.send(header(type_, req=req, **fields))
        deadline = time.monotonic() + self.timeout_s
        while req not in self.replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to {type_!r} within {self.timeout_s} s")
            self._poll(50)
        reply = self.replies.pop(req)
        if reply["type"] == "reject":
            raise RuntimeError(f"{type_} refused: {reply.get('reason')}: {reply.get('detail')}")
        return reply

    # ---- the scanner's side of a slide
    def start_scan(self, slide_id: str, **metadata: Any) -> None:
        self._request("scan", slide_id=slide_id, metadata=metadata)

    def send_tile(
        self,
        slide_id: str,
        tile_id: str,
        seq: int,
        pixels: np.ndarray,
        *,
        x_um: float,
        y_um: float,
        pixel_size_um: float,
        z_um: float = 0.0,
        objective: str = "",
        kind: str = "scan",
    ) -> None:
        """Send one tile; (x_um, y_um) is the stage position of the tile's CENTRE, y growing with image row."""
        while len(self.unacked) >= self.window:  # credit: wait for acknowledgements
            self._poll(100)
        pixels = np.ascontiguousarray(pixels)
        tile = {
            "slide_id": slide_id,
            "tile_id": tile_id,
            "seq": seq,
            "x_um": x_um,
            "y_um": y_um,
            "z_um": z_um,
            "pixel_size_um": pixel_size_um,
            "objective": objective,
            "acquired_at": time.time(),
            "kind": kind,
            "metadata": {"scanner": "example"},
            "dtype": pixels.dtype.name,  # uint8, uint16 or float32, native (little-endian) byte order
            "shape": list(pixels.shape),  # (H, W) or (H, W, 3)
        }
        self.sock.send_multipart([header("tile", tile=tile, sent_at=time.time()), pixels.data], copy=False)
        self.unacked[tile_id] = time.monotonic()
        self._poll(0)

    def finish(self, slide_id: str, **summary: Any) -> dict[str, Any]:
        """Wait for every tile's acknowledgement, then for the stored slide; the slide summary."""
        deadline = time.monotonic() + self.timeout_s
        while self.unacked and time.monotonic() < deadline:
            self._poll(100)
        return dict(self._request("finish", slide_id=slide_id, summary=summary).get("summary", {}))

    def wait_for(self, topic: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(t == topic and predicate(e) for t, e in list(self.events)):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._stop.set()
        if self._sub_thread is not None:
            self._sub_thread.join(2.0)
        self.sock.close(0)
        self.ctx.term()


# ------------------------------------------------------------------------------ tiles to send
def synthetic_tiles(n: int = 4, size: int = 96, seed: int = 0) -> Iterator[tuple[str, float, float, float, np.ndarray]]:
    """(tile_id, x_um, y_um, pixel_size_um, pixels): pale fields with one dark 'nucleus' each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        img = np.full((size, size, 3), (235, 215, 200), np.uint8)
        r, c = rng.integers(20, size - 20, 2)
        blob = (yy - r) ** 2 + (xx - c) ** 2 < 64
        img[blob] = (90, 40, 120)
        yield f"tile-{i:03d}", 1000.0 + 45.0 * i, 1000.0, 0.5, img


def folder_tiles(folder: Path) -> Iterator[tuple[str, float, float, float, np.ndarray]]:
    """Tiles of a folder with ``tiles.csv`` (file, x_um, y_um, pixel_size_um)."""
    from PIL import Image

    with (folder / "tiles.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            with Image.open(folder / row["file"]) as im:
                img = np.asarray(im.convert("RGB"))
            yield Path(row["file"]).stem, float(row["x_um"]), float(row["y_um"]), float(row["pixel_size_um"]), img


def scan_slide(
    frontend: str,
    events: str | None,
    slide_id: str,
    tiles: Iterable[tuple[str, float, float, float, np.ndarray]],
    *,
    print_events: bool = False,
) -> tuple[dict[str, Any], ScannerClient]:
    """Announce, send every tile, finish; returns (the slide summary, the client with its events)."""
    client = ScannerClient(frontend, events)
    if print_events:
        client.on_event = lambda topic, ev: print(topic, json.dumps(ev)[:200], flush=True)
    try:
        client.start_scan(slide_id, scanner="examples/scanner_client.py")
        for seq, (tile_id, x, y, px, img) in enumerate(tiles):
            client.send_tile(slide_id, tile_id, seq, img, x_um=x, y_um=y, pixel_size_um=px, objective="20x")
        summary = client.finish(slide_id)
        if events is not None:
            client.wait_for("slide.done", lambda e: e.get("slide_id") == slide_id, 10.0)
    finally:
        client.close()
    return summary, client


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frontend", required=True, help="the pipeline's frontend endpoint")
    ap.add_argument("--events", help="the pipeline's events endpoint (to print results)")
    ap.add_argument("--slide", default="scanner-slide", help="slide id")
    ap.add_argument("--folder", type=Path, help="folder with tiles.csv (file,x_um,y_um,pixel_size_um) and images")
    ap.add_argument("--n", type=int, default=4, help="synthetic tiles to send without --folder")
    args = ap.parse_args(argv)
    tiles = folder_tiles(args.folder) if args.folder else synthetic_tiles(args.n)
    summary, client = scan_slide(args.frontend, args.events, args.slide, tiles, print_events=True)
    print("slide summary:", json.dumps(summary))
    if client.rejected:
        print("rejected:", client.rejected, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
