"""``scope-stream scan`` / ``replay`` / ``reimage`` from the command line (a local pipeline is started)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from scope_stream.acquire.listen import write_replay_folder
from scope_stream.callbacks import new_secret, verify_signature
from scope_stream.cli import app
from scope_stream.store import SlideStore
from scope_stream.vocabulary import Tile

SECRET = new_secret()
pytestmark = pytest.mark.slow


def write_config(path: Path, root: Path, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "slide_id": "cli-slide",
        "microscope": {"camera_width": 64, "camera_height": 64, "realtime": False},
        "scan": {
            "x0_um": 1000,
            "y0_um": 1000,
            "x1_um": 1080,
            "y1_um": 1080,
            "overlap": 0.1,
            "reimage_budget": 2,
            "results_timeout_s": 60,
        },
        "pipeline": {
            "n_workers": 1,
            "analyzer": "scan_helpers:flag_listed",
            "stage_options": {"flag_tile_ids": ["s000001"]},
        },
        "store": {"root": str(root)},
    }
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_scan_virtual_with_webhook(tmp_path: Path) -> None:
    got: list[tuple[bool, dict[str, Any]]] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((verify_signature(SECRET, body, self.headers), json.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    cfg = write_config(
        tmp_path / "scan.yaml",
        tmp_path,
        callbacks={"webhooks": [{"url": url, "events": ["slide.done"], "secret": SECRET}]},
    )
    try:
        result = CliRunner().invoke(app, ["scan", "--config", str(cfg), "--backend", "virtual", "--json"])
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["n_scan_tiles"] == 9 and report["n_reimage_tiles"] == 1 and report["backend"] == "virtual"
    assert report["reimages"][0]["flag"]["tile_id"] == "s000001"
    store = SlideStore.open(tmp_path / "cli-slide.zarr")
    assert store.status == "done" and len(store.tile_ids()) == 10
    assert [(ok, doc["topic"]) for ok, doc in got] == [(True, "slide.done")]
    assert (tmp_path / "webhook-deliveries.jsonl").is_file()


def test_cli_replay_folder_and_bad_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tiles = [
        Tile(
            rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
            slide_id="x",
            tile_id=f"f{i}",
            seq=i,
            x_um=100.0 * i,
            y_um=0.0,
            pixel_size_um=0.5,
        )
        for i in range(3)
    ]
    folder = write_replay_folder(tiles, tmp_path / "tiles")
    cfg = write_config(tmp_path / "r.yaml", tmp_path, pipeline={"n_workers": 1, "analyzer": "scan_helpers:flag_listed"})
    runner = CliRunner()
    result = runner.invoke(
        app, ["replay", str(folder), "--config", str(cfg), "--slide-id", "rp", "--rate", "50", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["n_scan_tiles"] == 3 and report["summary"]["n_tiles"] == 3
    assert sorted(SlideStore.open(tmp_path / "rp.zarr").tile_ids()) == ["f0", "f1", "f2"]

    # errors are a clear message (rich wraps it at the terminal width), not a traceback
    def said(result: Any) -> str:
        return " ".join(result.output.split())

    bad = runner.invoke(app, ["replay", str(tmp_path / "nope"), "--config", str(cfg)])
    assert bad.exit_code == 2 and "does not exist" in said(bad) and "Traceback" not in bad.output
    bad = runner.invoke(app, ["scan", "--config", str(cfg), "--backend", "teleporter"])
    assert bad.exit_code == 2 and "--backend must be one of" in said(bad)
    bad = runner.invoke(app, ["reimage", "1", "2", "--control", "tcp://127.0.0.1:9", "--timeout", "0.3"])
    assert bad.exit_code == 2 and "timeout" in said(bad)
