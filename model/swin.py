"""Swin Transformer and DeiT/ViT baselines from timm, built with the fused attention path switched on.

Swin ("Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
https://arxiv.org/abs/2103.14030) comes unchanged from timm (``timm/models/swin_transformer.py``), so
timm checkpoints and its checkpoint filter apply. timm builds Swin's ``WindowAttention`` on the manual
softmax path unless its *experimental* fused flag is set when the model is built; the entrypoints here
(``<timm name>_fused``) set it for the duration of the build only (no global state is left behind) and
accept ``fused_attn=False`` to build the unfused reference. On the fused path the relative-position
bias and the shift mask become a float ``attn_mask`` of ``F.scaled_dot_product_attention``, which the
flash backend does not take: SDPA runs the memory-efficient, cuDNN or math kernel instead.

DeiT/ViT (timm's ``VisionTransformer``) use SDPA by default; their ``_fused`` entrypoints pin it on (it
is otherwise switched off by ``TIMM_FUSED_ATTN=0``). Test-size variants: ``swin_pico_patch2_window4_32_fused``
and ``deit_pico_patch4_32_fused``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from timm.layers import set_fused_attn, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, model_entrypoint
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter_fn
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter_fn
from torch import nn

from model.registry import register_model

__all__ = ["count_fused", "timm_fused_attention"]


@contextmanager
def timm_fused_attention(enabled: bool = True) -> Iterator[None]:
    """Within the block, timm models are built with fused attention on (experimental paths included) or off.

    timm reads the flag when a module is constructed, so it only has to hold during the build; the
    previous setting is restored on exit.

    Args:
        enabled: ``True`` for SDPA everywhere (``TIMM_FUSED_ATTN=2``), ``False`` for the manual paths.
    """
    previous = 2 if use_fused_attn(experimental=True) else 1 if use_fused_attn() else 0
    set_fused_attn(enabled, experimental=enabled)
    try:
        yield
    finally:
        set_fused_attn(previous > 0, experimental=previous > 1)


def count_fused(net: nn.Module) -> tuple[int, int]:
    """(attention modules on the fused path, attention modules with a ``fused_attn`` flag) of a timm model."""
    flags = [bool(m.fused_attn) for m in net.modules() if hasattr(m, "fused_attn")]
    return sum(flags), len(flags)


def _build_timm(name: str, overrides: dict[str, Any]) -> nn.Module:
    fused = overrides.pop("fused_attn", True)
    with timm_fused_attention(fused):
        return model_entrypoint(name)(**overrides)


def _build_own(cls: type, filter_fn: Any, variant: str, defaults: dict[str, Any], overrides: dict[str, Any],
               **build_kwargs: Any) -> nn.Module:
    fused = overrides.pop("fused_attn", True)
    pretrained = overrides.pop("pretrained", False)
    with timm_fused_attention(fused):
        return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=filter_fn, **build_kwargs,
                                    **{**defaults, **overrides})


def _cfg(size: int, classifier: str, **kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 10, "input_size": (3, size, size), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "first_conv": "patch_embed.proj", "classifier": classifier, **kwargs}


default_cfgs = generate_default_cfgs({
    "swin_pico_patch2_window4_32_fused": _cfg(32, "head.fc"),
    "deit_pico_patch4_32_fused": _cfg(32, "head"),
})


@register_model
def swin_tiny_patch4_window7_224_fused(**overrides: Any) -> SwinTransformer:
    """Swin-T (timm ``swin_tiny_patch4_window7_224``) on the fused attention path: 28.3 M, 4.51 GMACs."""
    return _build_timm("swin_tiny_patch4_window7_224", overrides)


@register_model
def swin_small_patch4_window7_224_fused(**overrides: Any) -> SwinTransformer:
    """Swin-S (timm ``swin_small_patch4_window7_224``) on the fused attention path: 49.6 M, 8.77 GMACs."""
    return _build_timm("swin_small_patch4_window7_224", overrides)


@register_model
def swin_base_patch4_window7_224_fused(**overrides: Any) -> SwinTransformer:
    """Swin-B (timm ``swin_base_patch4_window7_224``) on the fused attention path: 87.8 M, 15.47 GMACs."""
    return _build_timm("swin_base_patch4_window7_224", overrides)


@register_model
def swin_large_patch4_window7_224_fused(**overrides: Any) -> SwinTransformer:
    """Swin-L (timm ``swin_large_patch4_window7_224``) on the fused attention path: 196.5 M, 34.53 GMACs."""
    return _build_timm("swin_large_patch4_window7_224", overrides)


@register_model
def swin_pico_patch2_window4_32_fused(**overrides: Any) -> SwinTransformer:
    """A two-stage Swin at 32×32 (16² then 8² tokens, window 4, shifted blocks in both stages), for tests."""
    defaults = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                    mlp_ratio=2.0, num_classes=10)
    return _build_own(SwinTransformer, swin_filter_fn, "swin_pico_patch2_window4_32_fused", defaults, overrides,
                      feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1)))


@register_model
def deit_tiny_patch16_224_fused(**overrides: Any) -> VisionTransformer:
    """DeiT-Ti (timm ``deit_tiny_patch16_224``) with SDPA pinned on."""
    return _build_timm("deit_tiny_patch16_224", overrides)


@register_model
def deit_small_patch16_224_fused(**overrides: Any) -> VisionTransformer:
    """DeiT-S (timm ``deit_small_patch16_224``) with SDPA pinned on."""
    return _build_timm("deit_small_patch16_224", overrides)


@register_model
def deit_base_patch16_224_fused(**overrides: Any) -> VisionTransformer:
    """DeiT-B (timm ``deit_base_patch16_224``) with SDPA pinned on."""
    return _build_timm("deit_base_patch16_224", overrides)


@register_model
def vit_base_patch16_224_fused(**overrides: Any) -> VisionTransformer:
    """ViT-B/16 (timm ``vit_base_patch16_224``) with SDPA pinned on: 86.6 M, 17.58 GMACs."""
    return _build_timm("vit_base_patch16_224", overrides)


@register_model
def deit_pico_patch4_32_fused(**overrides: Any) -> VisionTransformer:
    """A DeiT-shaped ViT at 32×32 (64 patches, width 64, depth 2), for tests."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
    return _build_own(VisionTransformer, vit_filter_fn, "deit_pico_patch4_32_fused", defaults, overrides)
