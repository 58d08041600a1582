"""Acquisition: the virtual microscope (a virtual slide + Python devices on a real MMCore) and adapters.

Names load lazily so that ``import scope_stream.acquire`` stays cheap:

* :class:`VirtualSlide`, :class:`PlantedCell` (``slide``)
* :func:`build_virtual_core`, :func:`close_core`, :class:`VirtualMMCore` (``virtual``)
* :func:`pycromanager_python_backend` (``pycromanager_compat``)
* :func:`sample_root` (``sample``)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pycromanager_compat import PycromanagerCore as PycromanagerCore
    from .pycromanager_compat import PycromanagerSession as PycromanagerSession
    from .pycromanager_compat import pycromanager_python_backend as pycromanager_python_backend
    from .sample import build_sample as build_sample
    from .sample import sample_root as sample_root
    from .slide import PlantedCell as PlantedCell
    from .slide import SlideError as SlideError
    from .slide import VirtualSlide as VirtualSlide
    from .slide import read_ground_truth as read_ground_truth
    from .slide import write_ground_truth as write_ground_truth
    from .virtual import VirtualMMCore as VirtualMMCore
    from .virtual import build_virtual_core as build_virtual_core
    from .virtual import close_core as close_core

_LAZY = {
    "VirtualSlide": "slide",
    "PlantedCell": "slide",
    "SlideError": "slide",
    "read_ground_truth": "slide",
    "write_ground_truth": "slide",
    "build_virtual_core": "virtual",
    "close_core": "virtual",
    "VirtualMMCore": "virtual",
    "pycromanager_python_backend": "pycromanager_compat",
    "PycromanagerCore": "pycromanager_compat",
    "PycromanagerSession": "pycromanager_compat",
    "sample_root": "sample",
    "build_sample": "sample",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{mod}", __name__), name)
