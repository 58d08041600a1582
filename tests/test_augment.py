"""Training augmentation: flips and colour jitter, and the optics (blur, lamp gain) for slide-like crops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scipy import ndimage as ndi  # noqa: E402

from scope_stream.classify.data import augment, gaussian_blur  # noqa: E402
from scope_stream.classify.testing import tiny_train_config, write_toy_folder  # noqa: E402
from scope_stream.config import ConfigError, load_train_config  # noqa: E402


def _batch(n: int = 4, size: int = 16, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _high_freq(x: Any) -> float:
    """Energy of the image minus its 3x3 box mean: what blur removes."""
    box = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return float((x - box).pow(2).mean())


def test_gaussian_blur_matches_scipy_per_image() -> None:
    x = _batch(3)
    sigma = torch.tensor([0.0, 0.5, 1.2])
    y = gaussian_blur(x, sigma)
    assert torch.equal(y[0], x[0])  # sigma 0 leaves the image as it was
    for i in (1, 2):
        ref = ndi.gaussian_filter(x[i].numpy(), (0, float(sigma[i]), float(sigma[i])), mode="mirror", truncate=3.0)
        np.testing.assert_allclose(y[i].numpy(), ref, atol=1e-5)
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([1.0])), flat)  # weights sum to one
    with pytest.raises(ValueError, match="one sigma per image"):
        gaussian_blur(x, torch.tensor([1.0]))


def test_optics_off_by_default_draw_nothing_so_old_runs_replay() -> None:
    x = _batch()
    a = augment(x, torch.Generator().manual_seed(5), 0.05)
    b = augment(x, torch.Generator().manual_seed(5), 0.05, blur_sigma_max=0.0, gain_jitter=0.0)
    assert torch.equal(a, b)
    # the optics come after flips and jitter: with blur probability 0 only the draws differ, not the images
    c = augment(x, torch.Generator().manual_seed(5), 0.05, blur_sigma_max=1.0, blur_probability=0.0)
    assert torch.equal(a, c)


def test_blur_softens_and_gain_scales_light_but_keeps_black() -> None:
    x = _batch(8, 32)
    plain = augment(x, torch.Generator().manual_seed(1), 0.0)
    blurred = augment(x, torch.Generator().manual_seed(1), 0.0, blur_sigma_max=1.5, blur_probability=1.0)
    assert _high_freq(blurred) < 0.6 * _high_freq(plain)
    assert abs(float(blurred.mean() - plain.mean())) < 0.02  # blur moves no light

    black = torch.full((6, 3, 8, 8), -1.0)
    assert torch.equal(augment(black, torch.Generator().manual_seed(2), 0.0, gain_jitter=0.3), black)
    grey = torch.zeros(64, 3, 8, 8)
    out = augment(grey, torch.Generator().manual_seed(3), 0.0, gain_jitter=0.1)
    gains = (out[:, 0, 0, 0] + 1).numpy()  # (x + 1) scales by the gain
    assert gains.min() >= 0.9 - 1e-6 and gains.max() <= 1.1 + 1e-6
    assert gains.std() > 0.02  # each image gets its own gain
    assert torch.all(out == out[:, :1, :1, :1])  # one gain per image, every pixel and channel alike


def test_bad_augmentation_arguments_name_the_problem() -> None:
    x = _batch()
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        augment(x[:, :2], None, 0.05)
    with pytest.raises(ValueError, match="blur_sigma_max"):
        augment(x, None, 0.05, blur_sigma_max=-1.0)
    with pytest.raises(ValueError, match="blur_probability"):
        augment(x, None, 0.05, blur_probability=1.5)


def test_train_config_carries_the_optics_to_every_training_loop(tmp_path: Path, monkeypatch: Any) -> None:
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("kind: train\nblur_sigma_max: 0.8\nblur_probability: 0.6\ngain_jitter: 0.05\n")
    cfg = load_train_config(cfg_file)
    assert cfg.augmentation() == {
        "jitter": 0.05,
        "blur_sigma_max": 0.8,
        "blur_probability": 0.6,
        "gain_jitter": 0.05,
        "rotate": False,
        "scale_jitter": 0.0,
        "hed_jitter": 0.0,
        "noise_std": 0.0,
    }
    cfg_file.write_text("kind: train\nblur_sigma_max: -0.5\n")
    with pytest.raises(ConfigError, match="blur_sigma_max"):
        load_train_config(cfg_file)

    import scope_stream.classify.train as train_mod

    seen: list[dict[str, float]] = []

    def spy(x: Any, gen: Any = None, jitter: float = 0.05, **kw: float) -> Any:
        seen.append({"jitter": jitter, **kw})
        return augment(x, gen, jitter, **kw)

    monkeypatch.setattr(train_mod, "augment", spy)
    data = write_toy_folder(tmp_path / "data", ["a", "b"], per_class=6)
    run = tiny_train_config(
        data, tmp_path / "run", 2, batch_size=4, blur_sigma_max=0.8, blur_probability=0.6, gain_jitter=0.05
    )
    res = train_mod.train_diffusion(run, progress=False)
    assert len(res["losses"]) == 2 and all(np.isfinite(res["losses"]))
    assert seen == [run.augmentation()] * 2


def test_robustness_augmentations_off_draw_nothing() -> None:
    x = _batch()
    a = augment(x, torch.Generator().manual_seed(5), 0.05)
    b = augment(
        x, torch.Generator().manual_seed(5), 0.05, rotate=False, scale_jitter=0.0, hed_jitter=0.0, noise_std=0.0
    )
    assert torch.equal(a, b)


def test_rotate_zoom_identity_quarter_turn_and_zoom() -> None:
    from scope_stream.classify.data import rotate_zoom

    x = _batch(2, 16)
    same = rotate_zoom(x, torch.zeros(2), torch.ones(2))
    assert torch.allclose(same, x, atol=1e-5)
    quarter = rotate_zoom(x, torch.full((2,), np.pi / 2), torch.ones(2))
    # a quarter turn is a transpose plus a flip, whichever the direction
    cands = [x.transpose(2, 3).flip(2), x.transpose(2, 3).flip(3)]
    assert min(float((quarter - c).abs().max()) for c in cands) < 1e-4
    # zoom 2 about the centre: a disc of radius 3 becomes one of radius ~6
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 9).float()[None, None].repeat(1, 3, 1, 1) * 2 - 1
    big = rotate_zoom(disc, torch.zeros(1), torch.full((1,), 2.0))
    area = float((big[0, 0] > 0).sum())
    assert 0.8 * np.pi * 36 < area < 1.2 * np.pi * 36
    with pytest.raises(ValueError, match="zoom"):
        rotate_zoom(x, torch.zeros(2), torch.zeros(2))


def test_hed_perturb_identity_and_stain_direction() -> None:
    from scope_stream.classify.data import hed_perturb

    x = _batch(3, 8) * 0.8
    same = hed_perturb(x, torch.ones(3, 3), torch.zeros(3, 3))
    assert torch.allclose(same, x, atol=2e-2)
    white = torch.ones(1, 3, 4, 4)
    assert torch.allclose(hed_perturb(white, torch.full((1, 3), 1.3), torch.zeros(1, 3)), white, atol=1e-3)
    purple = torch.tensor([0.45, 0.1, 0.6]).view(1, 3, 1, 1).repeat(1, 1, 4, 4) * 2 - 1
    more_h = hed_perturb(purple, torch.tensor([[1.5, 1.0, 1.0]]), torch.zeros(1, 3))
    assert float(more_h.mean()) < float(purple.mean())  # more haematoxylin absorbs more light


def test_camera_noise_grows_with_light_and_rotation_keeps_flat_background() -> None:
    x = torch.full((4, 3, 16, 16), 0.9)
    x[:, :, 6:10, 6:10] = -0.8
    y = augment(x, torch.Generator().manual_seed(2), 0.0, noise_std=0.05)
    bright = float((y - x)[:, :, :4, :4].std())
    dark = float((y - x)[:, :, 7:9, 7:9].std())
    assert 0.03 < bright < 0.07 and dark < bright / 2
    r = augment(x, torch.Generator().manual_seed(3), 0.0, rotate=True, scale_jitter=0.1)
    assert torch.allclose(r[:, :, 0, :], torch.full_like(r[:, :, 0, :], 0.9), atol=1e-4)


def test_jpeg_copies_and_swap_share() -> None:
    from scope_stream.classify.train import jpeg_copies, pick_jpeg

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    jp = jpeg_copies(imgs, seed=1)
    assert jp.shape == imgs.shape and jp.dtype == np.uint8 and not np.array_equal(jp, imgs)
    np.testing.assert_array_equal(jp, jpeg_copies(imgs, seed=1))
    t, tj = torch.from_numpy(imgs), torch.from_numpy(jp)
    idx = np.arange(6)
    assert torch.equal(pick_jpeg(t, None, idx, np.random.default_rng(0), 0.5), t)
    assert torch.equal(pick_jpeg(t, tj, idx, np.random.default_rng(0), 1.0), tj)
