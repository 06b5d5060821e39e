"""Offline dataset preparation for vitpipe: ImageFolder trees -> WebDataset shards.

Modules:
    scan: ImageFolder scanning (class list and samples).
    probe: header-only image inspection with PIL.
    tarwrite: deterministic tar writer that also writes the DALI ``.idx`` index.
    shard: split -> shards + parquet manifest + ``dataset.json``.
    cli: the ``vitpipe prep`` command.

Heavy dependencies (numpy, pyarrow, PIL) are imported by the submodules only.
"""

from data_prep.errors import PrepError

__all__ = ["PrepError"]
