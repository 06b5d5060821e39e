"""FLOP and MAC counts of a forward pass, measured by running the model under PyTorch's counter.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions but not the CPU
flash-attention kernel that ``scaled_dot_product_attention`` dispatches to on CPUs, so that op is
registered here with the same formula PyTorch uses for its GPU attention kernels
(2·B·H·Lq·Lk·E for QKᵀ plus 2·B·H·Lq·Lk·Ev for the weighted sum). Softmax, normalisation and
element-wise ops are not counted, as in the papers' tables (fvcore convention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    b, h, lq, e = query_shape
    lk, ev = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * e + 2 * b * h * lq * lk * ev


def _sdpa_backward_flops(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # grad_out, query, key, value are the first four arguments: backward costs twice the forward.
    _, query_shape, key_shape, value_shape = args[:4]
    return 2 * _sdpa_flops(query_shape, key_shape, value_shape)


_CUSTOM = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


@torch.no_grad()
def count_flops(net: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Forward FLOPs of ``net(inputs)`` (multiply and add counted separately: FLOPs = 2 × MACs).

    Args:
        net: The model (put in eval mode and back).
        inputs: A batch, e.g. 1×3×224×224 for one image or 1×3×T×H×W for one video view.

    Returns:
        Total forward FLOPs for the batch.
    """
    was_training = net.training
    net.eval()
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        net(inputs)
    net.train(was_training)
    return int(counter.get_total_flops())


def count_macs(net: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Forward multiply-accumulates (the "GMACs"/"FLOPs" of most vision papers) = FLOPs / 2."""
    return count_flops(net, inputs) // 2
