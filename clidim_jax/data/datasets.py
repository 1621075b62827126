"""Paired (noisy, clean) image sets in host memory, with the spatial train/test split."""

from __future__ import annotations

import dataclasses
import importlib.resources
import os

import ml_collections
import numpy as np

from clidim_jax.data.tiff import DataError, read_tiff


@dataclasses.dataclass
class PairedImages:
    """N noisy images in their stored dtype and the clean images they map to.

    Repeated acquisitions of one field share one ground truth, so `clean` holds M <= N images
    and `clean_index[i]` names the clean image of noisy image i (no copies of the mean).
    """

    noisy: np.ndarray  # (N, H, W) uint8 | uint16 | float32
    clean: np.ndarray  # (M, H, W) float32
    clean_index: np.ndarray  # (N,) int32
    name: str

    def __post_init__(self) -> None:
        if self.noisy.ndim != 3 or self.clean.ndim != 3:
            raise DataError(f"{self.name}: expected (N, H, W) stacks")
        if self.noisy.shape[1:] != self.clean.shape[1:]:
            raise DataError(
                f"{self.name}: noisy images are {self.noisy.shape[1:]}, "
                f"clean images {self.clean.shape[1:]}"
            )
        self.clean_index = np.asarray(self.clean_index, np.int32)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.noisy.shape[1:])

    def __len__(self) -> int:
        return self.noisy.shape[0]

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.noisy[i], self.clean[self.clean_index[i]]


def demo_stack_path() -> str:
    """The bundled ACsN TIRF stack (20 x 256 x 256 uint16, BSD-3-Clause, Mandracchia et al.)."""
    return str(importlib.resources.files("clidim_jax.data") / "demo" / "TIRF_200Hz.tif")


def mean_ground_truth(stack: np.ndarray, path: str) -> np.ndarray:
    if stack.shape[0] < 2:
        raise DataError(
            f"{path}: a stack of {stack.shape[0]} frame cannot give a ground truth "
            "(the mean of repeated acquisitions needs at least 2 frames)"
        )
    return stack.mean(axis=0, dtype=np.float64).astype(np.float32)


def split_stack(
    stack: np.ndarray, gt: np.ndarray, test_fraction: float, name: str
) -> tuple[PairedImages, PairedImages]:
    """Spatial split by columns: the left `test_fraction` is the test region, the rest trains."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    w = stack.shape[2]
    w_test = int(round(w * test_fraction))
    if w_test < 1 or w_test >= w:
        raise DataError(f"{name}: {w} columns cannot be split with test_fraction={test_fraction}")
    n = stack.shape[0]
    zeros = np.zeros(n, np.int32)
    train = PairedImages(
        stack[:, :, w_test:], gt[None, :, w_test:], zeros, f"{name}[:, :, {w_test}:]"
    )
    test = PairedImages(
        stack[:, :, :w_test], gt[None, :, :w_test], zeros, f"{name}[:, :, :{w_test}]"
    )
    return train, test


def carve_validation(
    train: PairedImages, val_fraction: float, full_width: int
) -> tuple[PairedImages, PairedImages | None]:
    """Splits the validation region off the right edge of the training region: the last
    round(full_width * val_fraction) columns. The test split is never touched (the reference
    code picked its best checkpoint on the test set, METHOD.md section 7)."""
    if val_fraction <= 0:
        return train, None
    w = train.shape[1]
    w_val = int(round(full_width * val_fraction))
    if w_val < 1 or w_val >= w:
        raise DataError(
            f"{train.name}: data.val_fraction={val_fraction} leaves {w - w_val} of the "
            f"{w} training columns"
        )
    base, sep, _ = train.name.partition("[")
    offset = full_width - w
    cut = w - w_val

    def region(a: int, b: int) -> str:
        return f"{base}[:, :, {offset + a}:{offset + b}]" if sep else f"{base}[{a}:{b}]"

    keep = PairedImages(
        train.noisy[:, :, :cut], train.clean[:, :, :cut], train.clean_index, region(0, cut)
    )
    val = PairedImages(
        train.noisy[:, :, cut:], train.clean[:, :, cut:], train.clean_index, region(cut, w)
    )
    return keep, val


def load_splits(
    data: ml_collections.ConfigDict,
) -> tuple[PairedImages, PairedImages | None, PairedImages]:
    """Returns (train, validation or None, test), validated before any training starts."""
    train, test = _load_train_test(data)
    full_width = train.shape[1] + test.shape[1]
    train, val = carve_validation(train, float(data.get("val_fraction", 0.0)), full_width)
    p = data.patch_size
    if val is not None and min(train.shape) < p:
        raise DataError(
            f"{train.name}: without the validation region (data.val_fraction={data.val_fraction}) "
            f"the training region is {train.shape[0]}x{train.shape[1]} pixels, smaller than "
            f"data.patch_size={p}"
        )
    return train, val, test


def load_datasets(data: ml_collections.ConfigDict) -> tuple[PairedImages, PairedImages]:
    """Returns (train, test) for the configured source (train without any validation region)."""
    train, _, test = load_splits(data)
    return train, test


def _load_train_test(data: ml_collections.ConfigDict) -> tuple[PairedImages, PairedImages]:
    if data.source == "demo":
        path = demo_stack_path()
        name = "acsn_tirf"
    elif data.source == "stack":
        if not data.path:
            raise DataError(
                "data.source=stack needs data.path (a TIFF stack of repeated acquisitions)"
            )
        path = os.path.expanduser(data.path)
        name = os.path.basename(path)
    else:
        raise DataError(f"unknown data.source {data.source!r} (choose demo or stack)")
    stack = read_tiff(path)
    gt = mean_ground_truth(stack, path)
    train, test = split_stack(stack, gt, data.test_fraction, name)
    p = data.patch_size
    if min(train.shape) < p:
        raise DataError(
            f"{path}: the training region is {train.shape[0]}x{train.shape[1]} pixels, "
            f"smaller than data.patch_size={p}"
        )
    return train, test
