"""Wire protocol v1: encoding, validation of every field, zero-copy, spool, security helpers, source backpressure."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_stream.transport.protocol import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    ProtocolError,
    Rejections,
    as_buffer,
    decode_header,
    encode,
    parse_result,
    parse_tile,
    result_frames,
    tile_frames,
)
from scope_stream.transport.security import (
    ClientSecurity,
    SecurityError,
    ServerSecurity,
    add_client,
    check_bind_allowed,
    generate_keys,
    is_loopback,
)
from scope_stream.transport.source import BackpressureError, TileSource
from scope_stream.transport.spool import Spool, SpoolFull
from scope_stream.vocabulary import Cell, CellKind, Tile, TileResult

LIMIT = 1 << 20


def tile(i: int = 0, shape: tuple[int, ...] = (16, 24, 3), dtype: str = "uint8") -> Tile:
    px = (np.arange(np.prod(shape)) % 251).astype(dtype).reshape(shape)
    return Tile(px, slide_id="s", tile_id=f"t{i}", seq=i, x_um=1.0, y_um=2.0, pixel_size_um=0.5)


def wire(t: Tile) -> tuple[dict, list]:
    frames = tile_frames(t)
    return decode_header(frames[0], ("tile",)), frames[1:]


def test_encode_decode_round_trip() -> None:
    h = decode_header(encode("ack", tile_id="a", depth=3))
    assert h == {"v": PROTOCOL_VERSION, "type": "ack", "tile_id": "a", "depth": 3}


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xff\xfe not json", "header"),
        (b"[1, 2]", "header"),
        (b'{"type": "tile"}', "version"),
        (json.dumps({"v": 99, "type": "tile"}).encode(), "version"),
        (json.dumps({"v": 1, "type": "nope"}).encode(), "type"),
        (json.dumps({"v": 1}).encode(), "type"),
        (b" " * (MAX_HEADER_BYTES + 1), "header"),
    ],
)
def test_bad_headers_are_rejected_with_a_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_header(frame, ("tile", "ack"))
    assert info.value.reason == reason


def test_tile_round_trip_is_zero_copy_over_real_sockets() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    try:
        t = tile(shape=(300, 400, 3))  # > pyzmq's copy threshold
        b.send_multipart(tile_frames(t), copy=False)
        frames = a.recv_multipart(copy=False)
        got = parse_tile(decode_header(frames[0], ("tile",)), frames[1:], LIMIT)
        assert got.same_as(t)
        assert np.shares_memory(got.pixels, np.frombuffer(as_buffer(frames[1]), np.uint8))
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def _tampered(change: dict, payload: bytes | None = None) -> tuple[dict, list]:
    header, frames = wire(tile())
    header["tile"].update(change)
    return header, [payload if payload is not None else frames[0]]


@pytest.mark.parametrize(
    ("change", "payload", "reason"),
    [
        ({"dtype": "float64"}, None, "dtype"),
        ({"dtype": "object"}, None, "dtype"),
        ({}, b"\x00" * 100, "length"),  # truncated
        ({"shape": [16, 24, 4]}, None, "length"),
        ({"shape": [4096, 4096, 3]}, None, "size"),  # over the limit
        ({"shape": [16, -24, 3]}, None, "schema"),
        ({"shape": "16x24"}, None, "schema"),
        ({"x_um": float("nan")}, None, "schema"),
        ({"pixel_size_um": 0}, None, "schema"),
        ({"kind": "other"}, None, "schema"),
        ({"extra_field": 1}, None, "schema"),
    ],
)
def test_bad_tiles_are_rejected_with_a_reason(change: dict, payload: bytes | None, reason: str) -> None:
    header, frames = _tampered(change, payload)
    with pytest.raises(ProtocolError) as info:
        parse_tile(header, frames, LIMIT)
    assert info.value.reason == reason
    assert info.value.tile_id in (None, "t0")


def test_missing_fields_and_frames() -> None:
    header, frames = wire(tile())
    del header["tile"]["slide_id"]
    with pytest.raises(ProtocolError, match="lacks"):
        parse_tile(header, frames, LIMIT)
    header, frames = wire(tile())
    with pytest.raises(ProtocolError) as info:
        parse_tile(header, [*frames, b"x"], LIMIT)
    assert info.value.reason == "frames"
    with pytest.raises(ProtocolError) as info:
        parse_tile({"v": 1, "type": "tile", "tile": "nope"}, frames, LIMIT)
    assert info.value.reason == "schema"


def test_result_round_trip_and_validation() -> None:
    t = tile()
    cell = Cell(
        cell_id="c",
        tile_id=t.tile_id,
        slide_id="s",
        kind=CellKind.WBC,
        bbox=(0, 0, 4, 4),
        centroid_px=(2, 2),
        x_um=1,
        y_um=2,
        area_px=16,
    )
    r = TileResult(
        slide_id="s",
        tile_id=t.tile_id,
        cells=[cell],
        crops=np.ones((1, 8, 8, 3), np.uint8),
        crop_cell_ids=["c"],
    )
    frames = result_frames(r, attempt=2)
    h = decode_header(frames[0], ("result",))
    got = parse_result(h, frames[1:])
    assert got.cells == r.cells and np.array_equal(got.crops, r.crops) and h["attempt"] == 2
    h["result"]["crops_shape"] = [2, 8, 8, 3]
    with pytest.raises(ProtocolError) as info:
        parse_result(h, frames[1:])
    assert info.value.reason == "schema"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=64))
def test_fuzzed_messages_only_ever_raise_protocol_error(header: bytes, payload: bytes) -> None:
    try:
        h = decode_header(header, ("tile",))
        parse_tile(h, [payload], LIMIT)
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["slide_id", "tile_id", "seq", "x_um", "y_um", "pixel_size_um", "dtype", "shape", "kind", "z"]),
        st.one_of(st.none(), st.integers(-5, 5), st.floats(), st.text(max_size=8), st.lists(st.integers(-2, 40))),
    )
)
def test_fuzzed_tile_headers_only_ever_raise_protocol_error(fields: dict) -> None:
    header, frames = wire(tile())
    header["tile"].update(fields)
    with contextlib.suppress(ProtocolError):
        parse_tile(header, frames, LIMIT)


def test_rejections_count_and_rate_limit(caplog: pytest.LogCaptureFixture) -> None:
    rej = Rejections("test", log_per_s=2)
    for _ in range(10):
        rej.add("dtype", "bad")
    rej.add("length", "short")
    assert rej.as_dict() == {"dtype": 10, "length": 1} and rej.total == 11
    assert len([r for r in caplog.records if "rejected" in r.message]) == 2


# ------------------------------------------------------------------------------------ spool
def test_spool_fifo_bounded_and_recovered(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", max_bytes=20_000)
    for i in range(3):
        sp.push({"tile": {"i": i}}, bytes([i]) * 4000)
    assert len(sp) == 3 and 12_000 < sp.nbytes < 13_000
    with pytest.raises(SpoolFull):
        for i in range(3, 10):
            sp.push({"tile": {"i": i}}, b"x" * 4000)
    n = len(sp)
    h, p = sp.pop()
    assert h == {"tile": {"i": 0}} and bytes(p) == b"\x00" * 4000
    # a new broker finds what an earlier one left, in order
    again = Spool(tmp_path / "spool", max_bytes=20_000)
    assert len(again) == n - 1
    assert [h["tile"]["i"] for h in again.headers()][:2] == [1, 2]
    assert again.pop()[0]["tile"]["i"] == 1
    tmp = Spool(None, max_bytes=1000)
    d = tmp.dir
    tmp.close()
    assert not d.exists()
    assert not Spool(None, 0).can_take(1)


# --------------------------------------------------------------------------------- security
def test_loopback_rules() -> None:
    for h in ("127.0.0.1", "localhost", "::1", "[::1]", "tcp://127.0.0.1:5555", "ipc:///tmp/x"):
        assert is_loopback(h), h
    for h in ("0.0.0.0", "10.1.2.3", "tcp://192.168.1.4:5556", "example.org"):
        assert not is_loopback(h), h
    check_bind_allowed("127.0.0.1", None)
    with pytest.raises(SecurityError, match="CurveZMQ"):
        check_bind_allowed("0.0.0.0", None)
    check_bind_allowed("0.0.0.0", Path("keys"))


def test_key_generation_and_loading(tmp_path: Path) -> None:
    paths = generate_keys(tmp_path / "k")
    assert all(p.exists() for p in paths.values())
    assert (tmp_path / "k" / "authorized" / "client.key").exists()
    with pytest.raises(SecurityError, match="already holds keys"):
        generate_keys(tmp_path / "k")
    add_client(tmp_path / "k", "scanner1")
    assert (tmp_path / "k" / "authorized" / "scanner1.key").exists()
    c = ClientSecurity.from_dir(tmp_path / "k", "scanner1")
    s = ServerSecurity(tmp_path / "k")
    assert c.server_public == s.public and len(c.public) == 40
    with pytest.raises(SecurityError, match="not found"):
        ClientSecurity.from_dir(tmp_path / "nothing")
    with pytest.raises(SecurityError, match="identifier"):
        add_client(tmp_path / "k", "bad name")


# --------------------------------------------------------------------------- backpressure
def test_source_blocks_then_raises_when_nothing_is_acknowledged() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)  # a broker that is stuck: it never acknowledges
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    src = TileSource(f"tcp://127.0.0.1:{port}", window=3, send_timeout_s=0.3, ack_timeout_s=30, context=ctx)
    try:
        for i in range(3):
            src.send(tile(i))
        t0 = time.monotonic()
        with pytest.raises(BackpressureError, match="not sent"):
            src.send(tile(3))
        assert time.monotonic() - t0 >= 0.25
        assert src.queue_depth == 3
        # the stuck broker comes back: it acknowledges one, and sending goes on
        ident, header, _ = router.recv_multipart()
        router.send_multipart(
            [ident, encode("ack", slide_id="s", tile_id=json.loads(header)["tile"]["tile_id"], depth=5)]
        )
        src.send(tile(3), timeout=2.0)
        assert src.unacked == 3 and src.queue_depth == 5 + 3
    finally:
        src.close()
        router.close(0)
        ctx.term()
