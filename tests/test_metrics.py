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


def test_summarize_has_nrmse_and_std(pair):
    gt, pred = pair
    s = metrics.summarize([gt], [pred])
    assert set(s) == {"psnr", "psnr_std", "ssim", "ssim_std", "nrmse", "nrmse_std"}
    assert s["nrmse"] == pytest.approx(metrics.nrmse(gt, pred), rel=1e-12)
    assert s["psnr_std"] == 0.0


# --- the reference code's metrics -------------------------------------------------------------


def test_to_uint16_truncates_like_astype():
    x = np.array([0.0, 2.9, 65535.7, 1000.5])
    assert metrics.to_uint16(x).tolist() == [0, 2, 65535, 1000]
    assert metrics.to_uint16(x).tolist() == x.astype(np.uint16).tolist()
    assert metrics.to_uint16(np.array([-1.0, 65536.0, np.nan])).tolist() == [65535, 0, 0]


def test_reference_psnr_wraps_squared_errors_above_256():
    # Errors of 300 and -300: 300**2 = 90000 wraps to 90000 - 65536 = 24464 in uint16.
    gt = np.array([[300.0, 0.0], [0.0, 100.0]])
    pred = np.array([[0.0, 0.0], [300.0, 100.0]])
    se = metrics.reference_squared_errors(gt, pred)
    assert se.dtype == np.uint16 and se.tolist() == [[24464, 0], [24464, 0]]
    wrapped_mse = (24464 + 24464) / 4
    true_mse = (90000 + 90000) / 4
    assert metrics.reference_psnr(gt, pred) == pytest.approx(
        10 * np.log10(300**2 / wrapped_mse), rel=1e-12
    )
    assert metrics.psnr(gt, pred) == pytest.approx(10 * np.log10(300**2 / true_mse), rel=1e-12)
    # the wrap flatters: +5.65 dB here
    assert metrics.reference_psnr(gt, pred) - metrics.psnr(gt, pred) == pytest.approx(
        10 * np.log10(90000 / 24464), rel=1e-12
    )


def test_reference_psnr_equals_standard_for_small_integer_errors():
    # |error| < 256 on integer-valued images: the uint16 arithmetic is exact (negative errors
    # wrap to 65536 - |e|, whose square is e**2 modulo 65536).
    rng = np.random.default_rng(1)
    gt = rng.integers(300, 4000, size=(20, 30)).astype(np.float64)
    pred = gt + rng.integers(-255, 256, size=gt.shape)
    assert metrics.reference_psnr(gt, pred) == pytest.approx(metrics.psnr(gt, pred), rel=1e-12)


def _columnwise_ssim_by_hand(gt, pred, data_range, win=7):
    """Independent direct SSIM of the reference code: per column, a 1-D SSIM at each position
    whose 7-sample window lies inside the column (the positions left after scikit-image crops 3
    samples at each end, so no border handling is needed), with sample (ddof=1) statistics, K1
    0.01, K2 0.03, averaged down the column; then the mean over columns."""
    g, p = np.asarray(gt, np.float64), np.asarray(pred, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    half = win // 2
    columns = []
    for j in range(g.shape[1]):
        values = []
        for i in range(half, g.shape[0] - half):
            x, y = g[i - half : i + half + 1, j], p[i - half : i + half + 1, j]
            mx, my = x.mean(), y.mean()
            vx, vy = x.var(ddof=1), y.var(ddof=1)
            cxy = ((x - mx) * (y - my)).sum() / (win - 1)
            num = (2 * mx * my + c1) * (2 * cxy + c2)
            values.append(num / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        columns.append(np.mean(values))
    return float(np.mean(columns))


def test_reference_ssim_by_hand_on_a_seven_row_image():
    # 7 rows: after the 3-sample crop at each end one position per column is left, whose
    # 7-sample window is the whole column (no border effect): plain SSIM of the column with
    # sample (ddof=1) statistics and the data range of the uint16 ground truth, 600 - 0 here;
    # then the mean over columns.
    gt = np.array([[0, 5], [100, 5], [200, 5], [300, 5], [400, 5], [500, 5], [600, 5]], float)
    pred = gt + np.array([[0, 0], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0], [70, 0]])

    def col_ssim(x, y, rng):
        c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
        mx, my = x.mean(), y.mean()
        vx, vy = x.var(ddof=1), y.var(ddof=1)
        cxy = ((x - mx) * (y - my)).sum() / (len(x) - 1)
        return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))

    expected = np.mean([col_ssim(gt[:, j], pred[:, j], 600.0) for j in range(2)])
    assert metrics.reference_ssim(gt, pred) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(_columnwise_ssim_by_hand(gt, pred, 600.0), rel=1e-12)
    # an explicit data_range still overrides the default
    old = np.mean([col_ssim(gt[:, j], pred[:, j], 65535.0) for j in range(2)])
    assert metrics.reference_ssim(gt, pred, data_range=65535) == pytest.approx(old, rel=1e-12)


def test_reference_ssim_uses_the_uint16_ground_truth_range():
    # A 12-bit-like image with noise: the range of the uint16 ground truth (a few thousand) is
    # what the reference passes; scikit-image's uint16 default 65535 would push SSIM towards 1.
    rng = np.random.default_rng(4)
    gt = rng.gamma(2.0, 300.0, size=(40, 24)) + 100.7  # fractional: the range is taken after
    pred = np.clip(gt + rng.normal(0, 150, size=gt.shape), 0, None)  # the uint16 truncation
    g16 = gt.astype(np.uint16)
    gt_range = float(g16.max()) - float(g16.min())
    expected = _columnwise_ssim_by_hand(g16, pred.astype(np.uint16), gt_range)
    value = metrics.reference_ssim(gt, pred)
    assert value == pytest.approx(expected, rel=1e-10)
    # the old default (65535) gives a clearly different, inflated value
    old = _columnwise_ssim_by_hand(g16, pred.astype(np.uint16), 65535.0)
    assert old > 0.99 and old - value > 0.05  # 0.992 vs 0.897
    assert metrics.reference_ssim(gt, pred, data_range=65535) == pytest.approx(old, rel=1e-10)


def test_reference_ssim_is_skimage_multichannel_on_uint16():
    # The reference's call, structural_similarity(gt_u16, pred_u16, multichannel=True,
    # data_range=gt_u16.max() - gt_u16.min()); scikit-image >= 0.19 spells multichannel=True as
    # channel_axis=-1.
    rng = np.random.default_rng(2)
    gt = rng.gamma(2.0, 300.0, size=(40, 24)) + 100
    pred = np.clip(gt + rng.normal(0, 60, size=gt.shape), 0, None)
    g16, p16 = gt.astype(np.uint16), pred.astype(np.uint16)
    gt_range = float(g16.max()) - float(g16.min())
    ref = structural_similarity(g16, p16, channel_axis=-1, data_range=gt_range)
    assert metrics.reference_ssim(gt, pred) == pytest.approx(ref, rel=1e-10)
    assert ref == pytest.approx(_columnwise_ssim_by_hand(g16, p16, gt_range), rel=1e-10)
    # with data_range=65535 it is scikit-image's dtype default (the value the old code gave)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting data_range based on im1.dtype"
        ref_default = structural_similarity(g16, p16, channel_axis=-1)
    assert metrics.reference_ssim(gt, pred, data_range=65535) == pytest.approx(
        ref_default, rel=1e-10
    )
    assert ref_default - ref > 0.01  # 0.9987 vs 0.9824
    # column-wise 1-D SSIM is not the 2-D SSIM of the same images
    assert abs(ref - metrics.ssim(g16, p16)) > 1e-3


def test_reference_nrmse_by_hand():
    # pred's least-squares affine fit to gt is 2 * pred (exact), so the "NRMSE" is
    # RMS(pred - 2 pred) / 4095 = RMS(pred) / 4095, however good or bad pred is.
    pred = np.array([[0.0, 1.0], [2.0, 3.0]])
    gt = 2 * pred
    assert metrics.reference_nrmse(gt, pred) == pytest.approx(np.sqrt(3.5) / 4095, rel=1e-12)
    # a perfect prediction scores 0; an offset prediction also scores 0 in the reference's NRMSE
    g = np.arange(20.0).reshape(4, 5) * 10
    assert metrics.reference_nrmse(g, g) == pytest.approx(0.0, abs=1e-12)
    assert metrics.reference_nrmse(g, g + 7) == pytest.approx(7 / 4095, rel=1e-9)


def test_summaries_of_both_modes():
    rng = np.random.default_rng(3)
    gts = [rng.uniform(100, 3000, size=(16, 12)) for _ in range(3)]
    preds = [g + rng.normal(0, 400, size=g.shape) for g in gts]
    std = metrics.summarize(gts, preds)
    ref = metrics.summarize(gts, preds, "reference")
    assert set(std) == set(ref)
    assert ref["psnr"] > std["psnr"]  # errors of several hundred wrap
    with pytest.raises(ValueError, match="unknown metrics mode"):
        metrics.per_image(gts, preds, "skimage")
