"""The control endpoint over real ZeroMQ sockets: protocol, validation, errors, REQ clients, CurveZMQ."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import zmq

from scope_stream.acquire.control import (
    MAX_REQUEST_BYTES,
    ControlError,
    ControlServer,
    ReimageClient,
    ReimageRequest,
    ReimageResult,
)
from scope_stream.transport.security import SecurityError, add_client, generate_keys


class Recorder:
    """A control handler that records requests and completes them from another thread, like a scan does."""

    def __init__(self) -> None:
        self.requests: list[ReimageRequest] = []
        self.delay_s = 0.05

    def submit_reimage(self, request: ReimageRequest) -> Future[ReimageResult]:
        if request.x_um > 1000:
            raise ControlError("out_of_limits", f"x {request.x_um} beyond 1000", request.request_id)
        if request.reason == "boom":
            raise RuntimeError("handler bug")
        self.requests.append(request)
        fut: Future[ReimageResult] = Future()

        def complete() -> None:
            time.sleep(self.delay_s)
            if request.reason == "fail later":
                fut.set_exception(RuntimeError("camera timed out"))
                return
            n = len(request.z_offsets_um or [0.0])
            fut.set_result(
                ReimageResult(
                    request_id=request.request_id,
                    slide_id="s1",
                    tile_ids=[f"r{len(self.requests):04d}-z{k}" for k in range(n)],
                    x_um=request.x_um,
                    y_um=request.y_um,
                    objective=request.objective or "50x",
                    pixel_size_um=0.2,
                    z_um=list(request.z_offsets_um or [0.0]),
                )
            )

        threading.Thread(target=complete, daemon=True).start()
        return fut

    def control_status(self) -> dict[str, Any]:
        return {"state": "scanning", "queued": 0}


@pytest.fixture()
def server() -> Any:
    handler = Recorder()
    srv = ControlServer(handler).start()
    srv.handler_obj = handler
    yield srv
    srv.close()


def test_reimage_roundtrip_ping_status(server: ControlServer) -> None:
    with ReimageClient(server.endpoint, timeout_s=5) as client:
        assert client.ping()
        assert client.status()["state"] == "scanning"
        reply = client.reimage(120.5, 80.0, objective="50x", z_offsets_um=[-1.0, 0.0, 1.0], reason="check")
    assert reply["type"] == "reimage.done"
    assert reply["tile_ids"] == ["r0001-z0", "r0001-z1", "r0001-z2"]
    assert (reply["x_um"], reply["y_um"], reply["objective"]) == (120.5, 80.0, "50x")
    (req,) = server.handler_obj.requests  # type: ignore[attr-defined]
    assert req.reason == "check" and req.z_offsets_um == [-1.0, 0.0, 1.0]


def test_concurrent_requests_are_answered_by_id(server: ControlServer) -> None:
    server.handler_obj.delay_s = 0.2  # type: ignore[attr-defined]
    results: list[dict[str, Any]] = []

    def ask(x: float) -> None:
        with ReimageClient(server.endpoint, timeout_s=10) as c:
            results.append(c.reimage(x, 1.0))

    threads = [threading.Thread(target=ask, args=(float(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["x_um"] for r in results) == [0.0, 1.0, 2.0, 3.0]
    assert len({r["request_id"] for r in results}) == 4


@pytest.mark.parametrize(
    ("message", "code", "detail"),
    [
        (b"{not json", "malformed", "not UTF-8 JSON"),
        (b"[1, 2]", "malformed", "JSON object"),
        (b"\xff\xfe", "malformed", "UTF-8"),
        (json.dumps({"v": 2, "type": "reimage", "x_um": 1, "y_um": 1}).encode(), "version", "version"),
        (json.dumps({"v": 1, "type": "teleport"}).encode(), "malformed", "type"),
        (json.dumps({"v": 1, "type": "reimage", "y_um": 1}).encode(), "malformed", "x_um"),
        (json.dumps({"v": 1, "type": "reimage", "x_um": "left", "y_um": 1}).encode(), "malformed", "x_um"),
        (b'{"v": 1, "type": "reimage", "x_um": NaN, "y_um": 1}', "malformed", "finite"),
        (json.dumps({"v": 1, "type": "reimage", "x_um": 1, "y_um": 1, "speed": 9}).encode(), "malformed", "speed"),
        (
            json.dumps({"v": 1, "type": "reimage", "x_um": 1, "y_um": 1, "z_offsets_um": [1e9]}).encode(),
            "malformed",
            "z offsets",
        ),
        (json.dumps({"v": 1, "type": "reimage", "x_um": 5000, "y_um": 1}).encode(), "out_of_limits", "beyond"),
    ],
)
def test_bad_requests_get_clear_errors_and_queue_nothing(
    server: ControlServer, message: bytes, code: str, detail: str
) -> None:
    with ReimageClient(server.endpoint, timeout_s=5) as client:
        reply = client.request(message)
        assert reply["type"] == "error", reply
        assert reply["code"] == code and detail in reply["detail"], reply
        assert client.ping()  # the endpoint carries on
    assert server.handler_obj.requests == []  # type: ignore[attr-defined]


def test_failures_after_acceptance_and_handler_bugs(server: ControlServer) -> None:
    with ReimageClient(server.endpoint, timeout_s=5) as client:
        with pytest.raises(ControlError) as err:
            client.reimage(1, 1, reason="fail later")
        assert err.value.code == "failed" and "camera timed out" in err.value.detail
        with pytest.raises(ControlError) as err:
            client.reimage(1, 1, reason="boom")
        assert err.value.code == "failed" and "handler bug" in err.value.detail
        assert client.ping()


def test_multi_frame_oversize_and_req_sockets(server: ControlServer) -> None:
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.endpoint)
    dealer.send_multipart([b'{"v": 1, "type": "ping"}', b"extra"])
    assert dealer.poll(5000)
    reply = json.loads(dealer.recv())
    assert reply["code"] == "malformed" and "one frame" in reply["detail"]
    # a frame over the limit: libzmq drops that connection (ZMQ_MAXMSGSIZE); the server is unaffected
    dealer.send(b"x" * (MAX_REQUEST_BYTES + 10))
    dealer.close(0)
    req = ctx.socket(zmq.REQ)  # plain REQ clients (any language) work too
    req.setsockopt(zmq.LINGER, 0)
    req.connect(server.endpoint)
    req.send(json.dumps({"v": 1, "type": "reimage", "x_um": 3, "y_um": 4, "request_id": "req-1"}).encode())
    assert req.poll(5000)
    reply = json.loads(req.recv())
    req.close(0)
    assert reply["type"] == "reimage.done" and reply["request_id"] == "req-1"


def test_client_times_out_cleanly_when_nobody_answers() -> None:
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with ReimageClient(f"tcp://127.0.0.1:{port}", timeout_s=0.3) as client:
            reply = client.request({"type": "ping"})
            assert reply["code"] == "timeout"
            with pytest.raises(ControlError, match="timeout"):
                client.reimage(1, 1, timeout_s=0.2)
    finally:
        silent.close(0)


def test_binding_beyond_loopback_needs_keys() -> None:
    with pytest.raises(SecurityError, match="CurveZMQ"):
        ControlServer(Recorder(), host="0.0.0.0")


def test_curve_authenticated_endpoint(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    other = tmp_path / "other"
    generate_keys(other)  # a different key set: its client is not authorised on `keys`
    add_client(keys, "napari")
    srv = ControlServer(Recorder(), host="127.0.0.1", keys_dir=keys).start()
    try:
        with ReimageClient(srv.endpoint, keys_dir=keys, timeout_s=5) as good:
            assert good.reimage(1.0, 2.0)["type"] == "reimage.done"
        # a client with keys the server does not know: the handshake fails and nothing is answered
        stranger_dir = tmp_path / "stranger"
        stranger_dir.mkdir()
        for name in ("client.key", "client.key_secret"):
            (stranger_dir / name).write_bytes((other / name).read_bytes())
        (stranger_dir / "server.key").write_bytes((keys / "server.key").read_bytes())
        with ReimageClient(srv.endpoint, keys_dir=stranger_dir, timeout_s=0.5) as bad:
            assert bad.request({"type": "ping"})["code"] == "timeout"
        # a client without CURVE at all
        with ReimageClient(srv.endpoint, timeout_s=0.5) as plain:
            assert plain.request({"type": "ping"})["code"] == "timeout"
    finally:
        srv.close()
