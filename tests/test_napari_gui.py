"""The plugin in a real napari window (Qt, OpenGL, under Xvfb when there is no display): the
manifest registered, the sample data opened through it, the Denoise widget run on it with the
session's tiny model; the new layer checked against the Denoiser called directly, and a
screenshot of the window saved (and copied to $CLIDIM_JAX_NAPARI_SCREENSHOT if set).

Needs napari, a Qt binding and pytest-qt (`pip install '.[napari]' pytest-qt`) and an X
server or Xvfb (Debian: apt-get install xvfb); skipped without them."""

import json
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
    """The Denoise widget on the TIRF sample stack, plane by plane, tiled. The model: the
    session's tiny run, or $CLIDIM_JAX_NAPARI_MODEL (the README's screenshot uses a trained demo
    run: `clidim-jax train --workdir runs/demo`)."""
    from clidim_jax.napari.jobs import load_denoiser

    model = os.environ.get("CLIDIM_JAX_NAPARI_MODEL")
    if not model:
        workdir, proc = tiny_run
        assert proc.returncode == 0, proc.stderr
        model = str(workdir)
    viewer.window.resize(1400, 820)
    (noisy,) = viewer.open_sample("clidim-jax", "tirf")
    noisy.scale = (1.0, 0.5, 0.5)  # a pixel size and an offset: the result keeps them
    noisy.translate = (0.0, 10.0, -4.0)
    _, widget = viewer.window.add_plugin_dock_widget("clidim-jax", "Denoise")
    assert widget.image.currentText() == noisy.name == "TIRF demo stack"
    widget.run_button.click()  # no model chosen: a message, nothing started
    assert widget.status.text().startswith("choose a model") and not widget.running
    widget.model.setText(model)
    widget.tile.setValue(128)  # 256 x 256 planes: 9 tiles each, the progress bar moves
    widget.run_button.click()
    widget.cancel_button.click()  # while the model loads: nothing added
    qtbot.waitUntil(lambda: not widget.running, timeout=300_000)
    assert widget.status.text() == "cancelled" and len(viewer.layers) == 1
    widget.run_button.click()
    widget.worker.quit()  # what napari does when its window closes with the job running
    qtbot.waitUntil(lambda: not widget.running, timeout=300_000)
    assert widget.status.text() == "cancelled" and len(viewer.layers) == 1

    widget.run_button.click()
    assert widget.running and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.running, timeout=300_000)
    assert widget.status.text() == "added TIRF demo stack denoised: 20x256x256 float32"
    assert widget.progress.value() == 1000 and not widget.cancel_button.isEnabled()

    out = viewer.layers["TIRF demo stack denoised"]
    assert out.data.shape == noisy.data.shape and out.data.dtype == np.float32
    np.testing.assert_array_equal(out.scale, noisy.scale)
    np.testing.assert_array_equal(out.translate, noisy.translate)
    expected = load_denoiser(model, tile=128)(noisy.data)  # the Denoiser on the whole stack
    np.testing.assert_allclose(out.data, expected, rtol=0, atol=1e-6 * np.ptp(expected))

    # the noisy and the denoised plane side by side, one contrast (the denoised image's)
    lo, hi = np.percentile(out.data, (0.5, 99.8))
    noisy.contrast_limits = out.contrast_limits = (float(lo), float(hi))
    (viewer.canvas if hasattr(viewer, "canvas") else viewer).grid.enabled = True  # (napari 0.9)
    viewer.reset_view()
    qtbot.wait(300)
    shot = viewer.screenshot(str(tmp_path / "napari_denoise.png"), canvas_only=False)
    assert shot.ndim == 3 and shot.shape[0] >= 600
    if os.environ.get("CLIDIM_JAX_NAPARI_SCREENSHOT"):
        shutil.copyfile(tmp_path / "napari_denoise.png", os.environ["CLIDIM_JAX_NAPARI_SCREENSHOT"])


def test_train_widget_stops_resumes_and_draws_the_curves(viewer, qtbot, tmp_path):
    from clidim_jax.napari.widgets import NO_CLEAN

    (stack,) = viewer.open_sample("clidim-jax", "tirf")
    assert stack.data.shape == (20, 256, 256)
    viewer.add_image(stack.data[:8, :64, :128], name="frames")  # small: a tiny run
    dock, widget = viewer.window.add_plugin_dock_widget("clidim-jax", "Train")
    widget.noisy.setCurrentText("frames")
    assert widget.noisy.currentText() == "frames" and widget.clean.currentText() == NO_CLEAN
    assert widget.preset.currentText() == "own_data"
    widget.preset_arg.setText("tiny")
    widget.steps.setValue(6)
    workdir = tmp_path / "run"
    widget.workdir.setText(str(workdir))

    widget.run_button.click()
    widget.stop_button.click()  # while it prepares: it stops after its first step
    qtbot.waitUntil(lambda: not widget.running, timeout=300_000)
    assert widget.status.text().startswith("stopped at step 1 (checkpoint saved)")
    assert os.listdir(workdir / "checkpoints") == ["1"]
    assert widget.curves_shown()["training loss"][:, 0].tolist() == [1]

    widget.run_button.click()  # the same folder: resumes
    qtbot.waitUntil(lambda: not widget.running, timeout=300_000)
    assert "trained; test split: PSNR" in widget.status.text(), widget.status.text()
    shown = widget.curves_shown()
    assert shown["training loss"][:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert shown["validation PSNR (dB)"][:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    psnr = [r["val/psnr"] for r in rows if "val/psnr" in r]
    np.testing.assert_allclose(shown["validation PSNR (dB)"][:, 1], psnr)
    viewer.screenshot(str(tmp_path / "napari_train.png"), canvas_only=False)

    # closed, the widget stops following the layer list (its Qt objects are gone)
    viewer.window.remove_dock_widget(dock)
    qtbot.wait(50)
    viewer.add_image(np.zeros((4, 4)), name="after closing")
    viewer.layers["frames"].name = "renamed"
