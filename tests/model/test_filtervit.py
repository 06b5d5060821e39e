"""FilterViT / DropoutViT: the spec's parameter and MAC counts, filter-attention behaviour and options."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from model import create_model
from model.factory import count_params
from model.flops import count_macs
from model.layers.filter_attention import (
    EncoderLayer,
    FilterAttention,
    RandomTokenAttention,
    grid_pos_embed,
)

PICO = ["filtervit_pico", "dropoutvit_pico"]


@pytest.mark.parametrize("name, p100, p1000", [
    ("filtervit_xs", 1_894_381, 2_240_881),
    ("dropoutvit_xs", 1_875_556, 2_222_056),
    ("filtervit_xxs", 946_608, 1_293_108),
    ("filtervit_s", 4_989_040, 5_450_740),
])
def test_parameter_counts_match_the_spec(name: str, p100: int, p1000: int) -> None:
    assert count_params(timm.create_model(name, num_classes=100)) == p100
    assert count_params(timm.create_model(name, num_classes=1000)) == p1000


def test_xs_per_block_parameter_counts() -> None:
    net = create_model("filtervit_xs", num_classes=100)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(net.stem.conv) + n(net.stem.bn) == 4_992 and n(net.stem.ir) == 27_200
    assert [n(b) for b in net.blocks] == [59_968, 275_203, 201_600, 275_203, 275_203, 201_600, 201_600, 234_624]
    assert n(net.head_hidden) + n(net.head) == 137_188
    assert n(net.blocks[1].attn.scorer) == 6_275


@pytest.mark.parametrize("name, size, gmacs", [
    ("filtervit_xs", 224, 1.38), ("filtervit_xs", 256, 1.50), ("dropoutvit_xs", 224, 1.35),
    ("dropoutvit_xs", 256, 1.47), ("filtervit_xxs", 224, 1.01), ("filtervit_s", 224, 3.19),
])
def test_gmacs_match_the_spec(name: str, size: int, gmacs: float) -> None:
    macs = count_macs(create_model(name, num_classes=100), torch.randn(1, 3, size, size))
    assert round(macs / 1e9, 2) == gmacs


def _pair(cls: type, **kw: object) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = cls(16, 28, 4, 48, impl="gather", **kw)
    b = cls(16, 28, 4, 48, impl="mask", **kw)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("train", [False, True])
def test_gather_scatter_equals_boolean_mask_formulation(train: bool) -> None:
    a, b = _pair(FilterAttention, encoder_kwargs=dict(dropout=0.0))
    a.train(train), b.train(train)
    x = torch.randn(3, 16, 28, 28, requires_grad=True)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-6)
    ga = torch.autograd.grad(ya.square().sum(), [x, a.scorer.conv.weight])
    gb = torch.autograd.grad(yb.square().sum(), [x, b.scorer.conv.weight])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_gather_scatter_equals_mask_for_random_selection_and_whole_models() -> None:
    a, b = _pair(RandomTokenAttention, eval_selection="fixed")
    x = torch.randn(2, 16, 28, 28)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=1e-6)
    torch.manual_seed(1)
    net = create_model("filtervit_pico").eval()
    ref = create_model("filtervit_pico", impl="mask").eval()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=1e-5)


def test_filter_attention_behaviour() -> None:
    """Unselected outputs equal X ⊙ s exactly; scores in (0.4576, 1); exactly K = 128 per image at 28²."""
    torch.manual_seed(0)
    layer = FilterAttention(16, 28, 4, 48).eval()
    layer.record = True
    x = torch.randn(2, 16, 28, 28) * 3
    x0 = x.clone()
    y = layer(x)
    s, idx = layer.last_scores, layer.last_index
    assert torch.equal(x, x0)  # input untouched
    assert idx.shape == (2, 128) and all(len(set(row.tolist())) == 128 for row in idx)
    assert s.min() > 0.4576 and s.max() < 1
    selected = torch.zeros(2, 28 * 28, dtype=torch.bool).scatter_(1, idx, True).view(2, 1, 28, 28)
    gated = x * s
    assert torch.equal(torch.where(selected, 0, y), torch.where(selected, 0, gated))
    assert not torch.isclose(y, gated).masked_select(selected.expand_as(y)).any()
    assert torch.equal(idx, s.flatten(1).topk(128, dim=1).indices.sort(dim=1).values)


def test_filter_block_trains_its_scorer_gets_gradient() -> None:
    net = create_model("filtervit_pico").train()
    net(torch.randn(4, 3, 32, 32)).logsumexp(-1).sum().backward()
    for layer in net.filter_layers():
        assert layer.scorer.conv.weight.grad.abs().sum() > 0 and layer.scorer.norm.weight.grad.abs().sum() > 0


def test_dropoutvit_stochastic_by_default_and_deterministic_modes() -> None:
    x = torch.randn(2, 3, 32, 32)
    net = create_model("dropoutvit_pico").eval()
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x))  # author: positions redrawn at eval
        for mode in ("fixed", "full"):
            det = create_model("dropoutvit_pico", eval_selection=mode).eval()
            det.load_state_dict(net.state_dict())
            assert torch.equal(det(x), det(x))
    layer = net.filter_layers()[0]
    layer.record = True
    net(x)
    assert layer.last_index.shape == (2, 8) and torch.equal(layer.last_index[0], layer.last_index[1])  # shared
    feat = torch.randn(2, 32, 7, 7)
    before = feat.clone()
    layer(feat)
    assert torch.equal(feat, before)  # never written in place


def test_k_rule_at_other_resolutions() -> None:
    layer = FilterAttention(16, 55, 4, 48)
    assert layer.tokens_for(55, 55) == 256 and layer.tokens_for(28, 28) == round(256 * 784 / 3025) == 66
    assert layer.tokens_for(63, 63) == round(256 * 63 * 63 / 3025)
    assert torch.equal(layer.table_for(30, 40, torch.device("cpu")), grid_pos_embed(30, 40, 16))
    fixed = FilterAttention(16, 28, 4, 48, k_rule="fixed")
    assert fixed.tokens_for(20, 20) == 128
    with pytest.raises(ValueError, match="larger than the configured"):
        fixed(torch.randn(1, 16, 30, 30))
    # XXS has no post-stem pool: 256 input gives a 126² stem map, which the author's code cannot run.
    net = create_model("filtervit_xxs", num_classes=10).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 256, 256)).shape == (1, 10)
    pico = create_model("filtervit_pico").eval()
    for size in (24, 48, 61):
        assert pico(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_encoder_layer_equals_pytorch_transformer_encoder_layer() -> None:
    ref = nn.TransformerEncoderLayer(32, 4, 96, batch_first=True).eval()
    ours = EncoderLayer(32, 4, 96).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PICO)
def test_tiny_variants_forward_backward_and_checkpointing(name: str) -> None:
    torch.manual_seed(0)
    net = create_model(name, num_classes=7, encoder_dropout=0.0, drop_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    out = net(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert len(grads) == sum(1 for _ in net.parameters())
    net.zero_grad()
    net.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out2 = net(x)
    out2.sum().backward()
    torch.testing.assert_close(out2, out)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fix", [
    dict(score_act="sigmoid"), dict(score_norm="instance"), dict(score_padding="replicate"),
    dict(gate_unselected=False), dict(writeback="add"), dict(full_outer_residual=False), dict(pos_embed="2d"),
    dict(encoder_norm_first=True, encoder_act="gelu", encoder_dropout=0.0), dict(k_rule="fixed"),
])
def test_quirk_fixes_build_and_run(fix: dict) -> None:
    net = create_model("filtervit_pico", **fix)
    assert count_params(net) == count_params(create_model("filtervit_pico"))
    net(torch.randn(2, 3, 32, 32)).sum().backward()


def test_no_stochastic_depth_and_meta_build() -> None:
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("filtervit_pico", drop_path_rate=0.1)
    assert all(p.is_meta for p in create_model("filtervit_xs", device="meta").parameters())
    assert "pos_embed" not in "".join(create_model("filtervit_pico").state_dict())


@pytest.mark.parametrize("name", PICO)
def test_bf16_autocast(name: str) -> None:
    net = create_model(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 32, 32))
    out.float().sum().backward()
    assert torch.isfinite(out).all()


# --- device/dtype and init_weights (the model owns its initialisation) ----------------------------------------

def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and every buffer, the non-persistent positional tables included."""
    return {**dict(net.named_parameters()), **dict(net.named_buffers())}


@pytest.mark.parametrize("name, kw", [
    ("filtervit_pico", {}), ("dropoutvit_pico", {}),
    ("filtervit_pico", dict(score_norm="instance", pos_embed="2d", head_hidden=0)),
])
def test_init_weights_redraws_the_constructors_initialisation(name: str, kw: dict) -> None:
    torch.manual_seed(0)
    net = create_model(name, **kw)
    after_build = torch.rand(4)
    ref = {k: v.clone() for k, v in _state(net).items()}
    net.train()(torch.randn(4, 3, 32, 32)).sum().backward()  # moves the BatchNorm statistics
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        for b in net.buffers():
            b.zero_()  # the positional tables too
    torch.manual_seed(0)
    net.init_weights()
    assert torch.equal(torch.rand(4), after_build)  # the same number of draws as the constructor
    for k, v in _state(net).items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.parametrize("name", PICO)
def test_meta_build_then_to_empty_and_init_weights(name: str) -> None:
    torch.manual_seed(0)
    ref = create_model(name).eval()
    net = timm.create_model(name, device="meta")  # the constructor's device argument, not a device context
    assert all(t.is_meta for t in _state(net).values())
    net.to_empty(device="cpu")
    torch.manual_seed(0)
    net.init_weights()
    net.eval()
    for k, v in _state(net).items():
        assert torch.equal(v, _state(ref)[k]), k
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if name.startswith("filter"):  # DropoutViT draws new positions at every pass
        assert torch.equal(out, ref(x))


@pytest.mark.parametrize("name", PICO)
def test_float64_build_and_reset_classifier(name: str) -> None:
    net = timm.create_model(name, dtype=torch.float64)
    assert {t.dtype for t in _state(net).values() if t.is_floating_point()} == {torch.float64}
    out = net.train()(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out.shape == (2, 10) and out.dtype == torch.float64 and torch.isfinite(out).all()
    net.reset_classifier(4)
    assert net.head.weight.dtype == torch.float64
    assert net(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 4)


def test_layers_take_device_and_dtype() -> None:
    layer = FilterAttention(16, 28, 4, 48, device="meta", dtype=torch.float64)
    state = _state(layer).values()
    assert all(t.is_meta for t in state) and {t.dtype for t in state if t.is_floating_point()} == {torch.float64}
    enc = EncoderLayer(32, 4, 96, dtype=torch.float64)
    assert {p.dtype for p in enc.parameters()} == {torch.float64}
    rand = RandomTokenAttention(16, 28, 4, 48, device="meta")
    assert all(t.is_meta for t in _state(rand).values())
