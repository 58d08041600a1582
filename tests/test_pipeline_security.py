"""CurveZMQ on tcp: only authorised keys get through; unauthenticated peers are refused and counted."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import zmq
from pipeline_support import PASSTHROUGH, fast_config, make_tile, wait_subscribed

from scope_stream.store import SlideStore
from scope_stream.transport import LocalPipeline, PipelineError, TileSource
from scope_stream.transport.protocol import tile_frames
from scope_stream.transport.security import generate_keys

pytestmark = pytest.mark.timeout(120)


def test_beyond_loopback_needs_keys(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, host="0.0.0.0", n_workers=0)
    with pytest.raises(PipelineError, match="CurveZMQ"):
        LocalPipeline(cfg).start()


def test_curve_keys_admit_authorised_peers_only(tmp_path: Path) -> None:
    keys, rogue_keys = tmp_path / "keys", tmp_path / "rogue"
    generate_keys(keys)
    generate_keys(rogue_keys)  # valid CURVE keys, but not in keys/authorized
    cfg = fast_config(tmp_path, host="0.0.0.0", n_workers=1, curve_keys_dir=keys)
    with LocalPipeline(cfg, analyzer_spec=PASSTHROUGH) as p:
        assert p.endpoints is not None
        sub = p.subscribe("tile.done")  # subscribers need keys too (LocalPipeline uses the configured ones)
        wait_subscribed(p.subscribe("pipeline.stats"))
        ctx = zmq.Context()
        plain = ctx.socket(zmq.DEALER)  # no CURVE at all
        plain.setsockopt(zmq.LINGER, 0)
        plain.setsockopt(zmq.SNDTIMEO, 2000)
        plain.connect(p.endpoints.frontend)
        # once the broker has refused the handshake no peer takes the message (zmq.Again): refused either way
        with contextlib.suppress(zmq.Again):
            plain.send_multipart(tile_frames(make_tile(100, "sec")), copy=True)
        rogue = TileSource(p.endpoints.frontend, keys_dir=rogue_keys, send_timeout_s=1.0, context=ctx)
        rogue.send(make_tile(101, "sec"))
        with p.source() as src:  # the configured client keys
            for i in range(5):
                src.send(make_tile(i, "sec"))
            summary = src.finish("sec")
        deadline = time.monotonic() + 10
        while p.stats()["rejected"].get("auth", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = p.stats()
        assert sub.recv(5) is not None  # encrypted events reach an authorised subscriber
        sub.close()
        assert rogue.unacked == 1  # never acknowledged: the broker never saw it
        rogue.close()
        plain.close(0)
        ctx.term()
    assert stats["rejected"]["auth"] >= 2
    assert summary["n_tiles"] == 5
    store = SlideStore.open(cfg.store.root / "sec.zarr")
    assert sorted(store.tile_ids()) == [f"t{i}" for i in range(5)]
