"""The training objective: cross-entropy on the batch's labels, or on its soft targets after mixup/CutMix."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from pipeline.config import LossCfg

Objective = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
"""``loss = objective(logits, batch)``: a scalar from B×classes logits and a batch-contract dict."""


def classification_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor],
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of a batch, computed in fp32.

    Args:
        logits: B×classes, any float dtype.
        batch: ``label`` (B, int64) and, with mixup/CutMix, ``target`` (B×classes soft targets that
            sum to 1, label smoothing already in them), which then replaces the labels.
        label_smoothing: Smoothing of the hard labels (not applied to ``target``).

    Returns:
        The scalar loss.
    """
    logits = logits.float()
    if "target" in batch:
        return torch.sum(-batch["target"] * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, batch["label"], label_smoothing=label_smoothing)


def build_objective(cfg: LossCfg) -> Objective:
    """The run's loss function (``[loss]`` section)."""
    return partial(classification_loss, label_smoothing=cfg.label_smoothing)
