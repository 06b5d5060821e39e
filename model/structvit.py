"""StructViT: UniFormer with every self-attention replaced by StructSA, for images (2-D) and video (3-D).

Paper: M. Kim, P. H. Seo, C. Schmid, M. Cho, "Learning Correlation Structures for Vision Transformers",
CVPR 2024 (arXiv 2404.03924); backbone: K. Li et al., "UniFormer", ICLR 2022 / TPAMI 2023. Spec:
``shared/specs/structvit.md`` §4. The authors released no code; this is a reimplementation from the paper and
the public UniFormer code, with the spec's recommended readings where the paper is silent (``docs/structvit.md``).

Layout (image; video replaces every 2-D op by its 3-D counterpart, see :class:`StructViT`)::

    stem      Conv 4×4/4 -> LN                                   (video: Conv3d 3×4×4 / 2×4×4, pad (1, 0, 0))
    stage 1-2 C-blocks: x += DW3×3(x); x += PW(DW5×5(PW(BN(x)))); x += MLP(BN(x))          (1×1-conv MLP)
    stage 3-4 S-blocks: x += DW3×3(x); x += StructSA(LN(x));    x += MLP(LN(x))
    downsample before stages 2-4: Conv 2×2/2 -> LN               (video: 1×2×2 / 1×2×2)
    head      BN -> global average pool -> Linear

Names: ``structvit_{s,b,l}_{D}_{S}`` (image, 224²) and ``structvit_{s,b}_{D}_{S}_video`` (16 frames for S,
32 for B); ``struct_dim=0`` gives UniFormer itself (vanilla attention), the FLOP/parameter baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.layers.structsa import StructSA
from model.registry import register_model

__all__ = ["GridStructSA", "StructViT"]

_Dd = dict[str, Any]


def _conv(ndim: int) -> type[nn.Module]:
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _bn(ndim: int) -> type[nn.Module]:
    return nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d


class ConvMlp(nn.Module):
    """MLP of 1×1(×1) convolutions on a (B, C, *grid) map (UniFormer's ``CMlp``)."""

    def __init__(self, dim: int, hidden: int, ndim: int, drop: float = 0.0, dd: _Dd | None = None) -> None:
        """Builds fc1 -> GELU -> dropout -> fc2 -> dropout (``ndim`` = 2 for images, 3 for video)."""
        super().__init__()
        dd = dd or {}
        self.fc1 = _conv(ndim)(dim, hidden, 1, **dd)
        self.act = nn.GELU()
        self.fc2 = _conv(ndim)(hidden, dim, 1, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *grid) -> (B, C, *grid)."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class MapScale(nn.Module):
    """LayerScale for a (B, C, *grid) map: a learnable per-channel factor ``gamma`` (UniFormer-L's C-blocks)."""

    def __init__(self, dim: int, init_value: float, dd: _Dd | None = None) -> None:
        """Builds ``gamma`` = ``init_value`` · 1 (``dim`` channels)."""
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value, **(dd or {})))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *grid) -> same, scaled per channel."""
        return x * self.gamma.view(-1, *(1,) * (x.dim() - 2))


class ConvBlock(nn.Module):
    """UniFormer's C-block (local relation aggregator): CPE, PW-DW5-PW token mixer, conv MLP; BatchNorm."""

    def __init__(self, dim: int, ndim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: float | None = None, dd: _Dd | None = None) -> None:
        """Builds the block for a ``dim``-channel map of ``ndim`` spatial(-temporal) dimensions."""
        super().__init__()
        dd, conv = dd or {}, _conv(ndim)
        self.pos_embed = conv(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = _bn(ndim)(dim, **dd)
        self.conv1 = conv(dim, dim, 1, **dd)
        self.attn = conv(dim, dim, 5, padding=2, groups=dim, **dd)
        self.conv2 = conv(dim, dim, 1, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _bn(ndim)(dim, **dd)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), ndim, drop, dd)
        self.ls1 = MapScale(dim, layer_scale, dd) if layer_scale else nn.Identity()
        self.ls2 = MapScale(dim, layer_scale, dd) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *grid) -> (B, C, *grid)."""
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.ls1(self.conv2(self.attn(self.conv1(self.norm1(x))))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class StructBlock(nn.Module):
    """UniFormer's S-block with StructSA in place of MHSA: CPE, pre-LN StructSA, pre-LN MLP."""

    def __init__(self, dim: int, ndim: int, *, head_dim: int = 64, mlp_ratio: float = 4.0, struct_dim: int = 4,
                 kernel_size: int = 3, kv_stride: int = 1, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None,
                 fused: bool = True, dd: _Dd | None = None) -> None:
        """Builds the block; see :class:`~model.layers.structsa.StructSA` for the attention arguments."""
        super().__init__()
        dd = dd or {}
        norm = partial(nn.LayerNorm, eps=1e-6, **dd)
        self.pos_embed = _conv(ndim)(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = norm(dim)
        self.attn = StructSA(dim, head_dim=head_dim, struct_dim=struct_dim, kernel_size=kernel_size,
                             kv_stride=kv_stride, ndim=ndim, qkv_bias=qkv_bias, attn_drop=attn_drop,
                             proj_drop=drop, fused=fused, **dd)
        self.ls1 = LayerScale(dim, layer_scale, **dd) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, **dd)
        self.ls2 = LayerScale(dim, layer_scale, **dd) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *grid) -> (B, C, *grid)."""
        x = x + self.pos_embed(x)
        b, c, *grid = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        t = t + self.drop_path(self.ls1(self.attn(self.norm1(t), tuple(grid))))
        t = t + self.drop_path(self.ls2(self.mlp(self.norm2(t))))
        return t.transpose(1, 2).reshape(b, c, *grid)


class PatchEmbed(nn.Module):
    """Strided convolution followed by LayerNorm over channels: the stem and the downsampling layers."""

    def __init__(self, in_chans: int, dim: int, kernel: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int] | int = 0, dd: _Dd | None = None) -> None:
        """Builds Conv(kernel, stride, padding) -> LayerNorm (eps 1e-5, as UniFormer's ``PatchEmbed``)."""
        super().__init__()
        dd = dd or {}
        self.proj = _conv(len(kernel))(in_chans, dim, tuple(kernel), tuple(stride), padding, **dd)
        self.norm = nn.LayerNorm(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *grid) -> (B, C, *grid′)."""
        x = self.proj(x)
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class Stage(nn.Module):
    """Optional downsampling followed by a list of blocks (kept as a list for gradient checkpointing)."""

    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]) -> None:
        """Holds ``downsample`` (``nn.Identity`` for the first stage) and ``blocks``."""
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)


class StructViT(nn.Module):
    """StructViT / UniFormer backbone with a classification head, for images or video.

    Input: (B, 3, H, W) images, or (B, 3, T, H, W) clips when ``video=True``. Token grids at 224²:
    56², 28², 14², 7² (video: T/2 frames at every stage). Output: (B, num_classes) logits.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 8, 3),
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        *,
        block_types: Sequence[str] = ("C", "C", "S", "S"),
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        struct_dim: int = 4,
        kv_stride: int = 1,
        kernel_size: int = 3,
        qkv_bias: bool = True,
        video: bool = False,
        in_chans: int = 3,
        num_classes: int = 1000,
        img_size: int | Sequence[int] = 224,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = None,
        fused: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Builds the network.

        Args:
            depths: Blocks per stage.
            embed_dims: Channels per stage.
            block_types: "C" (convolution block) or "S" (StructSA block) per stage.
            head_dim: Channels per attention head (64: 5/8 heads for 320/512 channels).
            mlp_ratio: MLP hidden width / channels.
            struct_dim: D of every StructSA layer; 0 = vanilla MHSA (UniFormer).
            kv_stride: Spatial key/value stride S (video: (1, S, S)).
            kernel_size: Side of the StructSA key/value kernels (3 -> M = 3×3 or 3×3×3).
            qkv_bias: Bias on the qkv projections.
            video: 3-D model for (B, 3, T, H, W) clips.
            in_chans: Input channels.
            num_classes: Classifier outputs; 0 = no classifier (``forward`` returns pooled features).
            img_size: Accepted for the pipeline's interface; the network is fully convolutional.
            drop_rate: Dropout after the MLPs/projections and before the classifier.
            attn_drop_rate: Attention dropout.
            drop_path_rate: Stochastic depth, increasing linearly over all blocks up to this rate.
            layer_scale_init_value: LayerScale init of every block (UniFormer-L* uses 1e-6); ``None`` = off.
            fused: StructSA code path (fused SDPA or the literal reference).
            device: Where to allocate (``"meta"`` allocates nothing; call :meth:`init_weights` after
                ``to_empty``).
            dtype: Parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes, self.video, self.img_size = num_classes, video, img_size
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        nd = 3 if video else 2
        if video:
            self.stem = PatchEmbed(in_chans, embed_dims[0], (3, 4, 4), (2, 4, 4), (1, 0, 0), dd)
        else:
            self.stem = PatchEmbed(in_chans, embed_dims[0], (4, 4), (4, 4), 0, dd)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        down = (1, 2, 2) if video else (2, 2)
        stages, k = [], 0
        for i, (depth, dim, kind) in enumerate(zip(depths, embed_dims, block_types, strict=True)):
            ds = nn.Identity() if i == 0 else PatchEmbed(embed_dims[i - 1], dim, down, down, 0, dd)
            if kind == "C":
                blocks = [ConvBlock(dim, nd, mlp_ratio, drop_rate, dpr[k + j], layer_scale_init_value, dd)
                          for j in range(depth)]
            else:
                blocks = [StructBlock(dim, nd, head_dim=head_dim, mlp_ratio=mlp_ratio, struct_dim=struct_dim,
                                      kernel_size=kernel_size, kv_stride=kv_stride, qkv_bias=qkv_bias,
                                      drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[k + j],
                                      layer_scale=layer_scale_init_value, fused=fused, dd=dd)
                          for j in range(depth)]
            stages.append(Stage(ds, blocks))
            k += depth
        self.stages = nn.ModuleList(stages)
        self.norm = _bn(nd)(embed_dims[-1], **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        self._layer_scale = layer_scale_init_value
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """UniFormer's init: Linear trunc-normal(0.02) with zero bias, norms at 1/0, convs at PyTorch's default.

        Also (re)initialises a model built on the meta device after ``to_empty``.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm | nn.BatchNorm2d | nn.BatchNorm3d | nn.Conv2d | nn.Conv3d):
                m.reset_parameters()
            elif isinstance(m, LayerScale | MapScale):
                m.gamma.fill_(self._layer_scale or 1.0)

    # --- hooks used by the training runtime (timm conventions) ---------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay beyond the 1-D rule (LayerScale gammas, for clarity)."""
        return {n for n, _ in self.named_parameters() if n.endswith(".gamma")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters by depth, for layer-wise LR decay (``timm.optim`` reads them).

        Fine groups: the stem, then every downsample layer and every block in order; the final norm with the
        last group (the head is always put after everything by timm).
        """
        blocks: Any = r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)),
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^norm", (99999,)),
        ]
        return {"stem": r"^stem", "blocks": blocks}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block's activations in the backward pass (non-reentrant, RNG state preserved)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the classifier (``global_pool`` is accepted for timm's interface; pooling is always avg)."""
        self.num_classes = num_classes
        w = self.norm.weight
        self.head = nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype) \
            if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, [T,] H, W) -> final normalised map (B, C, [T/2,] H/32, W/32)."""
        x = self.pos_drop(self.stem(x))
        for stage in self.stages:
            x = stage.downsample(x)
            for blk in stage.blocks:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, *grid) -> global average pool (B, C) -> logits (B, num_classes) unless ``pre_logits``."""
        x = self.head_drop(x.flatten(2).mean(-1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, [T,] H, W) -> (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


# --- configs and entrypoints ------------------------------------------------------------------------------

def _cfg(frames: int = 0, classes: int = 1000, **kwargs: Any) -> dict[str, Any]:
    cfg = {"url": "", "num_classes": classes, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
           "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
           "first_conv": "stem.proj", "classifier": "head", "paper_ids": "arXiv:2404.03924", **kwargs}
    if frames:  # timm's config has no frame count: clips are (B, 3, frames, 224, 224); see ``FRAMES``
        cfg.update(num_classes=400 if classes == 1000 else classes, notes=(f"{frames} frames",))
    return cfg


SIZES: dict[str, dict[str, Any]] = {
    "s": {"depths": (3, 4, 8, 3), "embed_dims": (64, 128, 320, 512), "drop_path_rate": 0.1},
    "b": {"depths": (5, 8, 20, 7), "embed_dims": (64, 128, 320, 512), "drop_path_rate": 0.3},
    "l": {"depths": (5, 10, 24, 7), "embed_dims": (128, 192, 448, 640), "drop_path_rate": 0.4,
          "layer_scale_init_value": 1e-6},
    # CI-sized: 4 tiny stages, 2 heads of 16 channels in the S-stages.
    "tiny": {"depths": (1, 1, 2, 1), "embed_dims": (16, 16, 32, 32), "head_dim": 16, "mlp_ratio": 2.0},
}
IMAGE = {"s": [(4, 2), (4, 1), (8, 1)], "b": [(4, 2), (4, 1), (8, 1)], "l": [(4, 1)], "tiny": [(4, 1), (4, 2)]}
VIDEO = {"s": [(4, 2), (4, 1), (8, 1)], "b": [(4, 2), (4, 1)], "tiny": [(4, 1), (4, 2)]}
FRAMES = {"s": 16, "b": 32, "tiny": 4}

_TINY_CFG = {"classes": 10, "input_size": (3, 64, 64)}
default_cfgs = generate_default_cfgs(
    {f"structvit_{s}_{d}_{st}": _cfg(**(_TINY_CFG if s == "tiny" else {})) for s, v in IMAGE.items() for d, st in v}
    | {f"structvit_{s}_{d}_{st}_video": _cfg(FRAMES[s], **(_TINY_CFG if s == "tiny" else {}))
       for s, v in VIDEO.items() for d, st in v}
    | {n: _cfg(first_conv="patch_embed.proj") for n in ("structvit_deit_s_4_1", "structvit_deit_s_1_1")}
    | {"structvit_deit_tiny_4_1": _cfg(classes=10, first_conv="patch_embed.proj", input_size=(3, 32, 32))}
)


def _create(variant: str, size: str, struct_dim: int, kv_stride: int, video: bool,
            overrides: dict[str, Any]) -> StructViT:
    pretrained = overrides.pop("pretrained", False)
    defaults = {**SIZES[size], "struct_dim": struct_dim, "kv_stride": kv_stride, "video": video}
    if size == "tiny":
        defaults["num_classes"] = 10
    if video:
        defaults["drop_path_rate"] = 0.1  # the paper's video fine-tuning rate (spec §7 item 8)
    return build_model_with_cfg(StructViT, variant, pretrained, **{**defaults, **overrides})


@register_model
def structvit_s_4_2(**overrides: Any) -> StructViT:
    """StructViT-S-4-2 (image): D = 4, key/value stride 2; UniFormer-S cost (paper: 23 M, 3.6 G)."""
    return _create("structvit_s_4_2", "s", 4, 2, False, overrides)


@register_model
def structvit_s_4_1(**overrides: Any) -> StructViT:
    """StructViT-S-4-1 (image): D = 4, stride 1 (paper: 23 M, 4.3 G, 83.2 % top-1)."""
    return _create("structvit_s_4_1", "s", 4, 1, False, overrides)


@register_model
def structvit_s_8_1(**overrides: Any) -> StructViT:
    """StructViT-S-8-1 (image): D = 8, stride 1 (paper: 24 M, 5.4 G, 83.3 % top-1)."""
    return _create("structvit_s_8_1", "s", 8, 1, False, overrides)


@register_model
def structvit_b_4_2(**overrides: Any) -> StructViT:
    """StructViT-B-4-2 (image): D = 4, stride 2 (paper: 51 M, 8.3 G, 84.0 % top-1)."""
    return _create("structvit_b_4_2", "b", 4, 2, False, overrides)


@register_model
def structvit_b_4_1(**overrides: Any) -> StructViT:
    """StructViT-B-4-1 (image): D = 4, stride 1 (paper: 51 M, 9.9 G, 84.2 % top-1)."""
    return _create("structvit_b_4_1", "b", 4, 1, False, overrides)


@register_model
def structvit_b_8_1(**overrides: Any) -> StructViT:
    """StructViT-B-8-1 (image): D = 8, stride 1 (paper: 52 M, 12.0 G, 84.3 % top-1)."""
    return _create("structvit_b_8_1", "b", 8, 1, False, overrides)


@register_model
def structvit_l_4_1(**overrides: Any) -> StructViT:
    """StructViT-L-4-1 (image, LayerScale 1e-6 as UniFormer-L*): paper 103 M, 15.4 G (Token Labeling)."""
    return _create("structvit_l_4_1", "l", 4, 1, False, overrides)


@register_model
def structvit_tiny_4_1(**overrides: Any) -> StructViT:
    """CI-sized image StructViT (D = 4, stride 1), 10 classes."""
    return _create("structvit_tiny_4_1", "tiny", 4, 1, False, overrides)


@register_model
def structvit_tiny_4_2(**overrides: Any) -> StructViT:
    """CI-sized image StructViT (D = 4, stride 2), 10 classes."""
    return _create("structvit_tiny_4_2", "tiny", 4, 2, False, overrides)


@register_model
def structvit_s_4_2_video(**overrides: Any) -> StructViT:
    """StructViT-S-4-2 video (16 frames, stride (1, 2, 2)): paper 42.3 G per view (K400)."""
    return _create("structvit_s_4_2_video", "s", 4, 2, True, overrides)


@register_model
def structvit_s_4_1_video(**overrides: Any) -> StructViT:
    """StructViT-S-4-1 video (16 frames, M = 3×3×3): paper 81.8 G per view (K400)."""
    return _create("structvit_s_4_1_video", "s", 4, 1, True, overrides)


@register_model
def structvit_s_8_1_video(**overrides: Any) -> StructViT:
    """StructViT-S-8-1 video (16 frames): paper 135.3 G per view (K400)."""
    return _create("structvit_s_8_1_video", "s", 8, 1, True, overrides)


@register_model
def structvit_b_4_2_video(**overrides: Any) -> StructViT:
    """StructViT-B-4-2 video (32 frames, stride (1, 2, 2)): paper 261.3 G per view (K400)."""
    return _create("structvit_b_4_2_video", "b", 4, 2, True, overrides)


@register_model
def structvit_b_4_1_video(**overrides: Any) -> StructViT:
    """StructViT-B-4-1 video (32 frames): paper 654.3 G per view (SS; K400 prints 664.5)."""
    return _create("structvit_b_4_1_video", "b", 4, 1, True, overrides)


@register_model
def structvit_tiny_4_1_video(**overrides: Any) -> StructViT:
    """CI-sized video StructViT (D = 4, stride 1, 3×3×3 kernels), 10 classes."""
    return _create("structvit_tiny_4_1_video", "tiny", 4, 1, True, overrides)


@register_model
def structvit_tiny_4_2_video(**overrides: Any) -> StructViT:
    """CI-sized video StructViT (D = 4, stride (1, 2, 2)), 10 classes."""
    return _create("structvit_tiny_4_2_video", "tiny", 4, 2, True, overrides)


# --- the paper's ablation backbone: DeiT-S with every attention layer replaced by StructSA (§4.2) -----------

class GridStructSA(StructSA):
    """StructSA as a drop-in for timm's ViT ``Attention``: a fixed patch grid after ``num_prefix_tokens`` tokens.

    The class token is not on the grid; it queries all tokens and is attended as one raw key/value inside the
    same joint softmax (the paper does not say how DeiT's class token is handled; this is the reading here).
    """

    def __init__(self, dim: int, num_heads: int, grid_size: tuple[int, ...], **kwargs: Any) -> None:
        """Builds the layer for ``grid_size`` patches; ``kwargs`` go to :class:`StructSA`."""
        super().__init__(dim, num_heads, **kwargs)
        self.grid_size = tuple(grid_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """(B, P + N, C) -> (B, P + N, C); ``attn_mask`` must be ``None`` (timm's call signature)."""
        if attn_mask is not None:
            raise ValueError("StructSA takes no attention mask")
        return super().forward(x, self.grid_size)


def _create_deit(variant: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> VisionTransformer:
    """A timm ``VisionTransformer`` whose blocks' attention is :class:`GridStructSA` (same qkv/proj names)."""
    overrides = dict(overrides)
    pretrained = overrides.pop("pretrained", False)
    sa_keys = ("struct_dim", "kv_stride", "kernel_size", "fused")
    sa = {k: overrides.pop(k, defaults.pop(k, None)) for k in sa_keys}
    net = build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                               **{**defaults, **overrides})
    w = net.patch_embed.proj.weight
    for blk in net.blocks:
        old = blk.attn
        blk.attn = GridStructSA(net.embed_dim, old.num_heads, net.patch_embed.grid_size,
                                num_prefix_tokens=net.num_prefix_tokens, qkv_bias=old.qkv.bias is not None,
                                attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p, device=w.device, dtype=w.dtype,
                                **{k: v for k, v in sa.items() if v is not None})
        trunc_normal_(blk.attn.qkv.weight, std=0.02)  # timm's ViT init of the Linear layers
        trunc_normal_(blk.attn.proj.weight, std=0.02)
        for lin in (blk.attn.qkv, blk.attn.proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
    return net


_DEIT_S = {"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "qkv_bias": True}
_DEIT_TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10,
              "mlp_ratio": 2.0}


@register_model
def structvit_deit_s_4_1(**overrides: Any) -> VisionTransformer:
    """DeiT-S with StructSA (D = 4, 3×3) in all 12 layers: the paper's ablation model (22.38 M; Table 7 22.4 M)."""
    return _create_deit("structvit_deit_s_4_1", {**_DEIT_S, "struct_dim": 4}, overrides)


@register_model
def structvit_deit_s_1_1(**overrides: Any) -> VisionTransformer:
    """DeiT-S with ConvSA (StructSA, D = 1) in all layers (22.13 M; Table 7 22.1 M)."""
    return _create_deit("structvit_deit_s_1_1", {**_DEIT_S, "struct_dim": 1}, overrides)


@register_model
def structvit_deit_tiny_4_1(**overrides: Any) -> VisionTransformer:
    """CI-sized DeiT with StructSA (32×32 input, 8×8 patches grid, D = 4), 10 classes."""
    return _create_deit("structvit_deit_tiny_4_1", {**_DEIT_TINY, "struct_dim": 4}, overrides)
