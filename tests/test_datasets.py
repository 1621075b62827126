"""Data sources of issue 3 on synthetic files: the paper's benchmark splits, the few-shot rule,
paired files and folders, TIFF axes and pixel types, and one clear error per bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from conftest import TINY_FLAGS, tiny_config

from clidim_jax import cli
from clidim_jax.data import DataError, load_datasets
from clidim_jax.data.datasets import PairedImages, few_shot, load_splits
from clidim_jax.data.download import DATASETS
from clidim_jax.data.normalization import percentiles
from clidim_jax.data.sampling import sample_batch
from clidim_jax.state import steps_per_epoch


def coded_stack(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A uint16 stack whose frames differ (noise) and whose pixels are distinct."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 60000, (n, h, w), dtype=np.uint16)


def write(path, arr, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tifffile.imwrite(path, arr, photometric="minisblack", **kw)
    return str(path)


def benchmark_config(name: str, root) -> object:
    c = tiny_config()
    c.data.source = name
    c.data.root = str(root)
    return c


# --- The paper's three benchmarks: PN2V splits and ground truth --------------------------------


def test_convallaria_split_quadrants_in_order_and_mean_ground_truth(tmp_path):
    stack = coded_stack(3, 1024, 1024)
    nested = tmp_path / "convallaria" / "Convallaria_diaphragm" / DATASETS["convallaria"].tif_name
    write(nested, stack)
    c = benchmark_config("convallaria", tmp_path)
    train, test = load_datasets(c.data)
    gt = stack.astype(np.float64).mean(0)
    assert len(train) == 9 and len(test) == 3
    quadrants = [(slice(512, 1024), slice(512, 1024)), (slice(0, 512), slice(512, 1024))]
    quadrants.append((slice(512, 1024), slice(0, 512)))  # bottom-right, top-right, bottom-left
    for q, (ys, xs) in enumerate(quadrants):
        for f in range(3):
            a, b = train.pair(3 * q + f)
            np.testing.assert_array_equal(a, stack[f, ys, xs])
            np.testing.assert_allclose(b, gt[ys, xs], rtol=1e-7)
    for f in range(3):
        a, b = test.pair(f)
        np.testing.assert_array_equal(a, stack[f, :512, :512])
        np.testing.assert_allclose(b, gt[:512, :512], rtol=1e-7)
    assert b.dtype == np.float32 and not np.array_equal(b, np.floor(b))  # a float mean

    c.data.ground_truth = "mean_uint16"  # the reference's truncation
    train, test = load_datasets(c.data)
    np.testing.assert_array_equal(test.pair(0)[1], gt[:512, :512].astype(np.uint16))


@pytest.mark.parametrize(
    "name,shape,cut", [("actin", (2, 1024, 1024), 512), ("skull", (3, 512, 512), 256)]
)
def test_actin_and_skull_splits(tmp_path, name, shape, cut):
    stack = coded_stack(*shape)
    folder = {"actin": "Mouse actin/Mouse actin", "skull": "Mouse skull nuclei"}[name]
    write(tmp_path / name / folder / DATASETS[name].tif_name, stack)
    train, test = load_datasets(benchmark_config(name, tmp_path).data)
    gt = stack.astype(np.float64).mean(0)
    assert len(train) == len(test) == shape[0]
    for f in range(shape[0]):
        np.testing.assert_array_equal(train.pair(f)[0], stack[f, :, cut:])
        np.testing.assert_array_equal(test.pair(f)[0], stack[f, :, :cut])
        np.testing.assert_allclose(test.pair(f)[1], gt[:, :cut], rtol=1e-7)


def test_missing_benchmark_names_the_download_command(tmp_path):
    with pytest.raises(DataError, match=r"clidim-jax download actin --root"):
        load_datasets(benchmark_config("actin", tmp_path).data)


def test_table_one_cells_are_configs():
    from clidim_jax.configs import paper, reference

    for ds in ("convallaria", "actin", "skull"):
        for variant in ("baseline", "tv", "ssim", "cl", "cl_tv_ssim"):
            for n in ("all", "32", "16"):
                c = reference.get_config(f"dataset={ds},variant={variant},n_samples={n}")
                assert c.data.source == ds and c.variant == variant
                assert c.data.n_samples == (0 if n == "all" else int(n))
    assert reference.get_config("dataset=skull").data.ground_truth == "mean_uint16"
    assert paper.get_config("dataset=actin,n_samples=16").data.ground_truth == "mean"
    with pytest.raises(ValueError, match="unknown dataset 'convalaria'"):
        reference.get_config("dataset=convalaria")
    with pytest.raises(ValueError, match="n_samples='x'"):
        reference.get_config("n_samples=x")


# --- Few-shot selection ------------------------------------------------------------------------


def views_set(n: int) -> PairedImages:
    noisy = np.arange(n, dtype=np.uint16)[:, None, None] * np.ones((1, 8, 8), np.uint16)
    return PairedImages.whole(noisy, np.zeros((1, 8, 8), np.float32), np.zeros(n, int), "s")


def test_few_shot_slice_below_batch_size_and_repetition_to_full_length():
    full = views_set(300)
    sub = few_shot(full, 16, batch_size=128, seed=0)
    np.testing.assert_array_equal(sub.views[:, 0], np.arange(50, 66))  # the slice [50:66]
    assert sub.epoch_length == 300 and len(sub) == 16
    np.testing.assert_array_equal(np.bincount(sub.order), [19] * 12 + [18] * 4)  # 300 = 18*16+12
    c = tiny_config()
    c.train.steps_per_epoch = 0
    c.train.batch_size = 128
    assert steps_per_epoch(c, sub.epoch_length) == steps_per_epoch(c, len(full)) == 3
    assert few_shot(full, 0, 128, 0) is full


def test_few_shot_seeded_subset_at_or_above_batch_size():
    full = views_set(300)
    a = few_shot(full, 32, batch_size=8, seed=1)
    b = few_shot(full, 32, batch_size=8, seed=1)
    c = few_shot(full, 32, batch_size=8, seed=2)
    np.testing.assert_array_equal(a.views, b.views)
    assert not np.array_equal(a.views, c.views)
    assert len(set(a.views[:, 0])) == 32 and a.epoch_length == 300
    assert few_shot(views_set(40), 16, batch_size=32, seed=0).views[0, 0] == 24  # clipped slice
    with pytest.raises(DataError, match=r"n_samples=301 is larger than the 300 training images"):
        few_shot(full, 301, batch_size=8, seed=0)


def test_few_shot_epoch_draws_only_the_subset_and_device_holds_only_its_planes(tmp_path):
    stack = coded_stack(80, 64, 64)
    c = tiny_config()
    c.data.source = "stack"
    c.data.path = write(tmp_path / "s.tif", stack)
    c.data.n_samples = 4
    c.train.batch_size = 8
    train, _ = load_datasets(c.data, batch_size=8, seed=0)
    np.testing.assert_array_equal(train.views[:, 0], [50, 51, 52, 53])
    d = train.device_data()
    assert d["noisy"].shape == (4, 64, 32) and len(d["order"]) == 80
    fn = jax.jit(
        lambda s: sample_batch(
            jax.random.key(0), s, d["noisy"], d["clean"], d["views"],
            batch_size=8, patch_size=32, augment=False, order=d["order"],
        )[0]
    )  # fmt: skip
    # A crop's first column is stack[plane, y:y+32, 32] (the training half is 32 wide): find
    # its plane among all 80 frames.
    planes = set()
    for s in range(10):
        for crop in np.asarray(fn(jnp.int32(s)))[..., 0]:
            hits = [
                (f, y)
                for f in range(80)
                for y in range(33)
                if np.array_equal(crop[:, 0], stack[f, y : y + 32, 32])
            ]
            assert len(hits) == 1
            planes.add(hits[0][0])
    assert planes == {50, 51, 52, 53}


# --- The user's own data -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_stack_pixel_types_are_kept(tmp_path, dtype):
    stack = (coded_stack(3, 40, 80) % 250).astype(dtype)
    c = tiny_config()
    c.data.source = "stack"
    c.data.path = write(tmp_path / "s.tif", stack)
    train, test = load_datasets(c.data)
    assert train.noisy.dtype == dtype and train.device_data()["noisy"].dtype == dtype
    np.testing.assert_array_equal(test.pair(2)[0], stack[2, :, :40])


def test_axes_from_metadata_and_explicit(tmp_path):
    arr = coded_stack(12, 40, 80).reshape(3, 4, 40, 80)
    c = tiny_config()
    c.data.source = "stack"
    c.data.path = write(tmp_path / "tzyx.tif", arr, imagej=True, metadata={"axes": "TZYX"})
    train, _ = load_datasets(c.data)
    assert len(train) == 12  # planes of T and Z, one by one
    np.testing.assert_array_equal(train.pair(5)[0], arr[1, 1, :, 40:])
    c.data.path = write(tmp_path / "q.tif", arr[0])  # no metadata: QYX
    c.data.axes = "ZYX"
    assert len(load_datasets(c.data)[0]) == 4
    c.data.axes = "YX"
    with pytest.raises(DataError, match=r"axes 'YX' \(data.axes\) name 2 dimensions.*3"):
        load_datasets(c.data)
    c.data.axes = ""
    c.data.path = write(tmp_path / "c.tif", arr[:, :2], metadata={"axes": "TCYX"})
    with pytest.raises(DataError, match=r"c\.tif: has 2 channels"):
        load_datasets(c.data)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((40, 80, 3), np.uint8), photometric="rgb")
    c.data.path = str(rgb)
    with pytest.raises(DataError, match=r"rgb\.tif: a colour"):
        load_datasets(c.data)


@pytest.mark.parametrize("n, compression", [(3, None), (4, None), (4, "zlib")])
def test_a_stack_of_3_or_4_planes_saved_as_rgb_planes_reads_as_planes_everywhere(
    tmp_path, n, compression
):
    """tifffile's default for an (n, H, W) array with n = 3 or 4 is one page of n planar samples
    marked RGB (axes SYX): training (read_tiff) and denoise (open_image, row by row)
    both read it as n planes; an interleaved colour image (YXS) is refused by both alike."""
    from clidim_jax.data.images import open_image
    from clidim_jax.data.tiff import read_tiff

    arr = np.random.default_rng(n).integers(0, 255, (n, 40, 72), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    # (written explicitly: tifffile plans to change that default)
    tifffile.imwrite(path, arr, photometric="rgb", planarconfig="separate", compression=compression)
    assert tifffile.TiffFile(path).pages[0].photometric == tifffile.PHOTOMETRIC.RGB
    np.testing.assert_array_equal(read_tiff(path), arr)
    with open_image(str(path)) as img:
        assert img.n_planes == n and img.plane_shape == (40, 72)
        np.testing.assert_array_equal(np.stack([img.plane(i) for i in range(n)]), arr)
        np.testing.assert_array_equal(img.rows(n - 1, 5, 9), arr[n - 1, 5:9])
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.moveaxis(arr, 0, -1), photometric="rgb")
    for read in (read_tiff, open_image):
        with pytest.raises(DataError, match=r"rgb\.tif: a colour \(RGB\) image, axes YXS"):
            read(str(rgb))


def paired_folders(tmp_path, names=("a", "b")):
    """Noisy stacks with, per name, either one clean image or one clean image per frame; the
    clean value is an exact function of the noisy one where they pair (clean = noisy / 2 + 1)."""
    rng = np.random.default_rng(1)
    nd, cd = tmp_path / "noisy", tmp_path / "clean"
    out = {}
    for k, name in enumerate(names):
        noisy = rng.integers(0, 4000, (3, 48, 64)).astype(np.uint16)
        clean = noisy.astype(np.float32) / 2 + 1
        if k == 0:
            clean = clean[:1]  # one ground truth for the three frames
        write(nd / f"{name}.tif", noisy)
        write(cd / f"{name}.tiff", clean)
        out[name] = (noisy, clean)
    return str(nd), str(cd), out


def test_paired_folders_matched_by_name(tmp_path):
    nd, cd, arrays = paired_folders(tmp_path)
    c = tiny_config()
    c.data.source = "paired"
    c.data.noisy_path, c.data.clean_path = nd, cd
    train, test = load_datasets(c.data)
    assert len(train) == len(test) == 6
    na, ca = arrays["a"]
    nb, cb = arrays["b"]
    for f in range(3):
        np.testing.assert_array_equal(train.pair(f)[0], na[f, :, 32:])
        np.testing.assert_array_equal(train.pair(f)[1], ca[0, :, 32:])
        np.testing.assert_array_equal(test.pair(3 + f)[0], nb[f, :, :32])
        np.testing.assert_array_equal(test.pair(3 + f)[1], cb[f, :, :32])


def test_paired_files_with_an_explicit_test_pair_of_another_size(tmp_path):
    rng = np.random.default_rng(2)
    noisy = rng.integers(0, 255, (4, 40, 40)).astype(np.uint8)
    c = tiny_config()
    c.data.source = "paired"
    c.data.noisy_path = write(tmp_path / "n.tif", noisy)
    c.data.clean_path = write(tmp_path / "c.tif", noisy.astype(np.float32) + 3)
    c.data.test_noisy_path = write(tmp_path / "tn.tif", noisy[:1, :36, :24])
    c.data.test_clean_path = write(tmp_path / "tc.tif", noisy[:1, :36, :24].astype(np.float32))
    train, test = load_datasets(c.data)
    assert len(train) == 4 and train.shape == (40, 40) and test.shape == (36, 24)
    np.testing.assert_array_equal(train.pair(3)[1], noisy[3].astype(np.float32) + 3)


def test_test_region_and_training_regions(tmp_path):
    stack = coded_stack(2, 96, 96)
    c = tiny_config()
    c.data.source = "stack"
    c.data.path = write(tmp_path / "s.tif", stack)
    c.data.test_region = "32:64,20:76"  # a centre block: training = the bands around it
    train, test = load_datasets(c.data)
    assert test.shape == (32, 56) and len(test) == 2
    sizes = {tuple(s) for s in train.sizes}
    assert sizes == {(32, 96)}  # the bands above and below; the parts beside it are 20 wide
    assert len(train) == 4
    c.data.train_regions = "0:32,:;64:,:"
    train2, _ = load_datasets(c.data)
    np.testing.assert_array_equal(train2.views, train.views)
    c.data.train_regions = "0:40,:"
    with pytest.raises(DataError, match=r"training region \[0:40, 0:96\] overlaps the test"):
        load_datasets(c.data)
    c.data.train_regions = ""
    c.data.test_region = "0:512"
    with pytest.raises(DataError, match="expected rows,columns"):
        load_datasets(c.data)


def test_lean_percentiles_equal_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    for k in range(50):
        imgs = [rng.integers(0, rng.integers(2, 65535), (rng.integers(1, 30), 17), np.uint16)]
        imgs.append(rng.integers(0, 9000, (5, 3), np.uint16))
        q = (0.1, 99.9) if k % 2 else tuple(rng.uniform(0, 100, 2))
        flat = np.concatenate([a.ravel() for a in imgs])
        assert percentiles(imgs, q) == tuple(float(v) for v in np.percentile(flat, q))
    f = [rng.normal(size=(7, 9)).astype(np.float32)]
    assert percentiles(f, (1.0, 99.0)) == tuple(float(v) for v in np.percentile(f[0], (1, 99)))


# --- Bad input: one clear error naming the file, before training, workdir untouched --------


def bad_inputs(tmp_path):
    """(config overrides, expected message) for every bad input of the issue."""
    ok = write(tmp_path / "ok.tif", coded_stack(3, 64, 64))
    narrow = write(tmp_path / "c.tif", np.zeros((1, 64, 48), np.float32))
    trunc = tmp_path / "truncated.tif"
    full = write(tmp_path / "full.tif", coded_stack(6, 64, 64))
    with open(full, "rb") as f:
        trunc.write_bytes(f.read()[:9000])
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00 definitely not a tiff")
    tifffile.imwrite(tmp_path / "line.tif", np.arange(9, dtype=np.uint16))  # 1-D: not an image
    nan = coded_stack(3, 64, 64).astype(np.float32)
    nan[1, 5, 5] = np.inf
    os.makedirs(tmp_path / "empty")
    nd, cd, _ = paired_folders(tmp_path / "pairs")
    os.remove(os.path.join(cd, "b.tiff"))
    stack = {"data.source": "stack"}
    paired = {"data.source": "paired"}
    return [
        ({**stack, "data.path": str(tmp_path / "missing.tif")}, "missing.tif: file not found"),
        ({**stack, "data.path": str(trunc)}, "truncated.tif: not a readable TIFF"),
        ({**stack, "data.path": str(tmp_path / "corrupt.tif")}, "corrupt.tif: not a readable"),
        ({**stack, "data.path": str(tmp_path / "line.tif")}, "line.tif: not an image"),
        ({**paired, "data.noisy_path": ok, "data.clean_path": narrow}, "is 64x48"),
        (
            {**stack, "data.path": write(tmp_path / "small.tif", coded_stack(3, 20, 64))},
            "smaller than data.patch_size=32",
        ),
        ({**stack, "data.path": write(tmp_path / "nan.tif", nan)}, "nan.tif: contains 1 NaN"),
        (
            {**paired, "data.noisy_path": str(tmp_path / "empty"), "data.clean_path": cd},
            "empty: an empty folder",
        ),
        ({**paired, "data.noisy_path": nd, "data.clean_path": cd}, "1 without a clean image"),
        (
            {**stack, "data.path": write(tmp_path / "one.tif", coded_stack(1, 64, 64))},
            "one.tif: a stack of 1 frame cannot give a ground truth",
        ),
        ({**stack, "data.path": ok, "data.n_samples": 4}, "n_samples=4 is larger than the 3"),
    ]


def test_every_bad_input_is_one_error_before_training(tmp_path):
    for overrides, message in bad_inputs(tmp_path):
        c = tiny_config()
        for k, v in overrides.items():
            section, field = k.split(".")
            c[section][field] = v
        with pytest.raises(DataError, match=None) as e:
            load_splits(c.data, batch_size=2)
        assert message in str(e.value), (overrides, str(e.value))
        assert "\n" not in str(e.value)


def test_cli_bad_input_exits_2_with_one_line_and_leaves_the_workdir_alone(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("kept")
    cases = bad_inputs(tmp_path / "inputs")
    for overrides, message in cases[:3] + cases[-3:]:
        flags = [f"--config.{k}={v}" for k, v in overrides.items()]
        flags += ["--config.data.patch_size=32", "--config.model.depth=4"]
        assert cli.main(["train", f"--workdir={workdir}", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
        assert sorted(os.listdir(workdir)) == ["notes.txt"]
        assert (workdir / "notes.txt").read_text() == "kept"


# --- End to end through the command line, and the host-memory bound ---------------------------

# (the pixel variant, L1 alone: these tests are about the data, and its program compiles in a
# fraction of the full method's time)
TINY = [
    f"{TINY_FLAGS[0]},variant=pixel", "--config.train.n_epochs=1",
    "--config.eval.baseline_sigmas=(1.0,)",
]  # fmt: skip


@pytest.mark.slow
def test_train_end_to_end_on_a_stack_and_on_paired_folders(tmp_path, capsys):
    # (the command's `main` in this process: the data plumbing is under test here; the
    # command's own process, exit statuses and messages are test_cli's and test_cli_errors')
    stack = write(tmp_path / "stack.tif", coded_stack(4, 64, 96).astype(np.float32))
    assert cli.main([
        "train", f"--workdir={tmp_path}/s", *TINY, "--config.data.source=stack",
        f"--config.data.path={stack}", "--config.data.test_region=:,:32",
    ]) == 0  # fmt: skip
    r = json.loads((tmp_path / "s" / "eval.json").read_text())
    assert r["dataset"] == "stack.tif" and r["n_images"] == 4 and np.isfinite(r["output"]["psnr"])
    nd, cd, arrays = paired_folders(tmp_path / "pairs")
    tn, tc = tmp_path / "test" / "noisy", tmp_path / "test" / "clean"  # two sizes
    for name, (h, w) in (("x", (40, 56)), ("y", (48, 64))):
        noisy, clean = arrays["b"]
        write(tn / f"{name}.tif", noisy[:, :h, :w])
        write(tc / f"{name}.tif", clean[:, :h, :w])
    assert cli.main([
        "train", f"--workdir={tmp_path}/p", *TINY, "--config.data.source=paired",
        f"--config.data.noisy_path={nd}", f"--config.data.clean_path={cd}",
        f"--config.data.test_noisy_path={tn}", f"--config.data.test_clean_path={tc}",
    ]) == 0  # fmt: skip
    r = json.loads((tmp_path / "p" / "eval.json").read_text())
    assert r["dataset"] == "noisy" and r["n_images"] == 6 and np.isfinite(r["output"]["psnr"])
    meta = json.loads((tmp_path / "p" / "config.json").read_text())
    assert meta["n_train_images"] == 6 and (tmp_path / "p" / "eval.png").exists()


MEMORY_WORKER = """
import resource, sys, numpy as np, tifffile
from clidim_jax.config_lib import apply_variant, base_config
from clidim_jax.train import train
c = base_config()
apply_variant(c, "pixel")  # (memory of the data, not of the method: the cheapest program)
c.model.depth, c.model.ngf, c.model.ndf, c.data.patch_size = 4, 8, 8, 32
c.train.batch_size, c.train.steps_per_epoch, c.train.n_epochs, c.train.n_epochs_decay = 2, 2, 1, 0
c.data.source, c.data.path = "stack", sys.argv[1]
train(c, sys.argv[2])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_a_100_frame_1024_uint16_stack_trains_within_twice_its_size(tmp_path):
    """Peak resident memory of training on a 100 x 1024 x 1024 uint16 stack (200 MiB) minus that
    of the same run on a tiny stack: the data may cost at most 2x the stack's size (the stack
    read once, the training region copied once to the device: 1.5x here)."""
    big = coded_stack(100, 1024, 1024)
    nbytes = big.nbytes
    write(tmp_path / "big.tif", big)
    write(tmp_path / "small.tif", big[:100, :64, :64])
    del big
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    peaks = {}
    for name in ("small", "big"):
        p = subprocess.run(
            [sys.executable, "-c", MEMORY_WORKER, str(tmp_path / f"{name}.tif"),
             str(tmp_path / f"run_{name}")],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        peaks[name] = int(p.stdout.split()[-1])
    extra = peaks["big"] - peaks["small"]
    mib = 2**20
    print(f"peak RSS {peaks}: data cost {extra / mib:.0f} MiB, stack {nbytes / mib:.0f} MiB")
    assert extra <= 2 * nbytes, (extra, nbytes)
