"""Swin Transformer from timm, built with the fused attention path switched on.

"Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", https://arxiv.org/abs/2103.14030.
The architecture comes unchanged from timm (``timm/models/swin_transformer.py``), so timm checkpoints and
its checkpoint filter apply. timm builds Swin's ``WindowAttention`` on the manual softmax path unless its
*experimental* fused flag is set when the model is built; the entrypoints here (``<timm name>_fused``) set
it for the duration of the build only (:mod:`model.timm_fused`) and accept ``fused_attn=False`` to build
the unfused reference. On the fused path the relative-position bias and the shift mask become a float
``attn_mask`` of ``F.scaled_dot_product_attention``, which the flash backend does not take: SDPA runs the
memory-efficient, cuDNN or math kernel instead.

Test-size variant: ``swin_pico_patch2_window4_32_fused``. The DeiT/ViT baselines are in :mod:`model.deit`.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from model.registry import register_model
from model.timm_fused import build_fused, build_timm_fused, small_cfg

default_cfgs = generate_default_cfgs({
    "swin_pico_patch2_window4_32_fused": small_cfg(32, "head.fc"),
})


@register_model
def swin_tiny_patch4_window7_224_fused(**overrides: Any) -> SwinTransformer:
    """Swin-T (timm ``swin_tiny_patch4_window7_224``) on the fused attention path: 28.3 M, 4.51 GMACs."""
    return build_timm_fused("swin_tiny_patch4_window7_224", overrides)


@register_model
def swin_small_patch4_window7_224_fused(**overrides: Any) -> SwinTransformer:
    """Swin-S (timm ``swin_small_patch4_window7_224``) on the fused attention path: 49.6 M, 8.77 GMACs."""
    return build_timm_fused("swin_small_patch4_window7_224", overrides)


@register_model
def swin_base_patch4_window7_224_fused(**overrides: Any) -> SwinTransformer:
    """Swin-B (timm ``swin_base_patch4_window7_224``) on the fused attention path: 87.8 M, 15.47 GMACs."""
    return build_timm_fused("swin_base_patch4_window7_224", overrides)


@register_model
def swin_large_patch4_window7_224_fused(**overrides: Any) -> SwinTransformer:
    """Swin-L (timm ``swin_large_patch4_window7_224``) on the fused attention path: 196.5 M, 34.53 GMACs."""
    return build_timm_fused("swin_large_patch4_window7_224", overrides)


@register_model
def swin_pico_patch2_window4_32_fused(**overrides: Any) -> SwinTransformer:
    """A two-stage Swin at 32×32 (16² then 8² tokens, window 4, shifted blocks in both stages), for tests."""
    defaults = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                    mlp_ratio=2.0, num_classes=10)
    return build_fused(SwinTransformer, checkpoint_filter_fn, "swin_pico_patch2_window4_32_fused", defaults,
                       overrides, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1)))
