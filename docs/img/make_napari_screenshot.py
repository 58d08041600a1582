"""Make ``docs/img/napari-plugin.png`` (and ``napari-review.png``): the widget during a demo scan of the virtual slide.

    nice -n 10 xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/img/make_napari_screenshot.py \
        [--model models/cytodiffusion-pbc-32] [--tiles 16] [--out docs/img/napari-plugin.png]

A real napari viewer, the widget's *start demo* (``configs/demo.yaml``: a LocalPipeline with segmentation and
the diffusion classifier, the virtual microscope scanning through a ScanSession) with one worker; once
``--tiles`` tiles are shown, the top flag is re-imaged through the control endpoint; the window is grabbed
(whole scan, *Flags* tab), then again zoomed on the first cell of the *Review* tab, while the scan goes on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="classifier model directory (default: the configured)")
    ap.add_argument("--tiles", type=int, default=16, help="tiles to wait for before grabbing")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "napari-plugin.png")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication
    from scope_stream_napari._demo import DemoRunner, demo_config

    cfg = demo_config()
    cfg.pipeline.n_workers = 1
    if args.model is not None:
        cfg.classifier.model = args.model
    viewer = napari.Viewer(title="scope-stream demo", show=True)
    viewer.window._qt_window.resize(1600, 980)
    _, widget = viewer.window.add_plugin_dock_widget("scope-stream", "Scope Stream")
    app = QApplication.instance()
    assert app is not None

    def pump(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.02)

    def wait(cond, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + args.timeout
        while not cond():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}; errors: {widget.errors[-3:]}")
            pump(0.2)

    runner = DemoRunner(cfg, store_root=Path(tempfile.mkdtemp(prefix="scope-stream-shot-")))
    widget.start_demo(runner)
    wait(lambda: widget.n_tiles >= args.tiles and widget.table.total > 0, f"{args.tiles} tiles and a flag")
    target = widget.table.rows[0]
    widget.tabs.setCurrentIndex(1)
    widget.focus_cell(target.cell_id)
    widget.reimage_selected()
    wait(lambda: any(name.startswith("re-image r") for name in (lay.name for lay in viewer.layers)), "a re-image")
    # 1: the whole scan so far, with the flagged-cell table
    viewer.layers.selection.active = viewer.layers["scope-stream flags"]
    viewer.reset_view()
    widget.tabs.setCurrentIndex(1)
    pump(2.0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False)
    # 2: review, zoomed on the first cell to review (its re-image, if any, under it)
    widget.start_review()
    cur = widget.session.current if widget.session is not None else None
    if cur is not None:
        widget.focus_cell(cur.cell_id, zoom_um=150.0)
    pump(2.0)
    review_png = args.out.with_name(args.out.stem.replace("plugin", "review") + args.out.suffix)
    viewer.screenshot(str(review_png), canvas_only=False)
    print(
        f"wrote {args.out} and {review_png.name}: {widget.n_tiles} tiles, {widget.table.total} flags, "
        f"{len(widget.records)} classified cells, state {widget.lbl_state.text()!r}"
    )
    stopper = widget.stop_demo()
    widget.shutdown()
    if stopper is not None:
        stopper.join(120)
    viewer.close()


if __name__ == "__main__":
    main()
