"""The one way the pipeline builds a model: by registered name, with overrides merged last."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import timm
import torch

import model  # noqa: F401  (registers vitpipe's variants with timm)
from model.registry import is_model

logger = logging.getLogger(__name__)


class UnknownModelError(ValueError):
    """Raised for a model name that no registry entry matches."""


def create_model(
    name: str,
    *,
    checkpoint_path: str | None = None,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """Builds a registered model.

    Args:
        name: Registered name (vitpipe's or timm's), e.g. ``vit_pico_patch4_32``.
        checkpoint_path: Optional local weights file (``.safetensors`` or ``.pt``) loaded strictly.
        device: Where to build (``"meta"`` builds without allocating).
        **overrides: Constructor keyword arguments; ``None`` values are dropped so that unset config
            fields keep the variant's own defaults.

    Returns:
        The model, never downloading weights (``pretrained=False``).

    Raises:
        UnknownModelError: If ``name`` is not registered.
    """
    if not is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise UnknownModelError(f"unknown model {name!r}; similar registered names: {', '.join(close) or 'none'}")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        net = timm.create_model(name, pretrained=False, checkpoint_path=checkpoint_path or "", **kwargs)
    logger.debug("built %s with %s", name, kwargs)
    return net


def count_params(net: torch.nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in net.parameters())
