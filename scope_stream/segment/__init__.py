"""Cell detection and segmentation in bright-field Romanowsky-stained smear tiles.

* :func:`segment_tile` -- white cells (nucleus + cytoplasm), red cells and platelets of a :class:`Tile`.
* :class:`StageDeduplicator` -- drops a cell already seen whole in an overlapping tile (stage µm).
* :func:`estimate_pixel_size` -- µm/px from the red cells' size (7.5 µm) when the pixel size is unknown.
* :func:`extract_crops` -- fixed-physical-size crops around cells, resampled for the classifier.
* :mod:`.evaluate` -- figures on a Pascal-VOC folder (``scope-stream evaluate detection``).

The method is described in ``docs/segmentation.md``.
"""

from __future__ import annotations

from scope_stream.config.segment import SegmentConfig

from .crops import extract_crops
from .dedup import StageDeduplicator
from .detect import SegmentDebug, cell_count, segment_image, segment_image_debug, segment_tile, segment_tile_debug
from .pixel_size import PixelSizeEstimate, estimate_pixel_size

__all__ = [
    "PixelSizeEstimate",
    "SegmentConfig",
    "SegmentDebug",
    "StageDeduplicator",
    "cell_count",
    "estimate_pixel_size",
    "extract_crops",
    "segment_image",
    "segment_image_debug",
    "segment_tile",
    "segment_tile_debug",
]
