"""The ``scope-stream`` command line. Each command lives in its own module."""

from __future__ import annotations

from . import config_cmd  # noqa: F401  (registers commands)
from .app import app

# Command modules of the pipeline stages register themselves on import; a module that is not
# there yet is simply absent from the CLI.
for _name in ("demo", "pipeline", "scan", "train", "evaluate", "bench", "generate", "microscope"):
    try:
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - only while a stage is missing
        if _exc.name != f"{__name__}.{_name}":
            raise


def main() -> None:
    app()


__all__ = ["app", "main"]
