"""The plugin's npe2 manifest (clidim_jax/napari/napari.yaml): valid for npe2, every command
importable, the sample data what the package bundles, the widgets built the way napari builds
them. Skipped without npe2 (which comes with napari: `pip install '.[napari]'`)."""

import importlib.metadata
import inspect
import subprocess
import sys
from importlib.resources import files

import numpy as np
import pytest

npe2 = pytest.importorskip("npe2")

MANIFEST = files("clidim_jax.napari") / "napari.yaml"


def validate(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "npe2", "validate", str(path), "--imports"],
        capture_output=True,
        text=True,
    )


def test_npe2_validates_the_manifest_and_imports_every_command(tmp_path):
    p = validate(MANIFEST)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "valid!" in p.stdout
    # the check is live: a command that does not exist fails it
    broken = tmp_path / "napari.yaml"
    broken.write_text(MANIFEST.read_text().replace("widgets:DenoiseWidget", "widgets:Nope"))
    p = validate(broken)
    assert p.returncode != 0 and "Nope" in p.stdout + p.stderr


def _commands() -> dict:
    manifest = npe2.PluginManifest.from_file(str(MANIFEST))
    assert manifest.name == "clidim-jax"  # the distribution's name, as npe2 requires
    return manifest, {c.id: c for c in manifest.contributions.commands}


def test_sample_data_are_the_bundled_images():
    from clidim_jax.data.datasets import demo_stack_path
    from clidim_jax.data.tiff import read_tiff
    from clidim_jax.denoise import example_image_path

    manifest, commands = _commands()
    expected = {
        "tirf": read_tiff(demo_stack_path()),
        "convallaria": read_tiff(example_image_path()),
    }
    assert {s.key for s in manifest.contributions.sample_data} == set(expected)
    for sample in manifest.contributions.sample_data:
        loader = npe2.manifest.utils.import_python_name(commands[sample.command].python_name)
        ((data, meta, kind),) = loader()
        assert kind == "image" and meta["name"]
        want = expected[sample.key]
        np.testing.assert_array_equal(data, want if len(want) > 1 else want[0])


def test_widgets_take_the_viewer_as_napari_passes_it():
    manifest, commands = _commands()
    names = {
        w.display_name: commands[w.command].python_name for w in manifest.contributions.widgets
    }
    assert set(names) == {"Denoise", "Train"}
    for name in names.values():
        widget = npe2.manifest.utils.import_python_name(name)
        # napari fills the parameter annotated with its Viewer
        parameter = inspect.signature(widget).parameters["napari_viewer"]
        assert "Viewer" in str(parameter.annotation)


def test_the_installed_entry_point_names_this_manifest():
    points = [
        e
        for e in importlib.metadata.entry_points(group="napari.manifest")
        if e.name == "clidim-jax"
    ]
    if not points:
        pytest.skip("the installed clidim-jax declares no napari.manifest entry point")
    (point,) = points
    module, _, resource = point.value.partition(":")
    assert files(module) / resource == MANIFEST
