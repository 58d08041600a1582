"""napari plugin for scope-stream (installed as ``scope_stream_napari``)."""
