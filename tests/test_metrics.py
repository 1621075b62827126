"""Comparable metrics against scikit-image (independent implementation) and analytic cases."""

import numpy as np
import pytest
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from clidim_jax import metrics


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    gt = rng.gamma(2.0, 300.0, size=(64, 48)) + 100
    pred = gt + rng.normal(0, 40, size=gt.shape)
    return gt, pred


def test_psnr_matches_skimage(pair):
    gt, pred = pair
    ref = peak_signal_noise_ratio(gt, pred, data_range=gt.max() - gt.min())
    assert metrics.psnr(gt, pred) == pytest.approx(ref, rel=1e-6)


def test_ssim_matches_skimage(pair):
    gt, pred = pair
    ref = structural_similarity(gt, pred, data_range=gt.max() - gt.min())
    assert metrics.ssim(gt, pred) == pytest.approx(ref, rel=1e-6)


def test_nrmse_matches_skimage_min_max(pair):
    gt, pred = pair
    ref = normalized_root_mse(gt, pred, normalization="min-max")
    assert metrics.nrmse(gt, pred) == pytest.approx(ref, rel=1e-6)


def test_uint16_inputs_are_not_wrapped():
    gt = np.array([[0, 1000], [2000, 3000]], np.uint16)
    pred = np.array([[10, 990], [2000, 3010]], np.uint16)  # errors of -10 would wrap in uint16
    mse = (100 + 100 + 0 + 100) / 4
    assert metrics.psnr(gt, pred) == pytest.approx(10 * np.log10(3000**2 / mse), rel=1e-12)


def test_identical_images():
    gt = np.arange(100.0).reshape(10, 10)
    assert metrics.psnr(gt, gt) == float("inf")
    assert metrics.ssim(gt, gt) == pytest.approx(1.0)


def test_summarize_mean_and_std(pair):
    gt, pred = pair
    s = metrics.summarize([gt, gt], [pred, gt + 1])
    p = [metrics.psnr(gt, pred), metrics.psnr(gt, gt + 1)]
    assert s["psnr"] == pytest.approx(np.mean(p)) and s["psnr_std"] == pytest.approx(np.std(p))
