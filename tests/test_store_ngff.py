"""Every store SlideStore writes is a valid OME-Zarr 0.5 image (ome-zarr-models), read by napari-ome-zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import make_tile

from scope_stream.config import ScopeStreamConfig, StoreConfig
from scope_stream.store import SlideStore
from scope_stream.transport.stages import ThresholdAnalyzer

image_mod = pytest.importorskip("ome_zarr_models.v05.image")


def validate_store(path: Path) -> list[str]:
    """Validate the root image and every tile image with ome-zarr-models; returns the tile paths checked."""
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    checked = []
    if "ome" in root.attrs:
        img = image_mod.Image.from_zarr(root)
        for ds in img.attributes.ome.multiscales[0].datasets:
            arr = root[ds.path]
            assert isinstance(arr, zarr.Array) and arr.metadata.dimension_names is not None
        checked.append("")
    store = SlideStore.open(path)
    for p in store.tile_rows()["path"]:
        if p:
            image_mod.Image.from_zarr(root[str(p)])
            checked.append(str(p))
    return checked


def _fill(tmp_path: Path, n: int = 6, **cfg: object) -> SlideStore:
    st = SlideStore.open_or_create(
        tmp_path / "s1.zarr", slide_id="s1", config=StoreConfig(**cfg), scan_region_um=(100, 100, 220, 160)
    )
    an = ThresholdAnalyzer(ScopeStreamConfig(), "cpu")
    tiles = [make_tile(i) for i in range(n)] + [make_tile(20, kind="reimage")]
    for t in tiles:
        st.write_result(an.analyze([t])[0], tile=t)
    return st


def test_store_validates_as_ngff_05_with_a_pyramid(tmp_path: Path) -> None:
    st = _fill(tmp_path)
    checked = validate_store(st.path)
    assert "" in checked and len(checked) == 1 + 7  # the root image and every tile
    root = zarr.open_group(str(st.path), mode="r")
    datasets = root.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["mosaic/0", "mosaic/1", "mosaic/2"] and st.mosaic_levels == 3
    scales = [d["coordinateTransformations"][0]["scale"][-1] for d in datasets]
    assert scales == [2.0, 4.0, 8.0]
    # each level's translation is the centre of its own top-left pixel: the corners coincide
    corners = [
        d["coordinateTransformations"][1]["translation"][-1] - s / 2 for d, s in zip(datasets, scales, strict=True)
    ]
    assert corners == pytest.approx([corners[0]] * 3)
    # level k is level 0's pixel (R*2^k + 2^(k-1), C*2^k + 2^(k-1)), kept up to date tile by tile
    m0, s0, o0 = st.mosaic(0)  # type: ignore[misc]
    for k in (1, 2):
        mk, sk, ok = st.mosaic(k)  # type: ignore[misc]
        assert sk == s0 * 2**k and ok == o0
        step, off = 2**k, 2 ** (k - 1)
        ny, nx = (m0.shape[1] - off + step - 1) // step, (m0.shape[2] - off + step - 1) // step
        np.testing.assert_array_equal(mk[:, :ny, :nx], m0[:, off::step, off::step][:, :ny, :nx])
    assert m0.any() and all(st.mosaic(k)[0].any() for k in (1, 2))  # type: ignore[index]


def test_grayscale_uint16_and_resumed_store_validate(tmp_path: Path) -> None:
    st = SlideStore.open_or_create(tmp_path / "g.zarr", slide_id="s1", scan_region_um=(100, 100, 220, 160))
    an = ThresholdAnalyzer(ScopeStreamConfig(), "cpu")
    for i in range(3):
        t = make_tile(i, shape=(64, 64), dtype="uint16")
        st.write_result(an.analyze([t])[0], tile=t)
    st2 = SlideStore.open_or_create(tmp_path / "g.zarr", slide_id="s1")  # resumed: more tiles, same pyramid
    t = make_tile(3, shape=(64, 64), dtype="uint16")
    st2.write_result(an.analyze([t])[0], tile=t)
    assert len(validate_store(st2.path)) == 1 + 4


def test_store_without_tiles_or_mosaic_still_reads(tmp_path: Path) -> None:
    st = _fill(tmp_path, n=2, save_tiles=False, mosaic_downsample=0)
    assert validate_store(st.path) == []  # no image claimed at all: nothing to validate, nothing invalid
    assert st.mosaic() is None


def test_napari_ome_zarr_opens_the_pyramid(tmp_path: Path) -> None:
    reader_mod = pytest.importorskip("napari_ome_zarr._reader")
    st = _fill(tmp_path, n=3)
    reader = reader_mod.napari_get_reader(str(st.path))
    assert reader is not None
    data, _meta, _ = reader(str(st.path))[0]
    assert len(data) == 3 and data[0].shape[0] == 3  # multiscale: three levels, channels first
    assert data[1].shape[-1] == (data[0].shape[-1] + 1) // 2
