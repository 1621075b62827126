"""Experiment presets (ml_collections `get_config()` files); packaged as `clidim_jax.configs`."""
