"""The "Scope Stream" dock widget: live mosaic, flags, differential, re-image and operator review.

Threading (see docs/napari.md): nothing in here runs on a background thread except

* :class:`scope_stream.view.live.LiveFeed` -- events + store reading + downsampling, feeding a queue;
* re-image requests and control-status queries -- napari ``create_worker`` jobs whose signals
  arrive on the GUI thread;
* review writes -- :class:`scope_stream.view.follow.AsyncReviewWriter`.

A 50 ms ``QTimer`` on the GUI thread drains the feed with a time budget, updates the models and
refreshes each layer at most once per tick, so the viewer stays responsive however fast tiles come.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import math
import os
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor, QIcon
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import ensure_main_thread

from scope_stream.classify.domain import domain_check
from scope_stream.view.cells import CellRecord
from scope_stream.view.counts import DifferentialCount, SlideState, slide_state
from scope_stream.view.flags import PBC_CLASSES, ClassPalette, FlagFilter, FlaggedCellTable, flag_layer_data
from scope_stream.view.follow import AsyncReviewWriter
from scope_stream.view.live import (
    CellsRetracted,
    CellsUpdate,
    FeedError,
    FeedStatus,
    FlagSeen,
    LiveFeed,
    MosaicSnapshot,
    ReimageEvent,
    ReimageTile,
    ReviewsUpdate,
    ScanTile,
    SlideUpdate,
    StatsUpdate,
    Update,
    describe_stats,
)
from scope_stream.view.mosaic import MosaicCanvas, tile_translate_um
from scope_stream.view.reimage import ReimagePlanError, ReimageTarget, explain_error, plan_targets, rect_from_corners
from scope_stream.view.review import Decision, KeyMap, ReviewSession

from ._qt_util import colour_icon, to_pixmap
from ._review_panel import ReviewPanel

if TYPE_CHECKING:
    import napari

    from ._demo import DemoRunner

__all__ = ["ScopeStreamWidget", "default_endpoints"]

log = logging.getLogger(__name__)

MOSAIC_LAYER = "scope-stream mosaic"
FLAGS_LAYER = "scope-stream flags"
REIMAGE_CELLS_LAYER = "scope-stream re-imaged cells"
REGIONS_LAYER = "re-image regions"
FLAG_BORDER = 0.15  # circle line width, relative to the marker size

_STATE_STYLE = {
    SlideState.WAITING: "color: #aaa;",
    SlideState.SCANNING: "color: #8cf;",
    SlideState.NEEDS_REVIEW: "color: #000; background: #f5a623; padding: 2px 6px; font-weight: bold;",
    SlideState.REVIEWED: "color: #000; background: #7ed321; padding: 2px 6px; font-weight: bold;",
    SlideState.NORMAL: "color: #7ed321; font-weight: bold;",
}


def default_endpoints() -> tuple[str, str]:
    """(events, control) endpoints to pre-fill: ``$SCOPE_STREAM_EVENTS`` / ``$SCOPE_STREAM_CONTROL``,
    else those implied by a fixed ``pipeline.base_port`` / ``scan.control_port`` in
    ``$SCOPE_STREAM_CONFIG``, else empty (the demo passes its own to :meth:`ScopeStreamWidget.connect`).
    """
    events = os.environ.get("SCOPE_STREAM_EVENTS", "")
    control = os.environ.get("SCOPE_STREAM_CONTROL", "")
    cfg_path = os.environ.get("SCOPE_STREAM_CONFIG")
    if cfg_path and not (events and control):
        try:
            from scope_stream.config import load_scope_config

            cfg = load_scope_config(cfg_path)
            host = cfg.pipeline.host if cfg.pipeline.host not in ("0.0.0.0", "*") else "127.0.0.1"
            if not events and cfg.pipeline.base_port:
                events = f"tcp://{host}:{cfg.pipeline.base_port + 3}"
            if not control and cfg.scan.control_port:
                control = f"tcp://{cfg.scan.control_host}:{cfg.scan.control_port}"
        except Exception as exc:  # a bad config file must not stop the widget from opening
            log.warning("SCOPE_STREAM_CONFIG %s: %s", cfg_path, exc)
    return events, control


def _reimage_job(
    endpoint: str,
    targets: list[ReimageTarget],
    objective: str,
    z_offsets: list[float] | None,
    slide_id: str,
    timeout_s: float,
) -> Generator[tuple[int, int, str], None, dict[str, Any]]:
    """Background job: ping the control endpoint, then request each target in turn (yields progress).

    Returns ``{"results": [reimage.done replies], "error": None | (code, detail)}``: refusals and
    timeouts are results to show, not exceptions (those are left for bugs, which napari reports).
    """
    from scope_stream.acquire.control import ControlError, ReimageClient

    client = ReimageClient(endpoint, timeout_s=timeout_s)
    results: list[dict[str, Any]] = []
    try:
        yield 0, len(targets), f"contacting {endpoint}…"
        if not client.ping(timeout_s=min(5.0, timeout_s)):
            return {"results": results, "error": ("timeout", f"no connection to {endpoint}")}
        for i, t in enumerate(targets):
            yield i, len(targets), f"moving to ({t.x_um:.1f}, {t.y_um:.1f}) µm and acquiring…"
            try:
                reply = client.reimage(
                    t.x_um,
                    t.y_um,
                    objective=objective or None,
                    z_offsets_um=z_offsets,
                    slide_id=slide_id or None,
                    reason=t.reason or (f"operator: cell {t.cell_id}" if t.cell_id else "operator"),
                )
            except ControlError as exc:
                return {"results": results, "error": (exc.code, exc.detail)}
            results.append(reply)
            yield i + 1, len(targets), f"acquired {', '.join(reply.get('tile_ids', []))}; analysing…"
        return {"results": results, "error": None}
    finally:
        client.close()


def _status_job(endpoint: str) -> dict[str, Any]:
    from scope_stream.acquire.control import ReimageClient

    client = ReimageClient(endpoint, timeout_s=5.0)
    try:
        return client.status(timeout_s=5.0)
    finally:
        client.close()


class ScopeStreamWidget(QWidget):
    """napari dock widget for scope-stream (see the module docstring and docs/napari.md).

    Public API, for the demo and scripts::

        w = ScopeStreamWidget(viewer)
        w.connect(events_endpoint="tcp://127.0.0.1:5603", control_endpoint="tcp://127.0.0.1:5610",
                  store_path="scans/s1.zarr")     # any of the three may be None
        w.open_store("scans/s1.zarr")             # a finished (or running) scan, no pipeline needed
        w.disconnect_pipeline()
    """

    TICK_MS = 50
    TICK_BUDGET_S = 0.03
    TABLE_MAX_ROWS = 300
    TABLE_REFRESH_S = 0.5
    FLAGS_REFRESH_S = 0.3
    SNAPSHOT_AFTER = 64  # catching up on more committed tiles than this: start from the store's overview
    FLAG_SIZE_UM = 10.0  # ring diameter of a certain call (a white cell is ~10-15 µm)
    FLAG_UNCERTAINTY_GAIN = 1.0  # ... times (1 + gain x uncertainty)

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.colours = ClassPalette()
        self.table = FlaggedCellTable()
        self.counts = DifferentialCount(classes=[])
        self.records: dict[str, CellRecord] = {}
        self.crops: dict[int, np.ndarray] = {}
        self.canvas: MosaicCanvas | None = None
        self.feed: LiveFeed | None = None
        self.writer: AsyncReviewWriter | None = None
        self.session: ReviewSession | None = None
        self.store_path: Path | None = None
        self.slide_id = ""
        self.status = ""
        self.metadata: dict[str, Any] = {}
        self.control_endpoint = ""
        self.control_status: dict[str, Any] = {}
        self.n_tiles = 0
        self.reimage_layers: dict[str, Any] = {}
        self.reimage_cells: dict[str, CellRecord] = {}
        self.reimage_replies: list[dict[str, Any]] = []  # reimage.done replies of the control endpoint
        self.errors: list[str] = []
        self.tick_seconds: list[float] = []  # wall time of each tick that did work (responsiveness metric)
        self._selected_cell = ""
        self._classes: list[str] = []
        self._dirty: set[str] = set()
        self._mosaic_realloc = False
        self._table_refreshed_at = 0.0
        self._flags_refreshed_at = 0.0
        self._icons: dict[str, QIcon] = {}
        self._reimage_worker: Any = None
        self._status_worker: Any = None
        self._pending_reimage: set[str] = set()
        self._syncing_selection = False
        self._demo: DemoRunner | None = None
        self._flag_ids: list[str] = []

        self._build_ui()
        self.timer = QTimer(self)
        self.timer.setInterval(self.TICK_MS)
        self.timer.timeout.connect(self._on_tick)
        self.timer.start()
        self.destroyed.connect(self._make_cleanup())

    # ================================================================== UI
    def _build_ui(self) -> None:
        self.setMinimumWidth(380)
        root = QVBoxLayout(self)
        # ---- header: slide, state, counts, connection
        self.lbl_slide = QLabel("no slide")
        self.lbl_slide.setStyleSheet("font-weight: bold; font-size: 12pt;")
        self.lbl_state = QLabel(SlideState.WAITING.value)
        self.lbl_state.setStyleSheet(_STATE_STYLE[SlideState.WAITING])
        head = QHBoxLayout()
        head.addWidget(self.lbl_slide, 1)
        head.addWidget(self.lbl_state)
        root.addLayout(head)
        self.lbl_totals = QLabel("tiles 0 · cells 0 · flagged 0")
        self.lbl_conn = QLabel("not connected")
        self.lbl_conn.setWordWrap(True)
        self.lbl_conn.setStyleSheet("color: #aaa;")
        self.lbl_stats = QLabel("")
        self.lbl_stats.setStyleSheet("color: #aaa;")
        self.lbl_error = QLabel("")
        self.lbl_error.setWordWrap(True)
        self.lbl_error.setStyleSheet("color: #ff6b6b;")
        for w in (self.lbl_totals, self.lbl_conn, self.lbl_stats, self.lbl_error):
            root.addWidget(w)

        self.tabs = QTabWidget()
        root.addWidget(self.tabs, 1)
        self.tabs.addTab(self._build_live_tab(), "Live")
        self.tabs.addTab(self._build_flags_tab(), "Flags")
        self.review_panel = ReviewPanel(self._crop_for, self.colours)
        self.review_panel.decided.connect(self._on_decided)
        self.review_panel.moved.connect(self._on_review_moved)
        review_tab = QWidget()
        rl = QVBoxLayout(review_tab)
        row = QHBoxLayout()
        row.addWidget(QLabel("reviewer"))
        self.ed_reviewer = QLineEdit(_user())
        self.ed_reviewer.editingFinished.connect(self._on_reviewer_changed)
        row.addWidget(self.ed_reviewer, 1)
        self.cb_review_scope = QComboBox()
        self.cb_review_scope.addItems(["flagged cells", "all classified cells"])
        self.cb_review_scope.currentIndexChanged.connect(lambda _i: self._rebuild_session())
        row.addWidget(self.cb_review_scope)
        rl.addLayout(row)
        rl.addWidget(self.review_panel, 1)
        row2 = QHBoxLayout()
        self.btn_review_start = QPushButton("start review (focus keyboard)")
        self.btn_review_start.clicked.connect(self.start_review)
        self.btn_export = QPushButton("export review")
        self.btn_export.clicked.connect(lambda: self._run_quietly(self.export_review))
        row2.addWidget(self.btn_review_start)
        row2.addWidget(self.btn_export)
        rl.addLayout(row2)
        self.lbl_review_save = QLabel("")
        self.lbl_review_save.setWordWrap(True)
        rl.addWidget(self.lbl_review_save)
        self.lbl_review_keys = QLabel("")  # the review key map (also the panel's tooltip)
        self.lbl_review_keys.setWordWrap(True)
        self.lbl_review_keys.setStyleSheet("color: grey; font-size: 11px;")
        rl.addWidget(self.lbl_review_keys)
        self._show_review_keys(KeyMap.for_model(()))
        self.tabs.addTab(review_tab, "Review")

    def _build_live_tab(self) -> QWidget:
        tab = QWidget()
        lay = QVBoxLayout(tab)
        conn = QGroupBox("pipeline")
        form = QFormLayout(conn)
        events, control = default_endpoints()
        self.ed_events = QLineEdit(events)
        self.ed_events.setPlaceholderText("tcp://127.0.0.1:PORT (events PUB)")
        self.ed_control = QLineEdit(control)
        self.ed_control.setPlaceholderText("tcp://127.0.0.1:PORT (re-image control)")
        self.ed_store = QLineEdit("")
        self.ed_store.setPlaceholderText("learnt from the events, or a <slide>.zarr")
        form.addRow("events", self.ed_events)
        form.addRow("control", self.ed_control)
        form.addRow("store", self.ed_store)
        btns = QHBoxLayout()
        self.btn_connect = QPushButton("connect")
        self.btn_connect.clicked.connect(self._on_connect_clicked)
        self.btn_open = QPushButton("open store…")
        self.btn_open.clicked.connect(self._on_open_clicked)
        self.btn_demo = QPushButton("start demo")
        self.btn_demo.setToolTip("scan the virtual microscope with a local pipeline")
        self.btn_demo.clicked.connect(lambda: self.start_demo())
        self.btn_disconnect = QPushButton("disconnect")
        self.btn_disconnect.clicked.connect(self.disconnect_pipeline)
        for b in (self.btn_connect, self.btn_open, self.btn_demo, self.btn_disconnect):
            btns.addWidget(b)
        form.addRow(btns)
        lay.addWidget(conn)

        disp = QGroupBox("flags shown")
        df = QFormLayout(disp)
        self.cb_color = QComboBox()
        self.cb_color.addItems(["class", "anomaly"])
        self.cb_color.currentIndexChanged.connect(lambda _i: self._apply_filter())
        df.addRow("colour by", self.cb_color)
        self.sp_threshold = QDoubleSpinBox()
        self.sp_threshold.setRange(-1000.0, 1000.0)
        self.sp_threshold.setDecimals(2)
        self.sp_threshold.setSingleStep(0.05)
        self.sp_threshold.setValue(0.0)
        self.sp_threshold.valueChanged.connect(lambda _v: self._apply_filter())
        df.addRow("score ≥", self.sp_threshold)
        self.chk_reviewed = QCheckBox("show reviewed cells")
        self.chk_reviewed.setChecked(True)
        self.chk_reviewed.toggled.connect(lambda _b: self._apply_filter())
        df.addRow(self.chk_reviewed)
        self.lst_classes = QListWidget()
        self.lst_classes.setMaximumHeight(110)
        self.lst_classes.itemChanged.connect(lambda _it: self._apply_filter())
        df.addRow("classes", self.lst_classes)
        lay.addWidget(disp)

        diff = QGroupBox("differential (classified white cells)")
        dl = QVBoxLayout(diff)
        self.tbl_counts = QTableWidget(0, 4)
        self.tbl_counts.setHorizontalHeaderLabels(["class", "model", "after review", "%"])
        _header(self.tbl_counts.verticalHeader()).setVisible(False)
        self.tbl_counts.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        _header(self.tbl_counts.horizontalHeader()).setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        dl.addWidget(self.tbl_counts)
        self.lbl_kinds = QLabel("")
        dl.addWidget(self.lbl_kinds)
        lay.addWidget(diff, 1)
        return tab

    def _build_flags_tab(self) -> QWidget:
        tab = QWidget()
        lay = QVBoxLayout(tab)
        self.lbl_table = QLabel("flagged cells, highest score first — click to centre the view")
        lay.addWidget(self.lbl_table)
        self.tbl_flags = QTableWidget(0, 6)
        self.tbl_flags.setHorizontalHeaderLabels(["cell", "class", "score", "uncert.", "why", "review"])
        _header(self.tbl_flags.verticalHeader()).setVisible(False)
        self.tbl_flags.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.tbl_flags.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.tbl_flags.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.tbl_flags.setIconSize(to_pixmap(np.zeros((2, 2), np.uint8), 40).size())
        _header(self.tbl_flags.verticalHeader()).setDefaultSectionSize(44)
        _header(self.tbl_flags.horizontalHeader()).setStretchLastSection(True)
        self.tbl_flags.itemSelectionChanged.connect(self._on_table_selection)
        lay.addWidget(self.tbl_flags, 1)

        rg = QGroupBox("re-image")
        rf = QFormLayout(rg)
        self.cb_objective = QComboBox()
        self.cb_objective.setEditable(True)
        self.cb_objective.addItem("")
        self.cb_objective.setToolTip("empty: the scan's configured re-image objective")
        rf.addRow("objective", self.cb_objective)
        self.ed_focus = QLineEdit("")
        self.ed_focus.setPlaceholderText("z offsets µm, e.g. -1, 0, 1 (empty: configured)")
        rf.addRow("focus stack", self.ed_focus)
        b = QHBoxLayout()
        self.btn_reimage_sel = QPushButton("re-image selected")
        self.btn_reimage_sel.clicked.connect(lambda: self._run_quietly(self.reimage_selected))
        self.btn_draw = QPushButton("draw rectangle")
        self.btn_draw.clicked.connect(self.draw_rectangle)
        self.btn_reimage_rect = QPushButton("re-image rectangle")
        self.btn_reimage_rect.clicked.connect(lambda: self._run_quietly(self.reimage_rectangle))
        for w in (self.btn_reimage_sel, self.btn_draw, self.btn_reimage_rect):
            b.addWidget(w)
        rf.addRow(b)
        self.pb_reimage = QProgressBar()
        self.pb_reimage.setVisible(False)
        rf.addRow(self.pb_reimage)
        self.lbl_reimage = QLabel("")
        self.lbl_reimage.setWordWrap(True)
        rf.addRow(self.lbl_reimage)
        lay.addWidget(rg)
        return tab

    # ================================================================== public API
    def connect(
        self,
        events_endpoint: str | None = None,
        control_endpoint: str | None = None,
        store_path: str | Path | None = None,
        *,
        keys_dir: str | Path | None = None,
    ) -> None:
        """Follow a running pipeline (events), its slide store, and use its control endpoint for re-images.

        Any argument may be None: without events the store is polled; without a store its path is
        learnt from the events; without a control endpoint re-imaging is disabled.
        """
        self.disconnect_pipeline()
        if events_endpoint:
            self.ed_events.setText(events_endpoint)
        if control_endpoint:
            self.ed_control.setText(control_endpoint)
        if store_path:
            self.ed_store.setText(str(store_path))
        self.control_endpoint = control_endpoint or ""
        if not events_endpoint and not store_path:
            self._show_error("give an events endpoint or a store to follow")
            return
        self._reset()
        self.feed = LiveFeed(
            events_endpoint or None, store_path or None, keys_dir=keys_dir, snapshot_after=self.SNAPSHOT_AFTER
        ).start()
        self.lbl_conn.setText(f"connecting to {events_endpoint or store_path}…")
        if self.control_endpoint:
            self._query_control_status()

    def open_store(self, path: str | Path) -> None:
        """Show a slide store (finished or still being written) without a pipeline."""
        self.connect(None, self.ed_control.text().strip() or None, path)

    def disconnect_pipeline(self) -> None:
        """Stop following (the layers and tables stay)."""
        if self.feed is not None:
            self.feed.stop()
            self.feed = None
            self.lbl_conn.setText("disconnected")
        if self.writer is not None:
            self.writer.flush(5.0)
            self.writer.close()
            self.writer = None

    def shutdown(self) -> None:
        """Stop timer, feed, writer and running jobs (the viewer is closing)."""
        self.timer.stop()
        self.disconnect_pipeline()
        if self._demo is not None:
            self.stop_demo()
        for w in (self._reimage_worker, self._status_worker):
            if w is not None:
                with contextlib.suppress(RuntimeError):  # already deleted
                    w.quit()

    def start_demo(self, runner: DemoRunner | None = None) -> None:
        """Start (or, when running, stop) the demo: a local pipeline scanning the virtual microscope.

        Starting spawns processes and loads the model: it runs on a thread of its own
        (:class:`._demo.DemoRunner`, default: ``configs/demo.yaml``) and reports back on the GUI
        thread; the widget then follows it.
        """
        from ._demo import DemoRunner

        if self._demo is not None:
            self.stop_demo()
            return
        self.lbl_conn.setText("starting the demo pipeline and the virtual microscope…")
        self.btn_demo.setText("stop demo")
        demo = runner or DemoRunner()
        self._demo = demo
        demo.start(self._on_demo_ready, self._on_demo_error)

    def stop_demo(self) -> threading.Thread | None:
        """Stop the demo scan and its pipeline in the background (the viewer stays usable); the stopping thread."""
        demo, self._demo = self._demo, None
        self.btn_demo.setText("start demo")
        if demo is None:
            return None
        self.lbl_conn.setText("stopping the demo…")
        th = threading.Thread(target=demo.stop, name="scope-stream-demo-stop")
        th.start()
        return th

    @ensure_main_thread
    def _on_demo_ready(self, info: dict[str, Any]) -> None:
        if self._demo is None:  # stopped meanwhile
            return
        self.connect(info.get("events"), info.get("control"), info.get("store"))

    @ensure_main_thread
    def _on_demo_error(self, msg: str) -> None:
        self._demo = None
        self.btn_demo.setText("start demo")
        self._show_error(msg)

    # ================================================================== the tick
    def _on_tick(self) -> None:
        t0 = time.perf_counter()
        updates: list[Update] = []
        if self.feed is not None:
            updates = self.feed.drain(max_items=400, budget_s=self.TICK_BUDGET_S)
        for u in updates:
            try:
                self._apply(u)
            except Exception as exc:  # one bad update must not stop the live view
                log.exception("could not apply %s", type(u).__name__)
                self._show_error(f"could not show {type(u).__name__}: {exc}")
        if self.writer is not None:
            for cell_id, label, err in self.writer.outcomes():
                if err:
                    self._show_error(f"review of {cell_id} not saved ({err}); it will be retried")
                    self.lbl_review_save.setText(f"{len(self.writer.failed)} review(s) not saved yet")
                else:
                    self.lbl_review_save.setText(f"saved: {cell_id} → {label}")
        if self._dirty:
            self._flush()
        if updates:
            self.tick_seconds.append(time.perf_counter() - t0)

    def _mark(self, *what: str) -> None:
        self._dirty.update(what)

    def _apply(self, u: Update) -> None:
        if isinstance(u, ScanTile):
            self._paste(u)
        elif isinstance(u, CellsUpdate):
            self._add_cells(u.cells, u.crops)
        elif isinstance(u, CellsRetracted):
            self._retract_cells(u.cell_ids)
        elif isinstance(u, FlagSeen):
            if u.record.cell_id not in self.records:
                self._add_cells([u.record], {})
        elif isinstance(u, ReviewsUpdate):
            for cid, (label, reviewer, secs) in u.reviews.items():
                rec = self.records.get(cid)
                if rec is not None and rec.reviewer_label != label:
                    self._set_record(rec.with_review(label, reviewer, secs))
        elif isinstance(u, ReimageTile):
            self._show_reimage(u)
        elif isinstance(u, MosaicSnapshot):
            self._paste_snapshot(u)
        elif isinstance(u, SlideUpdate):
            self._slide_update(u)
        elif isinstance(u, ReimageEvent):
            n = len(u.payload.get("cells") or [])
            self.lbl_reimage.setText(f"re-image {u.payload.get('tile_id', '')} analysed: {n} cells")
        elif isinstance(u, StatsUpdate):
            self.lbl_stats.setText(describe_stats(u.payload))
        elif isinstance(u, FeedStatus):
            self.lbl_conn.setText(u.message)
            self.lbl_conn.setStyleSheet("color: #aaa;" if u.connected else "color: #ff6b6b;")
        elif isinstance(u, FeedError):
            self._show_error(u.message)

    # ================================================================== models
    def _reset(self) -> None:
        self.table = FlaggedCellTable()
        self.counts = DifferentialCount(classes=self._classes)
        self.records.clear()
        self.crops.clear()
        self._icons.clear()
        self.canvas = None
        self.n_tiles = 0
        self.session = None
        self.review_panel.set_session(None)
        self.errors.clear()
        self.lbl_error.setText("")
        self._mark("flags", "table", "counts", "header")

    def _slide_update(self, u: SlideUpdate) -> None:
        changed_store = self.store_path != Path(u.store)
        self.store_path = Path(u.store)
        self.ed_store.setText(u.store)
        self.slide_id = u.slide_id
        self.status = u.status
        self.metadata = u.metadata
        if changed_store or self.writer is None:
            if self.writer is not None:
                self.writer.close()
            self.writer = AsyncReviewWriter(self.store_path, self.ed_reviewer.text().strip())
        self._mark("header")

    def _learn_classes(self, rec: CellRecord) -> None:
        if self._classes or not rec.probabilities:
            return
        known = [c for c in PBC_CLASSES if c in rec.probabilities]
        others = sorted(c for c in rec.probabilities if c not in PBC_CLASSES)
        self._classes = known + others
        self.counts._classes = list(self._classes)
        for c in self._classes:
            self.colours.add(c)
        self._rebuild_class_list()

    def _rebuild_class_list(self) -> None:
        self.lst_classes.blockSignals(True)
        have = {it.text() for it in _items(self.lst_classes)}
        for c in list(self._classes) + sorted({r.effective_label for r in self.table.all()} - set(self._classes)):
            if c and c not in have:
                it = QListWidgetItem(colour_icon(self.colours.hex(c)), c)
                it.setFlags(it.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                it.setCheckState(Qt.CheckState.Checked)
                self.lst_classes.addItem(it)
        self.lst_classes.blockSignals(False)

    def _add_cells(self, cells: list[CellRecord], crops: dict[int, np.ndarray]) -> None:
        self.crops.update(crops)
        new_flags: list[CellRecord] = []
        new_classified: list[CellRecord] = []
        for rec in cells:
            old = self.records.get(rec.cell_id)
            merged = rec if old is None else old.merged(rec)
            if rec.classified:
                self._learn_classes(rec)
                self.records[rec.cell_id] = merged
                new_classified.append(merged)
                if merged.flagged:
                    new_flags.append(merged)
            elif rec.flagged:  # an event before its store row
                self.records[rec.cell_id] = merged
            self.counts.add(merged)
            if merged.flagged:
                self.table.upsert(merged)
            if merged.tile_kind == "reimage" and merged.classified:
                self.reimage_cells[merged.cell_id] = merged
            if old is not None and self.session is not None and self.session.update_record(merged):
                self._mark("review")  # e.g. its crop arrived with the store row
        if any(r.effective_label not in self._classes for r in new_flags):
            self._rebuild_class_list()
        self._extend_session(new_flags, new_classified)
        self._mark("flags", "table", "counts", "header", "reimage_cells")

    def _retract_cells(self, cell_ids: list[str]) -> None:
        """Drop cells that turned out to be copies of better-centred cells in overlapping tiles."""
        for cid in cell_ids:
            self.records.pop(cid, None)
            self.counts.remove(cid)
            self.table.remove(cid)
            self.reimage_cells.pop(cid, None)
        self._mark("flags", "table", "counts", "header", "reimage_cells")

    def _set_record(self, rec: CellRecord) -> None:
        self.records[rec.cell_id] = rec
        self.counts.add(rec)
        if rec.flagged:
            self.table.replace(rec)
        if rec.cell_id in self.reimage_cells:
            self.reimage_cells[rec.cell_id] = rec
        self._icons.pop(rec.cell_id, None)
        self._mark("flags", "table", "counts", "header")

    def _crop_for(self, rec: CellRecord) -> np.ndarray | None:
        if rec.crop_index < 0:
            return None
        crop = self.crops.get(rec.crop_index)
        if crop is None and self.feed is not None and self.feed.follower is not None:
            try:  # crops of unflagged cells (review of all cells) are read on demand
                lo = rec.crop_index - rec.crop_index % 64
                self.crops.update(self.feed.follower.read_crops(list(range(lo, lo + 64))))
                crop = self.crops.get(rec.crop_index)
            except Exception as exc:
                log.info("crop %d: %s", rec.crop_index, exc)
        return crop

    # ================================================================== mosaic
    def _ensure_canvas(self, scale_um: float, channels: int, tile_w_um: float, tile_h_um: float) -> MosaicCanvas:
        if self.canvas is None:
            bounds = None
            region = self.metadata.get("region_um") if isinstance(self.metadata, dict) else None
            if isinstance(region, list | tuple) and len(region) == 4:
                x0, y0, x1, y1 = (float(v) for v in region)
                bounds = (x0 - tile_w_um / 2, y0 - tile_h_um / 2, x1 + tile_w_um / 2, y1 + tile_h_um / 2)
            self.canvas = MosaicCanvas(scale_um, channels=channels, n_levels=3, bounds_um=bounds, max_side_px=8192)
            self._mosaic_realloc = True
        return self.canvas

    def _paste(self, u: ScanTile) -> None:
        row = u.row
        channels = 3 if u.image.ndim == 3 else 1
        canvas = self._ensure_canvas(u.scale_um, channels, row.width_um, row.height_um)
        res = canvas.paste_prepared(
            u.image,
            u.scale_um,
            x_um=row.x_um,
            y_um=row.y_um,
            height=row.height,
            width=row.width,
            pixel_size_um=row.pixel_size_um,
        )
        if res.reallocated:
            self._mosaic_realloc = True
        if self.feed is not None:
            self.feed.mosaic_scale_um = canvas.scale_um
        self.n_tiles += 1
        self._mark("mosaic", "header")

    def _paste_snapshot(self, u: MosaicSnapshot) -> None:
        h, w = u.image.shape[:2]
        channels = 3 if u.image.ndim == 3 else 1
        canvas = self._ensure_canvas(u.scale_um, channels, 0.0, 0.0)
        ty, tx = u.translate_um
        corner_y, corner_x = ty - u.scale_um / 2, tx - u.scale_um / 2
        res = canvas.paste(u.image, corner_x + w * u.scale_um / 2, corner_y + h * u.scale_um / 2, u.scale_um)
        self._mosaic_realloc |= res.reallocated
        self.n_tiles += len(u.tile_ids)
        if self.feed is not None:
            self.feed.mosaic_scale_um = canvas.scale_um
        self._mark("mosaic", "header")

    def _flush_mosaic(self) -> None:
        c = self.canvas
        if c is None or c.empty:
            return
        layer = self._layer(MOSAIC_LAYER)
        data = list(c.levels) if len(c.levels) > 1 else c.levels[0]
        s = c.scale_um
        if layer is None:
            layer = self.viewer.add_image(
                data,
                name=MOSAIC_LAYER,
                rgb=c.channels == 3,
                multiscale=len(c.levels) > 1,
                scale=(s, s),
                translate=c.translate_um,
                contrast_limits=(0, 255) if c.dtype == np.uint8 else None,
                metadata={"scope_stream": "mosaic"},
            )
            self.viewer.layers.move(self.viewer.layers.index(layer), 0)  # under everything
            self.viewer.reset_view()
        elif self._mosaic_realloc:
            layer.data = data
            layer.scale = (s, s)
            layer.translate = c.translate_um
        else:
            layer.refresh()
        self._mosaic_realloc = False

    def _show_reimage(self, u: ReimageTile) -> None:
        row = u.row
        pixels = u.pixels
        rgb = pixels.ndim == 3 and pixels.shape[2] in (3, 4)
        name = f"re-image {row.tile_id}"
        translate = tile_translate_um(row.x_um, row.y_um, row.height, row.width, row.pixel_size_um)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = pixels
        else:
            layer = self.viewer.add_image(
                pixels,
                name=name,
                rgb=rgb,
                scale=(row.pixel_size_um, row.pixel_size_um),
                translate=translate,
                metadata={"scope_stream": "reimage", "tile_id": row.tile_id, "z_um": row.z_um},
            )
        self.reimage_layers[row.tile_id] = layer
        self._pending_reimage.discard(row.tile_id)
        # keep flags and cells on top of the new image
        self._raise_markers()
        cells = [r for r in self.reimage_cells.values() if r.tile_id == row.tile_id]
        self.lbl_reimage.setText(
            f"re-image {row.tile_id} at ({row.x_um:.1f}, {row.y_um:.1f}) µm, {row.pixel_size_um:g} µm/px: "
            f"{row.n_cells} cells, {len(cells)} classified"
            + (f" ({_label_summary(cells)})" if cells else "")
            + f", {row.n_flagged} flagged"
        )

    def _raise_markers(self) -> None:
        """Keep the point layers above every image (napari's move(src, dest) inserts before dest)."""
        for lname in (REIMAGE_CELLS_LAYER, FLAGS_LAYER):
            lay = self._layer(lname)
            if lay is not None:
                self.viewer.layers.move(self.viewer.layers.index(lay), len(self.viewer.layers))

    # ================================================================== flags + table
    def _apply_filter(self) -> None:
        classes: set[str] = set()
        unchecked = False
        for it in _items(self.lst_classes):
            if it.checkState() == Qt.CheckState.Checked:
                classes.add(it.text())
            else:
                unchecked = True
        flt = FlagFilter(
            classes=classes if unchecked else set(),
            min_score=float(self.sp_threshold.value()) if self.sp_threshold.value() != 0.0 else -math.inf,
            include_reviewed=self.chk_reviewed.isChecked(),
        )
        self.table.set_filter(flt)
        self._table_refreshed_at = self._flags_refreshed_at = 0.0  # user action: show it now
        self._mark("flags", "table")

    def set_filter(
        self, *, classes: set[str] | None = None, min_score: float | None = None, show_reviewed: bool | None = None
    ) -> None:
        """Set the display filters programmatically (as the controls do)."""
        if classes is not None:
            for it in _items(self.lst_classes):
                it.setCheckState(
                    Qt.CheckState.Checked if (not classes or it.text() in classes) else Qt.CheckState.Unchecked
                )
        if min_score is not None:
            self.sp_threshold.setValue(min_score)
        if show_reviewed is not None:
            self.chk_reviewed.setChecked(show_reviewed)
        self._apply_filter()

    def _flush_flags(self) -> None:
        data = flag_layer_data(
            self.table.rows,
            palette=self.colours,
            color_by="anomaly" if self.cb_color.currentText() == "anomaly" else "class",
            anomaly_range=self._anomaly_range(),
            base_size_um=self.FLAG_SIZE_UM,
            uncertainty_gain=self.FLAG_UNCERTAINTY_GAIN,
        )
        layer = self._layer(FLAGS_LAYER)
        if layer is None:
            if not len(data):
                return
            layer = self.viewer.add_points(
                data.points,
                name=FLAGS_LAYER,
                features=data.features,
                face_color="transparent",  # a circle around the cell, the cell itself stays visible
                border_color=data.face_colors,
                border_width=FLAG_BORDER,
                border_width_is_relative=True,
                size=data.sizes,
                symbol="disc",
                metadata={"scope_stream": "flags"},
            )
            layer.selected_data.events.items_changed.connect(self._on_points_selection)
            self.viewer.layers.selection.active = layer
        else:
            # one refresh instead of one per setter (each would re-slice and redraw)
            with layer.selected_data.events.items_changed.blocked(), layer.events.blocker_all():
                layer.selected_data = set()
                layer.data = data.points
                layer.features = data.features
                layer.face_color = np.zeros((len(data), 4))
                layer.border_color = data.face_colors if len(data) else np.zeros((0, 4))
                layer.border_width = np.full(len(data), FLAG_BORDER)
                layer.size = data.sizes
            layer.refresh()
        self._flag_ids = data.cell_ids
        self._flags_refreshed_at = time.monotonic()

    def _anomaly_range(self) -> tuple[float, float]:
        scores = [r.anomaly_score for r in self.table.all() if math.isfinite(r.anomaly_score)]
        if len(scores) < 2:
            return 0.0, 1.0
        lo, hi = float(np.percentile(scores, 5)), float(np.percentile(scores, 95))
        return (lo, hi) if hi > lo else (lo, lo + 1.0)

    def _flush_reimage_cells(self) -> None:
        recs = [r for r in self.reimage_cells.values() if r.located]
        if not recs:
            return
        data = flag_layer_data(recs, palette=self.colours, base_size_um=6.0, uncertainty_gain=1.0)
        layer = self._layer(REIMAGE_CELLS_LAYER)
        if layer is None:
            self.viewer.add_points(
                data.points,
                name=REIMAGE_CELLS_LAYER,
                features=data.features,
                face_color="transparent",
                border_color=data.face_colors,
                border_width=FLAG_BORDER,
                border_width_is_relative=True,
                size=data.sizes,
                symbol="square",
                metadata={"scope_stream": "reimage_cells"},
            )
            self._raise_markers()
        else:
            with layer.events.blocker_all():
                layer.data = data.points
                layer.features = data.features
                layer.face_color = np.zeros((len(data), 4))
                layer.border_color = data.face_colors
                layer.border_width = np.full(len(data), FLAG_BORDER)
                layer.size = data.sizes
            layer.refresh()

    def _flush_table(self) -> None:
        rows = self.table.rows
        shown = rows[: self.TABLE_MAX_ROWS]
        t = self.tbl_flags
        t.blockSignals(True)
        t.setRowCount(len(shown))
        for i, rec in enumerate(shown):
            icon = self._icons.get(rec.cell_id)
            if icon is None:
                crop = self._crop_for(rec)
                icon = QIcon(to_pixmap(crop, 40)) if crop is not None else QIcon()
                if crop is not None:
                    self._icons[rec.cell_id] = icon
            item = QTableWidgetItem(icon, "")
            item.setData(Qt.ItemDataRole.UserRole, rec.cell_id)
            item.setToolTip(rec.cell_id)
            t.setItem(i, 0, item)
            lab = QTableWidgetItem(rec.effective_label)
            lab.setForeground(QColor(self.colours.hex(rec.effective_label)))
            t.setItem(i, 1, lab)
            t.setItem(i, 2, _num_item(rec.score))
            t.setItem(i, 3, _num_item(rec.uncertainty))
            t.setItem(i, 4, QTableWidgetItem(",".join(rec.flag_reasons)))
            t.setItem(i, 5, QTableWidgetItem(rec.reviewer_label if rec.reviewed else ""))
        sel = self.table.row_of(self._selected_cell) if self._selected_cell else -1
        if 0 <= sel < len(shown):
            t.selectRow(sel)
        t.blockSignals(False)
        more = f" (top {len(shown)} of {len(rows)})" if len(rows) > len(shown) else ""
        self.lbl_table.setText(f"{len(rows)} flagged cells shown, {self.table.total} in all{more}")
        self._table_refreshed_at = time.monotonic()

    def _flush_counts(self) -> None:
        rows = self.counts.rows()
        t = self.tbl_counts
        t.setRowCount(len(rows))
        for i, r in enumerate(rows):
            it = QTableWidgetItem(colour_icon(self.colours.hex(r.label)), r.label)
            t.setItem(i, 0, it)
            t.setItem(i, 1, QTableWidgetItem(str(r.model)))
            t.setItem(i, 2, QTableWidgetItem(str(r.reviewed)))
            t.setItem(i, 3, QTableWidgetItem(f"{r.percent:.1f}"))
        kinds = self.counts.kinds
        self.lbl_kinds.setText(
            f"classified {self.counts.n_classified} · " + " · ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        )

    def _flush_header(self) -> None:
        flagged = self.table.all()
        n_rev = sum(1 for r in flagged if r.reviewed)
        state = slide_state(
            n_tiles=self.n_tiles, done=self.status == "done", n_flagged=len(flagged), n_flagged_reviewed=n_rev
        )
        self.state = state
        self.lbl_state.setText(state.value)
        self.lbl_state.setStyleSheet(_STATE_STYLE[state])
        self.lbl_slide.setText(f"{self.slide_id or 'slide'}" + (" (scan finished)" if self.status == "done" else ""))
        dc = domain_check(r.flag_reasons for r in self.records.values() if r.kind == "WBC" and r.label)
        self.lbl_totals.setText(
            f"tiles {self.n_tiles} · cells {len(self.records)} classified · flagged {len(flagged)} · reviewed {n_rev}"
            + (f"\ndomain check: {dc['message']}" if dc["n_classified"] else "")
        )
        self.lbl_totals.setStyleSheet("color: #ff6b6b;" if dc["trusted"] is False else "")

    def _flush(self) -> None:
        d = self._dirty
        now = time.monotonic()
        later: set[str] = set()  # throttled: flushed on a later tick
        if "mosaic" in d:
            self._flush_mosaic()
        if "flags" in d:
            if now - self._flags_refreshed_at >= self.FLAGS_REFRESH_S:
                self._flush_flags()
            else:
                later.add("flags")
        if "reimage_cells" in d:
            self._flush_reimage_cells()
        if "table" in d:
            if now - self._table_refreshed_at >= self.TABLE_REFRESH_S:
                self._flush_table()
            else:
                later.add("table")
        if "counts" in d:
            self._flush_counts()
        if "header" in d:
            self._flush_header()
        if "review" in d:
            self.review_panel.refresh()
        self._dirty = later

    def _layer(self, name: str) -> Any:
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401 (no .get)

    # ================================================================== selection
    def _on_table_selection(self) -> None:
        items = self.tbl_flags.selectedItems()
        if not items:
            return
        item = self.tbl_flags.item(items[0].row(), 0)
        if item is None:
            return
        self.focus_cell(str(item.data(Qt.ItemDataRole.UserRole)))

    def _on_points_selection(self, *_: Any) -> None:
        layer = self._layer(FLAGS_LAYER)
        if layer is None or self._syncing_selection:
            return
        sel = sorted(layer.selected_data)
        if len(sel) != 1:
            return
        ids = self._flag_ids
        if sel[0] < len(ids):
            self._selected_cell = ids[sel[0]]
            row = self.table.row_of(self._selected_cell)
            if 0 <= row < self.tbl_flags.rowCount():
                self.tbl_flags.blockSignals(True)
                self.tbl_flags.selectRow(row)
                self.tbl_flags.blockSignals(False)

    def focus_cell(self, cell_id: str, zoom_um: float = 120.0) -> None:
        """Centre the view on a cell (and select its flag): what a click in the table does."""
        rec = self.records.get(cell_id) or self.table.get(cell_id)
        if rec is None or not rec.located:
            return
        self._selected_cell = cell_id
        self.viewer.camera.center = (rec.y_um, rec.x_um)
        size = getattr(getattr(self.viewer, "canvas", None), "size", None)  # (h, w) screen px of the canvas
        try:
            px = float(min(size)) if size else 600.0
        except (TypeError, ValueError):
            px = 600.0
        want = max(px, 100.0) / zoom_um
        if self.viewer.camera.zoom < want:
            self.viewer.camera.zoom = want
        layer = self._layer(FLAGS_LAYER)
        ids = self._flag_ids
        if layer is not None and cell_id in ids:
            self._syncing_selection = True
            try:
                layer.selected_data = {ids.index(cell_id)}
            finally:
                self._syncing_selection = False

    # ================================================================== review
    def _extend_session(self, new_flags: list[CellRecord], new_classified: list[CellRecord]) -> None:
        if self.session is None:
            if not new_flags and not (self.cb_review_scope.currentIndex() == 1 and new_classified):
                return
            self._rebuild_session()
            return
        added = self.session.extend(new_classified if self.cb_review_scope.currentIndex() == 1 else new_flags)
        if added:
            self._mark("review")

    def _rebuild_session(self) -> None:
        everything = self.cb_review_scope.currentIndex() == 1
        recs = [r for r in self.records.values() if r.classified and (everything or r.flagged)]
        # every class the model knows, plus ig / erythroblast, other (9) and artefact (0): docs/napari.md
        keymap = KeyMap.for_model(self._classes)
        if self.session is not None:
            self.session.pause()
        self.session = ReviewSession(recs, writer=self._write_review, keymap=keymap, skip_reviewed=False)
        self.review_panel.set_session(self.session)
        self._show_review_keys(keymap)
        if not self.review_panel.hasFocus():
            self.session.pause()

    def _show_review_keys(self, keymap: KeyMap) -> None:
        """The key map as a tooltip on the review panel and its start button, and as a help line."""
        text = keymap.describe()
        self.review_panel.setToolTip(text)
        self.btn_review_start.setToolTip(text)
        self.lbl_review_keys.setText(text)

    def _write_review(self, d: Decision) -> None:
        if self.writer is None:
            raise RuntimeError("no slide store to save the review to (connect to a pipeline or open a store)")
        self.writer.submit(d.cell_id, d.label, d.seconds)

    def _on_decided(self, d: Decision) -> None:
        rec = self.records.get(d.cell_id)
        if rec is not None:
            self._set_record(rec.with_review(d.label, self.ed_reviewer.text().strip(), d.seconds))

    def _on_review_moved(self, rec: CellRecord | None) -> None:
        if rec is not None and rec.located:
            self.focus_cell(rec.cell_id, zoom_um=80.0)
            self.review_panel.setFocus()

    def _on_reviewer_changed(self) -> None:
        if self.writer is not None:
            self.writer.reviewer = self.ed_reviewer.text().strip()

    def start_review(self) -> None:
        """Show the review tab and give it the keyboard."""
        if self.session is None:
            self._rebuild_session()
        self.tabs.setCurrentIndex(2)
        self.review_panel.setFocus()
        self.review_panel.refresh()

    def export_review(self) -> tuple[Path, Path] | None:
        """Write ``<slide>.review.json`` / ``.csv`` next to the store (after pending saves)."""
        if self.store_path is None:
            self._show_error("no store to export the review of")
            return None
        if self.writer is not None and not self.writer.flush(10.0):
            self._show_error("reviews are still being saved; try again")
            return None
        from scope_stream.view.report import export_review

        try:
            paths = export_review(self.store_path)
        except Exception as exc:
            self._show_error(f"export failed: {exc}")
            return None
        self.lbl_review_save.setText(f"exported {paths[0].name} and {paths[1].name} to {paths[0].parent}")
        return paths

    # ================================================================== re-image
    def _z_offsets(self) -> list[float] | None:
        txt = self.ed_focus.text().strip()
        if not txt:
            return None
        try:
            return [float(v) for v in txt.replace(";", ",").split(",") if v.strip()]
        except ValueError:
            raise ReimagePlanError(f"focus stack {txt!r}: give z offsets in µm separated by commas") from None

    def _stage_limits(self) -> tuple[float, float, float, float] | None:
        lim = self.control_status.get("stage_limits_um")
        if isinstance(lim, list | tuple) and len(lim) == 4:
            return tuple(float(v) for v in lim)  # type: ignore[return-value]
        return None

    def _field_um(self) -> tuple[float, float] | None:
        fov = self.control_status.get("reimage_field_um") or self.control_status.get("field_um")
        if isinstance(fov, list | tuple) and len(fov) == 2:
            return float(fov[0]), float(fov[1])
        return None

    def reimage_selected(self) -> bool:
        """Re-image the selected flag (table row or point). Returns False if nothing was sent."""
        rec = self.records.get(self._selected_cell) if self._selected_cell else None
        if rec is None or not rec.located:
            self._reimage_error("select a flagged cell first (table row or point)")
            return False
        try:
            targets = plan_targets(
                point=(rec.x_um, rec.y_um),
                stage_limits_um=self._stage_limits(),
                reason=f"operator: {rec.label} flagged {','.join(rec.flag_reasons)}",
                cell_id=rec.cell_id,
            )
        except ReimagePlanError as exc:
            self._reimage_error(str(exc))
            return False
        return self.request_reimage(targets)

    def draw_rectangle(self) -> None:
        """Add (or select) the rectangle layer in draw mode."""
        layer = self._layer(REGIONS_LAYER)
        if layer is None:
            layer = self.viewer.add_shapes(
                name=REGIONS_LAYER, edge_color="cyan", face_color="transparent", edge_width=2.0, ndim=2
            )
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"
        self.lbl_reimage.setText("draw a rectangle on the slide, then press 're-image rectangle'")

    def reimage_rectangle(self) -> bool:
        """Re-image the last rectangle drawn in the re-image regions layer."""
        layer = self._layer(REGIONS_LAYER)
        if layer is None or not len(layer.data):
            self._reimage_error("draw a rectangle first")
            return False
        try:
            rect = rect_from_corners([tuple(p) for p in np.asarray(layer.data[-1])[:, -2:]])
            targets = plan_targets(
                rect=rect,  # type: ignore[arg-type]
                field_um=self._field_um(),
                stage_limits_um=self._stage_limits(),
                reason="operator rectangle",
            )
        except ReimagePlanError as exc:
            self._reimage_error(str(exc))
            return False
        return self.request_reimage(targets)

    def request_reimage(self, targets: list[ReimageTarget]) -> bool:
        """Send re-image requests in the background; progress and errors show in the Flags tab."""
        from napari.qt.threading import create_worker

        endpoint = self.ed_control.text().strip() or self.control_endpoint
        if not endpoint:
            self._reimage_error("no control endpoint: connect to a scan that serves re-image requests")
            return False
        if self._reimage_worker is not None:
            self._reimage_error("a re-image is already running; wait for it to finish")
            return False
        try:
            z = self._z_offsets()
        except ReimagePlanError as exc:
            self._reimage_error(str(exc))
            return False
        self.control_endpoint = endpoint
        self.pb_reimage.setVisible(True)
        self.pb_reimage.setRange(0, max(1, len(targets)))
        self.pb_reimage.setValue(0)
        self.lbl_reimage.setStyleSheet("")
        self.lbl_reimage.setText(f"re-imaging {len(targets)} field(s)…")
        self.btn_reimage_sel.setEnabled(False)
        self.btn_reimage_rect.setEnabled(False)
        worker = create_worker(
            _reimage_job,
            endpoint,
            targets,
            self.cb_objective.currentText().strip(),
            z,
            self.slide_id,
            float(os.environ.get("SCOPE_STREAM_REIMAGE_TIMEOUT", "120")),
            _start_thread=False,
        )
        worker.yielded.connect(self._on_reimage_progress)
        worker.returned.connect(self._on_reimage_done)
        worker.errored.connect(self._on_reimage_failed)
        worker.finished.connect(self._on_reimage_finished)
        self._reimage_worker = worker
        worker.start()
        return True

    def _on_reimage_progress(self, p: tuple[int, int, str]) -> None:
        done, total, msg = p
        self.pb_reimage.setRange(0, max(1, total))
        self.pb_reimage.setValue(done)
        self.lbl_reimage.setText(msg)

    def _on_reimage_done(self, outcome: dict[str, Any]) -> None:
        results = outcome.get("results") or []
        ids = [t for r in results for t in r.get("tile_ids", [])]
        self._pending_reimage.update(ids)
        self.reimage_replies.extend(results)
        if self.feed is not None:
            self.feed.poke()
        err = outcome.get("error")
        if err:
            done = f" (after {len(ids)} tile(s) acquired)" if ids else ""
            self._reimage_error(explain_error(str(err[0]), str(err[1])) + done)
            return
        self.lbl_reimage.setText(f"acquired {len(ids)} tile(s) {', '.join(ids)}; they appear as layers once analysed")

    def _on_reimage_failed(self, exc: BaseException) -> None:
        self._reimage_error(f"re-image failed: {type(exc).__name__}: {exc}")

    def _on_reimage_finished(self) -> None:
        self._reimage_worker = None
        self.pb_reimage.setVisible(False)
        self.btn_reimage_sel.setEnabled(True)
        self.btn_reimage_rect.setEnabled(True)

    def _reimage_error(self, msg: str) -> None:
        self.lbl_reimage.setText(msg)
        self.lbl_reimage.setStyleSheet("color: #ff6b6b;")
        self.errors.append(msg)

    def _query_control_status(self) -> None:
        from napari.qt.threading import create_worker

        if self._status_worker is not None:
            return
        worker = create_worker(_status_job, self.control_endpoint, _start_thread=False)
        worker.returned.connect(self._on_control_status)
        worker.errored.connect(lambda exc: self._reimage_error(f"control endpoint: {exc}"))

        def done() -> None:
            self._status_worker = None

        worker.finished.connect(done)
        self._status_worker = worker
        worker.start()

    def _on_control_status(self, status: dict[str, Any]) -> None:
        if status.get("type") == "error":
            self._reimage_error(explain_error(str(status.get("code")), str(status.get("detail", ""))))
            return
        self.control_status = status
        objs = status.get("objectives") or []
        names = [o.get("name") if isinstance(o, dict) else str(o) for o in objs]
        current = self.cb_objective.currentText()
        self.cb_objective.clear()
        self.cb_objective.addItem("")
        self.cb_objective.addItems([n for n in names if n])
        self.cb_objective.setCurrentText(current)
        self.lbl_reimage.setStyleSheet("")
        self.lbl_reimage.setText(f"microscope: {status.get('state', 'ready')}; re-image ready")

    # ================================================================== misc
    def _on_connect_clicked(self) -> None:
        self.connect(
            self.ed_events.text().strip() or None,
            self.ed_control.text().strip() or None,
            self.ed_store.text().strip() or None,
        )

    def _on_open_clicked(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a scope-stream slide store (<slide>.zarr)")
        if path:
            self.open_store(path)

    @staticmethod
    def _run_quietly(fn: Any) -> None:
        """Call ``fn`` for a button (its result is for scripts, not for Qt)."""
        fn()

    def _show_error(self, msg: str) -> None:
        self.errors.append(msg)
        self.lbl_error.setText(msg)

    def _make_cleanup(self) -> Any:
        """A slot for ``destroyed`` that stops the background parts without touching Qt objects."""
        state = self.__dict__

        def cleanup(*_: Any) -> None:
            for key in ("feed", "_demo"):
                obj = state.get(key)
                if obj is not None:
                    obj.stop()
            writer = state.get("writer")
            if writer is not None:
                writer.close()

        return cleanup


def _header(h: QHeaderView | None) -> QHeaderView:
    assert h is not None, "QTableWidget always has headers"
    return h


def _items(lst: QListWidget) -> list[QListWidgetItem]:
    out = []
    for i in range(lst.count()):
        it = lst.item(i)
        if it is not None:
            out.append(it)
    return out


def _num_item(v: float) -> QTableWidgetItem:
    it = QTableWidgetItem("–" if not math.isfinite(v) else f"{v:.2f}")
    it.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
    return it


def _label_summary(cells: list[CellRecord]) -> str:
    counts: dict[str, int] = {}
    for c in cells:
        counts[c.effective_label] = counts.get(c.effective_label, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return ""
