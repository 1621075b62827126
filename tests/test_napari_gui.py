"""The plugin in a real napari window (Qt, OpenGL, under Xvfb when there is no display): the
manifest registered, the sample data opened through it, the Denoise widget run on it with the
session's tiny model; the new layer checked against the Denoiser called directly, and a
screenshot of the window saved (and copied to $CLIDIM_JAX_NAPARI_SCREENSHOT if set).

Needs napari, a Qt binding and pytest-qt (`pip install '.[napari]' pytest-qt`) and an X
server or Xvfb (Debian: apt-get install xvfb); skipped without them."""

import os
import shutil
import subprocess

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = [pytest.mark.slow, pytest.mark.gui]


@pytest.fixture(scope="session", autouse=True)
def display():
    """$DISPLAY, or an Xvfb of our own when there is none (session-scoped: it must exist before
    pytest-qt creates the QApplication). Qt keeps its X connection until the process ends, so
    the server is started with -terminate: it exits when its last client (this process) has
    gone; it is stopped here only if no client ever connected."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("no X display and no Xvfb (Debian: apt-get install xvfb)")
    read, write = os.pipe()
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write), "-screen", "0", "1600x1000x24", "-nolisten", "tcp",
         "-terminate"],
        pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()  # Xvfb writes its display number once it is ready
    if not number:
        proc.kill()
        pytest.skip("Xvfb did not start")
    os.environ["DISPLAY"] = f":{number}"
    yield os.environ["DISPLAY"]
    from qtpy.QtWidgets import QApplication

    if QApplication.instance() is None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def viewer(display, make_napari_viewer):
    """A shown napari viewer that knows the plugin (registered from the package's manifest
    when the installed package does not declare it through its entry point)."""
    from importlib.resources import files

    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    if "clidim-jax" not in pm:
        pm.register(PluginManifest.from_file(str(files("clidim_jax.napari") / "napari.yaml")))
    return make_napari_viewer(show=True)


def test_denoise_widget_in_napari(viewer, qtbot, tiny_run, tmp_path):
    from clidim_jax.run import denoiser_from_run

    workdir, proc = tiny_run
    assert proc.returncode == 0, proc.stderr
    viewer.window.resize(1400, 860)
    (noisy,) = viewer.open_sample("clidim-jax", "convallaria")
    noisy.scale = (0.25, 0.5)  # anisotropic pixels and an offset, which the result must keep
    noisy.translate = (10.0, -4.0)
    _, widget = viewer.window.add_plugin_dock_widget("clidim-jax", "Denoise")
    assert widget.image.currentText() == noisy.name == "Convallaria"
    widget.model.setText(str(workdir))
    widget.tile.setValue(256)  # 1024 x 1024: 25 tiles, the progress bar moves
    widget.run_button.click()
    assert widget.running and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.running, timeout=300_000)
    assert widget.status.text().startswith("added Convallaria denoised"), widget.status.text()
    assert widget.progress.value() == 1000

    out = viewer.layers["Convallaria denoised"]
    assert out.data.shape == noisy.data.shape == (1024, 1024) and out.data.dtype == np.float32
    np.testing.assert_array_equal(out.scale, noisy.scale)
    np.testing.assert_array_equal(out.translate, noisy.translate)
    expected = denoiser_from_run(str(workdir), tile=256).denoise(noisy.data)
    np.testing.assert_allclose(out.data, expected, rtol=0, atol=1e-6 * np.ptp(expected))

    # the noisy and the denoised image side by side, contrast from the denoised image
    lo, hi = np.percentile(out.data, (0.5, 99.8))
    noisy.contrast_limits = out.contrast_limits = (float(lo), float(hi))
    viewer.grid.enabled = True
    viewer.reset_view()
    qtbot.wait(300)
    shot = viewer.screenshot(str(tmp_path / "napari_denoise.png"), canvas_only=False)
    assert shot.ndim == 3 and shot.shape[0] >= 600
    if os.environ.get("CLIDIM_JAX_NAPARI_SCREENSHOT"):
        shutil.copyfile(tmp_path / "napari_denoise.png", os.environ["CLIDIM_JAX_NAPARI_SCREENSHOT"])
