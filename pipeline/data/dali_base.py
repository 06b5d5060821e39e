"""What both DALI graphs (images and video) share besides the sample reader: the RandAugment spec.

Samples reach DALI through :mod:`pipeline.data.reader` (byte ranges from the split manifest, ``pread``
through a bounded set of open files) and ``fn.external_source``; the ``.idx`` files beside the tars are
for DALI's own webdataset reader and for ``vitpipe prep verify``, not read by the loaders.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)


def parse_randaugment(config: str) -> tuple[int, int]:
    """``rand-m9-n2-mstd0.5-inc1`` → ``(n, m)``; DALI has no magnitude noise (``mstd``), logged once."""
    fields = dict(re.findall(r"(mstd|inc|m|n|w|p)([\d.]+)", config))
    if "mstd" in fields and float(fields["mstd"]) > 0:
        logger.info("dali RandAugment: magnitude noise mstd=%s is not available in DALI; using a fixed m",
                    fields["mstd"])
    return int(fields.get("n", 2)), int(float(fields.get("m", 9)))
