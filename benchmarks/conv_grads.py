"""Per-layer forward, input-gradient and weight-gradient times of the 4x4 convolutions of the
reference networks (unet_256 + PatchGAN at 256x256), lax autodiff against clidim_jax's custom VJPs.

    PYTHONPATH=. python benchmarks/conv_grads.py [--batch-size 4] [--repeats 5] [--only down|up]

Each figure is the best of `--repeats` calls of one jitted function (forward, x-gradient or
kernel-gradient alone), in milliseconds; "ours" must agree with "lax" (the relative difference
of value and both gradients is printed). Run it on an idle machine: the figures are per op.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clidim_jax.compiler import compiler_options
from clidim_jax.models.layers import conv_4x4, conv_transpose_4x4_s2

_DN = ("NHWC", "HWIO", "NHWC")


def lax_conv(stride: int):
    def f(x, k):
        return lax.conv_general_dilated(
            x, k, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=_DN
        )

    return f


def ours_conv(stride: int):
    def f(x, k):
        return conv_4x4(x, k, stride)

    return f


def lax_conv_transpose(x, k):
    return lax.conv_transpose(x, k, (2, 2), ((2, 2), (2, 2)), dimension_numbers=_DN)


def best_ms(fn, *args, repeats: int) -> float:
    compiled = jax.jit(fn, compiler_options=compiler_options()).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def time_layer(fn, x, k, dy, repeats: int) -> np.ndarray:
    fwd = best_ms(fn, x, k, repeats=repeats)
    gx = best_ms(
        lambda x, k, dy: jax.vjp(lambda x: fn(x, k), x)[1](dy)[0], x, k, dy, repeats=repeats
    )
    gw = best_ms(
        lambda x, k, dy: jax.vjp(lambda k: fn(x, k), k)[1](dy)[0], x, k, dy, repeats=repeats
    )
    return np.array([fwd, gx, gw])


def max_rel_diff(f, g, x, k, dy) -> float:
    # x, k and dy are arguments, not closed-over constants: XLA would constant-fold the
    # convolutions at compile time (tens of seconds for the large layers).
    def vg(fn, x, k, dy):
        y, vjp = jax.vjp(fn, x, k)
        return (y, *vjp(dy))

    a = jax.jit(lambda *args: vg(f, *args))(x, k, dy)
    b = jax.jit(lambda *args: vg(g, *args))(x, k, dy)
    return max(float(jnp.max(jnp.abs(p - q)) / (jnp.max(jnp.abs(q)) + 1e-30)) for p, q in zip(a, b))


def layers(batch: int):
    """(name, x shape, kernel shape, output shape, lax reference, ours) of each 4x4 conv."""
    out = []
    chans = [1, 64, 128, 256, 512, 512, 512, 512, 512]
    h = 256
    for i in range(8):
        ci, co = chans[i], chans[i + 1]
        out.append(
            (f"G down{i}", (batch, h, h, ci), (4, 4, ci, co), (batch, h // 2, h // 2, co), 2)
        )
        h //= 2
    for name, h, ci, co, s in [
        ("D conv0", 256, 2, 64, 2),
        ("D conv1", 128, 64, 128, 2),
        ("D conv2", 64, 128, 256, 2),
        ("D conv3", 32, 256, 512, 1),
        ("D conv4", 31, 512, 1, 1),
    ]:
        ho = h // 2 if s == 2 else h - 1
        out.append((name, (batch, h, h, ci), (4, 4, ci, co), (batch, ho, ho, co), s))
    rows = [(name, xs, ks, ys, lax_conv(s), ours_conv(s)) for name, xs, ks, ys, s in out]
    cin = [512, 1024, 1024, 1024, 1024, 512, 256, 128]
    cout = [512, 512, 512, 512, 256, 128, 64, 1]
    h = 1
    for j in range(8):
        xs, ks = (batch, h, h, cin[j]), (4, 4, cin[j], cout[j])
        rows.append(
            (
                f"G up{7 - j}",
                xs,
                ks,
                (batch, 2 * h, 2 * h, cout[j]),
                lax_conv_transpose,
                conv_transpose_4x4_s2,
            )
        )
        h *= 2
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["down", "up"], default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    totals = {"lax": np.zeros(3), "ours": np.zeros(3)}
    header = f"{'layer':10s} {'x shape':22s} {'impl':5s} {'fwd ms':>8s} {'dx ms':>8s} {'dk ms':>8s}"
    print(header + "  rel diff")
    for name, xs, ks, ys, ref, ours in layers(args.batch_size):
        if args.only and (("up" in name) != (args.only == "up")):
            continue
        x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
        k = jnp.asarray(0.02 * rng.standard_normal(ks), jnp.float32)
        dy = jnp.asarray(rng.standard_normal(ys), jnp.float32)
        diff = max_rel_diff(ours, ref, x, k, dy)
        for impl, fn in (("lax", ref), ("ours", ours)):
            t = time_layer(fn, x, k, dy, args.repeats)
            totals[impl] += t
            extra = f"  {diff:.1e}" if impl == "ours" else ""
            print(
                f"{name:10s} {xs!s:22s} {impl:5s} {t[0]:8.1f} {t[1]:8.1f} {t[2]:8.1f}{extra}",
                flush=True,
            )
    for impl, t in totals.items():
        print(f"{'total':10s} {'':22s} {impl:5s} {t[0]:8.1f} {t[1]:8.1f} {t[2]:8.1f}")


if __name__ == "__main__":
    main()
