"""Turn ``pack_canonical.py``'s npz into the crop cache ``load_crops`` reads (``$SCOPE_STREAM_CROP_CACHE``).

python examples/gpu_training/unpack_canonical.py .gpu --config configs/train-pbc-gpu-64.yaml --cache /tmp/cc
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from scope_stream.classify.data import CropCache
from scope_stream.classify.train import canonical_spec
from scope_stream.config import load_train_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packed", type=Path, help="the folder pack_canonical.py wrote")
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True, help="the crop-cache folder to fill")
    args = ap.parse_args()
    spec = canonical_spec(load_train_config(args.config))
    z = np.load(args.packed / "canonical-train.npz", allow_pickle=False)
    cache = CropCache(args.cache, args.packed / "data" / "pbc", spec)
    offs, data = z["offsets"], z["data"]
    for k, name in enumerate(z["names"]):
        blob = data[offs[k] : offs[k + 1]].tobytes()
        with Image.open(io.BytesIO(blob)) as im:
            cache.images[str(name)] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    for p, r in zip(z["refused_paths"], z["reasons"], strict=True):
        cache.refused[str(p)] = str(r)
    cache.save()
    print(f"{len(cache.images)} canonical crops, {len(cache.refused)} refused -> {cache.path}")


if __name__ == "__main__":
    main()
