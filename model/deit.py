"""DeiT/ViT baselines from timm (``VisionTransformer``), built with SDPA pinned on.

"Training data-efficient image transformers & distillation through attention" (DeiT),
https://arxiv.org/abs/2012.12877; "An Image is Worth 16x16 Words" (ViT), https://arxiv.org/abs/2010.11929.
The architecture comes unchanged from timm (``timm/models/vision_transformer.py``), so timm checkpoints and
its checkpoint filter apply. timm's ViT uses SDPA by default; the ``_fused`` entrypoints pin it on for the
build (:mod:`model.timm_fused`; it is otherwise switched off by ``TIMM_FUSED_ATTN=0``) and accept
``fused_attn=False`` to build the unfused reference.

Test-size variant: ``deit_pico_patch4_32_fused``. The CPU demo ViTs are in :mod:`model.vit_tiny`; the
paper's DeiT-S with StructSA is in :mod:`model.structvit`.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from model.registry import register_model
from model.timm_fused import build_fused, build_timm_fused, small_cfg

default_cfgs = generate_default_cfgs({
    "deit_pico_patch4_32_fused": small_cfg(32, "head"),
})


@register_model
def deit_tiny_patch16_224_fused(**overrides: Any) -> VisionTransformer:
    """DeiT-Ti (timm ``deit_tiny_patch16_224``) with SDPA pinned on."""
    return build_timm_fused("deit_tiny_patch16_224", overrides)


@register_model
def deit_small_patch16_224_fused(**overrides: Any) -> VisionTransformer:
    """DeiT-S (timm ``deit_small_patch16_224``) with SDPA pinned on."""
    return build_timm_fused("deit_small_patch16_224", overrides)


@register_model
def deit_base_patch16_224_fused(**overrides: Any) -> VisionTransformer:
    """DeiT-B (timm ``deit_base_patch16_224``) with SDPA pinned on."""
    return build_timm_fused("deit_base_patch16_224", overrides)


@register_model
def vit_base_patch16_224_fused(**overrides: Any) -> VisionTransformer:
    """ViT-B/16 (timm ``vit_base_patch16_224``) with SDPA pinned on: 86.6 M, 17.58 GMACs."""
    return build_timm_fused("vit_base_patch16_224", overrides)


@register_model
def deit_pico_patch4_32_fused(**overrides: Any) -> VisionTransformer:
    """A DeiT-shaped ViT at 32×32 (64 patches, width 64, depth 2), for tests."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
    return build_fused(VisionTransformer, checkpoint_filter_fn, "deit_pico_patch4_32_fused", defaults, overrides)
