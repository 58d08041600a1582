"""Pack a PBC folder at the model size into one xz file for a machine that cannot read ``shared/data``.

    python examples/gpu_training/pack_data.py ../shared/data/pbc .gpu --size 32

writes ``.gpu/pbc32.u8.xz`` (the rows of ``labels.csv``, in order, as uint8 RGB, resized exactly as
training resizes) and the matching ``labels.csv``. PBC's 14,548 crops at 32 px pack to 27 MB. Only what
training reads, ``--split train --exclude ig,erythroblast`` (9,460 crops), packs to about 17 MB; evaluate
on ``val`` where the data is.
"""

from __future__ import annotations

import argparse
import csv
import lzma
from pathlib import Path

import numpy as np
from rich.progress import track

from scope_stream.classify.data import load_crops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="a folder with labels.csv (PBC)")
    ap.add_argument("out", type=Path, help="where pbc<size>.u8.xz and labels.csv go")
    ap.add_argument("--size", type=int, default=32, help="the model's input size")
    ap.add_argument("--split", default=None, help="only rows of this split (default: all)")
    ap.add_argument("--exclude", default="", help="comma-separated labels to leave out")
    args = ap.parse_args()
    exclude = {s.strip() for s in args.exclude.split(",") if s.strip()}
    with (args.data / "labels.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = [
            r
            for r in reader
            if (args.split is None or (r.get("split") or "").strip() == args.split)
            and r["label"].strip() not in exclude
        ]
    # the same rows, in labels.csv order
    crops = load_crops(args.data, args.size, split=args.split, exclude=sorted(exclude), progress=True)
    if [Path(p) for p in crops.paths] != [(args.data / r["path"]).resolve() for r in rows]:
        raise SystemExit("the crops read do not match the rows of labels.csv (order or filter)")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = np.ascontiguousarray(crops.images).tobytes()
    chunks = [raw[i : i + (1 << 24)] for i in range(0, len(raw), 1 << 24)]
    comp = lzma.LZMACompressor(preset=9)
    with (args.out / f"pbc{args.size}.u8.xz").open("wb") as fh:
        for chunk in track(chunks, description="compressing"):
            fh.write(comp.compress(chunk))
        fh.write(comp.flush())
    with (args.out / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(crops)} crops of {args.size} px -> {args.out}")


if __name__ == "__main__":
    main()
