"""`clidim-jax` with the commit of one checkpoint save held open, so that a test can kill the
process while that save is in flight (test_resume). Usage:

    python tests/held_save_cli.py STEP:SECONDS train --workdir ...

Orbax writes a save into `<step>.orbax-checkpoint-tmp-*` and renames it in `finalize`; this
delays that rename for the given step (the data are written, not committed)."""

import asyncio
import sys

from orbax.checkpoint.path import atomicity

STEP, SECONDS = sys.argv[1].split(":")
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def held_finalize(self, *args, **kwargs):
    if self.get_final().name == STEP:
        print(f"holding the save of step {STEP} open", flush=True)
        await asyncio.sleep(float(SECONDS))
    return await _finalize(self, *args, **kwargs)


atomicity.AtomicRenameTemporaryPath.finalize = held_finalize

if __name__ == "__main__":
    from clidim_jax.cli import main

    sys.exit(main(sys.argv[2:]))
