"""Callbacks for automated scanners: signed webhooks with retries and a delivery log."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import urlparse

from pydantic import ConfigDict, Field, field_validator

from .base import Section

#: Event topics published by the pipeline (docs/protocol.md); ``*`` subscribes a webhook to all of them.
KNOWN_TOPICS = ("scan.started", "tile.done", "cell.flagged", "slide.done", "reimage.done", "pipeline.stats")


class WebhookConfig(Section):
    """An HTTP(S) endpoint that receives Standard Webhooks: signed JSON events (docs/callbacks.md)."""

    # a secret or a token in a header must never be echoed in a validation error
    model_config = ConfigDict(hide_input_in_errors=True)

    url: str
    events: list[str] = Field(default_factory=lambda: ["slide.done", "cell.flagged"])
    # whsec_<base64 key> (Standard Webhooks): signs webhook-signature; kept out of repr and logs
    secret: str | None = Field(default=None, repr=False)
    secret_env: str | None = None  # or: the name of an environment variable holding the secret
    max_retries: int = Field(default=5, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)  # first retry after this, doubling each time
    max_backoff_s: float = Field(default=30.0, ge=0)
    timeout_s: float = Field(default=5.0, gt=0)
    queue_size: int = Field(default=10_000, ge=1)  # events waiting for this endpoint; overflow is logged
    # extra request headers (e.g. an API token); sent only to `url` (redirects are never followed), not in repr
    headers: dict[str, str] = Field(default_factory=dict, repr=False)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"webhook url must be http(s)://host[:port]/path, got {v!r}")
        return v

    @field_validator("secret")
    @classmethod
    def _whsec(cls, v: str | None) -> str | None:
        if v is not None:
            check_secret(v)
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


def check_secret(secret: str) -> bytes:
    """The key of a Standard Webhooks secret ``whsec_<base64>``; ``ValueError`` (never echoing it) if malformed."""
    hint = "a webhook secret must be 'whsec_' followed by base64 (make one with scope_stream.callbacks.new_secret())"
    if not isinstance(secret, str) or not secret.startswith("whsec_"):
        raise ValueError(hint)
    b64 = secret[len("whsec_") :].strip()
    try:
        key = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(hint) from None
    if len(key) < 16:
        raise ValueError(f"a webhook secret needs at least 16 bytes of key (24-64 recommended), got {len(key)}")
    return key


class CallbacksConfig(Section):
    """Webhooks and where their delivery log goes."""

    webhooks: list[WebhookConfig] = Field(default_factory=list)
    delivery_log: Path | None = None  # JSON lines; None: <store.root>/webhook-deliveries.jsonl
