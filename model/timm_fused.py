"""timm architectures built on the fused attention path: the switch, a counter, and the builders.

timm reads its fused-attention flag when an attention module is constructed, and builds some modules
(Swin's ``WindowAttention``) on the manual softmax path unless its *experimental* flag is set. The builders
here set the flag for the duration of one build only (no global state is left behind) and accept
``fused_attn=False`` to build the unfused reference. Shared by :mod:`model.swin` and :mod:`model.deit`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from timm.layers import set_fused_attn, use_fused_attn
from timm.models import build_model_with_cfg, model_entrypoint
from torch import nn

__all__ = ["build_fused", "build_timm_fused", "count_fused", "small_cfg", "timm_fused_attention"]


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


def build_timm_fused(name: str, overrides: dict[str, Any]) -> nn.Module:
    """Builds timm's own registered ``name`` with ``overrides``, fused unless ``fused_attn=False`` is among them."""
    fused = overrides.pop("fused_attn", True)
    with timm_fused_attention(fused):
        return model_entrypoint(name)(**overrides)


def build_fused(cls: type, filter_fn: Any, variant: str, defaults: dict[str, Any], overrides: dict[str, Any],
                **build_kwargs: Any) -> nn.Module:
    """Builds a vitpipe-configured variant of a timm class through ``build_model_with_cfg``, fused by default.

    Args:
        cls: The timm model class (e.g. ``SwinTransformer``).
        filter_fn: timm's checkpoint filter for ``cls``.
        variant: The registered name (its ``default_cfgs`` entry is used).
        defaults: Constructor arguments of the variant; ``overrides`` are merged last.
        overrides: Caller's arguments; ``fused_attn`` and ``pretrained`` are taken out.
        **build_kwargs: Extra ``build_model_with_cfg`` arguments (``feature_cfg``).

    Returns:
        The model.
    """
    fused = overrides.pop("fused_attn", True)
    pretrained = overrides.pop("pretrained", False)
    with timm_fused_attention(fused):
        return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=filter_fn, **build_kwargs,
                                    **{**defaults, **overrides})


def small_cfg(size: int, classifier: str, **kwargs: Any) -> dict[str, Any]:
    """The ``default_cfgs`` entry of a test-size variant: ``size``² input, 10 classes, mean = std = 0.5."""
    return {"url": "", "num_classes": 10, "input_size": (3, size, size), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "first_conv": "patch_embed.proj", "classifier": classifier, **kwargs}
