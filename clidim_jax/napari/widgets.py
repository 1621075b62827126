"""The napari widgets: Denoise (a trained model on an image layer, in a background thread) and
Train (a model trained on image layers, its loss and validation PSNR drawn as it trains).

The work itself is in `clidim_jax.napari.jobs` (no Qt); here are the controls, the background
workers (`napari.qt.threading`) and the messages (napari notifications, and the widget's own
status line). A worker reports progress by writing a small object that a timer on the GUI thread
reads: no Qt object is touched from the worker's thread.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import napari
import numpy as np
from napari.layers import Image
from napari.qt.threading import FunctionWorker, create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from clidim_jax.napari import jobs

NO_CLEAN = "(none: a stack, its mean is the ground truth)"


class LayerChoice(QComboBox):
    """The viewer's image layers by name, kept in step with its layer list; `first` is an
    optional entry standing for no layer."""

    def __init__(self, viewer: napari.viewer.Viewer, first: str | None = None):
        super().__init__()
        self.viewer, self.first = viewer, first
        events = viewer.layers.events
        self._events = [events.inserted, events.removed, events.moved, events.reordered]
        for event in self._events:
            event.connect(self.refresh)
        events.inserted.connect(self._watch_name)
        for layer in viewer.layers:
            self._watch_name(layer)
        self.refresh()

    def _watch_name(self, event_or_layer: Any) -> None:
        layer = getattr(event_or_layer, "value", event_or_layer)
        layer.events.name.connect(self.refresh)
        self._events.append(layer.events.name)

    def refresh(self, *_: Any) -> None:
        try:
            current = self.currentText()
        except RuntimeError:  # the widget was closed (its Qt object is gone): stop listening
            for event in self._events:
                event.disconnect(self.refresh)
            self.viewer.layers.events.inserted.disconnect(self._watch_name)
            return
        self.blockSignals(True)
        self.clear()
        if self.first is not None:
            self.addItem(self.first)
        self.addItems([layer.name for layer in self.viewer.layers if isinstance(layer, Image)])
        index = self.findText(current)
        self.setCurrentIndex(index if index >= 0 else 0)
        self.blockSignals(False)

    def layer(self) -> Image | None:
        name = self.currentText()
        if name == self.first or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]


class _Report:
    """What a worker has done so far, written by its thread and read by a timer (attribute
    stores are atomic in Python)."""

    def __init__(self, text: str = "starting") -> None:
        self.fraction, self.text = 0.0, text

    def __call__(self, fraction: float, text: str) -> None:
        self.fraction, self.text = fraction, text


def _full_resolution(layer: Image) -> Any:
    return layer.data[0] if layer.multiscale else layer.data


def _path_row(edit: QLineEdit, *buttons: QPushButton) -> QHBoxLayout:
    row = QHBoxLayout()
    row.addWidget(edit)
    for b in buttons:
        row.addWidget(b)
    return row


class _Worker(FunctionWorker):
    """A napari function worker whose quit request (napari's, when the window closes with the
    job running) sets the job's own stop / cancel event."""

    stop_event: threading.Event | None = None

    def quit(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()
        super().quit()


class _JobWidget(QWidget):
    """A widget that runs one background job at a time, with a progress bar, a status line and
    a timer showing the job's progress."""

    quit_message = "cancelled"  # what the status line says after the worker was quit

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.worker: Any = None
        self.report = _Report()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.timer = QTimer(self)
        self.timer.setInterval(100)
        self.timer.timeout.connect(self.tick)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def say(self, text: str, *, error: bool = False) -> None:
        """A message on the status line and as a napari notification."""
        self.status.setText(text)
        (show_error if error else show_info)(text)

    def start(self, stop: threading.Event, job: Any, *args: Any, **kwargs: Any) -> None:
        """Runs jobs.guarded(job, *args, **kwargs) in a napari worker thread; the worker's quit
        sets `stop`."""
        worker = create_worker(
            jobs.guarded, job, *args, _start_thread=False, _worker_class=_Worker, **kwargs
        )
        worker.stop_event = stop
        worker.returned.connect(self._returned)
        worker.finished.connect(self._finished)
        self.worker = worker
        self.set_running(True)
        self.timer.start()
        worker.start()

    def tick(self) -> None:
        self.progress.setValue(int(1000 * min(max(self.report.fraction, 0.0), 1.0)))
        self.progress.setFormat(f"{self.report.text}  %p%")

    def _returned(self, outcome: jobs.Outcome) -> None:
        self.tick()
        if outcome.error is not None:
            self.say(outcome.error, error=True)
        elif outcome.cancelled:
            self.say("cancelled")
        else:
            self.done(outcome.value)

    def _finished(self) -> None:
        self.timer.stop()
        if self.worker.abort_requested:  # (a quit worker emits no `returned`)
            self.say(self.quit_message)
        self.worker = None
        self.set_running(False)

    def set_running(self, running: bool) -> None:
        raise NotImplementedError

    def done(self, value: Any) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ Denoise


class DenoiseWidget(_JobWidget):
    """Denoises an image layer with a trained run, a model file or a zoo package, plane by
    plane, into a new layer with the same scale and position."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        self.image = LayerChoice(napari_viewer)
        self.model = QLineEdit()
        self.model.setPlaceholderText("training folder, .clidim file or zoo .zip")
        self.model.setToolTip(
            "A training folder (clidim-jax train --workdir), a model file from clidim-jax "
            "export, or a BioImage Model Zoo package from export --format bmz"
        )
        folder, file = QPushButton("Folder…"), QPushButton("File…")
        folder.clicked.connect(self._choose_folder)
        file.clicked.connect(self._choose_file)
        self.tile = QSpinBox()
        self.tile.setRange(0, 1 << 16)
        self.tile.setSingleStep(64)
        self.tile.setSpecialValueText("model's")
        self.tile.setToolTip("Images larger than this are denoised as overlapping tiles")
        self.overlap = QSpinBox()
        self.overlap.setRange(0, 1 << 14)
        self.overlap.setSingleStep(16)
        self.overlap.setSpecialValueText("model's")
        self.tta = QCheckBox("test-time augmentation (8 flips and turns, 8x the time)")
        self.run_button = QPushButton("Denoise")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        self._cancel = threading.Event()
        self._cache: tuple[tuple, Any] | None = None  # (settings, Denoiser)
        self._source: Image | None = None

        form = QFormLayout()
        form.addRow("image", self.image)
        form.addRow("model", _path_row(self.model, folder, file))
        form.addRow("tile size", self.tile)
        form.addRow("tile overlap", self.overlap)
        form.addRow(self.tta)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Training folder (--workdir)")
        if path:
            self.model.setText(path)

    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Model file", "", "clidim-jax models (*.clidim *.zip);;All files (*)"
        )
        if path:
            self.model.setText(path)

    def settings(self) -> tuple:
        """What the model depends on: its path and last change, tiling and augmentation."""
        path = os.path.expanduser(self.model.text().strip())
        stamp = None
        for p in (os.path.join(path, "checkpoints"), path):
            if os.path.exists(p):
                stamp = os.stat(p).st_mtime_ns
                break
        return (path, stamp, self.tile.value(), self.overlap.value(), self.tta.isChecked())

    def run(self) -> None:
        """Starts denoising the chosen layer (refused with a message while a job runs or when
        the input is unusable)."""
        if self.running:
            return
        layer = self.image.layer()
        if layer is None:
            self.say("no image layer: open one (or File > Open Sample > clidim-jax)", error=True)
            return
        data = _full_resolution(layer)
        try:
            jobs.check_image(data, layer.name, rgb=layer.rgb)
            jobs.model_kind(self.settings()[0])
        except jobs.UserError as e:
            self.say(str(e), error=True)
            return
        self._cancel = threading.Event()
        self._source = layer
        self.report = _Report("loading the model")
        self.status.setText(f"denoising {layer.name}")
        self.start(
            self._cancel, self.job, self.settings(), data, layer.name, self._cancel, self.report
        )

    def job(self, settings: tuple, data: Any, name: str, cancel: threading.Event, report):
        """(in the worker thread) -> (settings, Denoiser, denoised array)."""
        cached = self._cache
        if cached is not None and cached[0] == settings:
            denoiser = cached[1]
        else:
            path, _, tile, overlap, tta = settings
            denoiser = jobs.load_denoiser(path, tile=tile, overlap=overlap, tta=tta)
        if cancel.is_set():
            raise jobs.Cancelled
        report(0.0, "denoising")
        out = jobs.denoise_image(denoiser, data, name=name, progress=report, cancel=cancel)
        return settings, denoiser, out

    def cancel(self) -> None:
        if self.running:
            self._cancel.set()
            self.status.setText("cancelling after the current tile")

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def done(self, value: tuple) -> None:
        settings, denoiser, out = value
        self._cache = (settings, denoiser)
        layer = self._source
        new = self.viewer.add_image(out, **output_layer_kwargs(layer, settings[0]))
        self.say(f"added {new.name}: {'x'.join(map(str, out.shape))} float32")


def output_layer_kwargs(layer: Image, model: str) -> dict[str, Any]:
    """The denoised layer's name, geometry (scale, translate, rotation, shear, affine, units,
    axis labels) and look, taken from the noisy layer."""
    kwargs: dict[str, Any] = dict(
        name=f"{layer.name} denoised",
        scale=layer.scale,
        translate=layer.translate,
        rotate=layer.rotate,
        shear=layer.shear,
        affine=layer.affine.affine_matrix,
        colormap=layer.colormap,
        blending=layer.blending,
        metadata={**layer.metadata, "clidim_jax_model": model, "clidim_jax_source": layer.name},
    )
    for attribute in ("units", "axis_labels"):  # (napari >= 0.6)
        if hasattr(layer, attribute):
            kwargs[attribute] = getattr(layer, attribute)
    return kwargs


# -------------------------------------------------------------------------------------- Train


class TrainWidget(_JobWidget):
    """Trains a model on noisy and clean layers (or a stack layer whose mean is the ground
    truth) through a packaged preset, in a workdir; draws the loss and the validation PSNR from
    its metrics.jsonl as it trains; Stop saves a checkpoint, and training again in the same
    folder resumes."""

    quit_message = "stopped (with a checkpoint once a step was done); train again to resume"

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.noisy = LayerChoice(napari_viewer)
        self.clean = LayerChoice(napari_viewer, first=NO_CLEAN)
        self.preset = QComboBox()
        self.preset.addItems(jobs.presets())
        self.preset.setCurrentText(jobs.DEFAULT_PRESET)
        self.preset_arg = QLineEdit()
        self.preset_arg.setPlaceholderText("e.g. variant=cl_tv_ssim,seed=1 (optional)")
        self.preset_arg.setToolTip("The preset's arguments, as in --config own_data:ARGS")
        self.steps = QSpinBox()
        self.steps.setRange(1, 10_000_000)
        self.steps.setValue(3000)
        self.steps.setToolTip("Training steps (rounded up to whole epochs of the preset)")
        self.workdir = QLineEdit()
        self.workdir.setPlaceholderText("folder for checkpoints, metrics and the data")
        folder = QPushButton("Folder…")
        folder.clicked.connect(self._choose_folder)
        self.run_button = QPushButton("Train")
        self.run_button.clicked.connect(self.run)
        self.stop_button = QPushButton("Stop (saves a checkpoint)")
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        self._stop = threading.Event()
        self.figure = Figure(figsize=(4, 3.2), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.loss_axes, self.psnr_axes = self.figure.subplots(2, 1, sharex=True)
        self._drawn: dict | None = None
        self._curve_timer = QTimer(self)
        self._curve_timer.setInterval(1000)
        self._curve_timer.timeout.connect(self.draw_curves)

        form = QFormLayout()
        form.addRow("noisy", self.noisy)
        form.addRow("clean", self.clean)
        form.addRow("preset", self.preset)
        form.addRow("preset arguments", self.preset_arg)
        form.addRow("steps", self.steps)
        form.addRow("folder", _path_row(self.workdir, folder))
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas)

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Training folder")
        if path:
            self.workdir.setText(path)
            self.draw_curves()

    def run(self) -> None:
        if self.running:
            return
        noisy, clean = self.noisy.layer(), self.clean.layer()
        workdir = os.path.expanduser(self.workdir.text().strip())
        if noisy is None:
            self.say("no noisy image layer: open your images first", error=True)
            return
        if not workdir:
            self.say("choose a folder for the run (checkpoints, metrics, data)", error=True)
            return
        if clean is noisy:
            self.say("the noisy and the clean layer are the same layer", error=True)
            return
        self._stop = threading.Event()
        self.report = _Report("preparing the data")
        self.status.setText(f"training in {workdir}")
        self._curve_timer.start()
        self.start(
            self._stop,
            self.job,
            workdir,
            self.preset.currentText(),
            self.preset_arg.text().strip() or None,
            self.steps.value(),
            (_full_resolution(noisy), noisy.name),
            None if clean is None else (_full_resolution(clean), clean.name),
            self._stop,
            self.report,
        )

    @staticmethod
    def job(workdir, preset, arg, steps, noisy, clean, stop, report) -> dict:
        """(in the worker thread) writes the layers, builds the config, trains."""
        fields = jobs.write_training_data(
            workdir, noisy[0], None if clean is None else clean[0], noisy_name=noisy[1],
            clean_name="" if clean is None else clean[1],
        )  # fmt: skip
        config = jobs.training_config(preset, fields, steps=steps, arg=arg)
        report(0.0, "compiling the train step")

        def progress(step: int, total: int) -> None:
            report(step / max(total, 1), f"step {step}/{total}")

        return jobs.train(config, workdir, stop=stop, progress=progress)

    def stop(self) -> None:
        if self.running:
            self._stop.set()
            self.status.setText("stopping: saving a checkpoint after the current step")

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def _finished(self) -> None:
        super()._finished()
        self._curve_timer.stop()
        self.draw_curves()

    def done(self, result: dict) -> None:
        self.say(f"{jobs.summary(result)} ({self.workdir.text().strip()})")

    def draw_curves(self) -> None:
        """Redraws the loss and validation PSNR if metrics.jsonl has new lines."""
        curves = jobs.read_curves(os.path.expanduser(self.workdir.text().strip()))
        if curves == self._drawn:
            return
        self._drawn = curves
        for axes, key, label in (
            (self.loss_axes, jobs.LOSS_KEY, "training loss"),
            (self.psnr_axes, jobs.PSNR_KEY, "validation PSNR (dB)"),
        ):
            axes.clear()
            axes.set_ylabel(label, fontsize=8)
            axes.tick_params(labelsize=7)
            steps, values = curves.get(key, ([], []))
            if steps:
                axes.plot(steps, values, ".-" if len(steps) < 30 else "-", lw=1)
                if key == jobs.LOSS_KEY and min(values) > 0:
                    axes.set_yscale("log")
            else:
                axes.text(0.5, 0.5, "none yet", ha="center", va="center", fontsize=8,
                          transform=axes.transAxes)  # fmt: skip
        self.psnr_axes.set_xlabel("step", fontsize=8)
        self.canvas.draw_idle()

    def curves_shown(self) -> dict[str, np.ndarray]:
        """The data of the lines drawn, by y label (for checks)."""
        return {
            axes.get_ylabel(): np.asarray(axes.lines[0].get_xydata())
            for axes in (self.loss_axes, self.psnr_axes)
            if axes.lines
        }
