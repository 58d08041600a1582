"""A folder of another lab's tightly cropped white cells, with no labels.csv and no pixel size, is evaluated
through the model's canonical crops without any preparation by the user."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from scope_stream.datasets import DatasetError, read_labels_csv


def _disc_cell(size: int, seed: int) -> np.ndarray:
    """A hand-made white cell cut tightly: purple nucleus, lilac cytoplasm, pale background in the corners."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    r = np.hypot(yy - size / 2, xx - size / 2)
    img = np.empty((size, size, 3))
    img[:] = (236, 226, 232)
    img[r < 0.46 * size] = (200, 170, 215)
    img[r < 0.27 * size] = (95, 45, 140)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_class_folders_are_read_without_labels_csv(tmp_path: Path) -> None:
    from PIL import Image

    for k, label in enumerate(["lymphocyte", "neutrophil"]):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(_disc_cell(120 + 40 * i, k * 10 + i)).save(tmp_path / label / f"c{i}.png")
    (tmp_path / "notes.txt").write_text("not an image folder")
    rows = read_labels_csv(tmp_path)
    assert [r.label for r in rows] == ["lymphocyte", "lymphocyte", "neutrophil", "neutrophil"]
    with pytest.raises(DatasetError, match="one sub-folder of images per class"):
        read_labels_csv(tmp_path / "lymphocyte")


def test_evaluate_a_foreign_folder_of_tight_crops_with_a_canonical_model(tmp_path: Path) -> None:
    from PIL import Image

    from scope_stream.classify.testing import make_tiny_model
    from scope_stream.cli import app

    model = make_tiny_model(tmp_path / "tiny", steps=40, feature_bank=False)
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    cfg["canonical"] = {"size": cfg["image_size"], "cell_fraction": 0.62, "context": "mask", "stain": "white"}
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    data = tmp_path / "other-lab"
    for k, label in enumerate(["lymphocyte", "neutrophil"]):
        (data / label).mkdir(parents=True)
        for i in range(3):  # tight crops of several sizes, as another lab cuts them
            Image.fromarray(_disc_cell(100 + 60 * i, k * 10 + i)).save(data / label / f"cell{i}.png")
    Image.fromarray(np.full((90, 90, 3), 235, np.uint8)).save(data / "neutrophil" / "empty.png")
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["evaluate", "classifier", "--data", str(data), "--model", str(model),
                                   "--json", str(out), "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text(encoding="utf-8"))
    assert rep["n_cells"] == 6 and rep["n_refused"] == 1
    assert any(p.endswith("empty.png") for p in rep["refused"])
    assert rep["canonical"]["size"] == cfg["image_size"]
    shutil.rmtree(tmp_path / "tiny", ignore_errors=True)


def test_canonical_crops_are_cached_per_folder_and_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from scope_stream.classify.canonical import CanonicalSpec
    from scope_stream.classify.data import CROP_CACHE_ENV, load_crops

    data = tmp_path / "lab"
    (data / "lymphocyte").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_disc_cell(100 + 30 * i, i)).save(data / "lymphocyte" / f"c{i}.png")
    Image.fromarray(np.full((90, 90, 3), 235, np.uint8)).save(data / "lymphocyte" / "empty.png")
    spec = CanonicalSpec(size=32)
    monkeypatch.delenv(CROP_CACHE_ENV, raising=False)
    plain = load_crops(data, 32, canonical=spec)
    assert len(plain) == 3 and len(plain.refused) == 1
    monkeypatch.setenv(CROP_CACHE_ENV, str(tmp_path / "cache"))
    first = load_crops(data, 32, canonical=spec)
    assert len(list((tmp_path / "cache").glob("crops-lab-*.npz"))) == 1
    for img in (data / "lymphocyte").iterdir():  # from now on only the cache holds the cells
        img.write_bytes(b"")
    again = load_crops(data, 32, canonical=spec)
    for got in (first, again):
        np.testing.assert_array_equal(got.images, plain.images)
        assert got.paths == plain.paths and got.refused == plain.refused
