"""The FLOP counter counts CPU attention too, and matches a hand count for a tiny ViT."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import create_model
from model.flops import count_flops, count_macs


class _Attention(torch.nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q)


def test_sdpa_is_counted_on_cpu() -> None:
    b, h, n, e = 2, 3, 16, 8
    assert count_flops(_Attention(), torch.randn(b, h, n, e)) == 2 * (2 * b * h * n * n * e)


def test_vit_macs_match_a_hand_count() -> None:
    d, hidden, tokens, depth, patch = 96, 192, 65, 4, 4
    embed = 64 * (patch * patch * 3 * d)  # 64 patches through the patch-embedding convolution
    per_block = tokens * (3 * d * d + d * d + 2 * d * hidden) + 2 * tokens * tokens * d  # linears + QKᵀ, AV
    head = d * 10
    assert count_macs(create_model("vit_pico_patch4_32"), torch.randn(1, 3, 32, 32)) == embed + depth * per_block + head
