"""Consolidated fp32 weights from any checkpoint directory (DDP, DeepSpeed ZeRO-0..3).

The result loads strictly with ``timm.create_model(name, checkpoint_path=...)``. ZeRO-1/2/3
checkpoints are merged from their per-rank shards with DeepSpeed's ``zero_to_fp32`` (the fp32
master weights, exact even for bf16 runs); DDP and ZeRO-0 checkpoints hold the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

DS_TAG = "pytorch_model"  # the folder accelerate's save_state gives DeepSpeed's checkpoint


class ExportError(ValueError):
    """The directory is not a complete vitpipe checkpoint."""


def consolidate(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Reads a checkpoint directory's model weights as one fp32 state dict.

    Args:
        ckpt_dir: A ``checkpoints/step_N`` directory.

    Returns:
        Parameter and buffer tensors, fp32, on the CPU, with the model's own key names.
    """
    if (ckpt_dir / "model.safetensors").is_file():
        weights = load_file(str(ckpt_dir / "model.safetensors"))
    elif any((ckpt_dir / DS_TAG).glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=DS_TAG)
    elif (ckpt_dir / DS_TAG / "mp_rank_00_model_states.pt").is_file():
        state = torch.load(ckpt_dir / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        weights = state["module"]
    else:
        raise ExportError(f"{ckpt_dir} holds no model weights (model.safetensors or {DS_TAG}/)")
    return {k: v.float().contiguous() for k, v in weights.items()}
