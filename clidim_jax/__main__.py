"""`python -m clidim_jax` is the `clidim-jax` command."""

import sys

from clidim_jax.cli import main

sys.exit(main())
