"""Evaluation: top-1 / top-5 accuracy and loss over a split, summed over all ranks; ``evaluate_run``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.build import build_model
from pipeline.config_io import load_config
from pipeline.data.loaders import build_eval
from pipeline.dist import all_reduce_sum
from pipeline.rundir import RunError, config_of


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]], device: torch.device,
             autocast_dtype: torch.dtype | None = None, input_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Evaluates ``net`` on this rank's share of a split and reduces the counts over ranks.

    Args:
        net: The (unwrapped) model; it is put in eval mode and back.
        loader: Batch-contract dicts: ``input`` (B×3×H×W images, B×3×T×H×W clips, or B×V×3×T×H×W
            multi-view clips whose V views' softmax scores are averaged) and ``label`` (B).
        device: Where the model lives.
        autocast_dtype: bf16 for mixed-precision evaluation, None for fp32.
        input_dtype: dtype the inputs are cast to (the engine's ``input_dtype``: bf16 where it holds bf16 weights).

    Returns:
        ``{"top1", "top5"}`` in percent, ``"loss"`` (mean cross-entropy) and ``"samples"`` (global count).
    """
    was_training = net.training
    net.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    for batch in loader:
        inputs, labels = batch["input"].to(device, input_dtype), batch["label"].to(device)
        views = inputs.shape[1] if inputs.dim() == 6 else 0
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = net(inputs.flatten(0, 1) if views else inputs).float()  # (B·V)×classes
        if views:  # average the views' probabilities; the loss is taken on their log
            logits = logits.softmax(-1).view(labels.numel(), views, -1).mean(1).log()
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


def evaluate_run(run_dir: Path, weights: str | None, split: str | None, overrides: list[str]) -> dict[str, Any]:
    """Builds a run's model from its resolved config, loads weights strictly and evaluates a split here.

    Args:
        run_dir: The run directory (holds ``config.toml``).
        weights: Weights file (default: ``<run_dir>/final/model.safetensors``).
        split: Split to evaluate (default: the config's ``data.val_split``).
        overrides: ``--section.key=value`` items applied over the run's config.

    Returns:
        ``{"top1", "top5", "loss", "samples", "split", "weights"}``.

    Raises:
        RunError: When ``run_dir`` is not a run directory or the weights file is missing.
    """
    cfg = load_config(config_of(run_dir), overrides)
    weights_path = Path(weights) if weights else run_dir / "final" / "model.safetensors"
    if not weights_path.is_file():
        raise RunError(f"weights {weights_path} not found")
    split = split or cfg.data.val_split
    net = build_model(cfg, weights=weights_path)
    cpu = torch.device("cpu")
    result = evaluate(net, build_eval(cfg, split, rank=0, world_size=1, device=cpu), cpu)
    return {**result, "split": split, "weights": str(weights_path)}
