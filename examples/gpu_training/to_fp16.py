"""Store model directories' weights as float16 (the shipped format, half the size), in place.

python examples/gpu_training/to_fp16.py runs/pbc-gpu/ema
"""

from __future__ import annotations

import sys

from safetensors.torch import load_file, save_file

for model_dir in sys.argv[1:]:
    path = f"{model_dir}/model.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(path).items()}, path)
    print(f"float16: {path}")
