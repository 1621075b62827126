"""`clidim-jax benchmark`: the figures it reports exist, are consistent and come from XLA."""

import json

import pytest
from conftest import TINY_FLAGS

from clidim_jax import cli

pytestmark = pytest.mark.slow  # every test here trains or runs the CLI end to end

TINY = TINY_FLAGS
KEYS = (
    "compile_s",
    "step_s",
    "images_per_s",
    "flops_per_step",
    "achieved_flops_per_s",
    "peak_flops_per_s",
    "utilization",
    "peak_rss_bytes",
    "params_g",
    "params_d",
    "devices",
)


@pytest.mark.parametrize("mode", ["train", "denoise"])
def test_benchmark_reports_every_figure(tmp_path, capsys, mode):
    out = tmp_path / "b.json"
    assert cli.main(["benchmark", *TINY, "--steps=2", f"--json={out}", f"--mode={mode}"]) == 0
    r = json.loads(out.read_text())
    for k in KEYS:
        assert k in r, k
    # by hand: G 128+2048+32+8192+64+32768 down, 32768+64+16384+32+4096+16+256+1 up;
    # D 264+2080+8256+32896+1025
    assert r["params_g"] == 96_849 and r["params_d"] == 44_521
    assert r["flops_per_step"] > 1e6 and r["compile_s"] > 0 and r["step_s"] > 0
    assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"])
    assert r["utilization"] == pytest.approx(r["achieved_flops_per_s"] / r["peak_flops_per_s"])
    assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
    if mode == "denoise":
        assert r["megapixels_per_s"] == pytest.approx(1024 * 1024 / 1e6 / r["step_s"])
    else:
        assert r["images_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["memory_analysis"]["temp_size_in_bytes"] > 0
    assert "GFLOP/s" in capsys.readouterr().out
