"""XLA compiler options: only known options are used, and they change speed, not results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clidim_jax import compiler
from clidim_jax.models import PatchGANDiscriminator, UNetGenerator


def test_unknown_options_are_rejected_and_known_ones_accepted() -> None:
    assert not compiler.accepts({"xla_cpu_no_such_option": True})
    assert not compiler.accepts({"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
    assert compiler.accepts({"xla_cpu_copy_insertion_use_region_analysis": True})
    options = compiler.compiler_options(jax.devices("cpu")[0])
    assert options["xla_cpu_copy_insertion_use_region_analysis"] is True
    assert compiler.accepts(options)
    if compiler.accepts({"xla_cpu_experimental_ynn_fusion_type": compiler.CPU_LIBRARY_FUSIONS}):
        assert options["xla_cpu_experimental_ynn_fusion_type"] == compiler.CPU_LIBRARY_FUSIONS


@pytest.mark.slow
def test_options_keep_values_and_gradients() -> None:
    """G and D in train mode, value and parameter gradients, with and without the options (the
    convolutions move between YNNPACK and XLA's own): equal to float32 rounding."""
    g, d = UNetGenerator(depth=3, ngf=8), PatchGANDiscriminator(ndf=8)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)), jnp.float32)
    vg = g.init(jax.random.key(0), x, train=False)
    vd = d.init(jax.random.key(1), jnp.concatenate([x, x], -1), train=False)

    def loss(pg, pd):
        y, _ = g.apply(
            {**vg, "params": pg},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(2)},
        )
        logits, _ = d.apply(
            {**vd, "params": pd}, jnp.concatenate([x, y], -1), train=True, mutable=["batch_stats"]
        )
        return jnp.mean(jnp.square(logits)) + jnp.mean(jnp.abs(y - x))

    fn = jax.value_and_grad(loss, argnums=(0, 1))
    ours = jax.jit(fn, compiler_options=compiler.compiler_options())(vg["params"], vd["params"])
    plain = jax.jit(fn)(vg["params"], vd["params"])
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
