"""Callbacks: EventHub over a real PUB socket, webhooks to a real local HTTP server (retries, signatures, log)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import zmq
from pydantic import ValidationError

from scope_stream.callbacks import (
    SIGNATURE_HEADER,
    Callbacks,
    EventHub,
    WebhookDispatcher,
    new_secret,
    sign,
    topic_matches,
    verify_signature,
)
from scope_stream.config import ScopeStreamConfig
from scope_stream.config.callbacks import WebhookConfig

SECRET = "whsec_czNjcmV0LWZvci10ZXN0cy1zM2NyZXQtZm9yLXRlc3Rz"  # Standard Webhooks form: whsec_<base64>


# ------------------------------------------------------------------------------ a real receiver
class Receiver:
    """A real HTTP server on 127.0.0.1 that verifies signatures; ``plan`` scripts its answers."""

    def __init__(self, plan: list[int] | None = None, secret: str | None = SECRET) -> None:
        self.plan = list(plan or [])  # status codes to answer, in order; then 200
        self.secret = secret
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ok = receiver.secret is None or verify_signature(receiver.secret, body, self.headers)
                with receiver.lock:
                    status = receiver.plan.pop(0) if receiver.plan else 200
                    if not ok:
                        status = 401
                    receiver.requests.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers),
                            "body": body,
                            "verified": ok,
                            "status": status,
                            "at": time.monotonic(),
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.requests if r["status"] == 200]


@pytest.fixture()
def pub() -> Iterator[tuple[zmq.Socket[Any], str]]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(0)


def publish(sock: zmq.Socket[Any], topic: str, **payload: Any) -> None:
    body = {"v": 1, "topic": topic, "ts": time.time(), **payload}
    sock.send_multipart([topic.encode(), json.dumps(body).encode()])


def hook(url: str, **kw: Any) -> WebhookConfig:
    base: dict[str, Any] = {"url": url, "events": ["*"], "secret": SECRET, "backoff_s": 0.05, "timeout_s": 2.0}
    base.update(kw)
    return WebhookConfig(**base)


# ------------------------------------------------------------------------------ signatures
def test_signature_roundtrip_and_tampering() -> None:
    body = b'{"v":1,"topic":"slide.done"}'
    now = int(time.time())
    header = sign(SECRET, "msg_1", now, body)
    assert header.startswith("v1,") and len(header) == 3 + 44
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), SIGNATURE_HEADER: header}
    assert verify_signature(SECRET, body, headers)
    assert not verify_signature(SECRET, body + b" ", headers)
    assert not verify_signature(new_secret(), body, headers)
    assert not verify_signature(SECRET, body, {**headers, "webhook-id": "msg_2"})
    assert not verify_signature(SECRET, body, {})
    assert not verify_signature(SECRET, body, {**headers, SIGNATURE_HEADER: header.replace("v1,", "v2,")})


def test_topic_patterns() -> None:
    assert topic_matches("*", "pipeline.stats")
    assert topic_matches("tile.*", "tile.done") and not topic_matches("tile.*", "tiles.done")
    assert topic_matches("slide.done", "slide.done") and not topic_matches("slide.done", "slide.done2")


def test_webhook_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="http"):
        WebhookConfig(url="ftp://example.org/x")
    with pytest.raises(ValidationError, match="unknown event topics"):
        WebhookConfig(url="http://127.0.0.1:1/x", events=["slide.finished"])
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE"):
        WebhookDispatcher([WebhookConfig(url="http://127.0.0.1:1/x", secret_env="NOT_SET_ANYWHERE")])


# ------------------------------------------------------------------------------ webhooks
def test_webhook_retries_after_failure_and_receiver_verifies(tmp_path: Path) -> None:
    log_path = tmp_path / "deliveries.jsonl"
    with Receiver(plan=[503, 500]) as rx:
        hooks = WebhookDispatcher([hook(rx.url)], log_path)
        hooks.submit({"v": 1, "topic": "slide.done", "slide_id": "s1", "summary": {"n_cells": 3}})
        assert hooks.flush(10)
        hooks.close()
        assert [r["status"] for r in rx.requests] == [503, 500, 200]
        assert all(r["verified"] for r in rx.requests)
        # identical body on every attempt (so the receiver de-duplicates by id), attempts counted
        assert len({r["body"] for r in rx.requests}) == 1
        assert [r["headers"]["X-Scope-Stream-Attempt"] for r in rx.requests] == ["1", "2", "3"]
        assert rx.requests[0]["headers"]["X-Scope-Stream-Event"] == "slide.done"
        gaps = [b["at"] - a["at"] for a, b in zip(rx.requests, rx.requests[1:], strict=False)]
        assert gaps[0] >= 0.04 and gaps[1] >= 0.09  # 0.05 s, then doubled
        (doc,) = rx.delivered()
        assert doc["topic"] == "slide.done" and doc["event"]["summary"] == {"n_cells": 3}
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["attempt"], r["outcome"], r["http_status"]) for r in lines] == [
        (1, "retry", 503),
        (2, "retry", 500),
        (3, "delivered", 200),
    ]
    assert all(r["url"].endswith("/hook") and "token" not in r["url"] for r in lines)  # no query in the log
    assert SECRET not in log_path.read_text()


def test_webhook_final_4xx_is_not_retried(tmp_path: Path) -> None:
    with Receiver(plan=[422]) as rx:
        hooks = WebhookDispatcher([hook(rx.url)], tmp_path / "d.jsonl")
        hooks.submit({"topic": "cell.flagged", "cell_id": "c1"})
        hooks.close(10)
        assert len(rx.requests) == 1
    (rec,) = hooks.records
    assert rec.outcome == "failed" and rec.http_status == 422


def test_webhook_gives_up_on_a_dead_endpoint(tmp_path: Path) -> None:
    with Receiver() as rx:
        dead_url = rx.url  # server closed below: connection refused
    hooks = WebhookDispatcher([hook(dead_url, max_retries=2, backoff_s=0.01)], tmp_path / "d.jsonl")
    hooks.submit({"topic": "slide.done", "slide_id": "s"})
    hooks.close(10)
    outcomes = [r.outcome for r in hooks.records]
    assert outcomes == ["retry", "retry", "failed"]
    assert hooks.records[-1].error and "gave up after 3 attempts" in hooks.records[-1].error


def test_webhook_unsigned_receiver_rejects_bad_signature(tmp_path: Path) -> None:
    # the sender uses the wrong secret: the receiver's verification fails and it answers 401 (final)
    with Receiver() as rx:
        hooks = WebhookDispatcher([hook(rx.url, secret=new_secret())], None)
        hooks.submit({"topic": "slide.done"})
        hooks.close(10)
        assert [r["verified"] for r in rx.requests] == [False]
    assert hooks.records[-1].outcome == "failed" and hooks.records[-1].http_status == 401


def test_webhook_topic_filter_and_slow_endpoint_isolation(tmp_path: Path) -> None:
    with Receiver() as fast, Receiver(plan=[503] * 3) as slow:
        hooks = WebhookDispatcher(
            [hook(fast.url, events=["slide.done"]), hook(slow.url, events=["tile.done", "slide.done"], backoff_s=0.2)],
            tmp_path / "d.jsonl",
        )
        assert hooks.submit({"topic": "tile.done", "tile_id": "t1"}) == 1
        assert hooks.submit({"topic": "slide.done", "slide_id": "s"}) == 2
        t0 = time.monotonic()
        while len(fast.delivered()) < 1 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert time.monotonic() - t0 < 0.5  # not held up by the slow endpoint's backoff
        assert hooks.flush(15)
        hooks.close()
        assert [d["topic"] for d in fast.delivered()] == ["slide.done"]
        assert [d["topic"] for d in slow.delivered()] == ["tile.done", "slide.done"]  # in order


def test_webhook_queue_overflow_is_logged_not_silent(tmp_path: Path) -> None:
    with Receiver(plan=[503] * 50) as rx:
        hooks = WebhookDispatcher([hook(rx.url, queue_size=1, backoff_s=0.5, max_retries=1)], tmp_path / "d.jsonl")
        for i in range(5):
            hooks.submit({"topic": "tile.done", "tile_id": f"t{i}"})
        hooks.close(0.1)
    outcomes = [r.outcome for r in hooks.records]
    assert outcomes.count("dropped") >= 3
    assert "abandoned" in outcomes or "failed" in outcomes


# ------------------------------------------------------------------------------ event hub
def test_event_hub_dispatches_by_topic_and_survives_bad_callbacks(pub: tuple[zmq.Socket[Any], str]) -> None:
    sock, endpoint = pub
    flagged: list[dict[str, Any]] = []
    tiles: list[dict[str, Any]] = []
    everything: list[str] = []
    hub = EventHub(endpoint)
    hub.on("cell.flagged", flagged.append)

    @hub.on("tile.*")
    def on_tile(ev: dict[str, Any]) -> None:
        tiles.append(ev)

    hub.on("*", lambda ev: everything.append(ev["topic"]))
    hub.on("*", lambda ev: 1 / 0)  # a broken callback: logged and counted, nothing else stops
    with hub:
        publish(sock, "tile.done", tile_id="t1")
        publish(sock, "cell.flagged", cell_id="c1", x_um=1.0, y_um=2.0)
        sock.send_multipart([b"tile.done", b"{not json"])
        sock.send_multipart([b"only-one-frame"])
        publish(sock, "slide.done", slide_id="s")
        t0 = time.monotonic()
        while len(everything) < 3 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert hub.wait_idle(5)
        hub.off("tile.*", on_tile)
        publish(sock, "tile.done", tile_id="t2")
        t0 = time.monotonic()
        while len(everything) < 4 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
    assert [e["cell_id"] for e in flagged] == ["c1"]
    assert [e["tile_id"] for e in tiles] == ["t1"]
    assert everything == ["tile.done", "cell.flagged", "slide.done", "tile.done"]
    assert hub.errors == 4 and hub.malformed == 2


def test_callbacks_from_config_deliver_pipeline_events(pub: tuple[zmq.Socket[Any], str], tmp_path: Path) -> None:
    sock, endpoint = pub
    with Receiver() as rx:
        cfg = ScopeStreamConfig.model_validate(
            {
                "store": {"root": str(tmp_path)},
                "callbacks": {"webhooks": [{"url": rx.url, "events": ["slide.done"], "secret": SECRET}]},
            }
        )
        seen: list[str] = []
        with Callbacks(cfg, endpoint, slide_id="s1") as cb:
            cb.on("slide.done", lambda ev: seen.append(ev["slide_id"]))
            publish(sock, "tile.done", slide_id="s1", tile_id="t")
            publish(sock, "slide.done", slide_id="other")  # another slide: no webhook
            publish(sock, "slide.done", slide_id="s1", summary={"differential": {"neutrophil": 2}})
            t0 = time.monotonic()
            while len(rx.delivered()) < 1 and time.monotonic() - t0 < 5:
                time.sleep(0.01)
        (doc,) = rx.delivered()
        assert doc["event"]["slide_id"] == "s1" and doc["event"]["summary"]["differential"] == {"neutrophil": 2}
        assert seen == ["other", "s1"]  # Python callbacks see everything; the webhook filters by slide
    log_lines = (tmp_path / "webhook-deliveries.jsonl").read_text().splitlines()
    assert [json.loads(x)["outcome"] for x in log_lines] == ["delivered"]
