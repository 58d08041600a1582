"""Small Qt helpers: numpy images to pixmaps, key names, colour swatches."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QImage, QKeyEvent, QKeySequence, QPixmap

__all__ = ["colour_icon", "key_name", "to_pixmap"]


def to_pixmap(img: np.ndarray, size: int | None = None) -> QPixmap:
    """A QPixmap of an ``(H, W)`` or ``(H, W, 3)`` uint8 image, optionally scaled to ``size`` px (nearest)."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        hi = float(a.max()) if a.size else 1.0
        a = np.clip(a.astype(np.float32) * (255.0 / (hi or 1.0)), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    a = np.ascontiguousarray(a)
    h, w = a.shape[:2]
    buf = a.tobytes()
    qimg = QImage(buf, w, h, 3 * w, QImage.Format.Format_RGB888).copy()  # copy: own the memory
    pix = QPixmap.fromImage(qimg)
    if size is not None:
        pix = pix.scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.FastTransformation)
    return pix


def colour_icon(hex_colour: str, size: int = 12) -> QIcon:
    pix = QPixmap(size, size)
    pix.fill(QColor(hex_colour))
    return QIcon(pix)


_NAMED = {
    Qt.Key.Key_Space: "Space",
    Qt.Key.Key_Return: "Return",
    Qt.Key.Key_Enter: "Enter",
    Qt.Key.Key_Left: "Left",
    Qt.Key.Key_Right: "Right",
    Qt.Key.Key_Up: "Up",
    Qt.Key.Key_Down: "Down",
    Qt.Key.Key_Backspace: "Backspace",
    Qt.Key.Key_Escape: "Escape",
    Qt.Key.Key_Tab: "Tab",
}


def key_name(event: QKeyEvent) -> str:
    """The key's name as :class:`scope_stream.view.review.KeyMap` spells it (``"A"``, ``"1"``, ``"Right"``)."""
    k = event.key()
    for key, name in _NAMED.items():
        if k == key:
            return name
    text = event.text()
    if text and text.isprintable() and not text.isspace():
        return text.upper() if text.isalpha() else text
    return QKeySequence(k).toString()
