"""Per-frame detail the mesh does not determine (the few-step students' test data) and the sharpness metric."""

import json
import math

import numpy as np
import pytest
import torch

from engine.data.dataset import AvatarDataset as Dataset
from engine.data.synthetic import SyntheticHead, default_camera
from engine.data.synthetic_dataset import detail_seed, write_synthetic_dataset
from engine.data.synthetic_look import DETAIL_BAND, DetailField, gaussian_blur
from engine.errors import InputError
from engine.metrics import sharpness


def test_sharpness_of_a_sinusoid_is_its_closed_form():
    # f(x) = sin(w x): the 4-neighbour Laplacian is f(x) (2 cos w - 2), whose variance over whole periods is
    # (2 - 2 cos w)^2 / 2; the valid region of a 8k + 2 wide image holds k whole periods of w = 2 pi / 8.
    w, width = 2 * math.pi / 8, 8 * 6 + 2
    x = torch.arange(width, dtype=torch.float64)
    image = torch.sin(w * x).expand(12, width).clone()
    assert float(sharpness(image)) == pytest.approx((2 - 2 * math.cos(w)) ** 2 / 2, rel=1e-9)
    assert float(sharpness(torch.full((12, 12), 0.3))) == 0.0
    # a mask restricts it: the left half sinusoid, the right half flat, masked to the left half
    image[:, 26:] = 0.5
    mask = torch.zeros(12, width)
    mask[:, :25] = 1
    assert float(sharpness(image[:, :26])) == pytest.approx(float(sharpness(image, mask)), rel=1e-9)
    rgb = image[..., None].expand(12, width, 3)  # [H, W, 3]: the mean of equal channels is the same image
    assert float(sharpness(rgb, mask)) == pytest.approx(float(sharpness(image, mask)), rel=1e-9)


def test_sharpness_refuses_bad_masks_and_images():
    with pytest.raises(InputError, match="mask must be"):
        sharpness(torch.zeros(8, 8), torch.ones(7, 8))
    with pytest.raises(InputError, match="mask is empty"):
        sharpness(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(InputError, match="NaN or Inf"):
        sharpness(torch.full((8, 8), float("nan")))


def test_detail_field_has_zero_mean_and_unit_variance_over_draws():
    p = torch.tensor([[0.01, 0.05, 0.08], [-0.04, 0.0, 0.02]], dtype=torch.float64)
    values = torch.stack([DetailField.draw(s).field(p) for s in range(3000)])
    # 3000 draws: the standard error of the mean is 1 / sqrt(3000) = 0.018; of the variance about 0.026
    assert values.mean(0).abs().max() < 0.07
    assert (values.var(0) - 1).abs().max() < 0.12
    field = DetailField.draw(7)
    k = field.waves[:, :3].norm(dim=1)
    assert DETAIL_BAND[0] <= float(k.min()) and float(k.max()) <= DETAIL_BAND[1]
    assert torch.equal(DetailField.draw(7).waves, field.waves) and not torch.equal(DetailField.draw(8).waves,
                                                                                   field.waves)


def test_detail_adds_high_frequencies_that_the_mean_of_frames_loses():
    head, cam = SyntheticHead(), default_camera(96)
    plain, alpha = head.render(cam, None)
    mask = alpha > 0.99
    drawn = [head.render(cam, None, detail=DetailField.draw(s))[0] for s in range(6)]
    base = float(sharpness(plain, mask))
    each = [float(sharpness(d, mask)) for d in drawn]
    mean = float(sharpness(sum(drawn) / len(drawn), mask))
    assert min(each) > 1.2 * base  # detail is high-frequency content
    assert mean < 0.5 * (min(each) + base)  # averaging frames (what one step draws) loses most of it
    outside = ~(alpha > 0)
    assert torch.equal(drawn[0][outside], plain[outside])  # the background is untouched
    with pytest.raises(InputError, match="DetailField"):
        head.render(cam, None, detail=3)


def test_a_detail_dataset_gives_each_frame_its_own_texture(tmp_path):
    kwargs = dict(sequences=2, frames_per_sequence=2, cameras=2, size=32, eval_cameras=0, eval_sequences=0,
                  progress=False)
    write_synthetic_dataset(tmp_path / "plain", **kwargs)
    write_synthetic_dataset(tmp_path / "detail", detail=True, seed=5, **kwargs)
    doc = json.loads((tmp_path / "detail" / "dataset.json").read_text())
    assert doc["detail"]["band_rad_per_m"] == list(DETAIL_BAND) and "detail" not in json.loads(
        (tmp_path / "plain" / "dataset.json").read_text())
    plain, detail = Dataset(tmp_path / "plain"), Dataset(tmp_path / "detail")
    assert detail.index.detail == doc["detail"] and plain.index.detail is None
    head = SyntheticHead()
    for seq, cam, t in (("seq000", "cam00", 0), ("seq001", "cam01", 1)):
        rgb_p, _ = plain.index.image(seq, cam, t)  # [3, H, W] in [-1, 1]
        rgb_d, alpha = detail.index.image(seq, cam, t)
        inside = (alpha > 0.99).expand_as(rgb_d)
        assert (rgb_p - rgb_d).abs()[inside].mean() > 0.02
        field = DetailField.draw(detail_seed(5, int(seq[3:]), t))
        want, _ = head.render(detail.cameras[cam], detail.expression(seq, t), detail=field)
        assert ((rgb_d + 1) / 2 - want.permute(2, 0, 1)).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding
    assert len({detail_seed(5, s, t) for s in range(4) for t in range(4)}) == 16
    assert np.array_equal(plain.index.codes["seq000"], detail.index.codes["seq000"])


def test_a_detail_band_is_drawn_and_recorded_and_a_bad_one_refused(tmp_path):
    kwargs = dict(sequences=2, frames_per_sequence=1, cameras=1, size=24, eval_cameras=0, eval_sequences=0,
                  progress=False, detail=True, seed=3)
    write_synthetic_dataset(tmp_path / "low", detail_band=(160, 320), **kwargs)
    low = Dataset(tmp_path / "low")
    assert low.index.detail["band_rad_per_m"] == [160.0, 320.0]
    field = DetailField.draw(detail_seed(3, 1, 0), band=(160.0, 320.0))
    k = field.waves[:, :3].norm(dim=1)
    assert bool(((k >= 160) & (k <= 320)).all())  # the band's wave numbers, not the default's 400-700
    want, _ = SyntheticHead().render(low.cameras["cam00"], low.expression("seq001", 0), detail=field)
    got, _ = low.index.image("seq001", "cam00", 0)
    assert ((got + 1) / 2 - want.permute(2, 0, 1)).abs().max() <= 0.5 / 255 + 1e-6
    for band in ((300, 100), (0, 10), (float("nan"), 5), (1, 2, 3)):
        with pytest.raises(InputError, match="detail_band"):
            write_synthetic_dataset(tmp_path / "bad", detail_band=band, **kwargs)
    assert not (tmp_path / "bad").exists()


def test_the_point_spread_blur_attenuates_a_sinusoid_as_the_gaussians_transform():
    # a Gaussian of standard deviation s multiplies a sinusoid of angular frequency w by exp(-s^2 w^2 / 2) (its
    # Fourier transform; sampling at s = 1 aliases by < 1e-6, truncating at 3 s drops 0.3% of the weight)
    w, s = 2 * math.pi / 8, 1.0
    x = torch.arange(64, dtype=torch.float64)
    image = (0.5 + 0.25 * torch.sin(w * x)).expand(1, 3, 40, 64).clone()
    blurred = gaussian_blur(image, s)
    inner = blurred[..., 8:-8, 8:-8] - 0.5
    amplitude = float(inner.pow(2).mean().sqrt()) * math.sqrt(2) / 0.25
    assert amplitude == pytest.approx(math.exp(-(s * w) ** 2 / 2), rel=1e-2)
    assert torch.allclose(gaussian_blur(torch.full((1, 3, 9, 9), 0.7), 2.5), torch.full((1, 3, 9, 9), 0.7))


def test_a_psf_blurs_the_image_not_the_mask_and_is_recorded(tmp_path):
    head, cam = SyntheticHead(), default_camera(48)
    sharp, alpha = head.render(cam, None)
    soft, soft_alpha = head.render(cam, None, psf=1.0)
    assert torch.equal(alpha, soft_alpha)  # the head's coverage stays as rasterised
    want = gaussian_blur(sharp.permute(2, 0, 1)[None], 1.0)[0].permute(1, 2, 0)
    assert torch.allclose(soft, want, atol=1e-6)
    assert float(sharpness(soft, alpha)) < 0.5 * float(sharpness(sharp, alpha))
    kwargs = dict(sequences=2, frames_per_sequence=1, cameras=1, size=24, eval_cameras=0, eval_sequences=0,
                  progress=False)
    write_synthetic_dataset(tmp_path / "psf", psf=1.0, **kwargs)
    data = Dataset(tmp_path / "psf")
    assert data.index.doc["render"] == {"supersample": 2, "psf_px": 1.0}
    want, _ = head.render(data.cameras["cam00"], data.expression("seq001", 0), psf=1.0)
    got, _ = data.index.image("seq001", "cam00", 0)
    assert ((got + 1) / 2 - want.permute(2, 0, 1)).abs().max() <= 0.5 / 255 + 1e-6
    for bad in (-0.5, float("nan"), 9, True, "1"):
        with pytest.raises(InputError, match="psf must be"):
            write_synthetic_dataset(tmp_path / "bad", psf=bad, **kwargs)
        with pytest.raises(InputError, match="psf must be"):
            head.render(cam, None, psf=bad)
    assert not (tmp_path / "bad").exists()
