"""DeiT/ViT baselines: built through the factory on the fused path, equal to the unfused path."""

from __future__ import annotations

import pytest
import torch

from model import create_model
from model.timm_fused import count_fused

TINY = ["deit_pico_patch4_32_fused"]


def _fused_and_unfused(name: str, **kw: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    fused = create_model(name, **kw).eval()
    plain = create_model(name, fused_attn=False, **kw).eval()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("name", TINY)
def test_fused_equals_unfused_float32(name: str) -> None:
    fused, plain = _fused_and_unfused(name, num_classes=10)
    n_on, n_all = count_fused(fused)
    assert n_on == n_all > 0 and count_fused(plain)[0] == 0
    size = fused.pretrained_cfg["input_size"][-1]
    x = torch.randn(1 if size > 100 else 2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_tiny_variants_forward_backward_through_the_trainer_kwargs(name: str) -> None:
    # The trainer passes img_size and drop_path_rate to every model.
    net = create_model(name, num_classes=5, img_size=32, drop_path_rate=0.1).train()
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("name, timm_name", [
    ("deit_tiny_patch16_224_fused", "deit_tiny_patch16_224"),
    ("deit_small_patch16_224_fused", "deit_small_patch16_224"),
    ("deit_base_patch16_224_fused", "deit_base_patch16_224"),
    ("vit_base_patch16_224_fused", "vit_base_patch16_224"),
])
def test_baselines_are_timms_architecture_on_the_fused_path(name: str, timm_name: str) -> None:
    ours, theirs = create_model(name, device="meta"), create_model(timm_name, device="meta")
    assert type(ours) is type(theirs) and [(n, p.shape) for n, p in ours.named_parameters()] == \
        [(n, p.shape) for n, p in theirs.named_parameters()]
    n_on, n_all = count_fused(ours)
    assert n_on == n_all > 0
