"""napari plugin for scope-stream (installed as ``scope_stream_napari``).

Contributions (``napari.yaml``): the *Scope Stream* dock widget, a reader for slide stores
(``<slide>.zarr``) and sample data (a scan of the virtual slide). Qt and napari are imported only
when napari loads a contribution; :func:`launch` is what the demo calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import napari

    from ._widget import ScopeStreamWidget

__all__ = ["launch"]


def launch(
    viewer: napari.Viewer | None = None,
    pipeline_info: dict[str, Any] | None = None,
    *,
    events: str | None = None,
    control: str | None = None,
    store: str | Path | None = None,
) -> ScopeStreamWidget:
    """Dock the Scope Stream widget in ``viewer`` (a new one if None) and connect it.

    ``pipeline_info`` may carry ``events``, ``control`` and ``store`` (what the demo knows);
    keyword arguments override it. Returns the widget; call ``napari.run()`` to show the viewer.
    """
    import napari

    from ._widget import ScopeStreamWidget

    info = dict(pipeline_info or {})
    events = events or info.get("events") or info.get("events_endpoint")
    control = control or info.get("control") or info.get("control_endpoint")
    store = store or info.get("store") or info.get("store_path")
    viewer = viewer or napari.Viewer(title="scope-stream")
    widget = ScopeStreamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Scope Stream", area="right")
    if events or store:
        widget.connect(events, control, store)
    return widget
