"""The OME-Zarr slide store (zarr v3): one store per slide; layout in ``docs/store.md``."""

from __future__ import annotations

from .slide_store import (
    FORMAT,
    FORMAT_VERSION,
    SlideStore,
    StoreError,
    StoreRefused,
    TileRecord,
    store_path_for,
    tile_key,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SlideStore",
    "StoreError",
    "StoreRefused",
    "TileRecord",
    "store_path_for",
    "tile_key",
]
