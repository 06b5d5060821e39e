"""Tiny vision transformers (timm's ``VisionTransformer``) for CPU demos, tests and smoke runs.

Same architecture as ViT/DeiT ("An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929),
scaled down so that a whole training runs on a 2-core CPU in minutes. Attention uses PyTorch's
fused ``scaled_dot_product_attention`` (timm's default for ViT). No pretrained weights exist:
``checkpoint_path`` loads local files only.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from model.registry import register_model


def _create(variant: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> VisionTransformer:
    pretrained = overrides.pop("pretrained", False)
    return build_model_with_cfg(VisionTransformer, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **{**defaults, **overrides})


def _cfg(size: int) -> dict[str, Any]:
    return {"url": "", "num_classes": 10, "input_size": (3, size, size), "pool_size": None,
            "crop_pct": 1.0, "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "first_conv": "patch_embed.proj", "classifier": "head"}


default_cfgs = generate_default_cfgs({
    "vit_pico_patch4_32": _cfg(32),
    "vit_nano_patch8_32": _cfg(32),
})


@register_model
def vit_pico_patch4_32(**overrides: Any) -> VisionTransformer:
    """ViT-Pico/4 at 32×32: 64 patches, width 96, depth 4, 3 heads (311,338 parameters at 10 classes)."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, num_classes=10)
    return _create("vit_pico_patch4_32", defaults, overrides)


@register_model
def vit_nano_patch8_32(**overrides: Any) -> VisionTransformer:
    """ViT-Nano/8 at 32×32: 16 patches, width 64, depth 2, 2 heads; the fastest variant, for tests."""
    defaults = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
    return _create("vit_nano_patch8_32", defaults, overrides)
