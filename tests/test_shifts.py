"""Simulated microscope shifts (classify.shifts) and the confident error rate."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from scope_stream.classify.metrics import confident_error_rate
from scope_stream.classify.shifts import NONE, SHIFTS, Illumination, Restain, Scale, apply_shift, cell_box

BACKGROUND = np.array([250.0, 226.0, 204.0])  # PBC-like warm background


def _cell(size: int = 128, diameter: float = 60.0, seed: int = 0) -> np.ndarray:
    """A synthetic smear crop: warm background, a few pale red cells, a purple disc (the WBC) at the centre
    with a darker nucleus, and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.broadcast_to(BACKGROUND, (size, size, 3)).copy()
    for cy, cx in ((12, 14), (110, 20), (18, 112), (112, 108)):
        rbc = np.hypot(yy - cy, xx - cx) < 10
        img[rbc] = (225, 170, 170)
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c)
    img[r < diameter / 2] = (170, 120, 190)
    img[r < 0.3 * diameter] = (80, 40, 130)
    img += rng.normal(0, 2, img.shape)
    return np.asarray(np.clip(np.rint(img), 0, 255), dtype=np.uint8)


def _disc_diameter(img: np.ndarray) -> float:
    """Equivalent diameter of the dark (purple) region."""
    dark = img.astype(np.float64).sum(axis=2) < 560
    return float(2 * np.sqrt(dark.sum() / np.pi))


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    return [_cell(seed=0), _cell(diameter=44, seed=1)]


def test_registry_has_the_required_shifts() -> None:
    required = {"scale_0.6", "scale_0.8", "scale_1.25", "scale_1.6", "tight", "stain_hed", "stain_bccd"}
    required |= {"illum_warm", "illum_dim", "blur", "jpeg", "noise", "combo"}
    assert required <= set(SHIFTS)
    assert NONE not in SHIFTS


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_shift_is_deterministic_uint8_and_changes_the_image(name: str, crops: list[np.ndarray]) -> None:
    a = apply_shift(name, crops, seed=3)
    b = apply_shift(name, crops, seed=3)
    assert len(a) == len(crops)
    for x, y, src in zip(a, b, crops, strict=True):
        assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[2] == 3
        np.testing.assert_array_equal(x, y)
        if name == "tight":
            assert 100 <= x.shape[0] <= 300 and 100 <= x.shape[1] <= 300
        else:
            assert x.shape == src.shape
        changed = x.shape != src.shape or np.abs(x.astype(int) - src.astype(int)).mean() > 0.5
        assert changed, f"{name} left the crop unchanged"


def test_results_depend_on_the_crop_and_seed_not_the_batch(crops: list[np.ndarray]) -> None:
    alone = apply_shift("noise", crops[:1], seed=3)[0]
    np.testing.assert_array_equal(alone, apply_shift("noise", crops, seed=3)[0])
    assert not np.array_equal(alone, apply_shift("noise", crops[:1], seed=4)[0])


def test_none_copies_and_unknown_names_are_refused(crops: list[np.ndarray]) -> None:
    out = apply_shift(NONE, crops, seed=0)
    np.testing.assert_array_equal(out[0], crops[0])
    assert out[0] is not crops[0]
    with pytest.raises(KeyError, match="unknown shift"):
        apply_shift("sepia", crops, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        apply_shift("blur", [crops[0].astype(np.float32)], seed=0)


@pytest.mark.parametrize("factor", [0.6, 0.8, 1.25, 1.6])
def test_scale_changes_the_cell_diameter_by_the_factor(factor: float) -> None:
    img = _cell(diameter=60)
    out = Scale(factor)(img, np.random.default_rng(0))
    assert out.shape == img.shape
    assert _disc_diameter(out) / _disc_diameter(img) == pytest.approx(factor, rel=0.06)


def test_zoom_out_pads_with_the_background_not_flat() -> None:
    out = apply_shift("scale_0.6", [_cell()], seed=0)[0].astype(np.float64)
    corner = out[:10, :10].reshape(-1, 3)
    np.testing.assert_allclose(corner.mean(axis=0), BACKGROUND, atol=4)
    assert corner.std(axis=0).min() > 0.5


def test_illumination_gains_are_applied() -> None:
    img = np.full((16, 16, 3), 200, dtype=np.uint8)
    warm = SHIFTS["illum_warm"](img, np.random.default_rng(0))
    np.testing.assert_array_equal(warm[0, 0], np.rint(200 * np.array([1.0, 0.93, 0.78])).astype(np.uint8))
    dim = SHIFTS["illum_dim"](img, np.random.default_rng(0))
    assert dim[0, 0, 0] == round(255 * 0.7 * (200 / 255) ** 1.15)
    bright = Illumination(gains=(2.0, 2.0, 2.0))(img, np.random.default_rng(0))
    assert (bright == 255).all()  # clipped


def test_jpeg_round_trips_like_pil_at_quality_30(crops: list[np.ndarray]) -> None:
    buf = io.BytesIO()
    Image.fromarray(crops[0]).save(buf, format="JPEG", quality=30)
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(apply_shift("jpeg", crops[:1], seed=0)[0], expected)


def test_blur_smooths_and_noise_scales_with_intensity() -> None:
    img = _cell()
    blurred = SHIFTS["blur"](img, np.random.default_rng(0))
    assert np.abs(np.diff(blurred.astype(float), axis=1)).mean() < np.abs(np.diff(img.astype(float), axis=1)).mean()
    white = np.full((64, 64, 3), 255, dtype=np.uint8)
    grey = np.full((64, 64, 3), 64, dtype=np.uint8)
    rng = np.random.default_rng(0)
    s_white = (SHIFTS["noise"](white - 20, rng).astype(float) - 235).std()
    s_grey = (SHIFTS["noise"](grey, rng).astype(float) - 64).std()
    assert 4.5 < s_white < 7.5
    assert s_grey < 0.7 * s_white


def test_tight_crops_around_the_cell() -> None:
    img = _cell(diameter=50)
    y0, x0, y1, x1 = cell_box(img)
    assert 46 <= y1 - y0 <= 58 and 46 <= x1 - x0 <= 58
    sizes = {apply_shift("tight", [img], seed=s)[0].shape[0] for s in range(6)}
    assert all(100 <= s <= 300 for s in sizes) and len(sizes) > 1
    out = apply_shift("tight", [img], seed=0)[0]
    # the cell now fills the crop: its disc covers most of it
    assert _disc_diameter(out) / out.shape[0] > 0.75


def test_stain_shifts_keep_the_background_plausible(crops: list[np.ndarray]) -> None:
    bccd = Restain(jitter=0.0)(crops[0], np.random.default_rng(0)).astype(float)
    np.testing.assert_allclose(bccd[60:68, 2:6].reshape(-1, 3).mean(axis=0), (206, 208, 205), atol=6)
    centre = bccd[60:68, 60:68].reshape(-1, 3).mean(axis=0)
    assert centre[2] > centre[0]  # nuclei turn bluer
    hed = apply_shift("stain_hed", crops, seed=0)[0].astype(float)
    assert np.abs(hed[60:68, 2:6].mean(axis=(0, 1)) - BACKGROUND).max() < 60


def test_confident_error_rate() -> None:
    conf = np.array([0.99, 0.97, 0.96, 0.5, 0.3, 0.95])
    correct = np.array([True, False, False, False, True, False])
    assert confident_error_rate(conf, correct) == pytest.approx(3 / 6)
    assert confident_error_rate(conf, correct, threshold=0.965) == pytest.approx(1 / 6)
    assert confident_error_rate(conf, np.ones(6, dtype=bool)) == 0.0
    with pytest.raises(ValueError, match="equally long"):
        confident_error_rate(conf, correct[:5])
    with pytest.raises(ValueError):
        confident_error_rate(np.array([]), np.array([], dtype=bool))
