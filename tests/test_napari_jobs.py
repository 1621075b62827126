"""What the napari widgets run (`clidim_jax.napari.jobs`), without napari or Qt: models loaded
from each kind of path, images denoised plane by plane with progress and cancellation, layers
written as training data, the length of a run, and training stopped from another thread then
resumed."""

import os
import threading

import numpy as np
import pytest
import tifffile

from clidim_jax.data.datasets import demo_stack_path
from clidim_jax.data.tiff import read_tiff
from clidim_jax.napari import jobs

# The module needs no napari, but it is the plugin's: its tests run with the plugin's other
# tests, in the napari environment of .ci/run (the default test command installs no napari).
pytest.importorskip("napari", reason="the napari plugin's tests run where napari is installed")


@pytest.fixture(scope="module")
def models(tiny_run, tiny_exports):
    """The session's tiny run and the two files exported from it: {kind: path}."""
    pytest.importorskip("onnx")
    workdir, proc = tiny_run
    assert proc.returncode == 0, proc.stderr
    return {"run": str(workdir), "clidim": tiny_exports["clidim"], "bmz": tiny_exports["bmz"]}


@pytest.fixture(scope="module")
def stack():
    return tifffile.imread(demo_stack_path())[:4, :96, :160]


def test_each_kind_of_model_loads_with_the_settings_given(models, stack):
    from clidim_jax.export import ExportedGenerator
    from clidim_jax.models import UNetGenerator
    from clidim_jax.onnx_export import OnnxGenerator

    types = {"run": UNetGenerator, "clidim": ExportedGenerator, "bmz": OnnxGenerator}
    plane = stack[0]
    reference = None
    for kind, path in models.items():
        assert jobs.model_kind(path) == kind
        d = jobs.load_denoiser(f"  {path} ", tile=64, overlap=32, tta=True)
        assert isinstance(d.generator, types[kind]), kind
        assert (d.tiling.tile, d.tiling.overlap, d.tta) == (64, 32, True), kind
        out = d.denoise(plane)
        if reference is None:
            reference = out
        # the exported program is the run's (equal); ONNX Runtime within 1e-4 of the range
        atol = 0 if kind == "clidim" else 1e-4 * np.ptp(reference)
        np.testing.assert_allclose(out, reference, rtol=0, atol=atol, err_msg=kind)
    # 0 / None: the model's own settings (the tiny run's config: tile 512, no TTA)
    d = jobs.load_denoiser(models["run"], tile=0, overlap=0, tta=None)
    assert (d.tiling.tile, d.tta) == (512, False)


def test_model_paths_that_are_not_models_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "fake.zip").write_text("not a zip")
    cases = {
        "": "choose a model",
        str(tmp_path / "missing"): "missing: not found",
        str(tmp_path / "empty"): "empty: no checkpoint found",
        str(tmp_path / "notes.txt"): "notes.txt: not a clidim-jax model file",
        str(tmp_path / "fake.zip"): "fake.zip: not a zip file",
    }
    for path, message in cases.items():
        with pytest.raises(jobs.UserError, match=message) as e:
            jobs.load_denoiser(path)
        assert "\n" not in str(e.value)


class Planes:
    """An array that is read plane by plane (like a dask or zarr array): records the reads."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.a[index]


def test_denoise_image_goes_plane_by_plane_with_progress(models, stack):
    d = jobs.load_denoiser(models["run"], tile=64, overlap=32)
    data = Planes(stack.reshape(2, 2, *stack.shape[1:]))  # e.g. (T, Z, Y, X)
    seen = []
    out = jobs.denoise_image(d, data, progress=lambda f, text: seen.append((f, text)))
    assert out.shape == data.shape and out.dtype == np.float32
    assert data.reads == [(0, 0), (0, 1), (1, 0), (1, 1)]  # one plane read at a time
    expected = d(stack)  # the Denoiser on the (N, H, W) stack
    np.testing.assert_array_equal(out.reshape(stack.shape), expected)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert seen[-1][1] == "plane 4/4: tile 8/8"  # 96 x 160 in 64-pixel tiles, overlap 32


def test_cancel_stops_at_the_next_tile(models, stack):
    d = jobs.load_denoiser(models["run"], tile=64, overlap=32)
    cancel, seen = threading.Event(), []

    def progress(fraction, text):
        seen.append(text)
        cancel.set()  # as the Cancel button would, while the first plane runs

    with pytest.raises(jobs.Cancelled):
        jobs.denoise_image(d, stack, progress=progress, cancel=cancel)
    assert seen == ["plane 1/4: tile 4/8"]  # one batch of 4 tiles, then stopped


def test_unusable_images_are_refused(stack):
    for data, rgb, message in [
        (np.zeros((8, 8, 3), np.uint8), True, "an RGB image"),
        (np.zeros(8), False, r"not an image \(shape \(8,\)\)"),
        (np.zeros((8, 8), np.complex64), False, "pixel type complex64"),
        (np.zeros((8, 8), bool), False, "pixel type bool"),
    ]:
        with pytest.raises(jobs.UserError, match=message):
            jobs.denoise_image(None, data, name="layer", rgb=rgb)


def test_training_data_written_once_and_read_back(tmp_path, stack):
    noisy, clean = stack[:3], stack.mean(0).astype(np.float32)
    fields = jobs.write_training_data(str(tmp_path), noisy, clean)
    assert fields["data.source"] == "paired" and fields["data.axes"] == "TYX"
    # (read with the file's own axes, and with the axes the config gives)
    for axes in ("", "TYX"):
        np.testing.assert_array_equal(read_tiff(fields["data.noisy_path"], axes=axes), noisy)
        np.testing.assert_array_equal(read_tiff(fields["data.clean_path"], axes=axes), clean[None])
    # the same layers again: the same files; other data: other files (so a resumed run that is
    # given other data is refused by the resume check, which compares data paths)
    assert jobs.write_training_data(str(tmp_path), noisy, clean) == fields
    other = jobs.write_training_data(str(tmp_path), noisy[:2], clean)
    assert other["data.noisy_path"] != fields["data.noisy_path"]
    assert other["data.clean_path"] == fields["data.clean_path"]

    s = jobs.write_training_data(str(tmp_path), stack.reshape(2, 2, 96, 160).astype(np.int64))
    assert s["data.source"] == "stack"
    back = read_tiff(s["data.path"], axes="TYX")
    assert back.dtype == np.uint16  # int64 within 0..65535: stored as uint16
    np.testing.assert_array_equal(back, stack)
    assert (
        read_tiff(
            jobs.write_training_data(str(tmp_path), noisy * 0.5, clean)["data.noisy_path"]
        ).dtype
        == np.float32
    )  # float64: float32


def test_training_data_that_cannot_pair_is_refused(tmp_path, stack):
    with pytest.raises(jobs.UserError, match="noisy is 96x160, clean is 96x80"):
        jobs.write_training_data(str(tmp_path), stack, stack[:, :, :80])
    with pytest.raises(jobs.UserError, match="clean: 2 clean planes for the 4 noisy planes"):
        jobs.write_training_data(str(tmp_path), stack, stack[:2])
    with pytest.raises(jobs.UserError, match="noisy: one plane; a stack"):
        jobs.write_training_data(str(tmp_path), stack[0])
    assert not os.path.exists(tmp_path / "napari_data")  # refused before writing anything


@pytest.mark.parametrize(
    "preset, steps, total", [("own_data", 3000, 3000), ("own_data", 95, 100), ("paper", 7, 10)]
)
def test_the_run_length_is_whole_epochs_of_the_preset(preset, steps, total):
    from clidim_jax.state import total_steps

    c = jobs.training_config(preset, {"data.source": "stack", "data.path": "x.tif"}, steps=steps)
    assert total_steps(c, n_train_images=1) == total
    reference = jobs.preset_config(preset)
    if reference.train.steps_per_epoch:
        assert c.train.steps_per_epoch == reference.train.steps_per_epoch
        t, r = c.train, reference.train
        share = r.n_epochs / (r.n_epochs + r.n_epochs_decay)
        assert abs(t.n_epochs / (t.n_epochs + t.n_epochs_decay) - share) <= 0.1
    assert 1 <= c.train.log_every <= max(1, total // 30)
    assert c.data.source == "stack" and c.data.path == "x.tif"
    with pytest.raises(jobs.UserError, match="unknown preset 'nope'"):
        jobs.training_config("nope", {})


def test_presets_are_the_packaged_configs():
    assert {"demo", "own_data", "reference", "paper"} <= set(jobs.presets())
    assert jobs.DEFAULT_PRESET in jobs.presets()


@pytest.mark.slow
def test_training_stops_from_another_thread_and_resumes(tmp_path, stack):
    """A stop request (the Stop button) saves a checkpoint at the step it was seen; training
    again in the folder resumes there, finishes and evaluates; the curves come from
    metrics.jsonl."""
    workdir = str(tmp_path / "run")
    frames = tifffile.imread(demo_stack_path())[:8, :64, :128]
    config = jobs.training_config("own_data", jobs.write_training_data(workdir, frames), arg="tiny")
    stop, seen = threading.Event(), []

    def progress(step, total):
        seen.append((step, total))
        if step == 1:
            stop.set()  # (the widget sets it from the GUI thread): seen after the next step

    result = jobs.train(config, workdir, stop=stop, progress=progress)
    assert result == {"stopped_by": "a stop request", "step": 2}
    assert seen == [(0, 6), (1, 6), (2, 6)]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    curves = jobs.read_curves(workdir)
    assert curves[jobs.LOSS_KEY][0] == [2] and curves[jobs.PSNR_KEY][0] == [2]
    assert "train again in the same folder to resume" in jobs.summary(result)

    seen.clear()
    result = jobs.train(config, workdir, stop=threading.Event(), progress=progress)
    assert seen[0] == (2, 6) and seen[-1] == (6, 6)  # resumed at the checkpoint
    assert result["output"]["psnr"] > 0 and "test split: PSNR" in jobs.summary(result)
    curves = jobs.read_curves(workdir)
    assert curves[jobs.LOSS_KEY][0] == [2, 4, 6] and curves[jobs.PSNR_KEY][0] == [2, 4, 6]

    # other layers in the same folder: refused (they are other files), one line
    other = jobs.write_training_data(workdir, frames[:, :, ::-1])
    config = jobs.training_config("own_data", other, steps=20, arg="tiny")
    with pytest.raises(jobs.UserError, match=r"cannot continue: config\.data\.path is") as e:
        jobs.train(config, workdir)
    assert "\n" not in str(e.value)


def test_read_curves_keeps_the_later_value_of_a_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "g_total": 5.0}\n{"step": 4, "g_total": 4.0}\n'
        '{"step": 4, "g_total": 3.5, "val/psnr": 20.0}\n{"step": 6, "g_tot'
    )
    assert jobs.read_curves(str(tmp_path)) == {
        "g_total": ([2, 4], [5.0, 3.5]),
        "val/psnr": ([4], [20.0]),
    }
    assert jobs.read_curves(str(tmp_path / "missing")) == {}
