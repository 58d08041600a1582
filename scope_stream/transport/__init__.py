"""The ZeroMQ streaming pipeline: protocol, broker, workers, sink, sources, events, security.

Heavy pieces load lazily; importing this package costs little (pyzmq only). See ``docs/protocol.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Analyzer",
    "BackpressureError",
    "ControlClient",
    "Endpoints",
    "EventSubscriber",
    "LocalPipeline",
    "PipelineError",
    "ProtocolError",
    "SourceError",
    "TileSource",
]

_LAZY = {
    "Analyzer": ".stages",
    "BackpressureError": ".source",
    "ControlClient": ".pipeline",
    "Endpoints": ".protocol",
    "EventSubscriber": ".events",
    "LocalPipeline": ".pipeline",
    "PipelineError": ".pipeline",
    "ProtocolError": ".protocol",
    "SourceError": ".source",
    "TileSource": ".source",
}

if TYPE_CHECKING:
    from .events import EventSubscriber
    from .pipeline import ControlClient, LocalPipeline, PipelineError
    from .protocol import Endpoints, ProtocolError
    from .source import BackpressureError, SourceError, TileSource
    from .stages import Analyzer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
