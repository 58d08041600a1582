"""Where and how results are stored (one OME-Zarr store per slide; layout in docs/store.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section


class StoreConfig(Section):
    """One OME-Zarr (zarr v3) store per slide under ``root``: ``<root>/<slide_id>.zarr``."""

    root: Path = Path("scans")
    crop_px: int = Field(default=32, ge=8)  # crop side used when a store is created before any crop arrives
    save_tiles: bool = True  # keep the tile pixels (False: positions, cells and crops only)
    compressor: Literal["lz4", "zstd", "none"] = "lz4"  # for tile pixels; tables always use zstd
    mosaic_downsample: int = Field(default=4, ge=0, le=256)  # 0: no mosaic overview image
    mosaic_max_px: int = Field(default=32768, ge=256)  # the downsample grows so that the mosaic fits
    commit_every: int = Field(default=32, ge=1, le=4096)  # the sink commits up to this many tiles at once
    table_chunk_rows: int = Field(default=4096, ge=16)
