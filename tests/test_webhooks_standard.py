"""Webhooks follow the Standard Webhooks spec: verified by the `standardwebhooks` package, no redirects followed."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from scope_stream.callbacks import TOLERANCE_S, WebhookDispatcher, new_secret, sign, verify_signature
from scope_stream.config.callbacks import WebhookConfig

standardwebhooks = pytest.importorskip("standardwebhooks")

SECRET = new_secret()
TOKEN = "Bearer tok-3f9a-never-leak"


class Server:
    """A real HTTP server on 127.0.0.1 that answers ``status`` (with ``location`` for a redirect)."""

    def __init__(self, status: int = 200, location: str | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n) if n else b""
                srv.requests.append({"method": self.command, "headers": dict(self.headers), "body": body})
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET = do_PUT = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def hook(url: str, **kw: Any) -> WebhookConfig:
    base: dict[str, Any] = {"url": url, "events": ["*"], "secret": SECRET, "backoff_s": 0.01, "timeout_s": 2.0}
    base.update(kw)
    return WebhookConfig(**base)


def test_delivery_verifies_with_the_standardwebhooks_package(tmp_path: Path) -> None:
    with Server() as rx:
        hooks = WebhookDispatcher([hook(rx.url)], tmp_path / "d.jsonl")
        hooks.submit({"topic": "slide.done", "slide_id": "s1", "summary": {"n_cells": 3}})
        hooks.close(10)
    (req,) = rx.requests
    h = {k.lower(): v for k, v in req["headers"].items()}
    assert h["webhook-signature"].startswith("v1,")
    assert int(h["webhook-timestamp"]) == pytest.approx(time.time(), abs=60)
    doc = standardwebhooks.Webhook(SECRET).verify(req["body"], req["headers"])  # raises if not valid
    assert doc["id"] == h["webhook-id"] and doc["topic"] == "slide.done"
    assert verify_signature(SECRET, req["body"], req["headers"])
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(req["body"], req["headers"])
    assert [r.outcome for r in hooks.records] == ["delivered"]


def test_our_verifier_agrees_with_the_package_and_enforces_the_replay_window() -> None:
    body = b'{"v":1,"topic":"slide.done"}'
    wh = standardwebhooks.Webhook(SECRET)
    now = int(time.time())
    from datetime import datetime, timezone

    assert sign(SECRET, "msg_1", now, body) == wh.sign("msg_1", datetime.fromtimestamp(now, tz=timezone.utc), body)
    old = now - int(TOLERANCE_S) - 5
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(old),
        "webhook-signature": sign(SECRET, "msg_1", old, body),
    }
    assert not verify_signature(SECRET, body, headers)  # a replay from > 5 min ago
    assert verify_signature(SECRET, body, headers, now=old + 10)
    with pytest.raises(standardwebhooks.WebhookVerificationError, match="too old"):
        wh.verify(body, headers)
    # key rotation: several space-separated signatures, one of them matching
    rotated = {
        **headers,
        "webhook-signature": f"{sign(new_secret(), 'msg_1', old, body)} {headers['webhook-signature']}",
    }
    assert verify_signature(SECRET, body, rotated, now=old)


def test_a_redirect_is_a_failed_delivery_and_is_not_followed(tmp_path: Path) -> None:
    with Server() as elsewhere:
        target = elsewhere.url + "?stolen=1"
        with Server(302, location=target) as rx:
            hooks = WebhookDispatcher([hook(rx.url, headers={"Authorization": TOKEN})], tmp_path / "d.jsonl")
            hooks.submit({"topic": "slide.done", "slide_id": "s1"})
            hooks.close(10)
        assert elsewhere.requests == []  # nothing followed the redirect: no GET, no token, no signature
    assert len(rx.requests) == 1 and rx.requests[0]["method"] == "POST"
    assert rx.requests[0]["headers"]["Authorization"] == TOKEN  # the configured URL gets it, and only it
    (rec,) = hooks.records
    assert rec.outcome == "failed" and rec.http_status == 302 and rec.attempt == 1
    assert rec.error is not None and "redirect" in rec.error and "not followed" in rec.error
    text = (tmp_path / "d.jsonl").read_text()
    assert "stolen" not in text and "tok-3f9a" not in text and SECRET not in text
    assert json.loads(text.splitlines()[0])["outcome"] == "failed"


@pytest.mark.parametrize("status", [301, 307, 308])
def test_other_redirects_are_final_failures(tmp_path: Path, status: int) -> None:
    with Server() as elsewhere, Server(status, location=elsewhere.url) as rx:
        hooks = WebhookDispatcher([hook(rx.url)], None)
        hooks.submit({"topic": "slide.done"})
        hooks.close(10)
        assert elsewhere.requests == [] and len(rx.requests) == 1
    assert [(r.outcome, r.http_status) for r in hooks.records] == [("failed", status)]


def test_configured_headers_cannot_replace_the_signature(tmp_path: Path) -> None:
    with Server() as rx:
        hooks = WebhookDispatcher([hook(rx.url, headers={"webhook-signature": "v1,forged", "X-Api-Key": "k"})], None)
        hooks.submit({"topic": "slide.done"})
        hooks.close(10)
    (req,) = rx.requests
    assert req["headers"]["X-Api-Key"] == "k"
    assert verify_signature(SECRET, req["body"], req["headers"])


def test_secrets_must_be_whsec_and_stay_out_of_reprs() -> None:
    for bad in ("change-me", "whsec_not base64!", "whsec_c2hvcnQ="):
        with pytest.raises(ValidationError) as err:
            WebhookConfig(url="http://127.0.0.1:1/x", secret=bad)
        assert bad not in str(err.value)
    cfg = WebhookConfig(url="http://127.0.0.1:1/x", secret=SECRET, headers={"Authorization": TOKEN})
    assert SECRET not in repr(cfg) and TOKEN not in repr(cfg)
    assert new_secret().startswith("whsec_") and new_secret() != new_secret()


def test_secret_env_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPE_STREAM_TEST_HOOK_SECRET", "plain-text")
    with pytest.raises(ValueError, match="whsec_"):
        WebhookDispatcher([WebhookConfig(url="http://127.0.0.1:1/x", secret_env="SCOPE_STREAM_TEST_HOOK_SECRET")])
    monkeypatch.setenv("SCOPE_STREAM_TEST_HOOK_SECRET", SECRET)
    WebhookDispatcher([WebhookConfig(url="http://127.0.0.1:1/x", secret_env="SCOPE_STREAM_TEST_HOOK_SECRET")]).close(1)


def test_the_example_receiver_verifies_our_deliveries(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "webhook_receiver.py"
    spec = importlib.util.spec_from_file_location("webhook_receiver_example", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    server = ThreadingHTTPServer(("127.0.0.1", 0), mod.make_handler(SECRET))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        good = WebhookDispatcher([hook(url)], None)
        good.submit({"topic": "slide.done", "slide_id": "s1"})
        good.close(10)
        bad = WebhookDispatcher([hook(url, secret=new_secret())], None)
        bad.submit({"topic": "slide.done", "slide_id": "s1"})
        bad.close(10)
    finally:
        server.shutdown()
        server.server_close()
    assert [(r.outcome, r.http_status) for r in good.records] == [("delivered", 204)]
    assert [(r.outcome, r.http_status) for r in bad.records] == [("failed", 401)]
    assert '"topic": "slide.done"' in capsys.readouterr().out
