"""Where and how results are stored."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from .base import Section


class StoreConfig(Section):
    """One OME-Zarr store per slide under ``root``."""

    root: Path = Path("scans")
    crop_px: int = Field(default=32, ge=8)
