"""The review gallery: one big crop, what the model said, the next cells, all driven from the keyboard."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QFocusEvent, QKeyEvent
from qtpy.QtWidgets import (
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from scope_stream.view.cells import CellRecord
from scope_stream.view.flags import ClassPalette
from scope_stream.view.review import Decision, ReviewSession

from ._qt_util import key_name, to_pixmap

__all__ = ["ReviewPanel"]

CropLookup = Callable[[CellRecord], "np.ndarray | None"]


class ReviewPanel(QWidget):
    """Shows a :class:`ReviewSession`: the current crop, its call, the next cells and the key legend.

    Keys go to the session while the panel has focus (click it, or press *Start review*). Every
    decision is emitted as :attr:`decided` for the widget to save and to update its tables.
    """

    decided = Signal(object)  # Decision
    moved = Signal(object)  # CellRecord | None: the cell now shown

    BIG = 192
    SMALL = 48
    N_UPCOMING = 8

    def __init__(self, crop_lookup: CropLookup, palette: ClassPalette, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._crop_lookup = crop_lookup
        self._palette = palette
        self.session: ReviewSession | None = None
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)

        self.progress = QLabel("no cells to review yet")
        self.crop = QLabel()
        self.crop.setFixedSize(self.BIG, self.BIG)
        self.crop.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.crop.setStyleSheet("background: #222; border: 2px solid #555;")
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.info.setTextFormat(Qt.TextFormat.RichText)
        self.info.setAlignment(Qt.AlignmentFlag.AlignTop)
        self.info.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        top = QHBoxLayout()
        top.addWidget(self.crop)
        top.addWidget(self.info, 1)

        self.strip = QHBoxLayout()
        self._strip_labels: list[QLabel] = []
        for _ in range(self.N_UPCOMING):
            lab = QLabel()
            lab.setFixedSize(self.SMALL, self.SMALL)
            lab.setStyleSheet("background: #222;")
            self.strip.addWidget(lab)
            self._strip_labels.append(lab)
        self.strip.addStretch(1)

        buttons = QHBoxLayout()
        self.btn_back = QPushButton("← back")
        self.btn_accept = QPushButton("accept (A / space)")
        self.btn_skip = QPushButton("skip →")
        for b in (self.btn_back, self.btn_accept, self.btn_skip):
            b.setFocusPolicy(Qt.FocusPolicy.NoFocus)
            buttons.addWidget(b)
        self.btn_back.clicked.connect(lambda: self.press("Left"))
        self.btn_accept.clicked.connect(lambda: self.press("A"))
        self.btn_skip.clicked.connect(lambda: self.press("Right"))

        self.class_grid = QGridLayout()
        self._class_buttons: list[QPushButton] = []

        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.focus_hint = QLabel("click here, then review with the keyboard")
        self.focus_hint.setStyleSheet("color: #999;")

        layout = QVBoxLayout(self)
        layout.addWidget(self.progress)
        layout.addLayout(top)
        layout.addWidget(QLabel("next:"))
        layout.addLayout(self.strip)
        layout.addLayout(buttons)
        layout.addLayout(self.class_grid)
        layout.addWidget(self.summary)
        layout.addWidget(self.focus_hint)
        layout.addStretch(1)

    # ------------------------------------------------------------------ session
    def set_session(self, session: ReviewSession | None) -> None:
        self.session = session
        self._build_class_buttons()
        self.refresh()

    def _build_class_buttons(self) -> None:
        for b in self._class_buttons:
            self.class_grid.removeWidget(b)
            b.deleteLater()
        self._class_buttons = []
        if self.session is None:
            return
        items = sorted(self.session.keymap.class_keys.items(), key=lambda kv: (kv[0] == "0", kv[0]))
        for i, (key, label) in enumerate(items):
            b = QPushButton(f"{key}  {label}")
            b.setFocusPolicy(Qt.FocusPolicy.NoFocus)
            b.setStyleSheet(f"text-align: left; border-left: 6px solid {self._palette.hex(label)}; padding: 2px 6px;")
            b.clicked.connect(lambda _=False, k=key: self.press(k))
            self.class_grid.addWidget(b, i // 3, i % 3)
            self._class_buttons.append(b)

    def refresh(self) -> None:
        """Redraw from the session (current cell, strip, progress, summary)."""
        s = self.session
        cur = s.current if s is not None else None
        if s is None or not len(s):
            self.progress.setText("no flagged cells to review yet")
            self.crop.clear()
            self.info.setText("")
            for lab in self._strip_labels:
                lab.clear()
            self.summary.setText("")
            return
        if cur is None:
            self.progress.setText(f"all {len(s)} cells reviewed")
            self.crop.clear()
            self.info.setText("<b>done</b> — new flags will appear here as the scan goes on")
        else:
            group = [r for r in s.queue if r.label == cur.label]
            left = sum(1 for r in group if s.decision_for(r.cell_id) is None)
            self.progress.setText(
                f"cell {s.index + 1} / {len(s)} · reviewed {s.n_decided} · "
                f"group <b>{cur.label}</b>: {left} of {len(group)} left"
            )
            self.progress.setTextFormat(Qt.TextFormat.RichText)
            crop = self._crop_lookup(cur)
            if crop is not None:
                self.crop.setPixmap(to_pixmap(crop, self.BIG))
            else:
                self.crop.setText("(no crop)")
            self.crop.setStyleSheet(f"background: #222; border: 3px solid {self._palette.hex(cur.label)};")
            self.info.setText(self._describe(cur, s.decision_for(cur.cell_id)))
        for lab, rec in zip(self._strip_labels, s.upcoming(self.N_UPCOMING) + [None] * self.N_UPCOMING, strict=False):
            if rec is None:
                lab.clear()
                lab.setToolTip("")
                continue
            crop = self._crop_lookup(rec)
            if crop is not None:
                lab.setPixmap(to_pixmap(crop, self.SMALL))
            else:
                lab.setText("…")
            lab.setStyleSheet(f"background: #222; border-bottom: 3px solid {self._palette.hex(rec.label)};")
            lab.setToolTip(f"{rec.label} · score {rec.score:.2f}")
        sm = s.summary()
        per = "–" if math.isnan(sm.seconds_per_cell) else f"{sm.seconds_per_cell:.1f} s/cell"
        self.summary.setText(
            f"this session: {sm.n_reviewed} reviewed, {sm.n_changed} re-labelled, {sm.seconds_total:.0f} s ({per})"
        )

    def _describe(self, rec: CellRecord, decision: Decision | None) -> str:
        probs = sorted(rec.probabilities.items(), key=lambda kv: -kv[1])[:3]
        p_txt = ", ".join(f"{k} {v:.0%}" for k, v in probs) or "–"

        def fmt(v: float) -> str:
            return "–" if math.isnan(v) else f"{v:.2f}"

        lines = [
            f"<span style='font-size:14pt'><b>{rec.label or '?'}</b></span>",
            f"probabilities: {p_txt}",
            f"uncertainty {fmt(rec.uncertainty)} · anomaly {fmt(rec.anomaly_score)}",
            f"flag: {', '.join(rec.flag_reasons) or '–'} (score {fmt(rec.flag_score)})",
            f"<span style='color:#999'>{rec.cell_id} · ({rec.x_um:.0f}, {rec.y_um:.0f}) µm</span>",
        ]
        if decision is not None:
            lines.append(f"reviewed as <b>{decision.label}</b>")
        elif rec.reviewed:
            lines.append(f"earlier review: <b>{rec.reviewer_label}</b>")
        return "<br>".join(lines)

    # ------------------------------------------------------------------ keys
    def press(self, name: str) -> None:
        """Act as if key ``name`` was pressed (the buttons use this)."""
        if self.session is None:
            return
        d = self.session.handle_key(name)
        if d is not None:
            self.decided.emit(d)
        self.refresh()
        self.moved.emit(self.session.current)

    def keyPressEvent(self, event: QKeyEvent | None) -> None:
        if event is None:
            return
        name = key_name(event)
        if self.session is None or self.session.keymap.action(name) is None:
            super().keyPressEvent(event)
            return
        self.press(name)
        event.accept()

    def focusInEvent(self, event: QFocusEvent | None) -> None:
        self.focus_hint.setText("reviewing: 1-9/0 re-label · A/space accept · → skip · ← back")
        self.focus_hint.setStyleSheet("color: #6c6;")
        if self.session is not None:
            self.session.resume()
        super().focusInEvent(event)

    def focusOutEvent(self, event: QFocusEvent | None) -> None:
        self.focus_hint.setText("click here, then review with the keyboard (clock paused)")
        self.focus_hint.setStyleSheet("color: #999;")
        if self.session is not None:
            self.session.pause()
        super().focusOutEvent(event)
