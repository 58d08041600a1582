"""scope-stream: live detection of abnormal blood cells while a slide is scanned.

Micro-Manager (pycromanager / pymmcore-plus) -> ZeroMQ pipeline -> segmentation ->
CytoDiffusion-style generative classifier -> OME-Zarr store -> napari.

Importing this package is cheap: torch, diffusers, napari and Qt load only when used.
"""

__version__ = "0.1.0"
