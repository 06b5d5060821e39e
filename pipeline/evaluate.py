"""Evaluation: top-1 / top-5 accuracy and loss over a split, summed over all ranks; ``evaluate_run``.

Every rank runs the same number of forward passes, whatever its share of the split: before each
batch the ranks agree (one small all-reduce) whether any of them still has data and what its input
shape is; a rank whose share is exhausted runs a one-sample zero batch whose results are masked out.
Engines that gather weights inside the forward (DeepSpeed ZeRO-3) therefore never wait on a rank that
has stopped, and the metrics still count every validation sample exactly once.

A result is reported only when the samples evaluated (summed over ranks) are the samples the loader expects
(``dataset.json``'s count, less shards left out under ``data.on_bad_shard = "skip"``); otherwise every rank
raises the same one-line :class:`~pipeline.data.shards.LoaderError`: ``vitpipe eval`` exits 2, and training
stops (exit 2) rather than log a ``val/*`` metric over part of the split. ``vitpipe eval`` is always strict
about bad shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.build import build_model
from pipeline.config_io import load_config
from pipeline.data.loaders import build_eval
from pipeline.data.shards import LoaderError
from pipeline.dist import all_reduce_max, all_reduce_sum
from pipeline.rundir import RunError, config_of

#: Input dimensions the shape agreement carries: B×V×3×T×H×W at most (multi-view video).
_MAX_DIMS = 6


def lockstep(loader: Iterable[dict[str, torch.Tensor]]) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """This rank's batches, padded so that every rank yields the same number.

    Yields:
        ``(batch, real)``: this rank's next batch with ``real=True``; once it has none left while another
        rank still has some, a one-sample zero batch of that rank's input shape with ``real=False``.
    """
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        shape = _agreed_shape(batch)
        if shape is None:  # no rank has a batch left
            return
        if batch is not None:
            yield batch, True
        else:
            yield {"input": torch.zeros((1, *shape[1:])), "label": torch.zeros(1, dtype=torch.int64)}, False


def _agreed_shape(batch: dict[str, torch.Tensor] | None) -> tuple[int, ...] | None:
    """The input shape of some rank's next batch (None: every rank is done); one all-reduce per call."""
    mine = [0] * (2 + _MAX_DIMS)
    if batch is not None:
        dims = list(batch["input"].shape)
        mine = [1, len(dims), *dims, *[0] * (_MAX_DIMS - len(dims))]
    agreed = all_reduce_max(mine)
    if not agreed[0]:
        return None
    return tuple(agreed[2 : 2 + agreed[1]])


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]], device: torch.device,
             autocast_dtype: torch.dtype | None = None, input_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Evaluates ``net`` on this rank's share of a split and reduces the counts over ranks.

    Every rank runs the same number of forward passes (:func:`lockstep`), so it is safe under engines
    that gather weights inside the forward.

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
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, count; on the device
    for batch, real in lockstep(loader):
        inputs, labels = batch["input"].to(device, input_dtype), batch["label"].to(device)
        views = inputs.shape[1] if inputs.dim() == 6 else 0
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = net(inputs.flatten(0, 1) if views else inputs).float()  # (B·V)×classes
        if not real:  # a padding pass: this rank's share is done, another rank's is not
            continue
        if views:  # average the views' probabilities; the loss is taken on their log
            logits = logits.softmax(-1).view(labels.numel(), views, -1).mean(1).log()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices  # B×5
        hits = topk.eq(labels[:, None])
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), F.cross_entropy(logits, labels, reduction="sum"),
                             labels.new_full((), labels.numel())]).double()
    net.train(was_training)
    correct1, correct5, loss_sum, count = all_reduce_sum(sums.tolist())
    _check_complete(loader, count)
    n = max(count, 1.0)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "samples": count}


def _check_complete(loader: Iterable[dict[str, torch.Tensor]], count: float) -> None:
    """Refuses a result that did not cover every expected sample (the same count on every rank: all raise).

    Raises:
        LoaderError: When the loader knows its expected count and another number was evaluated.
    """
    expected = int(getattr(loader, "expected_samples", -1))
    if expected >= 0 and int(count) != expected:
        split = getattr(loader, "split", "") or "the split"
        raise LoaderError(f"{split}: evaluated {int(count)} samples, dataset.json lists {expected}: no metric "
                          "reported (a shard is damaged, or samples failed to decode)")


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
    result = evaluate(net, build_eval(cfg, split, rank=0, world_size=1, device=cpu, strict=True), cpu)
    return {**result, "split": split, "weights": str(weights_path)}
