"""View models of the napari plugin, free of Qt and napari so they are tested (and reused) without a display.

* :mod:`.mosaic`   -- the live mosaic: tiles placed by stage position into one (multiscale) canvas.
* :mod:`.cells`    -- :class:`CellRecord`, the row every view shows, from store rows or events.
* :mod:`.flags`    -- flag layer data (colour by class or anomaly, size by uncertainty), flagged-cell table.
* :mod:`.counts`   -- live differential count and the slide's review state.
* :mod:`.review`   -- keyboard-driven, timed operator review.
* :mod:`.reimage`  -- re-image targets from a selected flag or a drawn rectangle.
* :mod:`.follow`   -- incremental reading of a slide store being written; review writers.
* :mod:`.live`     -- the background feed (events + store) the widget drains from a GUI timer.
* :mod:`.report`   -- the review part of the slide report (JSON + CSV).
"""

from __future__ import annotations

from .cells import CellRecord
from .counts import DifferentialCount, SlideState, slide_state
from .flags import PBC_CLASSES, ClassPalette, FlagFilter, FlaggedCellTable, flag_layer_data
from .follow import AsyncReviewWriter, ReviewWriter, StoreFollower, is_slide_store
from .mosaic import MosaicCanvas, tile_translate_um
from .reimage import ReimageTarget, plan_targets
from .report import export_review, review_report
from .review import Decision, KeyMap, ReviewSession

__all__ = [
    "PBC_CLASSES",
    "AsyncReviewWriter",
    "CellRecord",
    "ClassPalette",
    "Decision",
    "DifferentialCount",
    "FlagFilter",
    "FlaggedCellTable",
    "KeyMap",
    "MosaicCanvas",
    "ReimageTarget",
    "ReviewSession",
    "ReviewWriter",
    "SlideState",
    "StoreFollower",
    "export_review",
    "flag_layer_data",
    "is_slide_store",
    "plan_targets",
    "review_report",
    "slide_state",
    "tile_translate_um",
]
