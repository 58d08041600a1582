"""The minimal scanner client (examples/scanner_client.py) against a real pipeline: tiles in, events and a signed
webhook out; a malformed tile is rejected with its reason while the slide goes on."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from scope_stream.callbacks import Callbacks, verify_signature
from scope_stream.config import ScopeStreamConfig
from scope_stream.store import SlideStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SECRET = "whsec_c2Nhbm5lci1zZWNyZXQtc2Nhbm5lci1zZWNyZXQ="  # Standard Webhooks: whsec_<base64>


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("scanner_client", REPO / "examples" / "scanner_client.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scanner_client"] = mod
    spec.loader.exec_module(mod)
    return mod


class Hooks:
    """The scanner's webhook receiver: a real HTTP server that checks the signature."""

    def __init__(self) -> None:
        self.got: list[tuple[bool, dict[str, Any]]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify_signature(SECRET, body, self.headers)
                outer.got.append((ok, json.loads(body)))
                self.send_response(204 if ok else 401)
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/scope-stream"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_scanner_pushes_tiles_gets_events_and_webhooks(tmp_path: Path) -> None:
    from scope_stream.transport import LocalPipeline

    example = load_example()
    hooks = Hooks()
    cfg = ScopeStreamConfig.model_validate(
        {
            "slide_id": "scanner-1",
            "pipeline": {"n_workers": 1, "analyzer": "scope_stream.transport.stages:threshold"},
            "store": {"root": str(tmp_path)},
            "callbacks": {
                "webhooks": [{"url": hooks.url, "events": ["scan.started", "slide.done"], "secret": SECRET}],
                "delivery_log": str(tmp_path / "deliveries.jsonl"),
            },
        }
    )
    try:
        with LocalPipeline(cfg, store_path=tmp_path / "scanner-1.zarr") as pipe:
            assert pipe.endpoints is not None
            with Callbacks(cfg, pipe.events_endpoint, slide_id="scanner-1") as callbacks:
                seen: list[str] = []  # the Python-callback side (pipeline.on) sees the same events
                callbacks.on("tile.done", lambda ev: seen.append(ev["tile_id"]))
                tiles = list(example.synthetic_tiles(4, size=96))
                summary, client = example.scan_slide(pipe.endpoints.frontend, pipe.events_endpoint, "scanner-1", tiles)
                # a broken tile: the header promises 64 bytes, the buffer holds 10 -> rejected, nothing stored
                bad = example.ScannerClient(pipe.endpoints.frontend)
                try:
                    bad.sock.send_multipart(
                        [
                            example.header(
                                "tile",
                                tile={
                                    "slide_id": "scanner-1",
                                    "tile_id": "short",
                                    "seq": 10,
                                    "x_um": 0,
                                    "y_um": 0,
                                    "pixel_size_um": 0.5,
                                    "dtype": "uint8",
                                    "shape": [8, 8],
                                },
                                sent_at=time.time(),
                            ),
                            b"\0" * 10,
                        ]
                    )
                    deadline = time.monotonic() + 10
                    while not bad.rejected and time.monotonic() < deadline:
                        bad._poll(100)
                finally:
                    bad.close()
                assert [r["reason"] for r in bad.rejected] == ["length"]
                deadline = time.monotonic() + 10
                while (len(hooks.got) < 2 or len(seen) < 4) and time.monotonic() < deadline:
                    time.sleep(0.05)
    finally:
        hooks.close()
    assert summary["n_tiles"] == 4 and summary["n_failed_tiles"] == 0
    assert client.rejected == []
    done = [e for t, e in client.events if t == "tile.done" and e["slide_id"] == "scanner-1"]
    assert sorted(e["tile_id"] for e in done) == [f"tile-{i:03d}" for i in range(4)]
    assert all(e["n_cells"] >= 1 for e in done)  # the dark 'nucleus' of every synthetic tile was found
    assert any(t == "slide.done" for t, _ in client.events)
    # webhooks: scan.started and slide.done, both signed and verified by the receiver
    topics = sorted(doc["topic"] for ok, doc in hooks.got if ok)
    assert topics == ["scan.started", "slide.done"] and all(ok for ok, _ in hooks.got)
    (slide_done,) = [doc for _, doc in hooks.got if doc["topic"] == "slide.done"]
    assert slide_done["event"]["summary"]["n_tiles"] == 4
    log_lines = [json.loads(x) for x in (tmp_path / "deliveries.jsonl").read_text().splitlines()]
    assert [x["outcome"] for x in log_lines] == ["delivered", "delivered"]
    assert sorted(seen) == [f"tile-{i:03d}" for i in range(4)]
    # the store holds the scanner's tiles at the positions it gave, and not the broken one
    store = SlideStore.open(tmp_path / "scanner-1.zarr")
    pos = {r["tile_id"]: (r["x_um"], r["y_um"]) for r in store.tile_positions(kind=None)}
    for tile_id, x, y, _, _ in tiles:
        assert pos[tile_id] == (x, y)
    assert "short" not in pos and len(pos) == 4
