"""Acquisition listeners: frames from pymmcore-plus, pycromanager, the Micro-Manager GUI or a replay -> tiles.

* :class:`PymmcorePlusListener` -- ``mda.events.frameReady`` of any ``CMMCorePlus``;
* :class:`PycromanagerListener` / :func:`stream_to_scope_stream` -- pycromanager's ``image_process_fn``
  (Java and Python backends) and ``image_saved_fn``;
* :class:`DatastoreFollower` with :class:`MicroManagerGuiFeed` (acquisitions started in the GUI's own
  MDA window) or :class:`DatasetFeed` (a dataset being written);
* :class:`ReplaySource` -- a folder of tiles with positions, or the store of an earlier scan.

Every listener sends :class:`~scope_stream.vocabulary.Tile` objects to a *sink* (the pipeline's
``TileSource`` or any ``send(tile)``/callable), off the acquisition thread. See ``docs/acquisition.md``.
"""

from __future__ import annotations

from .follower import DatasetFeed, DatastoreFeed, DatastoreFollower, MicroManagerGuiFeed
from .pycromanager import (
    PycromanagerListener,
    TileNamer,
    default_namer,
    detect_backend,
    stream_to_scope_stream,
    tile_from_pycromanager,
)
from .pymmcore_plus import SCOPE_STREAM_KEY, PymmcorePlusListener
from .replay import ReplayError, ReplaySource, write_replay_folder
from .tiles import FrameError, SendStats, ThreadedSink, TileSink, deliver

__all__ = [
    "SCOPE_STREAM_KEY",
    "DatasetFeed",
    "DatastoreFeed",
    "DatastoreFollower",
    "FrameError",
    "MicroManagerGuiFeed",
    "PycromanagerListener",
    "PymmcorePlusListener",
    "ReplayError",
    "ReplaySource",
    "SendStats",
    "ThreadedSink",
    "TileNamer",
    "TileSink",
    "default_namer",
    "deliver",
    "detect_backend",
    "stream_to_scope_stream",
    "tile_from_pycromanager",
    "write_replay_folder",
]
