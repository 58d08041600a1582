"""Cell detection and segmentation (``segment:`` section).

All sizes are physical (µm, µm²) so that one configuration works at any pixel size; the tile's
``pixel_size_um`` converts them. Stain thresholds are in optical density (OD) relative to the
tile's own background, so they do not depend on bit depth, exposure or white balance.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section


class SegmentConfig(Section):
    """Classic (scikit-image / scipy) segmentation of Romanowsky-stained bright-field tiles."""

    method: Literal["classic"] = "classic"
    #: internal analysis resolution: tiles finer than this are block-averaged towards it (never upsampled)
    work_um_per_px: float = Field(default=0.3, gt=0, le=2.0)
    #: tiles coarser than this cannot be segmented (a platelet would be under two pixels): ValueError
    max_um_per_px: float = Field(default=1.5, gt=0, le=10.0)

    # ---- white cells
    #: physical side of a white-cell crop; 25.6 µm matches the PBC training crops (128 px x 0.2 µm/px)
    crop_um: float = Field(default=25.6, gt=0)
    crop_px: int = Field(default=32, ge=8, le=512)  # resampled to the classifier's input size
    #: white cells whose outline (nucleus + cytoplasm) is narrower than this are dropped
    min_wbc_diameter_um: float = Field(default=5.0, gt=0)
    #: larger stained groups are not one white cell; also the scan overlap needed (see docs/segmentation.md)
    max_wbc_diameter_um: float = Field(default=30.0, gt=0)
    #: smallest stained nucleus (all lobes together) that makes a white cell; smaller purple blobs are platelets
    min_nucleus_area_um2: float = Field(default=22.0, gt=0)
    #: ... except a round nucleus of at least this area that stains densely (a late erythroblast's):
    min_small_nucleus_area_um2: float = Field(default=10.0, gt=0)
    #: the share of its pixels above twice the nuclear threshold, and its 90th percentile / the threshold
    small_nucleus_min_dense_fraction: float = Field(default=0.5, gt=0, le=1)
    small_nucleus_min_peak_ratio: float = Field(default=2.5, gt=0)
    #: nuclear lobes closer than this belong to one cell
    lobe_gap_um: float = Field(default=1.2, ge=0)
    #: groups up to this far apart also merge when together they span at most max_nucleus_span_um
    lobe_merge_gap_um: float = Field(default=3.0, ge=0)
    max_nucleus_span_um: float = Field(default=19.0, gt=0)
    #: nuclear-stain threshold (OD): None = automatic (Otsu), clamped to [nucleus_od_min, nucleus_od_max]
    nucleus_od: float | None = Field(default=None, gt=0)
    nucleus_od_min: float = Field(default=0.10, gt=0)
    nucleus_od_max: float = Field(default=0.30, gt=0)
    #: cytoplasm: pixels around a nucleus with total OD above this ...
    cytoplasm_od: float = Field(default=0.04, gt=0)
    #: ... whose red-cell (eosin) share of the OD stays below this ...
    cytoplasm_max_eosin: float = Field(default=0.45, gt=0, le=1)
    #: ... up to this far beyond the nucleus
    max_cytoplasm_um: float = Field(default=6.0, gt=0)

    # ---- red cells
    rbc_diameter_um: float = Field(default=7.5, gt=0)
    #: objects below this fraction of a typical red cell's area are fragments, not cells
    min_rbc_area_fraction: float = Field(default=0.3, gt=0, lt=1)
    #: total-OD threshold between glass and cells: None = automatic (foreground_otsu_fraction x Otsu's
    #: threshold, which falls between glass and the bulk of the red cells: pale cells need a lower one),
    #: clamped to [foreground_od_min, foreground_od_max]
    foreground_od: float | None = Field(default=None, gt=0)
    foreground_otsu_fraction: float = Field(default=0.5, gt=0, le=1)
    foreground_od_min: float = Field(default=0.04, gt=0)
    foreground_od_max: float = Field(default=0.2, gt=0)
    #: red-cell centres: peaks of the scale-normalised LoG of the foreground, sigma = rbc_log_sigma x radius / sqrt 2
    rbc_log_sigma: float = Field(default=0.9, gt=0, le=2)
    #: ... at least rbc_min_separation x radius apart ...
    rbc_min_separation: float = Field(default=0.6, gt=0, le=3)
    #: ... with a response of at least this (a full disk gives about 0.4)
    rbc_min_response: float = Field(default=0.05, gt=0, lt=1)
    detect_rbc: bool = True

    # ---- platelets
    detect_platelets: bool = True
    #: the blob scale platelets are looked for at (LoG sigma = platelet_blob_um / 2 / sqrt 2) ...
    platelet_blob_um: float = Field(default=1.6, gt=0)
    #: ... and a single platelet's typical diameter (larger blobs count as clumps of several)
    platelet_diameter_um: float = Field(default=2.5, gt=0)
    min_platelet_diameter_um: float = Field(default=1.0, gt=0)
    max_platelet_diameter_um: float = Field(default=5.0, gt=0)
    #: smallest scale-normalised blob response (nuclear-stain OD) of a platelet
    platelet_min_response: float = Field(default=0.06, gt=0)
    #: a platelet's eosin must stay below this fraction of its nuclear stain (purple, not red-cell coloured)
    platelet_max_eosin_ratio: float = Field(default=0.2)
    #: ... or, for a blob of at least platelet_strong_response, below platelet_strong_max_eosin_ratio
    platelet_strong_response: float = Field(default=0.12, gt=0)
    platelet_strong_max_eosin_ratio: float = Field(default=0.45)

    # ---- tiles, borders and output
    #: drop cells whose mask touches the tile border (an overlapping neighbour tile sees them whole)
    drop_border_cells: bool = True
    #: cells from different tiles whose stage centroids are closer than this are one cell
    dedup_radius_um: float = Field(default=4.0, ge=0)
    max_contour_vertices: int = Field(default=32, ge=4, le=1000)
    #: tiles whose relative contrast is below this hold nothing (blank, black or saturated frames)
    min_contrast: float = Field(default=0.05, ge=0, lt=1)

    @model_validator(mode="after")
    def _ranges(self) -> SegmentConfig:
        if self.max_wbc_diameter_um <= self.min_wbc_diameter_um:
            raise ValueError(
                f"max_wbc_diameter_um ({self.max_wbc_diameter_um}) must exceed "
                f"min_wbc_diameter_um ({self.min_wbc_diameter_um})"
            )
        if self.nucleus_od_max < self.nucleus_od_min:
            raise ValueError(f"nucleus_od_max ({self.nucleus_od_max}) < nucleus_od_min ({self.nucleus_od_min})")
        if self.foreground_od_max < self.foreground_od_min:
            raise ValueError(
                f"foreground_od_max ({self.foreground_od_max}) < foreground_od_min ({self.foreground_od_min})"
            )
        if self.max_platelet_diameter_um <= self.min_platelet_diameter_um:
            raise ValueError(
                f"max_platelet_diameter_um ({self.max_platelet_diameter_um}) must exceed "
                f"min_platelet_diameter_um ({self.min_platelet_diameter_um})"
            )
        return self
