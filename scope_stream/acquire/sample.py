"""The small attributed sample of real images packaged with scope-stream.

``scope_stream/data/sample/`` holds a few dozen PBC crops (CC BY 4.0) of every class, taken from the
held-out ``val`` split, and a few BCCD fields (MIT), so the virtual microscope (and the demo) run on a
fresh machine without ``../shared/data``. Its ``ATTRIBUTION.md`` and ``LICENSE-BCCD.txt`` travel
with it. :func:`build_sample` regenerates it from a full data folder, deterministically.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SAMPLE_DIR", "build_sample", "sample_root"]

#: Where the packaged sample lives inside the installed package.
SAMPLE_DIR: Path = Path(__file__).resolve().parent.parent / "data" / "sample"

PBC_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")

ATTRIBUTION = """\
# Attribution of the packaged sample images

The images in this folder were not made by the scope-stream project. They are a small, unmodified
subset of two public datasets, copied here so the virtual microscope runs without the full data.
Regenerate the folder with `scope-stream microscope make-sample --data-dir ../shared/data`.

## pbc/ — Peripheral Blood Cell images (PBC)

Acevedo A., Merino A., Alférez S., Molina Á., Boldú L., Rodellar J. "A dataset of microscopic peripheral
blood cell images for development of automatic recognition systems", Data in Brief 30 (2020) 105474,
Mendeley Data, doi:10.17632/snkd93bnjr.1. Licensed under Creative Commons Attribution 4.0 International
(CC BY 4.0, https://creativecommons.org/licenses/by/4.0/). Hospital Clinic of Barcelona, CellaVision DM96,
May-Gruenwald Giemsa stain.

Changes: the images were resized from 360x363 to 128x128 RGB JPEG by whoever prepared the copy in
`shared/data/pbc`; {n_pbc} of them ({per_class} per class, all from its `val` split) were selected here,
byte for byte. `labels.csv` lists path, label, subtype and split. scope-stream cuts the cells out of these
crops at run time to place them on a virtual slide; that derived rendering is also CC BY 4.0 material.

## bccd/ — BCCD Dataset

https://github.com/Shenggan/BCCD_Dataset, MIT License, Copyright (c) 2017 shenggan; the licence text is
in `LICENSE-BCCD.txt`, which must accompany these files. {n_bccd} fields (640x480 JPEG) with their
Pascal-VOC annotations, unmodified.
"""


def sample_root() -> Path:
    """The packaged sample folder (holding ``pbc/labels.csv`` and ``bccd/``); a clear error if it is missing."""
    if not (SAMPLE_DIR / "pbc" / "labels.csv").is_file():
        from .slide import SlideError

        raise SlideError(
            f"the packaged sample images are missing from {SAMPLE_DIR} (a broken install?); reinstall scope-stream "
            "or set microscope.data_dir to a folder like ../shared/data"
        )
    return SAMPLE_DIR


def build_sample(
    data_root: Path | str,
    out_dir: Path | str = SAMPLE_DIR,
    *,
    per_class: int = 8,
    bccd_fields: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Copy a small attributed sample out of a full data folder (``pbc/`` + ``bccd/``) into ``out_dir``.

    PBC: ``per_class`` crops of each class from the ``val`` split, in a seeded random order, keeping
    only crops whose cell the virtual slide can cut out cleanly. BCCD: the ``bccd_fields`` fields that
    give the most usable red cells. Files are copied byte for byte. Returns a summary.
    """
    from scope_stream.datasets import read_labels_csv, read_voc

    from .slide import _read_rgb, extract_pbc_cell, harvest_bccd_rbcs

    root = Path(data_root)
    out = Path(out_dir)
    rows = read_labels_csv(root / "pbc", split="val")
    if not rows:
        raise ValueError(f"{root / 'pbc' / 'labels.csv'} has no rows of split 'val'")
    rng = np.random.default_rng(seed)
    chosen: list[Any] = []
    for label in PBC_CLASSES:
        pool = sorted((r for r in rows if r.label == label), key=lambda r: str(r.path))
        picked = 0
        for i in rng.permutation(len(pool)):
            r = pool[int(i)]
            if extract_pbc_cell(_read_rgb(r.path), label) is None:
                continue
            chosen.append(r)
            picked += 1
            if picked >= per_class:
                break
        if picked < per_class:
            raise ValueError(f"only {picked} usable {label!r} crops in the val split of {root / 'pbc'}")
    # BCCD fields ranked by usable red cells
    fields = []
    for xml in sorted((root / "bccd" / "Annotations").glob("*.xml")):
        jpg = root / "bccd" / "JPEGImages" / (xml.stem + ".jpg")
        if jpg.is_file():
            _, boxes = read_voc(xml)
            fields.append((len(harvest_bccd_rbcs(_read_rgb(jpg), boxes)), jpg, xml))
    fields.sort(key=lambda t: (-t[0], t[1].name))
    best = fields[:bccd_fields]

    if out.exists():
        for sub in ("pbc", "bccd"):
            shutil.rmtree(out / sub, ignore_errors=True)
    (out / "pbc").mkdir(parents=True, exist_ok=True)
    with (out / "pbc" / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(["path", "label", "subtype", "split"])
        for r in chosen:
            rel = Path("images") / r.label / r.path.name
            (out / "pbc" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(r.path, out / "pbc" / rel)
            wr.writerow([rel.as_posix(), r.label, r.subtype, r.split])
    for sub in ("JPEGImages", "Annotations"):
        (out / "bccd" / sub).mkdir(parents=True, exist_ok=True)
    for _, jpg, xml in best:
        shutil.copyfile(jpg, out / "bccd" / "JPEGImages" / jpg.name)
        shutil.copyfile(xml, out / "bccd" / "Annotations" / xml.name)
    lic = root / "bccd" / "LICENSE"
    if lic.is_file():
        shutil.copyfile(lic, out / "LICENSE-BCCD.txt")
    (out / "ATTRIBUTION.md").write_text(
        ATTRIBUTION.format(n_pbc=len(chosen), per_class=per_class, n_bccd=len(best)), encoding="utf-8"
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "out": str(out),
        "pbc_images": len(chosen),
        "bccd_fields": [j.name for _, j, _ in best],
        "bccd_rbcs": [n for n, _, _ in best],
        "bytes": size,
    }
