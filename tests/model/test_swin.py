"""Swin: built through the factory on the fused path, equal to the unfused path; timm's flag left alone."""

from __future__ import annotations

import pytest
import timm
import torch

from model import create_model
from model.timm_fused import count_fused, timm_fused_attention

TINY = ["swin_pico_patch2_window4_32_fused"]


def _fused_and_unfused(name: str, **kw: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    fused = create_model(name, **kw).eval()
    plain = create_model(name, fused_attn=False, **kw).eval()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("name", [*TINY, "swin_tiny_patch4_window7_224_fused"])
def test_fused_equals_unfused_float32(name: str) -> None:
    fused, plain = _fused_and_unfused(name, num_classes=10)
    n_on, n_all = count_fused(fused)
    assert n_on == n_all > 0 and count_fused(plain)[0] == 0
    size = fused.pretrained_cfg["input_size"][-1]
    x = torch.randn(1 if size > 100 else 2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=1e-5)


def test_fused_equals_unfused_in_training_gradients() -> None:
    fused, plain = _fused_and_unfused("swin_pico_patch2_window4_32_fused", drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    fused.train()(x).square().sum().backward()
    plain.train()(x).square().sum().backward()
    for (n, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_build_leaves_timm_global_flag_alone() -> None:
    before = (timm.layers.use_fused_attn(), timm.layers.use_fused_attn(experimental=True))
    create_model("swin_pico_patch2_window4_32_fused")
    create_model("swin_pico_patch2_window4_32_fused", fused_attn=False)
    with timm_fused_attention(True):
        assert timm.layers.use_fused_attn(experimental=True)
    assert (timm.layers.use_fused_attn(), timm.layers.use_fused_attn(experimental=True)) == before
    assert count_fused(timm.create_model("swin_pico_patch2_window4_32_fused"))[0] == 4
    assert count_fused(timm.create_model("deit_tiny_patch16_224"))[0] == 12  # timm's ViT default: fused


@pytest.mark.parametrize("name", TINY)
def test_tiny_variants_forward_backward_through_the_trainer_kwargs(name: str) -> None:
    # The trainer passes img_size and drop_path_rate to every model.
    net = create_model(name, num_classes=5, img_size=32, drop_path_rate=0.1).train()
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_swin_t_parameters_match_timm() -> None:
    net = create_model("swin_tiny_patch4_window7_224_fused", device="meta")
    assert sum(p.numel() for p in net.parameters()) == 28_288_354  # timm: 28.3 M


@pytest.mark.gpu
def test_flash_kernel_refuses_swin_bias_but_efficient_kernel_runs() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    net = create_model("swin_tiny_patch4_window7_224_fused").cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError):
        net(x)
    with torch.no_grad(), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        assert torch.isfinite(net(x)).all()
