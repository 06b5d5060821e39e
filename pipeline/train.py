"""Training entry point: ``python -m pipeline.train RECIPE [--section.key=value ...]``.

Launch it directly (one process), under ``torchrun --nproc_per_node N`` or under ``srun``; rank and
world size come from the launcher's environment. ``vitpipe train`` calls :func:`run`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from pipeline.config_io import load_config
from pipeline.dist import world_info_from_env
from pipeline.log import setup_logging

logger = logging.getLogger(__name__)


def run(recipe: str | None, overrides: list[str]) -> dict[str, Any]:
    """Loads the config, trains and tears down.

    Args:
        recipe: Recipe TOML path (None: defaults only).
        overrides: ``--section.key=value`` items.

    Returns:
        The run summary.
    """
    cfg = load_config(recipe, overrides)
    setup_logging(world_info_from_env().rank, None, cfg.run.log_level)
    from pipeline.trainer import Trainer  # heavy imports only after the config is known to be valid

    trainer = Trainer(cfg, Path(recipe).stem if recipe else "run")
    try:
        return trainer.fit()
    finally:
        trainer.acc.end_training()


def main(argv: list[str] | None = None) -> int:
    """Command-line wrapper of :func:`run` with one-line user errors."""
    from vitpipe.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
