"""Webhooks for automated scanners: Standard Webhooks, retried with backoff, logged.

Deliveries follow the Standard Webhooks specification (https://www.standardwebhooks.com), so any of its
receiver libraries verifies them. Each configured endpoint gets its own queue and delivery thread, so a
slow or dead endpoint never delays another one or the pipeline. A delivery is one event
(``docs/callbacks.md``):

* body: ``{"v": 1, "id": <delivery id>, "topic": ..., "created_at": <unix s>, "event": <payload>}``
  as UTF-8 JSON -- identical on every attempt, so a receiver de-duplicates by ``id``;
* headers: ``webhook-id`` (the delivery id), ``webhook-timestamp`` (unix seconds of the attempt) and,
  with a secret, ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed by
  the secret's bytes (``whsec_<base64>``); plus ``Content-Type: application/json``,
  ``X-Scope-Stream-Event`` and ``X-Scope-Stream-Attempt``. Receivers check them with
  :func:`verify_signature` (or ``standardwebhooks.Webhook(secret).verify``), which also refuses a
  timestamp more than :data:`TOLERANCE_S` (5 min) away from now.

2xx is delivered. Redirects are never followed: a 3xx is a failed delivery (final), so the body, the
signature and configured headers such as ``Authorization`` only ever go to the configured URL.
Connection errors, timeouts, 408, 425, 429 and 5xx are retried after ``backoff_s * 2**(attempt-1)`` s
(at most ``max_backoff_s``; a ``Retry-After`` header in seconds is honoured up to that cap),
``max_retries`` times; other 4xx answers are final. Every attempt is a line in the delivery log (JSON
lines): ``ts, delivery_id, url, topic, attempt, outcome (delivered|retry|failed|dropped|abandoned),
http_status, error, duration_ms``. The log never holds the secret, a header or the URL's query string.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from scope_stream import __version__
from scope_stream.config.callbacks import WebhookConfig, check_secret

from .hub import topic_matches

if TYPE_CHECKING:
    from .hub import EventHub

__all__ = [
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOLERANCE_S",
    "DeliveryRecord",
    "WebhookDispatcher",
    "build_body",
    "new_secret",
    "secret_key",
    "sign",
    "verify_signature",
]

log = logging.getLogger(__name__)

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
#: receivers refuse a ``webhook-timestamp`` further than this from their clock (the replay window), s
TOLERANCE_S = 300.0
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


# ------------------------------------------------------------------------------ signing
def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_<base64>`` decoded (raw ``bytes`` pass as they are).

    Raises ``ValueError`` for a string that is not ``whsec_`` followed by base64 of at least 16 bytes.
    """
    if isinstance(secret, (bytes, bytearray)):
        if not secret:
            raise ValueError("a webhook secret may not be empty")
        return bytes(secret)
    return check_secret(secret)


def new_secret(nbytes: int = 32) -> str:
    """A fresh random secret, ``whsec_<base64 of nbytes random bytes>``."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(nbytes)).decode("ascii")


def sign(secret: str | bytes, msg_id: str, timestamp: int | float, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64(HMAC-SHA256(key, f"{msg_id}.{timestamp}.".encode() + body))."""
    ts = str(math.floor(timestamp))
    digest = hmac.new(secret_key(secret), f"{msg_id}.{ts}.".encode() + bytes(body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def _header(headers: Mapping[str, str] | Any, name: str) -> str | None:
    getter = getattr(headers, "get", None)
    if getter is None:
        return None
    value = getter(name)
    if value is None and isinstance(headers, Mapping):  # a plain dict with other capitalisation
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == name), None)
    return value if isinstance(value, str) else None


def verify_signature(
    secret: str | bytes,
    body: bytes,
    headers: Mapping[str, str] | Any,
    *,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when ``headers`` (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``) sign the raw ``body``.

    ``headers`` is any mapping with ``.get`` (``http.server``'s, a dict; names are case-insensitive).
    The timestamp must lie within ``tolerance_s`` of ``now`` (the replay window); any of the
    space-separated ``v1,`` signatures may match (key rotation). Constant-time comparison. Compare
    against the bytes as received, before any JSON parsing, and de-duplicate on ``webhook-id``.
    """
    msg_id = _header(headers, ID_HEADER)
    ts = _header(headers, TIMESTAMP_HEADER)
    sigs = _header(headers, SIGNATURE_HEADER)
    if not (msg_id and ts and sigs):
        return False
    try:
        t = int(ts.strip())
        expected = sign(secret, msg_id, t, body)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    return any(hmac.compare_digest(expected.encode(), s.encode()) for s in sigs.split(" ") if s)


def build_body(topic: str, event: dict[str, Any], delivery_id: str | None = None) -> tuple[str, bytes]:
    """``(delivery_id, body)`` for one event (see the module docstring for the body's form)."""
    did = delivery_id or uuid.uuid4().hex
    doc = {"v": 1, "id": did, "topic": topic, "created_at": time.time(), "event": event}
    return did, json.dumps(doc, separators=(",", ":"), allow_nan=False, default=str).encode("utf-8")


# ------------------------------------------------------------------------------ records
@dataclass
class DeliveryRecord:
    """One attempt to deliver one event to one endpoint (a line of the delivery log)."""

    ts: float
    delivery_id: str
    url: str
    topic: str
    attempt: int
    outcome: str  # delivered | retry | failed | dropped | abandoned
    http_status: int | None = None
    error: str | None = None
    duration_ms: float | None = None


def _public_url(url: str) -> str:
    """The URL without query, fragment or user info, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _DeliveryLog:
    """Thread-safe JSON-lines writer plus an in-memory copy."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: list[DeliveryRecord] = []
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rec: DeliveryRecord) -> None:
        line = json.dumps(asdict(rec), separators=(",", ":"), default=str)
        with self._lock:
            self.records.append(rec)
            if self.path is not None:
                try:
                    with self.path.open("a", encoding="utf-8") as fh:
                        fh.write(line + "\n")
                except OSError as exc:
                    log.error("webhooks: cannot write delivery log %s: %s", self.path, exc)


# ------------------------------------------------------------------------------ endpoint
class _Endpoint:
    """One webhook: its queue and delivery thread."""

    def __init__(self, cfg: WebhookConfig, dlog: _DeliveryLog) -> None:
        self.cfg = cfg
        self.url_public = _public_url(cfg.url)
        self.secret: str | None = cfg.secret
        if self.secret is None and cfg.secret_env:
            self.secret = os.environ.get(cfg.secret_env)
            if self.secret is None:
                raise ValueError(
                    f"webhook {self.url_public}: environment variable {cfg.secret_env!r} (secret_env) is not set"
                )
        self._key: bytes | None = None
        if self.secret is not None:
            try:
                self._key = secret_key(self.secret)
            except ValueError as exc:
                raise ValueError(f"webhook {self.url_public}: {exc}") from None
        self._opener = urllib.request.build_opener(_NoRedirect)
        self.queue: queue.Queue[tuple[str, str, bytes] | None] = queue.Queue(maxsize=cfg.queue_size)
        self._log = dlog
        self._abort = threading.Event()
        self._busy = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"webhook {self.url_public}", daemon=True)

    def _record(
        self,
        did: str,
        topic: str,
        attempt: int,
        outcome: str,
        status: int | None = None,
        error: str | None = None,
        ms: float | None = None,
    ) -> None:
        """Write one line of the delivery log for this endpoint (``ms``: the attempt's duration)."""
        duration_ms = round(ms, 2) if ms is not None else None
        rec = DeliveryRecord(time.time(), did, self.url_public, topic, attempt, outcome, status, error, duration_ms)
        self._log.write(rec)

    def wants(self, topic: str) -> bool:
        return any(topic_matches(p, topic) for p in self.cfg.events)

    def submit(self, topic: str, event: dict[str, Any]) -> None:
        did, body = build_body(topic, event)
        try:
            self.queue.put_nowait((did, topic, body))
        except queue.Full:
            self._record(did, topic, 0, "dropped", error=f"queue full ({self.cfg.queue_size} events waiting)")
            log.error("webhook %s: queue full, event %s (%s) dropped", self.url_public, did, topic)

    def idle(self) -> bool:
        return self.queue.unfinished_tasks == 0

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                if self._abort.is_set():
                    did, topic, _ = item
                    self._record(did, topic, 0, "abandoned", error="dispatcher closed before delivery")
                    continue
                self._deliver(*item)
            finally:
                self.queue.task_done()

    def _deliver(self, did: str, topic: str, body: bytes) -> None:
        cfg = self.cfg
        attempt = 0
        while True:
            attempt += 1
            ts = int(time.time())
            headers = {
                **cfg.headers,  # ours below win: a configured header never replaces the signature
                "Content-Type": "application/json",
                "User-Agent": f"scope-stream/{__version__}",
                ID_HEADER: did,
                TIMESTAMP_HEADER: str(ts),
                "X-Scope-Stream-Event": topic,
                "X-Scope-Stream-Attempt": str(attempt),
            }
            if self._key is not None:
                headers[SIGNATURE_HEADER] = sign(self._key, did, ts, body)
            req = urllib.request.Request(cfg.url, data=body, headers=headers, method="POST")
            t0 = time.perf_counter()
            status: int | None = None
            error: str | None = None
            retry_after: float | None = None
            try:
                with self._opener.open(req, timeout=cfg.timeout_s) as resp:
                    status = int(resp.status)
                    resp.read(65536)
            except urllib.error.HTTPError as exc:
                status = int(exc.code)
                error = f"HTTP {exc.code} {exc.reason}"
                if 300 <= status < 400:
                    where = exc.headers.get("Location") if exc.headers else None
                    error = f"HTTP {status}: redirect{_to(where, cfg.url)} not followed"
                retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                error = f"{type(exc).__name__}: {reason}"
            ms = (time.perf_counter() - t0) * 1000.0
            if status is not None and 200 <= status < 300:
                self._record(did, topic, attempt, "delivered", status, None, ms)
                return
            retryable = status is None or status in _RETRY_STATUS
            if not retryable or attempt > cfg.max_retries or self._abort.is_set():
                why = error if retryable or error else f"HTTP {status}"
                if retryable and attempt > cfg.max_retries:
                    why = f"{error} (gave up after {attempt} attempts)"
                self._record(did, topic, attempt, "failed", status, why, ms)
                log.warning("webhook %s: %s delivery %s failed: %s", self.url_public, topic, did, why)
                return
            self._record(did, topic, attempt, "retry", status, error, ms)
            delay = min(cfg.max_backoff_s, cfg.backoff_s * (2 ** (attempt - 1)))
            if retry_after is not None:
                delay = min(cfg.max_backoff_s, max(delay, retry_after))
            if self._abort.wait(delay):
                self._record(did, topic, attempt, "abandoned", status, "dispatcher closed during backoff")
                return


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib then raises the 3xx as an ``HTTPError`` (a failed delivery)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _to(location: str | None, base: str) -> str:
    """`` to <scheme://host/path>`` of a redirect's target, for the log (no query, no user info)."""
    if not location:
        return ""
    return f" to {_public_url(urllib.parse.urljoin(base, location))}"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: ignore, use our own backoff


# ------------------------------------------------------------------------------ dispatcher
class WebhookDispatcher:
    """Deliver pipeline events to the configured webhooks.

    >>> hooks = WebhookDispatcher(cfg.callbacks.webhooks, delivery_log="scans/webhooks.jsonl")  # doctest: +SKIP
    >>> hooks.attach(hub)        # every event of an EventHub goes to the matching endpoints  # doctest: +SKIP
    >>> ...; hooks.close()       # delivers what is queued (retries included) up to a timeout  # doctest: +SKIP

    ``slide_id`` restricts deliveries to the events of one slide (events without a slide, such as
    ``pipeline.stats``, pass).
    """

    def __init__(
        self,
        webhooks: Iterable[WebhookConfig],
        delivery_log: Path | str | None = None,
        *,
        slide_id: str | None = None,
    ) -> None:
        self._log = _DeliveryLog(Path(delivery_log) if delivery_log is not None else None)

        self._slide_id = slide_id
        self._endpoints = [_Endpoint(w, self._log) for w in webhooks]
        for ep in self._endpoints:
            ep.thread.start()
        self._closed = False

    @property
    def records(self) -> list[DeliveryRecord]:
        """Every attempt so far (the delivery log's lines, in memory)."""
        return list(self._log.records)

    @property
    def log_path(self) -> Path | None:
        return self._log.path

    def attach(self, hub: EventHub) -> None:
        """Send every event of ``hub`` to the endpoints that subscribed to its topic."""
        hub.on("*", self.submit)

    def submit(self, event: dict[str, Any], topic: str | None = None) -> int:
        """Queue ``event`` (a payload with ``topic``) for every matching endpoint; returns how many."""
        if self._closed:
            return 0
        top = topic or str(event.get("topic", ""))
        if not top:
            log.warning("webhooks: event without a topic ignored: %r", list(event)[:8])
            return 0
        if self._slide_id is not None and "slide_id" in event and event["slide_id"] != self._slide_id:
            return 0
        n = 0
        for ep in self._endpoints:
            if ep.wants(top):
                ep.submit(top, event)
                n += 1
        return n

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued event is delivered or finally failed; True if in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(ep.idle() for ep in self._endpoints):
                return True
            time.sleep(0.01)
        return all(ep.idle() for ep in self._endpoints)

    def close(self, timeout: float = 30.0) -> bool:
        """Deliver what is queued (up to ``timeout``), then stop; the rest is logged ``abandoned``."""
        if self._closed:
            return True
        self._closed = True
        done = self.flush(timeout)
        for ep in self._endpoints:
            ep._abort.set()
            ep.queue.put(None)
        for ep in self._endpoints:
            ep.thread.join(5.0)
        return done

    def __enter__(self) -> WebhookDispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
