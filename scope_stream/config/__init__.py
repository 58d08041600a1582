"""Configuration: pydantic models (the single source of truth) loaded from ``configs/*.yaml``.

A file is one of two kinds, told apart by its top-level ``kind`` key:

* ``kind: scope-stream`` (the default) -- a :class:`ScopeStreamConfig` for scans, pipelines and demos;
* ``kind: train`` -- a :class:`TrainConfig` for ``scope-stream train``.

Unknown keys and bad values raise :class:`ConfigError`, whose message names the file and the
dotted path of each bad field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section
from .callbacks import CallbacksConfig, WebhookConfig
from .classify import ClassifierConfig, FlagConfig
from .loader import ConfigError, load_yaml, validate
from .microscope import MicroscopeConfig, ObjectiveConfig
from .pipeline import PipelineConfig
from .scan import ScanConfig
from .segment import SegmentConfig
from .store import StoreConfig
from .train import TrainConfig

__all__ = [
    "CallbacksConfig",
    "ClassifierConfig",
    "ConfigError",
    "FlagConfig",
    "MicroscopeConfig",
    "ObjectiveConfig",
    "PipelineConfig",
    "ScanConfig",
    "ScopeStreamConfig",
    "SegmentConfig",
    "StoreConfig",
    "TrainConfig",
    "WebhookConfig",
    "load_config",
]


class ScopeStreamConfig(Section):
    """A whole scope-stream setup: microscope, scan, pipeline, analysis, storage and callbacks."""

    kind: Literal["scope-stream"] = Field(
        default="scope-stream", description="the file's kind (train: a training file)"
    )
    slide_id: str = Field(default="slide-0001", description="names the store: <store.root>/<slide_id>.zarr")
    microscope: MicroscopeConfig = Field(default_factory=MicroscopeConfig)
    scan: ScanConfig = Field(default_factory=ScanConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    flags: FlagConfig = Field(default_factory=FlagConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    callbacks: CallbacksConfig = Field(default_factory=CallbacksConfig)


def load_config(path: Path | str) -> ScopeStreamConfig | TrainConfig:
    """Load a configuration file of either kind (see the module docstring)."""
    data = load_yaml(path)
    kind = data.get("kind", "scope-stream")
    if kind == "train":
        return validate(TrainConfig, data, path)
    if kind != "scope-stream":
        raise ConfigError(path, [f"kind: must be 'scope-stream' or 'train' (got {kind!r})"])
    return validate(ScopeStreamConfig, data, path)


def load_scope_config(path: Path | str | None) -> ScopeStreamConfig:
    """Load a :class:`ScopeStreamConfig` (``None``: all defaults); a train file here is an error."""
    if path is None:
        return ScopeStreamConfig()
    cfg = load_config(path)
    if not isinstance(cfg, ScopeStreamConfig):
        raise ConfigError(path, ["kind: expected a scope-stream configuration, got kind 'train'"])
    return cfg


def load_train_config(path: Path | str) -> TrainConfig:
    cfg = load_config(path)
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(path, ["kind: expected 'train' (a training configuration)"])
    return cfg


_ = Section  # re-exported for section authors
