"""The training objective against the formulas the trainer used to compute inline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import LossCfg
from pipeline.objective import build_objective, classification_loss


def _batch(soft: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    batch = {"label": torch.randint(0, 5, (6,), generator=g)}
    if soft:
        batch["target"] = torch.softmax(torch.randn(6, 5, generator=g), dim=-1)  # sums to 1 per row
    return logits, batch


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_hard_labels_are_cross_entropy_with_label_smoothing(smoothing: float) -> None:
    logits, batch = _batch(soft=False)
    expected = F.cross_entropy(logits.float(), batch["label"], label_smoothing=smoothing)
    assert torch.equal(classification_loss(logits, batch, smoothing), expected)
    assert torch.equal(build_objective(LossCfg(label_smoothing=smoothing))(logits, batch), expected)


def test_soft_targets_replace_the_labels_and_their_smoothing() -> None:
    logits, batch = _batch(soft=True)
    expected = torch.sum(-batch["target"] * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    assert torch.equal(build_objective(LossCfg(label_smoothing=0.1))(logits, batch), expected)
    one_hot = {"label": batch["label"], "target": F.one_hot(batch["label"], 5).float()}
    assert classification_loss(logits, one_hot) == pytest.approx(F.cross_entropy(logits, batch["label"]).item())


def test_computed_in_fp32_from_bf16_logits() -> None:
    logits, batch = _batch(soft=False)
    loss = classification_loss(logits.bfloat16(), batch, 0.1)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, F.cross_entropy(logits.bfloat16().float(), batch["label"], label_smoothing=0.1))
