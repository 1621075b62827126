"""The quality benchmark's splits (benchmarks/quality.py): which frames of which field of view
each split gets, in the protocol's order, in another order, as means of frames, and with the
training field also tested (on its frames after the training ones)."""

import importlib.util
import os

import numpy as np
import pytest
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location(
        "quality_benchmark", os.path.join(ROOT, "benchmarks", "quality.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fields(tmp_path):
    """Four fields of view of 50 frames; frame t of field k is 10 k + t everywhere, its
    ground truth 100 + k."""
    d = tmp_path / "fmd"
    d.mkdir()
    for k in (1, 2, 3, 4):
        frames = (10 * k + np.arange(50, dtype=np.uint8))[:, None, None] * np.ones(
            (1, 8, 12), np.uint8
        )
        tifffile.imwrite(d / f"fov0{k}_raw.tif", frames)
        tifffile.imwrite(d / f"fov0{k}_gt.tif", np.full((8, 12), 100 + k, np.uint8))
    return str(d)


def _frames(split: dict, name: str) -> list[float]:
    noisy, clean = split[name]
    assert clean[0, 0] == 100 + int(name[-1])  # each field keeps its own ground truth
    return [float(f[0, 0]) for f in noisy]


def test_the_protocols_splits(quality, fields, tmp_path):
    s = quality.prepare(fields, str(tmp_path / "out"))
    assert list(s["train"]) == ["fov01"] and list(s["val"]) == ["fov02"]
    assert sorted(s["test"]) == ["fov03", "fov04"]
    assert _frames(s["train"], "fov01") == [10.0 + t for t in range(16)]
    assert _frames(s["val"], "fov02") == [20.0 + t for t in range(4)]
    assert _frames(s["test"], "fov04") == [40.0 + t for t in range(50)]
    on_disk = tifffile.imread(tmp_path / "out" / "data" / "train_noisy" / "fov01.tif")
    assert on_disk.dtype == np.uint8 and on_disk.shape == (16, 8, 12)


def test_another_order_and_means_of_frames(quality, fields, tmp_path):
    s = quality.prepare(fields, str(tmp_path / "out"), (3, 4, 1, 2), average=4)
    assert list(s["train"]) == ["fov03"] and list(s["val"]) == ["fov04"]
    assert sorted(s["test"]) == ["fov01", "fov02"]
    # Means of frames 4i..4i+3 (10 k + 4 i + 1.5); 50 frames give 12 of them.
    assert _frames(s["train"], "fov03") == [31.5 + 4 * i for i in range(12)]
    assert _frames(s["val"], "fov04") == [41.5 + 4 * i for i in range(4)]
    assert _frames(s["test"], "fov02") == [21.5 + 4 * i for i in range(12)]
    on_disk = tifffile.imread(tmp_path / "out" / "data" / "test_noisy" / "fov01.tif")
    assert on_disk.dtype == np.float32 and on_disk.shape == (12, 8, 12)
    np.testing.assert_array_equal(on_disk[:, 0, 0], [11.5 + 4 * i for i in range(12)])


def test_the_training_field_tested_on_the_frames_it_does_not_train_on(quality, fields, tmp_path):
    s = quality.prepare(fields, str(tmp_path / "out"), (3, 2, 3, 4))
    assert list(s["train"]) == ["fov03"] and sorted(s["test"]) == ["fov03", "fov04"]
    assert _frames(s["train"], "fov03") == [30.0 + t for t in range(16)]
    assert _frames(s["test"], "fov03") == [30.0 + t for t in range(16, 50)]  # none trained on
    assert _frames(s["test"], "fov04") == [40.0 + t for t in range(50)]
    # Means of 4 frames: 12 images, all of which training takes.
    with pytest.raises(SystemExit, match="field 3 trains on all its 12 images"):
        quality.prepare(fields, str(tmp_path / "out2"), (3, 2, 3, 4), average=4)


@pytest.mark.parametrize(
    "text, ok",
    [("1,2,3,4", True), ("4,3,1,2", True), ("3,2,3,4", True), ("3,2,4,3", True),
     ("1,2,3,3", False), ("1,1,3,4", False), ("3,3,3,4", False), ("1,2,3", False),
     ("1,2,3,5", False), ("a,b,c,d", False), ("1,1,2,2", False)],
)  # fmt: skip
def test_fields_argument(quality, text, ok):
    if ok:
        assert quality.parse_fields(text) == tuple(int(k) for k in text.split(","))
    else:
        with pytest.raises(SystemExit, match="--fields"):
            quality.parse_fields(text)
