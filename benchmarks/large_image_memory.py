"""Peak memory of `clidim-jax denoise` on one huge plane: a SIZE x SIZE uint16 tiled TIFF
(16384 x 16384 = 512 MiB by default) denoised through the real command, TIFF -> TIFF and
TIFF -> OME-Zarr, each measured with `/usr/bin/time -v` (Maximum resident set size).

    clidim-jax train --workdir /tmp/io_tiny --config=demo:tiny        # a tiny model (~20 s)
    python benchmarks/large_image_memory.py --workdir /tmp/io_tiny --root /tmp/large_image

The input is written tile by tile (never held whole): a smooth pattern plus Poisson noise, in the
intensity range of the demo data (the TIRF stack: about 85 to 141 counts). Each run's figures
are printed as a table and written to ROOT/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import tifffile


def write_plane(path: str, size: int, tile: int = 512, seed: int = 0) -> None:
    """A SIZE x SIZE uint16 TIFF in TILE x TILE tiles, generated one tile at a time."""
    rng = np.random.default_rng(seed)

    def tiles():
        yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32)
        for y0 in range(0, size, tile):
            for x0 in range(0, size, tile):
                clean = 110 + 25 * np.sin((yy + y0) / 37.0) * np.cos((xx + x0) / 53.0)
                yield rng.poisson(np.maximum(clean, 1.0)).astype(np.uint16)

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            tiles(),
            shape=(size, size),
            dtype=np.uint16,
            tile=(tile, tile),
            resolution=(1 / 0.065, 1 / 0.065),
            resolutionunit="CENTIMETER",
            metadata={"axes": "YX"},
        )


def measure(args: list[str]) -> dict:
    """Runs `clidim-jax ARGS` under /usr/bin/time -v: peak RSS, wall time, exit status."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "clidim_jax", *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if p.returncode != 0 or m is None:
        tail = p.stderr[-3000:]
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{tail}")
    return {
        "command": "clidim-jax " + " ".join(args),
        "max_rss_mib": int(m.group(1)) / 1024,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a trained run (e.g. demo:tiny)")
    ap.add_argument("--root", default="/tmp/large_image", help="where input and outputs go")
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--outputs", default="tif,zarr", help="comma-separated: tif, zarr")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (they are large)")
    a = ap.parse_args()
    os.makedirs(a.root, exist_ok=True)
    src = os.path.join(a.root, f"demo_range_plane_{a.size}.tif")
    if not os.path.exists(src):
        t0 = time.perf_counter()
        write_plane(src, a.size)
        print(f"wrote {src} ({os.path.getsize(src) / 2**20:.0f} MiB, "
              f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr)  # fmt: skip
    rows = []
    for ext in a.outputs.split(","):
        out = os.path.join(a.root, f"denoised_{a.size}.{ext}")
        if os.path.isdir(out):
            shutil.rmtree(out)
        elif os.path.exists(out):
            os.remove(out)
        r = measure(["denoise", src, out, f"--workdir={a.workdir}", "--noprogress"])
        r["output"] = ext
        rows.append(r)
        print(f"{ext:5s} max RSS {r['max_rss_mib']:8.0f} MiB  {r['wall_s']:7.1f} s  {r['command']}")
        if not a.keep:
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    result = {
        "size": a.size,
        "input_mib": a.size * a.size * 2 / 2**20,
        "workdir": a.workdir,
        "runs": rows,
    }
    with open(os.path.join(a.root, "memory.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
