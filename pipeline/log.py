"""Logging, configured once per process and filtered by rank at the handlers.

Rank 0 logs to the console (stderr) and to ``<run dir>/log.rank0.txt``; every other rank logs to
its own ``log.rank{N}.txt`` and sends only errors to the console, so a failing rank is still seen.
Library modules only ever do ``logger = logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname).1s [rank{rank}] %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"
_OWNED = "_vitpipe_handler"


def setup_logging(rank: int = 0, log_dir: str | Path | None = None, level: str = "INFO") -> None:
    """Configures the root logger for this process; calling it again replaces vitpipe's handlers.

    Args:
        rank: Global rank of this process.
        log_dir: Directory for the per-rank log file; None logs to the console only.
        level: Level name for vitpipe's handlers.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OWNED, False)]:
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter(_FORMAT.format(rank=rank), _DATEFMT)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level if rank == 0 else logging.ERROR)
    handlers: list[logging.Handler] = [console]
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(log_dir) / f"log.rank{rank}.txt")
        file.setLevel(level)
        handlers.append(file)
    for handler in handlers:
        handler.setFormatter(fmt)
        setattr(handler, _OWNED, True)
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "alembic", "PIL", "matplotlib", "filelock", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
