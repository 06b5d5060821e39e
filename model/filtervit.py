"""FilterViT (FilterMobileViT) and DropoutViT: attention over a learned (or random) top-K pixel subset.

"FilterViT and DropoutViT: Lightweight Vision Transformer Models for Efficient Attention Mechanisms",
Sun & Chen, https://arxiv.org/abs/2410.22709. The paper's tables are not public; the author's code
(github.com/BobSun98/FilterVIT @ 67b09ae, ``v4.5/models/convformer.py``) is the reference and its
behaviour is reproduced by default. Name mapping: FilterViT-XS/XXS/S = ``ConvFormer_xs/xxs/s``,
DropoutViT-XS = ``DropOutVIT_xs``. Every quirk of the author's code is either reproduced (default) or
has a named option that fixes it; ``docs/models.md`` lists which is which.

Structure: stem conv 5×5/2 (no padding) → inverted residual → (XS: adaptive pool to 110²) → blocks of
three kinds, each closed by a MobileNetV2 inverted residual (IR) that may downsample:

* ``first``: pooled global attention: average-pool to g×g, + 1-D sinusoid, encoder, replicate back,
  add to the map;
* ``filter``: :class:`~model.layers.filter_attention.FilterAttention` (DropoutViT:
  :class:`~model.layers.filter_attention.RandomTokenAttention`) over K pixels;
* ``full``: every pixel is a token, no positional encoding, IR(X + Enc(X)).

Head: global average pool → Linear → GELU → Dropout(0.5) → Linear. PyTorch default initialisation, as in
the author's code: every layer initialises itself while it is built, and :meth:`FilterViT.init_weights`
redraws the same initialisation in the same order (for a model built on the meta device, after ``to_empty``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.layers.filter_attention import (
    EncoderLayer,
    FilterAttention,
    RandomTokenAttention,
    grid_pos_embed,
)
from model.registry import register_model

__all__ = ["BlockSpec", "FilterViT"]

_Dd = dict[str, Any]


def make_divisible(v: float, divisor: int = 8) -> int:
    """CVNets/MobileNetV2 channel rounding (never more than 10 % below ``v``)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _children_first(module: nn.Module) -> Iterator[nn.Module]:
    """Post-order walk: every submodule before its parent, siblings in registration (= build) order."""
    for child in module.children():
        yield from _children_first(child)
    yield module


def _conv_bn(in_dim: int, out_dim: int, kernel: int, stride: int = 1, groups: int = 1,
             act: bool = True, dd: _Dd | None = None) -> nn.Sequential:
    dd = dd or {}
    layers: list[nn.Module] = [nn.Conv2d(in_dim, out_dim, kernel, stride, kernel // 2, groups=groups, bias=False,
                                         **dd), nn.BatchNorm2d(out_dim, **dd)]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block (CVNets): [1×1 expand, BN, SiLU] → 3×3 depthwise/stride, BN, SiLU → 1×1, BN."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1, expand_ratio: float = 2.0,
                 dd: _Dd | None = None) -> None:
        super().__init__()
        hidden = make_divisible(int(round(in_dim * expand_ratio)), 8)
        self.block = nn.Sequential()
        if expand_ratio != 1:
            self.block.add_module("exp_1x1", _conv_bn(in_dim, hidden, 1, dd=dd))
        self.block.add_module("conv_3x3", _conv_bn(hidden, hidden, 3, stride, groups=hidden, dd=dd))
        self.block.add_module("red_1x1", _conv_bn(hidden, out_dim, 1, act=False, dd=dd))
        self.use_res_connect = stride == 1 and in_dim == out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → B×C′×H′×W′."""
        return x + self.block(x) if self.use_res_connect else self.block(x)


@dataclass(frozen=True)
class BlockSpec:
    """One block of a FilterViT.

    Attributes:
        kind: ``"first"`` (pooled global attention), ``"filter"`` (top-K / random-K) or ``"full"``.
        out_dim: Output channels of the closing IR.
        size: ``first``: pooled grid g; ``filter``: configured map size (K and PE fixed for it); ``full``: 0.
        num_heads: Attention heads.
        mlp_ratio: Encoder feed-forward width / input channels.
        expand_ratio: Expansion of the closing IR.
        stride: Stride of the closing IR.
        depth: Encoder layers.
        num_tokens: K at the configured size (``filter`` only); default from the author's table.
    """

    kind: Literal["first", "filter", "full"]
    out_dim: int
    size: int
    num_heads: int
    mlp_ratio: float
    expand_ratio: float
    stride: int
    depth: int = 1
    num_tokens: int | None = None


class PooledAttentionBlock(nn.Module):
    """The author's ``FirstConvFormerBlock``: pool to g×g, + PE, encoder, replicate back, residual add, IR."""

    def __init__(self, in_dim: int, spec: BlockSpec, pos_embed: Literal["1d", "2d"], encoder_kwargs: _Dd,
                 dd: _Dd | None = None) -> None:
        super().__init__()
        dd = dd or {}
        self.grid, self.pos_kind = spec.size, pos_embed
        self.register_buffer("pos_embed", torch.empty(spec.size**2, in_dim, **dd), persistent=False)
        self.encoder = nn.Sequential(*[EncoderLayer(in_dim, spec.num_heads, int(in_dim * spec.mlp_ratio),
                                                    **encoder_kwargs, **dd) for _ in range(spec.depth)])
        self.ir = InvertedResidual(in_dim, spec.out_dim, spec.stride, spec.expand_ratio, dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fills the g²×C positional table (a non-persistent buffer, uninitialised after ``to_empty``)."""
        table = grid_pos_embed(self.grid, self.grid, self.pos_embed.shape[1], self.pos_kind, self.pos_embed.device)
        self.pos_embed.copy_(table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → B×C′×H′×W′."""
        b, c, h, w = x.shape
        g = self.grid
        tokens = F.adaptive_avg_pool2d(x, g).flatten(2).transpose(1, 2) + self.pos_embed  # B×g²×C
        y = self.encoder(tokens).transpose(1, 2).reshape(b, c, g, g)
        # Author: AdaptiveAvgPool2d(H) as the "upsample" (nearest replication for integer ratios).
        return self.ir(x + F.adaptive_avg_pool2d(y, (h, w)))


class FullAttentionBlock(nn.Module):
    """The author's ``ConvFormerBlock``: every pixel a token, no PE; IR(X + Enc(X)) by the author's quirk."""

    def __init__(self, in_dim: int, spec: BlockSpec, outer_residual: bool, encoder_kwargs: _Dd,
                 dd: _Dd | None = None) -> None:
        super().__init__()
        dd = dd or {}
        self.outer_residual = outer_residual
        self.encoder = nn.Sequential(*[EncoderLayer(in_dim, spec.num_heads, int(in_dim * spec.mlp_ratio),
                                                    **encoder_kwargs, **dd) for _ in range(spec.depth)])
        self.ir = InvertedResidual(in_dim, spec.out_dim, spec.stride, spec.expand_ratio, dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → B×C′×H′×W′."""
        b, c, h, w = x.shape
        y = self.encoder(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        return self.ir(x + y if self.outer_residual else y)


class FilterBlock(nn.Module):
    """The author's ``LeakyConvFormerBlock`` / ``DropOutBlock``: subset attention, then IR."""

    def __init__(self, attn: nn.Module, in_dim: int, spec: BlockSpec, dd: _Dd | None = None) -> None:
        super().__init__()
        self.attn = attn
        self.ir = InvertedResidual(in_dim, spec.out_dim, spec.stride, spec.expand_ratio, dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → B×C′×H′×W′."""
        return self.ir(self.attn(x))


class FilterViT(nn.Module):
    """FilterViT / DropoutViT.

    Defaults reproduce the author's code; the options after ``drop_path_rate`` fix its quirks
    (numbers refer to the quirk table in ``docs/models.md``).

    Args:
        blocks: Block specs after the stem.
        stem_dim: Stem channels.
        stem_expand: Expansion of the stem's IR.
        stem_pool: Adaptive average pool after the stem (XS: 110, which makes every input size give the
            native 55²/28² maps); ``None`` for none.
        head_hidden: Hidden width of the head (0: a single linear classifier).
        num_classes: Classifier outputs (0: no classifier).
        in_chans: Input channels.
        img_size: Nominal input size (kept for configs; the network accepts any size the stem accepts).
        drop_rate: Head dropout (author 0.5).
        drop_path_rate: Must be 0: the author's models have no stochastic depth.
        selection: ``"filter"`` (FilterViT: learned top-K) or ``"random"`` (DropoutViT).
        encoder_dropout: Dropout of every encoder layer (author 0.1, PyTorch default) (quirk 5).
        encoder_act: Encoder feed-forward activation, ``"relu"`` (author) or ``"gelu"`` (quirk 5).
        encoder_norm_first: Pre-LN encoders instead of the author's post-LN (quirk 5).
        score_act: ``"gelu_sigmoid"`` (author) or ``"sigmoid"`` (quirk 1).
        score_norm: ``"batch"`` (author) or ``"instance"`` (quirk 2).
        score_padding: ``"zeros"`` (author) or ``"replicate"`` (quirk 8).
        gate_unselected: Gate every pixel by its score (author) or only the selected tokens (quirk 3).
        writeback: ``"overwrite"`` (author) or ``"add"`` (outer residual) (quirk 4).
        full_outer_residual: IR(X + Enc(X)) in full-attention blocks (author) or IR(Enc(X)) (quirk 6).
        pos_embed: ``"1d"`` raster sinusoid (author) or ``"2d"`` (quirk 7).
        k_rule: K and PE at non-native map sizes: ``"ratio"`` (default, a documented deviation) or
            ``"fixed"`` (author) (quirk 18).
        eval_selection: DropoutViT in eval: ``"random"`` (author), ``"fixed"`` or ``"full"`` (quirk 13).
        impl: ``"gather"`` or the reference ``"mask"`` formulation (quirk 9; identical results).
        device: Where to allocate (``"meta"`` allocates nothing; call :meth:`init_weights` after ``to_empty``).
        dtype: Parameter dtype.
    """

    def __init__(self, blocks: tuple[BlockSpec, ...], stem_dim: int = 64, stem_expand: float = 3.0,
                 stem_pool: int | None = None, head_hidden: int = 384, num_classes: int = 1000, in_chans: int = 3,
                 img_size: int | tuple[int, int] = 224, drop_rate: float = 0.5, drop_path_rate: float = 0.0,
                 selection: Literal["filter", "random"] = "filter", encoder_dropout: float = 0.1,
                 encoder_act: Literal["relu", "gelu"] = "relu", encoder_norm_first: bool = False,
                 score_act: Literal["gelu_sigmoid", "sigmoid"] = "gelu_sigmoid",
                 score_norm: Literal["batch", "instance"] = "batch",
                 score_padding: Literal["zeros", "replicate"] = "zeros", gate_unselected: bool = True,
                 writeback: Literal["overwrite", "add"] = "overwrite", full_outer_residual: bool = True,
                 pos_embed: Literal["1d", "2d"] = "1d", k_rule: Literal["ratio", "fixed"] = "ratio",
                 eval_selection: Literal["random", "fixed", "full"] = "random",
                 impl: Literal["gather", "mask"] = "gather", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if drop_path_rate:
            raise ValueError("FilterViT has no stochastic depth (author's code): drop_path_rate must be 0")
        # NOTE: every layer draws its PyTorch default init as it is built, in the order init_weights()
        # redraws it; calling init_weights() here would draw twice and change the author-parity weights.
        dd = {"device": device, "dtype": dtype}
        self.num_classes, self.img_size, self.selection = num_classes, img_size, selection
        self.grad_checkpointing = False
        enc = dict(dropout=encoder_dropout, act=encoder_act, norm_first=encoder_norm_first)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_chans, stem_dim, 5, stride=2, **dd))  # no padding: 224 → 110
        self.stem.add_module("bn", nn.BatchNorm2d(stem_dim, **dd))
        self.stem.add_module("act", nn.LeakyReLU(0.1))
        self.stem.add_module("ir", InvertedResidual(stem_dim, stem_dim, 1, stem_expand, dd))
        self.stem_pool = stem_pool
        layers, dim = [], stem_dim
        for spec in blocks:
            if spec.kind == "first":
                layers.append(PooledAttentionBlock(dim, spec, pos_embed, enc, dd))
            elif spec.kind == "full":
                layers.append(FullAttentionBlock(dim, spec, full_outer_residual, enc, dd))
            else:
                common = dict(depth=spec.depth, num_tokens=spec.num_tokens, k_rule=k_rule, pos_embed=pos_embed,
                              writeback=writeback, impl=impl, encoder_kwargs=enc, **dd)
                mlp_dim = int(dim * spec.mlp_ratio)
                if selection == "filter":
                    attn = FilterAttention(dim, spec.size, spec.num_heads, mlp_dim, gate_unselected=gate_unselected,
                                           scorer_kwargs=dict(act=score_act, norm=score_norm,
                                                              padding_mode=score_padding), **common)
                else:
                    attn = RandomTokenAttention(dim, spec.size, spec.num_heads, mlp_dim,
                                                eval_selection=eval_selection, **common)
                layers.append(FilterBlock(attn, dim, spec, dd))
            dim = spec.out_dim
        self.blocks = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = dim
        self.head_hidden = nn.Sequential(nn.Linear(dim, head_hidden, **dd), nn.GELU()) if head_hidden \
            else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self._head_in = head_hidden or dim
        self.head = nn.Linear(self._head_in, num_classes, **dd) if num_classes else nn.Identity()

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default initialisation of every layer (the author's: no custom init), in build order.

        Layers are visited children first, so every random draw happens in the order the constructor made
        it: under the same seed this gives exactly the constructor's weights. BatchNorm statistics and the
        positional tables (non-persistent buffers) are reset too, so this also materialises a model built
        on the meta device after ``to_empty``.
        """
        for module in _children_first(self):
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay (timm convention)."""
        return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (RNG state is restored, so DropoutViT redraws the same pixels)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Nothing is excluded by the model (the author decays every parameter)."""
        return set()

    def get_classifier(self) -> nn.Module:
        """The final linear classifier."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the final classifier (the hidden head layer is kept), on the model's device and dtype."""
        self.num_classes = num_classes
        w = self.stem.conv.weight
        self.head = nn.Linear(self._head_in, num_classes, device=w.device, dtype=w.dtype) if num_classes \
            else nn.Identity()

    def filter_layers(self) -> list[nn.Module]:
        """The subset-attention layers (filter or random), in forward order."""
        return [b.attn for b in self.blocks if isinstance(b, FilterBlock)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image B×3×H×W → last feature map B×C×h×w."""
        x = self.stem(x)
        if self.stem_pool:
            x = F.adaptive_avg_pool2d(x, self.stem_pool)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map → logits (or the pooled features with ``pre_logits``)."""
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        return self.head(self.head_drop(self.head_hidden(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image B×3×H×W → logits B×classes."""
        return self.forward_head(self.forward_features(x))


def _b(kind: str, out_dim: int, size: int, heads: int, mlp: float, expand: float, stride: int,
       depth: int = 1, k: int | None = None) -> BlockSpec:
    return BlockSpec(kind, out_dim, size, heads, mlp, expand, stride, depth, k)  # type: ignore[arg-type]


# Structures read from the author's convformer.py (spec §4.2–4.3). Heads the spec leaves open
# (XXS/S pooled blocks, S filter blocks 2–4) follow XS: 2 in pooled blocks, 4 in filter blocks; heads
# change neither parameters nor MACs.
_XS = dict(stem_dim=64, stem_expand=3, stem_pool=110, head_hidden=384, blocks=(
    _b("first", 128, 11, 2, 2, 2, 2),   # 110² → 55², pooled 11² (121 tokens)
    _b("filter", 128, 55, 4, 3, 3, 1),  # K = 256 of 3025
    _b("first", 128, 11, 2, 2, 2, 2),   # 55² → 28²
    _b("filter", 128, 28, 4, 3, 3, 1),  # K = 128 of 784
    _b("filter", 128, 28, 4, 3, 3, 1),
    _b("first", 128, 7, 2, 2, 2, 2),    # 28² → 14²
    _b("full", 128, 0, 8, 2, 2, 2),     # 196 tokens, 14² → 7²
    _b("full", 256, 0, 8, 2, 2, 2),     # 49 tokens, 7² → 4²
))
_XXS = dict(stem_dim=64, stem_expand=2, stem_pool=None, head_hidden=384, blocks=(
    _b("first", 64, 20, 2, 2, 2, 2),    # 110² → 55², pooled 20² (400 tokens)
    _b("filter", 64, 55, 2, 2, 2, 1),
    _b("filter", 64, 55, 4, 2, 2, 2),   # 55² → 28²
    _b("filter", 128, 28, 4, 2, 2, 1),
    _b("filter", 128, 28, 4, 2, 2, 1),
    _b("full", 128, 0, 8, 2, 2, 2),     # 784 tokens, 28² → 14²
    _b("full", 128, 0, 8, 2, 2, 2),     # 196 tokens, 14² → 7²
))
_S = dict(stem_dim=128, stem_expand=3, stem_pool=None, head_hidden=512, blocks=(
    _b("first", 128, 16, 2, 2, 2, 2, depth=2),   # 110² → 55²
    _b("filter", 128, 55, 4, 2, 2, 1, depth=2),
    _b("filter", 128, 55, 4, 3, 3, 2, depth=2),  # 55² → 28²
    _b("filter", 128, 28, 4, 3, 3, 1, depth=2),
    _b("filter", 256, 28, 4, 3, 3, 2, depth=2),  # 28² → 14²
    _b("full", 256, 0, 8, 2, 2, 2, depth=2),     # 14² → 7²
    _b("full", 256, 0, 8, 2, 2, 2, depth=2),     # 7² → 4²
))
# Test-size variants: 32² input, K = 8 of 49 on a 7² map; every block kind, a few hundred kFLOPs.
_PICO = dict(stem_dim=16, stem_expand=2, stem_pool=None, head_hidden=32, img_size=32, blocks=(
    _b("first", 32, 4, 2, 2, 2, 2),      # 14² → 7²
    _b("filter", 32, 7, 2, 2, 2, 1, k=8),
    _b("filter", 32, 7, 2, 2, 2, 1, k=8),
    _b("full", 32, 0, 2, 2, 2, 2),       # 7² → 4²
))


def _create(variant: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> FilterViT:
    pretrained = overrides.pop("pretrained", False)
    return build_model_with_cfg(FilterViT, variant, pretrained, **{**defaults, **overrides})


def _cfg(size: int = 224, **kwargs: Any) -> dict[str, Any]:
    # Author's evaluation: Resize(256) → CenterCrop(224), mean = std = 0.5, bilinear (torchvision default).
    return {"url": "", "num_classes": 1000, "input_size": (3, size, size), "pool_size": None,
            "crop_pct": 0.875, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "first_conv": "stem.conv", "classifier": "head", "paper_ids": "arXiv:2410.22709", **kwargs}


default_cfgs = generate_default_cfgs({
    "filtervit_xxs": _cfg(),
    "filtervit_xs": _cfg(),
    "filtervit_s": _cfg(),
    "dropoutvit_xs": _cfg(),
    "filtervit_pico": _cfg(32, num_classes=10, crop_pct=1.0),
    "dropoutvit_pico": _cfg(32, num_classes=10, crop_pct=1.0),
})


@register_model
def filtervit_xxs(**overrides: Any) -> FilterViT:
    """FilterViT-XXS (``ConvFormer_xxs``): 946,608 params at 100 classes, no post-stem pool."""
    return _create("filtervit_xxs", _XXS, overrides)


@register_model
def filtervit_xs(**overrides: Any) -> FilterViT:
    """FilterViT-XS (``ConvFormer_xs``, the paper's model): 1,894,381 params at 100 classes, 1.38 GMACs."""
    return _create("filtervit_xs", _XS, overrides)


@register_model
def filtervit_s(**overrides: Any) -> FilterViT:
    """FilterViT-S (``ConvFormer_s``): 4,989,040 params at 100 classes, two encoder layers per block."""
    return _create("filtervit_s", _S, overrides)


@register_model
def dropoutvit_xs(**overrides: Any) -> FilterViT:
    """DropoutViT-XS (``DropOutVIT_xs``): XS with random, batch-shared pixel selection; 1,875,556 params."""
    return _create("dropoutvit_xs", {**_XS, "selection": "random"}, overrides)


@register_model
def filtervit_pico(**overrides: Any) -> FilterViT:
    """A FilterViT with every block kind at 32×32 input, for tests."""
    return _create("filtervit_pico", _PICO, overrides)


@register_model
def dropoutvit_pico(**overrides: Any) -> FilterViT:
    """A DropoutViT at 32×32 input, for tests."""
    return _create("dropoutvit_pico", {**_PICO, "selection": "random"}, overrides)
