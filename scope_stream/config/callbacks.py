"""Callbacks for automated scanners: webhooks."""

from __future__ import annotations

from pydantic import Field

from .base import Section


class WebhookConfig(Section):
    """An HTTP endpoint that receives signed JSON events."""

    url: str
    events: list[str] = Field(default_factory=lambda: ["slide.done", "cell.flagged"])
    secret: str | None = None
    max_retries: int = Field(default=5, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)
    timeout_s: float = Field(default=5.0, gt=0)


class CallbacksConfig(Section):
    webhooks: list[WebhookConfig] = Field(default_factory=list)
