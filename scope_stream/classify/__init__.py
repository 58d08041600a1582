"""The CytoDiffusion-style generative classifier: train, classify by denoising error, calibrate, flag.

Heavy imports (torch, diffusers) happen inside the submodules that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .classifier import DiffusionClassifier
    from .flags import flag_call

__all__ = ["DiffusionClassifier", "flag_call"]


def __getattr__(name: str) -> Any:
    if name == "DiffusionClassifier":
        from .classifier import DiffusionClassifier

        return DiffusionClassifier
    if name == "flag_call":
        from .flags import flag_call

        return flag_call
    raise AttributeError(name)
