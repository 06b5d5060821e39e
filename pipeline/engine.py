"""The distributed engine seam: the only place that wraps the model for data-parallel training.

accelerate's ``Accelerator`` is the engine. Loaders are *not* passed through it: they shard
themselves by rank (:mod:`pipeline.data_wds`). The order of wrapping is fixed here:
process group → model on device → DDP wrapper (accelerate) → optimizer bound to it.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from pipeline.config import EngineCfg
from pipeline.dist import world_info_from_env

logger = logging.getLogger(__name__)


def build_accelerator(cfg: EngineCfg) -> Accelerator:
    """Creates the accelerator and, under a launcher, the process group.

    NCCL is used on GPU machines and gloo on CPUs unless ``cfg.dist_backend`` names one.
    """
    use_cuda = torch.cuda.is_available()
    if not use_cuda:  # DeepSpeed (imported by accelerate) otherwise warns in every process that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
    launched = world_info_from_env().world_size > 1
    # A backend named for a single un-launched process makes accelerate expect a process group.
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=30))] if launched else []
    acc = Accelerator(cpu=not use_cuda, mixed_precision=cfg.mixed_precision,
                      gradient_accumulation_steps=cfg.grad_accum_steps, kwargs_handlers=handlers)
    logger.info("engine: %s, %d process(es), device %s, precision %s", acc.distributed_type,
                acc.num_processes, acc.device, cfg.mixed_precision)
    return acc
