"""Callbacks for automated scanners: signed webhooks with retries and a delivery log."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, field_validator

from .base import Section

#: Event topics published by the pipeline (docs/protocol.md); ``*`` subscribes a webhook to all of them.
KNOWN_TOPICS = ("scan.started", "tile.done", "cell.flagged", "slide.done", "reimage.done", "pipeline.stats")


class WebhookConfig(Section):
    """An HTTP(S) endpoint that receives signed JSON events (docs/callbacks.md)."""

    url: str
    events: list[str] = Field(default_factory=lambda: ["slide.done", "cell.flagged"])
    secret: str | None = None  # HMAC-SHA256 key for X-Scope-Stream-Signature
    secret_env: str | None = None  # or: the name of an environment variable holding the secret
    max_retries: int = Field(default=5, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)  # first retry after this, doubling each time
    max_backoff_s: float = Field(default=30.0, ge=0)
    timeout_s: float = Field(default=5.0, gt=0)
    queue_size: int = Field(default=10_000, ge=1)  # events waiting for this endpoint; overflow is logged
    headers: dict[str, str] = Field(default_factory=dict)  # extra request headers (e.g. an API token)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"webhook url must be http(s)://host[:port]/path, got {v!r}")
        return v

    @field_validator("events")
    @classmethod
    def _topics(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a webhook needs at least one event topic (or '*')")
        bad = [t for t in v if t != "*" and t not in KNOWN_TOPICS]
        if bad:
            raise ValueError(f"unknown event topics {bad}; known: {list(KNOWN_TOPICS)} or '*'")
        return v


class CallbacksConfig(Section):
    """Webhooks and where their delivery log goes."""

    webhooks: list[WebhookConfig] = Field(default_factory=list)
    delivery_log: Path | None = None  # JSON lines; None: <store.root>/webhook-deliveries.jsonl
