"""The local launcher: ``torchrun`` on this machine for ``--nproc-per-node`` N > 1."""

from __future__ import annotations

import logging
import subprocess
import sys

logger = logging.getLogger("vitpipe")


def torchrun(nproc: int, module_args: list[str]) -> int:
    """Runs ``python -m torch.distributed.run --standalone --nproc_per_node N <module args>`` here.

    Args:
        nproc: Processes to start.
        module_args: What torchrun runs, e.g. ``["-m", "pipeline.train", RECIPE, *overrides]``.

    Returns:
        torchrun's exit status.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *module_args]
    logger.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)
