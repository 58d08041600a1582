"""The pipeline with real processes and sockets: streaming, events, rejection of bad messages, backpressure."""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zmq
from pipeline_support import PASSTHROUGH, THRESHOLD, collect, fast_config, make_tile, wait_subscribed

from scope_stream.store import SlideStore
from scope_stream.transport import BackpressureError, LocalPipeline
from scope_stream.transport.protocol import encode, tile_frames

pytestmark = pytest.mark.timeout(120)

MAX_TILE = 256 * 1024
MAX_MSG = 512 * 1024


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("stream")
    cfg = fast_config(tmp, max_tile_bytes=MAX_TILE, max_message_bytes=MAX_MSG)
    with LocalPipeline(cfg, analyzer_spec=THRESHOLD) as p:
        yield p


def test_stream_out_of_order_and_resent_tiles_are_stored_once(pipe: LocalPipeline) -> None:
    sub = pipe.subscribe()
    wait_subscribed(sub)
    tiles = [make_tile(i, "order") for i in range(30)]
    order = list(range(30))
    random.Random(1).shuffle(order)  # out-of-order arrival
    with pipe.source() as src:
        src.start_scan("order", {"objective": "20x", "region_um": [0, 0, 320, 96]})
        for i in order:
            src.send(tiles[i])
        src.flush()
        for i in (3, 7):  # a source that resends (after a timeout, say): harmless
            src.send(tiles[i])
        src.flush()
        src.send(tiles[7])
        summary = src.finish("order", {"operator": "test"})
    events = collect(sub, lambda ev: any(t == "slide.done" for t, _ in ev))
    sub.close()

    store = SlideStore.open(pipe.config.store.root / "order.zarr")
    assert sorted(store.tile_ids()) == sorted(t.tile_id for t in tiles)
    assert len(store) == 30 and store.status == "done"
    assert store.metadata["objective"] == "20x"
    for t in (tiles[0], tiles[29]):
        assert store.read_tile(t.tile_id).same_as(t)
    assert summary["n_tiles"] == 30 and summary["operator"] == "test"
    assert summary["n_cells"] == store.n_cells >= 30
    topics = Counter(t for t, _ in events)
    done = [p for t, p in events if t == "tile.done"]
    assert sorted(p["tile_id"] for p in done) == sorted(t.tile_id for t in tiles)  # each exactly once
    assert all(p["latency_ms"] is not None and p["latency_ms"] >= 0 and p["n_cells"] >= 1 for p in done)
    assert topics["cell.flagged"] == sum(1 for c in store.cells() if c["flagged"])
    assert topics["scan.started"] == 1 and topics["slide.done"] == 1
    flagged = next(p for t, p in events if t == "cell.flagged")
    assert {"cell_id", "reasons", "score", "label", "x_um", "y_um", "probabilities", "uncertainty"} <= set(flagged)
    stats = pipe.stats()
    assert stats["counts"]["duplicates_in"] >= 3 and stats["slides"]["order"]["finished"]


def test_reimage_tiles(pipe: LocalPipeline) -> None:
    sub = pipe.subscribe("reimage.")
    wait_subscribed(pipe.subscribe("pipeline.stats"))
    with pipe.source() as src:
        src.send(make_tile(0, "re"))
        src.send(make_tile(1, "re", kind="reimage"))
        src.finish("re")
    ev = sub.recv(10)
    sub.close()
    assert ev is not None and ev[0] == "reimage.done" and ev[1]["tile_id"] == "t1"
    assert ev[1]["cells"] and {"cell_id", "label", "x_um", "y_um", "flagged"} <= set(ev[1]["cells"][0])
    store = SlideStore.open(pipe.config.store.root / "re.zarr")
    assert store.tile_ids(kind="reimage") == ["t1"] and store.tile_ids(kind="scan") == ["t0"]


def _raw(pipe: LocalPipeline) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    assert pipe.endpoints is not None
    s.connect(pipe.endpoints.frontend)
    return ctx, s


def test_bad_messages_are_rejected_counted_and_the_stream_goes_on(pipe: LocalPipeline) -> None:
    before = pipe.stats()
    ctx, raw = _raw(pipe)
    good = make_tile(0, "bad")
    hdr = json.loads(tile_frames(good)[0])
    pixels = good.pixels.tobytes()

    def with_tile(**change: object) -> bytes:
        h = json.loads(json.dumps(hdr))
        h["tile"].update(change)
        return json.dumps(h).encode()

    wrong_version = json.dumps({**hdr, "v": 2}).encode()
    big = np.zeros((300, 300, 3), np.uint8)  # 270 kB > max_tile_bytes (256 kB), < socket limit (512 kB)
    bad = [
        ([b"{not json"], "header"),  # malformed
        ([wrong_version, pixels], "version"),
        ([with_tile(dtype="float64"), pixels], "dtype"),
        ([with_tile(), pixels[:-100]], "length"),  # truncated
        ([with_tile(shape=[300, 300, 3]), big.tobytes()], "size"),  # oversized
        ([with_tile(), pixels, b"extra"], "frames"),
        ([encode("launch_missiles")], "type"),
        ([with_tile(x_um="left"), pixels], "schema"),
    ]
    with pipe.source() as src:
        for i, (frames, _) in enumerate(bad):
            raw.send_multipart(frames)
            src.send(make_tile(100 + i, "bad"))  # the stream continues between bad messages
        replies = []
        while len(replies) < len(bad) and raw.poll(5000):
            replies.append(json.loads(raw.recv_multipart()[0]))
        assert [r["type"] for r in replies] == ["reject"] * len(bad)
        assert [r["reason"] for r in replies] == [reason for _, reason in bad]
        # a frame over the socket's ZMQ_MAXMSGSIZE: libzmq drops that connection, the broker carries on
        raw.send_multipart([with_tile(), b"\0" * (MAX_MSG + 1)])
        src.send(make_tile(200, "bad"))
        src.finish("bad")
    raw.close(0)
    ctx.term()
    after = pipe.stats()
    for _, reason in bad:
        assert after["rejected"].get(reason, 0) - before["rejected"].get(reason, 0) == 1, reason
    assert after["counts"].get("disconnects_frontend", 0) > before["counts"].get("disconnects_frontend", 0)
    store = SlideStore.open(pipe.config.store.root / "bad.zarr")
    assert sorted(store.tile_ids()) == sorted([f"t{100 + i}" for i in range(len(bad))] + ["t200"])


def test_slow_sink_backpressure_and_spool_lose_nothing(tmp_path: Path) -> None:
    """A sink far slower than the source: tiles wait in memory, then on disk, then the source is told to wait."""
    tile_bytes = 64 * 64 * 3
    cfg = fast_config(
        tmp_path,
        n_workers=1,
        tile_hwm=2,
        worker_credit=2,
        memory_queue_tiles=3,
        store_backlog_tiles=2,
        spool_dir=tmp_path / "spool",
        spool_max_bytes=6 * (tile_bytes + 1024),
        sink_credit=2,
    )
    n = 30
    with LocalPipeline(cfg, analyzer_spec=PASSTHROUGH, sink_delay_ms=40) as p:
        sub = p.subscribe("pipeline.stats")
        wait_subscribed(sub)
        src = p.source(send_timeout_s=0.2)
        pressure = 0
        depths = []
        deadline = time.monotonic() + 60
        for i in range(n):
            while time.monotonic() < deadline:
                try:
                    src.send(make_tile(i, "slow"))
                    break
                except BackpressureError:
                    pressure += 1  # the caller is told, keeps the tile and slows down
                    depths.append(src.queue_depth)
        src.finish("slow")
        src.close()
        seen = collect(sub, lambda ev: False, timeout=0.5)  # the stats events buffered while we sent
        peak = max((payload["queue_depth"] for _, payload in seen), default=0)
        sub.close()
        stats = p.stats()
    assert pressure > 0 and max(depths) >= 3
    assert stats["counts"]["spooled"] > 0  # some tiles waited on disk
    assert stats["stored"] == n and stats["queue_depth"] == 0
    assert not any((tmp_path / "spool").glob("*.tile"))
    assert peak > 0  # the depth was visible in the pipeline.stats events
    store = SlideStore.open(cfg.store.root / "slow.zarr")
    assert sorted(store.tile_ids()) == sorted(f"t{i}" for i in range(n)) and len(store) == n


@pytest.mark.skipif(sys.platform == "win32", reason="ipc:// is POSIX-only")
def test_ipc_transport(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, transport="ipc", n_workers=1)
    with LocalPipeline(cfg, store_path=tmp_path / "fixed.zarr", analyzer_spec=PASSTHROUGH) as p:
        assert p.endpoints is not None and p.endpoints.frontend.startswith("ipc://")
        with p.source() as src:
            for i in range(5):
                src.send(make_tile(i, "ipc"))
        assert p.drain()["ipc"]["n_tiles"] == 5
    assert len(SlideStore.open(tmp_path / "fixed.zarr")) == 5  # one fixed store path
