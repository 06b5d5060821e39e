"""Evaluation: top-1 / top-5 accuracy and loss over a split, summed over all ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.dist import all_reduce_sum


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader: DataLoader, device: torch.device,
             autocast_dtype: torch.dtype | None = None, input_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Evaluates ``net`` on this rank's share of a split and reduces the counts over ranks.

    Args:
        net: The (unwrapped) model; it is put in eval mode and back.
        loader: Batches of ``(B×3×H×W images, B labels)``.
        device: Where the model lives.
        autocast_dtype: bf16 for mixed-precision evaluation, None for fp32.
        input_dtype: dtype the inputs are cast to (bf16 for DeepSpeed's bf16 mode).

    Returns:
        ``{"top1", "top5"}`` in percent, ``"loss"`` (mean cross-entropy) and ``"samples"`` (global count).
    """
    was_training = net.training
    net.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    for images, labels in loader:
        images, labels = images.to(device, input_dtype, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = net(images)  # B×classes
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices  # B×5
        hits = topk.eq(labels[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += labels.numel()
    net.train(was_training)
    correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count])
    n = max(count, 1.0)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "samples": count}
