"""Hostile messages against a real pipeline (spawned broker, worker and sink; real sockets; issue #21).

Each message is refused with a reason and a ``malformed: ...`` answer, never acknowledged, and the broker
keeps serving: a good tile sent afterwards is stored. Ids that would escape the store root write nothing
outside it, and stores that are not ours are never modified (and not retried forever).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zarr
import zmq
from pipeline_support import PASSTHROUGH, fast_config, make_tile

from scope_stream.store import SlideStore
from scope_stream.transport import LocalPipeline, SourceError
from scope_stream.transport.protocol import decode_header, tile_frames

pytestmark = pytest.mark.timeout(120)

RAW = "__RAW__"


def _tile_msg(raw: str | None = None, *, i: int = 1, slide: str = "hostile", top: bool = False, **tile: Any) -> list:
    """``[header, pixels]`` of a good tile with fields changed; ``RAW`` in a field is replaced by ``raw`` text."""
    frames = tile_frames(make_tile(i, slide))
    header = json.loads(frames[0])
    (header if top else header["tile"]).update(tile)
    text = json.dumps(header)
    if raw is not None:
        text = text.replace(json.dumps(RAW), raw)
    return [text.encode(), bytes(frames[1])]


def _request(type_: str, raw: str | None = None, **fields: Any) -> list:
    text = json.dumps({"v": 1, "type": type_, "req": "r1", **fields})
    if raw is not None:
        text = text.replace(json.dumps(RAW), raw)
    return [text.encode()]


# (name, frames, reason): sent to the frontend; each must be refused with that reason
FRONTEND_CASES = [
    ("deep-header", [b"[" * 100_000, b"x"], "depth"),
    ("deep-metadata", _tile_msg("[" * 5000 + "]" * 5000, metadata=RAW), "depth"),
    ("5000-digit-int", _tile_msg("9" * 5000, seq=RAW), "number"),
    ("x_um-1e400", _tile_msg("1e400", x_um=RAW), "number"),
    ("seq-1e400", _tile_msg("1e400", seq=RAW), "number"),
    ("nan-acquired_at", _tile_msg("NaN", acquired_at=RAW), "number"),
    ("nan-sent_at", _tile_msg("NaN", top=True, sent_at=RAW), "number"),
    ("infinity-in-metadata", _tile_msg('{"a": [1, Infinity]}', metadata=RAW), "number"),
    ("slide_id-list", _tile_msg(slide_id=[1]), "id"),
    ("tile_id-object", _tile_msg(tile_id={}), "id"),
    ("slide_id-int", _tile_msg(slide_id=5), "id"),
    ("seq-10**30", _tile_msg(str(10**30), seq=RAW), "number"),
    ("seq-2**60", _tile_msg(seq=2**60), "schema"),
    ("seq-negative", _tile_msg(seq=-1), "schema"),
    ("seq-float", _tile_msg(seq=1.5), "schema"),
    ("traversal-slide", _tile_msg(slide_id="../../x"), "id"),
    ("absolute-slide", _tile_msg(slide_id="/tmp/scope-stream-abs-escape"), "id"),
    ("dot-slide", _tile_msg(slide_id=".hidden"), "id"),
    ("traversal-tile", _tile_msg(tile_id="../t"), "id"),
    ("huge-metadata", _tile_msg(metadata={"blob": "x" * (3_900_000)}), "header"),
    ("scan-infinity", _request("scan", '{"a": Infinity}', slide_id="hostile", metadata=RAW), "number"),
    ("finish-nan", _request("finish", '{"a": NaN}', slide_id="hostile", summary=RAW), "number"),
    ("scan-traversal", _request("scan", slide_id="../../scan-escape", metadata={}), "id"),
    ("finish-object-id", _request("finish", slide_id={}, summary={}), "id"),
    ("req-object", _request("stats", req={"a": 1}), "schema"),
]

# (name, frames, reason): sent to the control socket
CONTROL_CASES = [
    ("deep", [b"{" * 50_000], "depth"),
    ("scan-infinity", _request("scan", '{"a": -Infinity}', slide_id="hostile", metadata=RAW), "number"),
    ("finish-nan", _request("finish", '{"n": NaN}', slide_id="hostile", summary=RAW), "number"),
    ("scan-traversal", _request("scan", slide_id="../../scan-escape", metadata={}), "id"),
    ("scan-absolute", _request("scan", slide_id="/tmp/scope-stream-scan-abs", metadata={}), "id"),
    ("big-int", _request("ping", "1" + "0" * 400, pad=RAW), "number"),
]


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalPipeline, Path]]:
    tmp = tmp_path_factory.mktemp("hostile") / "inner"  # so that ../../ still lands inside pytest's tmp tree
    tmp.mkdir()
    cfg = fast_config(tmp, n_workers=1, ack_timeout_ms=1000)
    cfg.store.root.mkdir(parents=True)
    with LocalPipeline(cfg, analyzer_spec=PASSTHROUGH) as p:
        yield p, tmp


def _dealer(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, f"hostile-{uuid.uuid4().hex[:8]}".encode())
    s.connect(endpoint)
    return s


def _replies(sock: zmq.Socket[Any], n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        if sock.poll(100, zmq.POLLIN):
            out.append(decode_header(sock.recv_multipart()[0]))
    return out


def _send_all(endpoint: str, cases: list[tuple[str, list, str]]) -> list[dict[str, Any]]:
    ctx = zmq.Context()
    try:
        replies = []
        for _name, frames, _reason in cases:  # one socket each: a reply belongs to its message
            s = _dealer(ctx, endpoint)
            s.send_multipart(frames)
            got = _replies(s, 1)
            assert not _replies(s, 1, timeout=0.03), "a second reply to one hostile message"
            replies.append(got[0] if got else {})
            s.close(0)
        return replies
    finally:
        ctx.term()


def _good_tile_is_stored(p: LocalPipeline, tmp: Path, i: int) -> None:
    with p.source() as src:
        src.send(make_tile(i, "good"))
        src.flush(30)
    deadline = time.monotonic() + 30
    while p.stats()["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"t{i}" in SlideStore.open(tmp / "scans" / "good.zarr").tile_ids()


def test_hostile_messages_are_refused_and_the_broker_keeps_serving(pipe: tuple[LocalPipeline, Path]) -> None:
    p, tmp = pipe
    assert p.endpoints is not None and p.broker_proc is not None
    outside_before = {q for q in tmp.parent.parent.rglob("*") if not q.is_relative_to(tmp / "scans")}
    for endpoint, cases in ((p.endpoints.frontend, FRONTEND_CASES), (p.endpoints.control, CONTROL_CASES)):
        replies = _send_all(endpoint, cases)
        for (name, _frames, reason), reply in zip(cases, replies, strict=True):
            assert reply.get("type") == "reject", (name, reply)  # never acknowledged
            assert reply["reason"] == reason, (name, reply)
            assert reply["detail"].startswith(f"malformed: {reason}: "), (name, reply)
            if reply.get("req") is not None:
                assert reply["req"] == "r1"
        assert p.broker_proc.is_alive()
    stats = p.stats()
    assert stats["rejected_total"] >= len(FRONTEND_CASES) + len(CONTROL_CASES)
    for reason in ("depth", "number", "id", "schema", "header"):
        assert stats["rejected"].get(reason, 0) > 0, stats["rejected"]
    assert stats["accepted"] == 0 and "internal" not in stats["rejected"]
    _good_tile_is_stored(p, tmp, 7)
    # nothing was created outside the store root by the traversal ids
    outside_after = {q for q in tmp.parent.parent.rglob("*") if not q.is_relative_to(tmp / "scans")}
    assert outside_after == outside_before
    assert not Path("/tmp/scope-stream-abs-escape.zarr").exists()
    assert not Path("/tmp/scope-stream-scan-abs.zarr").exists()
    assert sorted(q.name for q in (tmp / "scans").iterdir()) == ["good.zarr"]


def test_foreign_stores_are_never_modified_nor_retried(pipe: tuple[LocalPipeline, Path]) -> None:
    p, tmp = pipe
    root = tmp / "scans"
    v3 = zarr.open_group(str(root / "foreign.zarr"), mode="w", zarr_format=3)
    v3.attrs["owner"] = "another lab"
    v3.create_array("data", shape=(4,), dtype="uint8")[:] = [1, 2, 3, 4]
    v2 = zarr.open_group(str(root / "legacy.zarr"), mode="w", zarr_format=2)
    v2.attrs["owner"] = "an older tool"
    (root / "plain.zarr").write_bytes(b"not a folder")
    before = {name: _tree_digest(root / name) for name in ("foreign.zarr", "legacy.zarr")}
    plain = (root / "plain.zarr").read_bytes()
    with p.source() as src:
        for k, slide in enumerate(("foreign", "legacy", "plain")):
            src.send(make_tile(20 + k, slide))
        src.flush(30)
        deadline = time.monotonic() + 20
        while p.stats()["counts"].get("store_refused", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(SourceError, match="not a scope-stream slide store"):
            src.finish("foreign", timeout=20)
    stats = p.stats()
    assert stats["counts"]["store_refused"] == 3, stats["counts"]
    assert stats["counts"].get("store_errors", 0) == 0  # refused once, not retried every second
    assert stats["pending"] == 0
    assert {name: _tree_digest(root / name) for name in ("foreign.zarr", "legacy.zarr")} == before
    assert (root / "plain.zarr").read_bytes() == plain
    assert p.broker_proc is not None and p.broker_proc.is_alive()
    _good_tile_is_stored(p, tmp, 8)


def test_a_full_spool_refuses_with_a_reason_and_the_temporary_folder_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool_tmp = tmp_path / "tmp"
    spool_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool_tmp))  # the spawned broker makes its temporary spool there
    cfg = fast_config(tmp_path, n_workers=0, memory_queue_tiles=2, spool_max_bytes=120_000)
    p = LocalPipeline(cfg, analyzer_spec=PASSTHROUGH).start()
    try:
        assert p.endpoints is not None and p.broker_proc is not None
        ctx = zmq.Context()
        s = _dealer(ctx, p.endpoints.frontend)
        statuses = []
        for i in range(3):  # two in memory, one on disk (small tiles: 12 KiB)
            s.send_multipart(_tile_msg(i=i, tile_id=f"small{i}"))
            statuses.append(_replies(s, 1)[0].get("status"))
        assert statuses == ["queued", "queued", "spooled"]
        assert [q.name for q in spool_tmp.iterdir() if q.name.startswith("scope-stream-spool-")]
        # 200 KB of metadata: header bytes count, so the spool (120 KB) cannot take it
        s.send_multipart(_tile_msg(i=9, tile_id="fat", metadata={"blob": "x" * 200_000}))
        reply = _replies(s, 1)[0]
        assert reply["type"] == "reject" and reply["reason"] == "full" and reply["tile_id"] == "fat", reply
        assert "broker full" in reply["detail"]
        stats = p.stats()
        assert stats["rejected"]["full"] == 1 and stats["accepted"] == 3 and p.broker_proc.is_alive()
        s.close(0)
        ctx.term()
    finally:
        p.stop(drain=False, timeout=20)
    assert not [q for q in spool_tmp.iterdir() if q.name.startswith("scope-stream-spool-")]


def test_control_client_sees_the_reason(pipe: tuple[LocalPipeline, Path]) -> None:
    p, _ = pipe
    from scope_stream.transport import PipelineError

    with pytest.raises(PipelineError, match="malformed: id"):
        p.start_scan("../../escape")
    assert p._control is not None
    assert p._control.request("ping")["type"] == "pong"  # the broker still answers
