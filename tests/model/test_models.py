"""vitpipe's tiny ViTs: built by name through timm's registry, shapes, and strict checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from model import create_model, list_models
from model.factory import UnknownModelError, count_params
from pipeline.checkpoint import export_weights

TINY = ["vit_pico_patch4_32", "vit_nano_patch8_32"]


@pytest.mark.parametrize("name", TINY)
def test_registered_with_timm_and_trains(name: str) -> None:
    assert name in list_models("vit_*_32")
    net = timm.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def _vit_params(img: int, patch: int, dim: int, depth: int, mlp_ratio: float, classes: int) -> int:
    """Parameter count of a pre-norm ViT with a class token, written out term by term."""
    tokens, hidden = (img // patch) ** 2, int(dim * mlp_ratio)
    embed = patch * patch * 3 * dim + dim + dim + (tokens + 1) * dim  # conv + bias, cls token, pos embed
    block = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)
    return embed + depth * block + 2 * dim + dim * classes + classes


def test_parameter_counts() -> None:
    assert count_params(create_model("vit_pico_patch4_32")) == _vit_params(32, 4, 96, 4, 2.0, 10) == 311_338
    assert count_params(create_model("vit_nano_patch8_32")) == _vit_params(32, 8, 64, 2, 2.0, 10)


def test_unknown_model_fails_loudly() -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'vit_pico_patch4_33'"):
        create_model("vit_pico_patch4_33")


def test_overrides_reach_the_constructor_and_none_is_dropped() -> None:
    net = create_model("vit_nano_patch8_32", depth=3, num_classes=None)
    assert len(net.blocks) == 3 and net.num_classes == 10


def test_exported_weights_load_strictly(tmp_path: Path) -> None:
    net = create_model("vit_nano_patch8_32", num_classes=10)
    path = export_weights(net.state_dict(), tmp_path / "model.safetensors")
    again = timm.create_model("vit_nano_patch8_32", num_classes=10, checkpoint_path=str(path))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(net.eval()(x), again.eval()(x))


def test_meta_build_allocates_nothing() -> None:
    net = create_model("vit_pico_patch4_32", device="meta")
    assert all(p.is_meta for p in net.parameters())
