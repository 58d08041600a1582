"""Callbacks for automated scanners and scripts: Python callbacks and signed webhooks on pipeline events.

* :class:`EventHub` -- ``hub.on("cell.flagged", fn)`` over the pipeline's events socket;
* :class:`WebhookDispatcher` -- Standard Webhooks (signed HTTP POSTs of JSON events) with retries, no
  redirects and a JSON-lines delivery log; :func:`verify_signature` for receivers, :func:`new_secret`;
* :class:`Callbacks` -- both, built from a :class:`~scope_stream.config.ScopeStreamConfig`.

See ``docs/callbacks.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hub import EventCallback, EventHub, topic_matches
from .webhooks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    TOLERANCE_S,
    DeliveryRecord,
    WebhookDispatcher,
    build_body,
    new_secret,
    sign,
    verify_signature,
)

if TYPE_CHECKING:
    from scope_stream.config import ScopeStreamConfig

__all__ = [
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOLERANCE_S",
    "Callbacks",
    "DeliveryRecord",
    "EventCallback",
    "EventHub",
    "WebhookDispatcher",
    "build_body",
    "new_secret",
    "sign",
    "topic_matches",
    "verify_signature",
]


class Callbacks:
    """An :class:`EventHub` on ``events_endpoint`` with the configured webhooks attached.

    >>> cb = Callbacks(cfg, pipeline.events_endpoint).start()        # doctest: +SKIP
    >>> cb.on("slide.done", lambda ev: print(ev["summary"]["differential"]))  # doctest: +SKIP
    >>> cb.close()                                                    # doctest: +SKIP

    The delivery log goes to ``callbacks.delivery_log`` or ``<store.root>/webhook-deliveries.jsonl``.
    """

    def __init__(
        self,
        cfg: ScopeStreamConfig,
        events_endpoint: str | None,
        *,
        slide_id: str | None = None,
        curve_keys_dir: Path | str | None = None,
    ) -> None:
        keys = curve_keys_dir if curve_keys_dir is not None else cfg.pipeline.curve_keys_dir
        self.hub = EventHub(events_endpoint, curve_keys_dir=keys)
        self.webhooks: WebhookDispatcher | None = None
        if cfg.callbacks.webhooks:
            log_path = cfg.callbacks.delivery_log or (Path(cfg.store.root) / "webhook-deliveries.jsonl")
            self.webhooks = WebhookDispatcher(cfg.callbacks.webhooks, log_path, slide_id=slide_id)
            self.webhooks.attach(self.hub)

    def on(self, topic: str, fn: EventCallback | None = None) -> Any:
        """Register a Python callback (see :meth:`EventHub.on`)."""
        return self.hub.on(topic, fn)

    def start(self, wait_connected: float = 2.0) -> Callbacks:
        self.hub.start(wait_connected)
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the hub (dispatching what arrived), then deliver queued webhooks up to ``timeout``."""
        self.hub.close(min(timeout, 5.0))
        if self.webhooks is not None:
            self.webhooks.close(timeout)

    def __enter__(self) -> Callbacks:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
