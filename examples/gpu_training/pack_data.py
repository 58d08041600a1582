"""Pack a PBC folder at the model size into one xz file for a machine that cannot read ``shared/data``.

    python examples/gpu_training/pack_data.py ../shared/data/pbc .gpu --size 32

writes ``.gpu/pbc32.u8.xz`` (every row of ``labels.csv``, in order, as uint8 RGB, resized exactly as
training resizes) and a copy of ``labels.csv``. PBC's 14,548 crops at 32 px pack to 27 MB.
"""

from __future__ import annotations

import argparse
import csv
import lzma
import shutil
from pathlib import Path

import numpy as np
from rich.progress import track

from scope_stream.classify.data import load_crops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="a folder with labels.csv (PBC)")
    ap.add_argument("out", type=Path, help="where pbc<size>.u8.xz and labels.csv go")
    ap.add_argument("--size", type=int, default=32, help="the model's input size")
    args = ap.parse_args()
    with (args.data / "labels.csv").open(newline="", encoding="utf-8") as fh:
        n = sum(1 for _ in csv.DictReader(fh))
    crops = load_crops(args.data, args.size, progress=True)  # every row, in labels.csv order
    if len(crops) != n:
        raise SystemExit(f"labels.csv has {n} rows but {len(crops)} crops were read")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = np.ascontiguousarray(crops.images).tobytes()
    chunks = [raw[i : i + (1 << 24)] for i in range(0, len(raw), 1 << 24)]
    comp = lzma.LZMACompressor(preset=9)
    with (args.out / f"pbc{args.size}.u8.xz").open("wb") as fh:
        for chunk in track(chunks, description="compressing"):
            fh.write(comp.compress(chunk))
        fh.write(comp.flush())
    shutil.copyfile(args.data / "labels.csv", args.out / "labels.csv")
    print(f"{len(crops)} crops of {args.size} px -> {args.out}")


if __name__ == "__main__":
    main()
