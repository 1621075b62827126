"""The OME-Zarr images `denoise` writes open in napari: with napari's own reader (the raw array)
and with the napari-ome-zarr plugin (one layer per channel, the pixel size as the layer scale).
Runs where napari and napari-ome-zarr are installed (the GUI environment of .ci/run); no window
is opened."""

import numpy as np
import pytest
import zarr
from test_ome_zarr import denoiser, hyperstack

from clidim_jax.denoise import denoise_file

pytest.importorskip("napari")
pytest.importorskip("napari_ome_zarr")


@pytest.fixture(scope="module")
def viewer_model():
    from napari.components import ViewerModel
    from napari.plugins import _initialize_plugins

    _initialize_plugins()  # (what napari's application does at start: discover the readers)
    return ViewerModel()


def test_denoised_ome_zarr_opens_in_napari_with_its_channels_and_pixel_size(tmp_path, viewer_model):
    src, _ = hyperstack(tmp_path)  # TZCYX: 2 x 3 x 2 x 40 x 70, 0.1 um pixels, dz 0.5, dt 2
    out = tmp_path / "denoised.ome.zarr"
    denoise_file(str(src), str(out), denoiser(tile=32, overlap=16), progress=False)
    written = zarr.open_group(str(out), mode="r")["0"][...]  # (t, c, z, y, x)
    assert written.shape == (2, 2, 3, 40, 70)

    (raw,) = viewer_model.open(str(out), plugin="napari")  # napari's built-in reader
    np.testing.assert_array_equal(np.asarray(raw.data), written)

    layers = viewer_model.open(str(out), plugin="napari-ome-zarr")
    assert len(layers) == 2  # one layer per channel
    for c, layer in enumerate(layers):
        data = layer.data[0] if layer.multiscale else layer.data
        np.testing.assert_array_equal(np.asarray(data), written[:, c])
        np.testing.assert_allclose(layer.scale, [2.0, 0.5, 0.1, 0.1])  # t, z, y, x
