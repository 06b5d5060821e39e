"""Optimizer with no-decay parameter groups, and the per-step warm-up + cosine schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from pipeline.config import OptimCfg, ScheduleCfg

logger = logging.getLogger(__name__)


def peak_lr(cfg: OptimCfg, global_batch: int) -> float:
    """The peak learning rate, scaled linearly by the global batch when ``lr_base_batch`` is set."""
    if cfg.lr_base_batch <= 0:
        return cfg.lr
    lr = cfg.lr * global_batch / cfg.lr_base_batch
    logger.info("peak lr %.3g = %.3g × global batch %d / %d", lr, cfg.lr, global_batch, cfg.lr_base_batch)
    return lr


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Splits parameters into decayed (matrices, kernels) and undecayed (biases, norms, tokens).

    The model's own ``no_weight_decay()`` hook, when it has one, adds names to the undecayed set.
    """
    skip = set(net.no_weight_decay()) if hasattr(net, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_decay_groups(net: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Groups by depth through the model's ``group_matcher`` hook, each with its ``lr_scale`` (timm's rule)."""
    from timm.optim._param_groups import param_groups_layer_decay

    skip = set(net.no_weight_decay()) if hasattr(net, "no_weight_decay") else set()
    return param_groups_layer_decay(net, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)


def build_optimizer(net: torch.nn.Module, cfg: OptimCfg, lr: float) -> torch.optim.Optimizer:
    """Builds the optimizer over :func:`param_groups` (or :func:`layer_decay_groups`)."""
    if cfg.layer_decay and cfg.layer_decay < 1:
        groups = layer_decay_groups(net, cfg.weight_decay, cfg.layer_decay)
        for g in groups:  # the scheduler scales each group's own peak
            g["lr"] = lr * g["lr_scale"]
    else:
        groups = param_groups(net, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.betas[0], nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, cfg: ScheduleCfg) -> float:
    """Learning rate after ``step`` optimizer steps: linear warm-up, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return cfg.warmup_lr + (peak - cfg.warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleCfg, steps_per_epoch: int, peak: float) -> LambdaLR:
    """A per-step scheduler following :func:`lr_at` over ``epochs × steps_per_epoch`` steps."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return LambdaLR(opt, lambda step: lr_at(step, total, warmup, peak, cfg) / peak)
