"""`python -m clidim_jax` is the `clidim-jax` command."""

import sys

from clidim_jax.cli import entry

sys.exit(entry())
