"""Rebuild a PBC folder from ``pack_data.py``'s output: the same relative paths and ``labels.csv``, each crop
a lossless PNG at the model size (under its original ``.jpg`` name; readers open it by content), so the
hold-out hash, the splits and the pixels training sees are the original ones.

    python examples/gpu_training/unpack_data.py .gpu /tmp/ssdata/pbc --size 32
"""

from __future__ import annotations

import argparse
import csv
import lzma
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packed", type=Path, help="the folder pack_data.py wrote")
    ap.add_argument("out", type=Path, help="the PBC folder to create")
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    with (args.packed / "labels.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    raw = lzma.decompress((args.packed / f"pbc{args.size}.u8.xz").read_bytes())
    if len(raw) != len(rows) * args.size * args.size * 3:
        raise SystemExit(f"pbc{args.size}.u8.xz does not hold {len(rows)} crops of {args.size} px")
    imgs = np.frombuffer(raw, np.uint8).reshape(len(rows), args.size, args.size, 3)
    for row, im in zip(rows, imgs, strict=True):
        path = args.out / row["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(path, format="PNG")
    shutil.copyfile(args.packed / "labels.csv", args.out / "labels.csv")
    print(f"unpacked {len(rows)} crops to {args.out}")


if __name__ == "__main__":
    main()
