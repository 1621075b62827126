"""Huge images and OME-Zarr: streamed tiling equals whole-plane tiling, TIFF and OME-Zarr (NGFF
0.4 / 0.5) read region by region, OME-Zarr written with its metadata, outputs never partial."""

import json
import os

import numpy as np
import pytest
import tifffile
import zarr

from clidim_jax.data.images import TiffImage, ZarrImage, open_image
from clidim_jax.data.normalization import Normalization
from clidim_jax.data.tiff import DataError
from clidim_jax.denoise import denoise_file
from clidim_jax.inference import Denoiser, pad_to_multiple


class NumpyNet:
    """A JAX-free 'generator' (no compilation): a non-symmetric local filter, so a pixel's
    output depends on its neighbours and tile borders would show if blending were wrong."""

    runs_in_jax = False
    depth = 3

    def __init__(self, gain: float = 1.0):
        self.gain = gain

    def apply(self, variables, x, train=False):
        y = x + 0.5 * np.roll(x, -1, axis=2) - 0.25 * np.roll(x, 2, axis=1)
        return np.tanh(self.gain * y)


def denoiser(tile=64, overlap=32, batch=3, gain=1.0):
    return Denoiser(NumpyNet(gain), None, Normalization(100.0, 3000.0), batch, tile=tile,
                    overlap=overlap)  # fmt: skip


def whole_plane_tiled(d: Denoiser, image: np.ndarray) -> np.ndarray:
    """The blending of Denoiser before streaming, as the reference: the whole padded plane and
    a whole-plane float32 accumulator, every tile predicted on its own."""
    h, w = image.shape
    x = d.norm.apply(pad_to_multiple(image.astype(np.float32), d.multiple)[0]).astype(np.float32)
    ph, pw = x.shape
    tl = d.tiling
    th, tw = min(tl.tile, ph), min(tl.tile, pw)
    ys, xs = tl.positions(ph), tl.positions(pw)
    wy = {y: tl.window(y, th, ph) for y in ys}
    wx = {x0: tl.window(x0, tw, pw) for x0 in xs}
    ny, nx = np.zeros(ph), np.zeros(pw)
    for y in ys:
        ny[y : y + th] += wy[y]
    for x0 in xs:
        nx[x0 : x0 + tw] += wx[x0]
    acc = np.zeros((ph, pw), np.float32)
    for y in ys:
        for x0 in xs:
            p = d.generator.apply(None, x[None, y : y + th, x0 : x0 + tw, None])[0, ..., 0]
            weight = (wy[y] / ny[y : y + th])[:, None] * (wx[x0] / nx[x0 : x0 + tw])
            acc[y : y + th, x0 : x0 + tw] += (p * weight).astype(np.float32)
    return np.asarray(d.norm.invert(acc[:h, :w].astype(np.float64)), np.float32)


@pytest.mark.parametrize("shape", [(203, 150), (64, 300), (5, 200), (300, 7), (129, 129)])
def test_streamed_tiling_equals_whole_plane_tiling_and_reads_bands(shape):
    img = np.random.default_rng(0).integers(0, 4000, size=shape).astype(np.uint16)
    d = denoiser()
    assert not d.fits_whole(shape)
    reads = []

    def read(a, b):
        reads.append((a, b))
        return img[a:b]

    bands = list(d.stream(read, shape))
    got = np.concatenate([rows for _, rows in bands])
    np.testing.assert_allclose(got, whole_plane_tiled(d, img), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(d.denoise(img), got, rtol=0, atol=0)
    # bands come in order, cover the image once, and no read spans more than a tile's rows
    assert [y0 for y0, _ in bands] == list(np.cumsum([0] + [len(r) for _, r in bands[:-1]]))
    assert got.shape == shape and got.dtype == np.float32
    assert max(b - a for a, b in reads) <= d.tiling.tile
    if shape[0] > d.tiling.tile:
        assert len(reads) > 1


def test_small_images_are_read_and_predicted_whole():
    img = np.random.default_rng(1).integers(0, 4000, size=(40, 50)).astype(np.uint16)
    d = denoiser(tile=64)
    (y0, rows), *rest = list(d.stream(lambda a, b: img[a:b], img.shape))
    assert y0 == 0 and not rest
    np.testing.assert_array_equal(rows, d(img))


def hyperstack(
    tmp_path, name="in.tif", *, channels=2, yx=(40, 70), pixel=0.1, spacing=0.5, finterval=2.0,
    seed=2,
):  # fmt: skip
    """A TZCYX ImageJ hyperstack (2 x 3 x channels x Y x X, uint16) with pixel size (um), Z
    spacing and frame interval: (path, the array written)."""
    rng = np.random.default_rng(seed)
    stack = rng.integers(100, 3000, size=(2, 3, channels, *yx)).astype(np.uint16)
    path = tmp_path / name
    tifffile.imwrite(
        path, stack, imagej=True, resolution=(1 / pixel, 1 / pixel),
        metadata={"axes": "TZCYX", "unit": "um", "spacing": spacing, "finterval": finterval},
    )  # fmt: skip
    return path, stack


def test_tiff_to_ome_zarr_keeps_axes_pixel_size_and_values(tmp_path):
    src, stack = hyperstack(tmp_path)
    d = denoiser(tile=32, overlap=16)
    out = tmp_path / "out.ome.zarr"
    summary = denoise_file(str(src), str(out), d, progress=False)
    assert summary["planes"] == 12
    # read back with zarr itself: NGFF 0.5, axes in NGFF order (t, c, z, y, x)
    root = zarr.open_group(str(out), mode="r")
    assert root.metadata.zarr_format == 3
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["t", "c", "z", "y", "x"]
    assert [a.get("type") for a in ms["axes"]] == ["time", "channel", "space", "space", "space"]
    assert [a.get("unit") for a in ms["axes"]] == [
        "second", None, "micrometer", "micrometer", "micrometer"
    ]  # fmt: skip
    (ds,) = ms["datasets"]
    assert ds["coordinateTransformations"] == [
        {"type": "scale", "scale": [2.0, 1.0, 0.5, pytest.approx(0.1), pytest.approx(0.1)]}
    ]
    arr = root[ds["path"]]
    assert arr.shape == (2, 2, 3, 40, 70) and arr.dtype == np.float32
    assert arr.chunks == (1, 1, 1, 40, 70)
    got = arr[...]
    # every plane is that plane denoised on its own (the tiled path: planes larger than a tile)
    for t, z, c in [(0, 0, 0), (1, 2, 1), (0, 1, 1)]:
        np.testing.assert_allclose(got[t, c, z], d.denoise(stack[t, z, c]), rtol=1e-6, atol=1e-3)
    with open(out / "zarr.json") as f:  # the group's own file says the same
        assert json.load(f)["attributes"]["ome"] == ome


def test_the_ome_zarr_written_passes_an_independent_ngff_validator(tmp_path):
    """yaozarrs (its own implementation of the NGFF 0.5 schema; installed in the napari
    environment of .ci/run, not by the test extra) accepts what denoise writes."""
    yaozarrs = pytest.importorskip("yaozarrs")
    src, _ = hyperstack(tmp_path)
    out = tmp_path / "out.ome.zarr"
    denoise_file(str(src), str(out), denoiser(tile=32, overlap=16), progress=False)
    yaozarrs.validate_zarr_store(str(out))
    # (and it is a validator that can fail: the same store with only the t and c axes named)
    root = zarr.open_group(str(out), mode="r+")
    ome = dict(root.attrs["ome"])
    ome["multiscales"] = [{**ome["multiscales"][0], "axes": ome["multiscales"][0]["axes"][:2]}]
    root.attrs["ome"] = ome
    with pytest.raises(ValueError, match="axes"):
        yaozarrs.validate_zarr_store(str(out))


def ngff_image(path, data, version, axes, scale):
    """An OME-Zarr image written with zarr directly: NGFF 0.4 (Zarr v2) or 0.5 (Zarr v3)."""
    fmt = 2 if version == "0.4" else 3
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    ms = {
        "axes": axes,
        "datasets": [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": scale}]}],
    }  # fmt: skip
    if version == "0.4":
        root.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    root.create_array("s0", shape=data.shape, dtype=data.dtype, chunks=(1,) * (data.ndim - 2)
                      + (16, 16))[...] = data  # fmt: skip


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_reads_ngff_04_and_05_and_writes_a_tiff(tmp_path, version):
    data = np.random.default_rng(3).integers(0, 4000, (2, 3, 50, 45)).astype(np.uint16)
    axes = [{"name": "c", "type": "channel"}, {"name": "z", "type": "space", "unit": "micrometer"},
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]  # fmt: skip
    src = tmp_path / "img.zarr"
    ngff_image(src, data, version, axes, [1.0, 2.0, 0.2, 0.25])
    img = open_image(str(src))
    assert isinstance(img, ZarrImage) and img.axes == "CZYX" and img.shape == data.shape
    assert img.scale == {"Z": 2.0, "Y": 0.2, "X": 0.25} and img.n_channels == 2
    np.testing.assert_array_equal(img.rows(4, 10, 20), data[1, 1, 10:20])
    d = denoiser(tile=32, overlap=16)
    out = tmp_path / "out.tif"
    denoise_file(str(src), str(out), d, progress=False)
    with tifffile.TiffFile(out) as t:
        got = t.asarray()
        assert t.series[0].axes == "CZYX"
        xres = t.pages[0].tags["XResolution"].value
        assert t.pages[0].tags["ResolutionUnit"].value == 3  # centimetre
    assert got.shape == data.shape and open_image(str(out)).axes == "CZYX"
    assert xres[0] / xres[1] == pytest.approx(1e4 / 0.25, rel=1e-6)
    np.testing.assert_allclose(got[1, 2], d.denoise(data[1, 2]), rtol=1e-6, atol=1e-3)
    # OME-Zarr to OME-Zarr: the same axes and scale, the same numbers
    zout = tmp_path / "out.zarr"
    denoise_file(str(src), str(zout), d, progress=False)
    (ms,) = zarr.open_group(str(zout), mode="r").attrs["ome"]["multiscales"]
    assert [(a["name"], a.get("unit")) for a in ms["axes"]] == [
        ("c", None), ("z", "micrometer"), ("y", "micrometer"), ("x", "micrometer")
    ]  # fmt: skip
    scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == pytest.approx([1.0, 2.0, 0.2, 0.25])
    np.testing.assert_array_equal(zarr.open_group(str(zout), mode="r")["0"][...], got)


def test_a_bioformats2raw_folder_opens_its_first_image(tmp_path):
    data = np.arange(2 * 20 * 24, dtype=np.uint16).reshape(2, 20, 24)
    root = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    axes = [{"name": "z", "type": "space"}, {"name": "y", "type": "space"},
            {"name": "x", "type": "space"}]  # fmt: skip
    ngff_image(tmp_path / "b2r.zarr" / "0", data, "0.5", axes, [1.0, 1.0, 1.0])
    img = open_image(str(tmp_path / "b2r.zarr"))
    assert img.axes == "ZYX" and img.shape == data.shape
    np.testing.assert_array_equal(img.plane(1), data[1])


def test_tiled_compressed_and_big_endian_tiffs_are_read_region_by_region(tmp_path):
    plane = np.random.default_rng(4).integers(0, 4000, (300, 260)).astype(np.uint16)
    tiled, big = tmp_path / "tiled.tif", tmp_path / "big.tif"
    tifffile.imwrite(tiled, plane, tile=(64, 64), compression="zlib")
    tifffile.imwrite(big, plane.astype(">u2"))
    d = denoiser()
    want = d.denoise(plane)
    for path in (tiled, big):
        img = TiffImage(str(path))
        assert (img._offset is None) == (path == tiled)  # tiles: through zarr; else a read
        np.testing.assert_array_equal(img.rows(0, 100, 170), plane[100:170])
        out = tmp_path / f"{path.stem}_out.tif"
        denoise_file(str(path), str(out), d, progress=False)
        np.testing.assert_allclose(tifffile.imread(out), want, rtol=0, atol=0)


def test_bad_zarr_inputs_are_one_clear_error(tmp_path):
    d = denoiser()
    bare = tmp_path / "bare.zarr"
    zarr.create_array(str(bare), shape=(8, 8), dtype="uint16")
    nometa = tmp_path / "nometa.zarr"
    zarr.open_group(str(nometa), mode="w")
    nan = tmp_path / "nan.zarr"
    data = np.ones((2, 16, 16), np.float32)
    data[1, 3, 3] = np.nan
    ngff_image(nan, data, "0.5", [{"name": "t", "type": "time"}, {"name": "y"}, {"name": "x"}],
               [1.0, 1.0, 1.0])  # fmt: skip
    cases = [
        (bare, "bare.zarr: a bare Zarr array"),
        (nometa, "nometa.zarr: not an OME-Zarr image"),
        (nan, "nan.zarr: plane 1 contains NaN"),
        (tmp_path / "missing.zarr", "missing.zarr: file not found"),
    ]
    for src, msg in cases:
        with pytest.raises(DataError, match=msg.replace(".", r"\.")):
            denoise_file(str(src), str(tmp_path / "o.zarr"), d, progress=False)
        assert not os.path.exists(tmp_path / "o.zarr")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no partial output


class Interrupting(NumpyNet):
    """Interrupted (as StopOnSignal does on SIGTERM) after a few tiles."""

    def __init__(self, after: int):
        super().__init__()
        self.calls, self.after = 0, after

    def apply(self, variables, x, train=False):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return super().apply(variables, x, train)


def test_zarr_output_is_never_partial_and_replaced_only_with_overwrite(tmp_path):
    src, _ = hyperstack(tmp_path)
    out = tmp_path / "out.zarr"
    d = denoiser(tile=32, overlap=16)
    denoise_file(str(src), str(out), d, progress=False)
    first = zarr.open_group(str(out), mode="r")["0"][...]
    with pytest.raises(DataError, match=r"out\.zarr: already exists \(pass --overwrite"):
        denoise_file(str(src), str(out), d, progress=False)
    # an interrupted overwrite leaves the old output as it was, and no partial folder
    broken = Denoiser(Interrupting(after=3), None, d.norm, 3, tile=32, overlap=16)
    with pytest.raises(KeyboardInterrupt):
        denoise_file(str(src), str(out), broken, overwrite=True, progress=False)
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][...], first)
    assert sorted(os.listdir(tmp_path)) == ["in.tif", "out.zarr"]
    # --overwrite with another model replaces it
    denoise_file(str(src), str(out), denoiser(32, 16, gain=0.5), overwrite=True, progress=False)
    assert not np.allclose(zarr.open_group(str(out), mode="r")["0"][...], first)
    assert sorted(os.listdir(tmp_path)) == ["in.tif", "out.zarr"]
