"""Where the real blood-smear data lives, how to read it, and its physical scale.

* PBC (Acevedo et al. 2020, CC BY 4.0): single-cell crops, ``labels.csv`` with ``path,label[,subtype][,split]``.
* BCCD (MIT): 640x480 smear fields with Pascal-VOC boxes (``JPEGImages/``, ``Annotations/``).

The data is never copied into the repository: it is found through ``$SCOPE_STREAM_DATA`` or, by default,
``<repo>/../shared/data``.
"""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BCCD_UM_PER_PX",
    "PBC_UM_PER_PX_128",
    "RBC_DIAMETER_UM",
    "DatasetError",
    "LabelledImage",
    "VocBox",
    "bccd_root",
    "data_root",
    "pbc_root",
    "read_labels_csv",
    "read_voc",
]

#: Physical scale of the PBC crops as stored in shared/data (128x128, resized from CellaVision's 360x363 at
#: about 0.071 µm/px): a 128 px crop spans about 25.6 µm.
PBC_UM_PER_PX_128: float = 0.2
#: Median RBC box side in BCCD is about 100 px; a red cell is about 7.5 µm across -> 0.075 µm/px.
BCCD_UM_PER_PX: float = 0.075
RBC_DIAMETER_UM: float = 7.5

_REPO = Path(__file__).resolve().parent.parent


class DatasetError(ValueError):
    """A dataset folder or file that cannot be read as expected."""


def data_root() -> Path:
    """The folder holding ``pbc/`` and ``bccd/``: ``$SCOPE_STREAM_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("SCOPE_STREAM_DATA")
    return Path(env) if env else (_REPO.parent / "shared" / "data")


def pbc_root() -> Path:
    return data_root() / "pbc"


def bccd_root() -> Path:
    return data_root() / "bccd"


@dataclass(frozen=True)
class LabelledImage:
    """One row of a ``labels.csv``: an image path (absolute), its label and split."""

    path: Path
    label: str
    split: str = ""
    subtype: str = ""


def read_labels_csv(folder: Path | str, split: str | None = None) -> list[LabelledImage]:
    """Read ``folder/labels.csv`` (columns ``path,label`` and optionally ``subtype``, ``split``).

    Paths are resolved relative to ``folder``. ``split`` keeps only rows of that split.
    """
    root = Path(folder)
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        found = _class_folders(root)
        if found:
            return found if split is None else [r for r in found if r.split == split]
        raise DatasetError(
            f"{csv_path} not found: a data folder needs a labels.csv with columns path,label[,split], or one "
            "sub-folder of images per class (the folder name is the label)"
        )
    rows: list[LabelledImage] = []
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or [])
        if not {"path", "label"} <= fields:
            raise DatasetError(f"{csv_path}: header must include 'path' and 'label', got {sorted(fields)}")
        for i, row in enumerate(reader, start=2):
            if not row.get("path") or not row.get("label"):
                raise DatasetError(f"{csv_path}:{i}: empty path or label")
            item = LabelledImage(
                path=(root / row["path"]).resolve(),
                label=row["label"].strip(),
                split=(row.get("split") or "").strip(),
                subtype=(row.get("subtype") or "").strip(),
            )
            if split is None or item.split == split:
                rows.append(item)
    return rows


#: image files a class-per-folder dataset may hold
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def _class_folders(root: Path) -> list[LabelledImage]:
    """A folder with one sub-folder of images per class (as torchvision's ImageFolder reads): its images,
    labelled by their folder's name, in sorted order; empty when there is none."""
    if not root.is_dir():
        return []
    rows: list[LabelledImage] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for img in sorted(sub.iterdir()):
            if img.is_file() and img.suffix.lower() in IMAGE_SUFFIXES:
                rows.append(LabelledImage(path=img.resolve(), label=sub.name))
    return rows


@dataclass(frozen=True)
class VocBox:
    """One Pascal-VOC object: class name and box in pixels (x0, y0, x1, y1), inclusive VOC coordinates."""

    name: str
    x0: float
    y0: float
    x1: float
    y1: float


def read_voc(xml_path: Path | str) -> tuple[tuple[int, int], list[VocBox]]:
    """Read a Pascal-VOC annotation: ((width, height), boxes)."""
    p = Path(xml_path)
    try:
        root = ET.parse(p).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DatasetError(f"{p}: not a readable Pascal-VOC XML file: {exc}") from exc
    size = root.find("size")
    w = int(float(size.findtext("width", "0"))) if size is not None else 0
    h = int(float(size.findtext("height", "0"))) if size is not None else 0
    boxes: list[VocBox] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None or not name:
            continue
        try:
            coords = [float(bb.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as exc:
            raise DatasetError(f"{p}: bad box coordinates for {name}: {exc}") from exc
        boxes.append(VocBox(name, *coords))
    return (w, h), boxes
