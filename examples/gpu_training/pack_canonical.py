"""Pack PBC (and a few BCCD fields) for a GPU machine that cannot read ``shared/data``, within its 64 MiB.

    python examples/gpu_training/pack_canonical.py --config configs/train-pbc-gpu-64.yaml --out .gpu

The training cells travel as their canonical crops (the config's spec), JPEG quality 95 in one ``.npz``
(raw JPEGs of 9,000 cells would not fit); the cells calibration re-renders (the run's hold-out) and the
``val`` rows travel as the original files, so shifts and canonical crops are made from them there.
``--bccd N`` copies N BCCD fields with their boxes. On the GPU machine,
``unpack_canonical.py .gpu`` turns the npz into the crop cache (``$SCOPE_STREAM_CROP_CACHE``) that
``load_crops`` reads, so training there sees exactly the crops made here, up to the JPEG step.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from scope_stream.classify.data import CROP_CACHE_ENV, holdout_mask, load_crops
from scope_stream.classify.train import canonical_spec
from scope_stream.config import load_train_config
from scope_stream.datasets import bccd_root, pbc_root, read_labels_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="the training config (its canonical spec)")
    ap.add_argument("--out", type=Path, default=Path(".gpu"))
    ap.add_argument("--data", type=Path, default=None, help="the PBC folder (default: shared/data/pbc)")
    ap.add_argument("--bccd", type=int, default=100, help="BCCD fields to copy (0: none)")
    ap.add_argument("--quality", type=int, default=95)
    args = ap.parse_args()
    cfg = load_train_config(args.config)
    spec = canonical_spec(cfg)
    src = args.data or pbc_root()
    out_pbc = args.out / "data" / "pbc"
    out_pbc.mkdir(parents=True, exist_ok=True)
    train_rows = [r for r in read_labels_csv(src, split=cfg.train_split) if r.label not in set(cfg.exclude_classes)]
    hold = holdout_mask([r.path for r in train_rows], [r.label for r in train_rows], cfg.holdout_fraction, cfg.seed)
    val_rows = read_labels_csv(src, split="val")
    raw_rows = [r for r, h in zip(train_rows, hold, strict=True) if h] + val_rows
    with (out_pbc / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "subtype", "split"])
        for r in train_rows + val_rows:
            w.writerow([r.path.relative_to(src.resolve()).as_posix(), r.label, r.subtype, r.split])
    for r in raw_rows:
        dst = out_pbc / r.path.relative_to(src.resolve())
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r.path, dst)
    # canonical crops of the training cells (through the crop cache, so exactly what load_crops makes)
    cache = args.out / "crop-cache-local"
    os.environ[CROP_CACHE_ENV] = str(cache)
    cells = load_crops(
        src, cfg.image_size, split=cfg.train_split, exclude=cfg.exclude_classes, progress=True, canonical=spec
    )
    held = {r.path for r, h in zip(train_rows, hold, strict=True) if h}
    keep = [i for i, p in enumerate(cells.paths) if p not in held]
    blobs, names = [], []
    for i in keep:
        buf = io.BytesIO()
        Image.fromarray(cells.images[i]).save(buf, format="JPEG", quality=args.quality, subsampling=0)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        names.append(cells.paths[i].relative_to(src.resolve()).as_posix())
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(
        args.out / "canonical-train.npz",
        names=np.array(names, dtype=str),
        offsets=offsets,
        data=np.concatenate(blobs),
        refused_paths=np.array([Path(p).relative_to(src.resolve()).as_posix() for p in cells.refused], dtype=str),
        reasons=np.array(list(cells.refused.values()), dtype=str),
        spec=np.array([str(spec.to_json())]),
    )
    shutil.rmtree(cache, ignore_errors=True)
    if args.bccd:
        b_src = bccd_root()
        b_out = args.out / "data" / "bccd"
        for sub in ("JPEGImages", "Annotations"):
            (b_out / sub).mkdir(parents=True, exist_ok=True)
        xmls = sorted((b_src / "Annotations").glob("*.xml"))[: args.bccd]
        for x in xmls:
            shutil.copyfile(x, b_out / "Annotations" / x.name)
            jpg = b_src / "JPEGImages" / (x.stem + ".jpg")
            if jpg.is_file():
                shutil.copyfile(jpg, b_out / "JPEGImages" / jpg.name)
        if (b_src / "LICENSE").is_file():
            shutil.copyfile(b_src / "LICENSE", b_out / "LICENSE")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(
        f"packed {len(keep)} canonical training crops, {len(raw_rows)} raw crops ({int(hold.sum())} hold-out, "
        f"{len(val_rows)} val), {args.bccd} BCCD fields: {size / 1e6:.1f} MB in {args.out}"
    )


if __name__ == "__main__":
    main()
