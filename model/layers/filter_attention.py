"""Attention over a subset of K pixels: FilterViT's filter attention and DropoutViT's random selection.

FilterViT ("FilterViT and DropoutViT", Sun & Chen, https://arxiv.org/abs/2410.22709; the author's code
github.com/BobSun98/FilterVIT ``v4.5/models/leaky_attention_block.py`` is the reference): a one-channel
dilated convolution scores every pixel, the scores gate all pixels, the top K pixels go through a
post-LN transformer encoder and are written back over the gated map. DropoutViT picks K uniformly
random pixels instead (no scorer, no gating).

Selection is done by gather/scatter on the K indices (static shapes, no ``nonzero``, no host-device
synchronisation); ``impl="mask"`` keeps the author's boolean-mask formulation as the reference for
tests and benchmarks. See ``docs/models.md`` for the author's quirks, which ones are reproduced by
default and which option fixes each.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

#: K by configured (square) feature-map size, from the author's code.
K_BY_SIZE = {110: 768, 55: 256, 28: 128}

_Device = torch.device | str | None


def sinusoid_1d(n: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed sinusoid table over ``n`` positions: row p is [sin(p·ω₀), cos(p·ω₀), sin(p·ω₁), ...].

    Args:
        n: Number of positions (raster positions p = r·W + c for a flattened grid).
        dim: Channels (even), ω_i = 10000^(−2i/dim).
        device: Where to build the table.

    Returns:
        Table of shape n×dim, float32.
    """
    pos = torch.arange(n, dtype=torch.float32, device=device).unsqueeze(1)  # n×1
    omega = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim, device=device)
    table[:, 0::2] = torch.sin(pos * omega)
    table[:, 1::2] = torch.cos(pos * omega)
    return table


def grid_pos_embed(h: int, w: int, dim: int, kind: Literal["1d", "2d"] = "1d",
                   device: torch.device | None = None) -> torch.Tensor:
    """Positional table of an h×w grid, one row per raster position.

    Args:
        h: Grid height.
        w: Grid width.
        dim: Channels.
        kind: ``"1d"`` (author's code: a 1-D sinusoid over p = r·w + c, so the 2-D location is only
            encoded through the grid width) or ``"2d"`` (half the channels encode the row, half the column).
        device: Where to build the table.

    Returns:
        Table of shape (h·w)×dim, float32.
    """
    if kind == "1d":
        return sinusoid_1d(h * w, dim, device)
    if dim % 4:
        raise ValueError(f"a 2-D sinusoid needs channels divisible by 4, got {dim}")
    rows = sinusoid_1d(h, dim // 2, device).unsqueeze(1).expand(h, w, dim // 2)
    cols = sinusoid_1d(w, dim // 2, device).unsqueeze(0).expand(h, w, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, dim)


class InProjAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters, run by SDPA.

    Parameter names and initialisation match ``nn.MultiheadAttention`` (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), so weights of a PyTorch ``TransformerEncoderLayer`` load unchanged.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, device: _Device = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, **dd))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, **dd))
        self.out_proj = nn.Linear(dim, dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's ``nn.MultiheadAttention`` initialisation (``out_proj.weight`` keeps ``nn.Linear``'s own).

        ``out_proj`` draws its initialisation when it is built, before this runs: a re-initialisation that
        reproduces the constructor resets ``out_proj`` first (``FilterViT.init_weights`` walks children
        before parents).
        """
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over tokens ``x`` of shape B×N×C; returns B×N×C."""
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B×heads×N×d
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (batch first) on the fused attention kernel, same parameter names.

    The defaults are PyTorch's, as in the author's code: post-LN, ReLU feed-forward, dropout 0.1 on the
    attention weights, after attention, inside and after the feed-forward, LayerNorm eps 1e-5.
    ``norm_first=True`` and ``act="gelu"`` give the pre-LN GELU (ViT) flavour instead.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.1,
                 act: Literal["relu", "gelu"] = "relu", norm_first: bool = False, eps: float = 1e-5,
                 device: _Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm_first = norm_first
        self.self_attn = InProjAttention(dim, num_heads, dropout, **dd)
        self.linear1 = nn.Linear(dim, mlp_dim, **dd)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(mlp_dim, dim, **dd)
        self.norm1 = nn.LayerNorm(dim, eps=eps, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=eps, **dd)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.ReLU() if act == "relu" else nn.GELU()

    def _sa(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout1(self.self_attn(x))

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens B×N×C in, B×N×C out."""
        if self.norm_first:
            x = x + self._sa(self.norm1(x))
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x))
        return self.norm2(x + self._ff(x))


class FilterScorer(nn.Module):
    """The Filter Block's "CNN": dilated 7×7 conv to one channel → norm → (GELU) → sigmoid, size kept.

    Args:
        dim: Input channels.
        act: ``"gelu_sigmoid"`` (author: scores in (0.4576, 1), ranking not monotone for very negative
            norm outputs) or ``"sigmoid"`` (fix: monotone, scores in (0, 1)).
        norm: ``"batch"`` (author: one-channel BatchNorm, scores depend on the batch) or ``"instance"``
            (fix: GroupNorm(1, 1), per-image statistics; same parameter count).
        padding_mode: ``"zeros"`` (author; border artefacts in the masks) or ``"replicate"``.
        device: Where to allocate parameters (``"meta"`` allocates nothing).
        dtype: Parameter dtype.
    """

    def __init__(self, dim: int, kernel_size: int = 7, dilation: int = 5,
                 act: Literal["gelu_sigmoid", "sigmoid"] = "gelu_sigmoid",
                 norm: Literal["batch", "instance"] = "batch",
                 padding_mode: Literal["zeros", "replicate"] = "zeros", device: _Device = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(dim, 1, kernel_size, padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
                              padding_mode=padding_mode, **dd)
        self.norm = nn.BatchNorm2d(1, **dd) if norm == "batch" else nn.GroupNorm(1, 1, **dd)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape B×1×H×W for a map of shape B×C×H×W."""
        z = self.norm(self.conv(x))
        return torch.sigmoid(F.gelu(z) if self.act == "gelu_sigmoid" else z)


class TokenSubsetAttention(nn.Module):
    """Encoder over K selected pixels of a map, written back in place of them (shared by both selections).

    Args:
        dim: Channels C.
        size: Configured (native) map size; K and the positional table are fixed for it.
        num_heads: Attention heads.
        mlp_dim: Feed-forward width.
        depth: Encoder layers.
        num_tokens: K at the native size; default from :data:`K_BY_SIZE`.
        k_rule: At other map sizes: ``"ratio"`` keeps the native keep-ratio, K = round(K·H·W / size²),
            with a positional table built for the runtime grid (deviation, documented); ``"fixed"`` is
            the author's behaviour (same K, rows of the native table looked up by the runtime raster
            position; an error when the map is larger than the native one).
        pos_embed: ``"1d"`` (author) or ``"2d"`` sinusoid.
        writeback: ``"overwrite"`` (author: selected pixels become the encoder output) or ``"add"``
            (outer residual: gated input + encoder output).
        impl: ``"gather"`` (gather/scatter on indices) or ``"mask"`` (the author's boolean-mask
            formulation with ``nonzero``; reference for tests and benchmarks).
        encoder_kwargs: Extra :class:`EncoderLayer` arguments (dropout, act, norm_first).
        device: Where to allocate parameters and the positional table (``"meta"`` allocates nothing).
        dtype: Parameter (and positional table) dtype.
    """

    def __init__(self, dim: int, size: int, num_heads: int, mlp_dim: int, depth: int = 1,
                 num_tokens: int | None = None, k_rule: Literal["ratio", "fixed"] = "ratio",
                 pos_embed: Literal["1d", "2d"] = "1d", writeback: Literal["overwrite", "add"] = "overwrite",
                 impl: Literal["gather", "mask"] = "gather", encoder_kwargs: dict[str, Any] | None = None,
                 device: _Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_tokens is None and size not in K_BY_SIZE:
            raise ValueError(f"no K for map size {size} (table: {K_BY_SIZE}); pass num_tokens")
        dd = {"device": device, "dtype": dtype}
        self.size, self.num_tokens = size, num_tokens or K_BY_SIZE[size]
        self.k_rule, self.pos_kind, self.writeback, self.impl = k_rule, pos_embed, writeback, impl
        # A non-persistent buffer (author: a plain tensor attribute created on CUDA): follows .to(), not saved.
        self.register_buffer("pos_embed", torch.empty(size * size, dim, **dd), persistent=False)
        self.encoder = nn.Sequential(*[EncoderLayer(dim, num_heads, mlp_dim, **(encoder_kwargs or {}), **dd)
                                       for _ in range(depth)])
        self.record = False
        self.last_scores: torch.Tensor | None = None
        self.last_index: torch.Tensor | None = None
        self.last_hw: tuple[int, int] = (0, 0)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fills the positional table for the configured size² map (no random draws).

        The table is a non-persistent buffer: ``to_empty`` leaves it uninitialised and checkpoints do not
        hold it, so a model materialised from the meta device needs this (``FilterViT.init_weights``).
        """
        table = grid_pos_embed(self.size, self.size, self.pos_embed.shape[1], self.pos_kind, self.pos_embed.device)
        self.pos_embed.copy_(table)

    def tokens_for(self, h: int, w: int) -> int:
        """K for a runtime map of h×w (a Python int: shapes stay static)."""
        if (h == w == self.size) or self.k_rule == "fixed":
            k = self.num_tokens
        else:
            k = max(1, round(self.num_tokens * h * w / self.size**2))
        if k > h * w:
            raise ValueError(f"K = {k} exceeds the {h}×{w} map (configured for {self.size}²)")
        return k

    def table_for(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Positional table with one row per raster position of the runtime h×w grid (at least)."""
        if h == w == self.size:
            return self.pos_embed
        if self.k_rule == "fixed":
            if h * w > self.size**2:
                raise ValueError(f"map {h}×{w} is larger than the configured {self.size}² (k_rule='fixed')")
            return self.pos_embed
        return grid_pos_embed(h, w, self.pos_embed.shape[1], self.pos_kind, device)

    def attend(self, base: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Runs the encoder over the pixels ``index`` of ``src`` and writes them into a copy of ``base``.

        Args:
            base: Map whose unselected pixels are kept, B×C×H×W.
            src: Map the tokens are taken from, B×C×H×W.
            index: Selected raster positions, B×K (int64).

        Returns:
            New map B×C×H×W; ``base`` and ``src`` are not modified.
        """
        if self.impl == "mask":
            return self._attend_mask(base, src, index)
        b, c, h, w = src.shape
        table = self.table_for(h, w, src.device)
        gidx = index.unsqueeze(1).expand(-1, c, -1)  # B×C×K
        tokens = src.flatten(2).gather(2, gidx).transpose(1, 2) + table[index]  # B×K×C
        out = self.encoder(tokens)
        if self.writeback == "add":
            out = out + src.flatten(2).gather(2, gidx).transpose(1, 2)
        return base.flatten(2).scatter(2, gidx, out.transpose(1, 2).to(base.dtype)).view(b, c, h, w)

    def _attend_mask(self, base: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        b, c, h, w = src.shape
        table = self.table_for(h, w, src.device)
        mask = torch.zeros(b, h * w, dtype=torch.bool, device=src.device).scatter_(1, index, True)
        tok = src.flatten(2).transpose(1, 2)  # B×N×C
        sel = tok[mask].view(b, -1, c)  # raster order, as the author's nonzero scan
        pos = mask.nonzero()[:, 1].view(b, -1)
        out = self.encoder(sel + table[pos])
        if self.writeback == "add":
            out = out + sel
        y = base.flatten(2).transpose(1, 2).clone()
        y[mask] = out.reshape(-1, c).to(y.dtype)
        return y.transpose(1, 2).reshape(b, c, h, w)

    def _remember(self, scores: torch.Tensor | None, index: torch.Tensor, hw: tuple[int, int]) -> None:
        if self.record:  # for the mask pictures (model.viz.filtervit)
            self.last_scores = None if scores is None else scores.detach()
            self.last_index, self.last_hw = index.detach(), hw


class FilterAttention(TokenSubsetAttention):
    """FilterViT's filter attention: score → gate → top-K → encoder → write back.

    Args:
        dim: Channels C.
        size: Configured map size (K from :data:`K_BY_SIZE` unless ``num_tokens``).
        num_heads: Attention heads.
        mlp_dim: Feed-forward width.
        gate_unselected: ``True`` (author): every pixel is multiplied by its score; ``False`` leaves the
            unselected pixels as they are (only the tokens are gated).
        scorer_kwargs: :class:`FilterScorer` options (act, norm, padding_mode).
        device: Where to allocate parameters (``"meta"`` allocates nothing).
        dtype: Parameter dtype.
        **kwargs: :class:`TokenSubsetAttention` options.
    """

    def __init__(self, dim: int, size: int, num_heads: int, mlp_dim: int, gate_unselected: bool = True,
                 scorer_kwargs: dict[str, Any] | None = None, device: _Device = None,
                 dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(dim, size, num_heads, mlp_dim, device=device, dtype=dtype, **kwargs)
        self.scorer = FilterScorer(dim, **(scorer_kwargs or {}), device=device, dtype=dtype)
        self.gate_unselected = gate_unselected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map B×C×H×W in, map B×C×H×W out (the input is not modified)."""
        _, _, h, w = x.shape
        scores = self.scorer(x)  # B×1×H×W
        gated = x * scores  # the scorer's only gradient path: top-K is not differentiable
        k = self.tokens_for(h, w)
        index = scores.flatten(1).topk(k, dim=1).indices.sort(dim=1).values  # B×K, raster order
        self._remember(scores, index, (h, w))
        return self.attend(gated if self.gate_unselected else x, gated, index)


class RandomTokenAttention(TokenSubsetAttention):
    """DropoutViT's attention: K uniformly random pixels, one draw shared by the batch, no gating.

    Args:
        dim: Channels C.
        size: Configured map size.
        num_heads: Attention heads.
        mlp_dim: Feed-forward width.
        eval_selection: Selection in eval mode: ``"random"`` (author: redrawn every forward pass, so two
            evaluations differ), ``"fixed"`` (deterministic: the same draw from ``eval_seed`` every pass)
            or ``"full"`` (all pixels attend).
        eval_seed: Seed of the ``"fixed"`` draw.
        **kwargs: :class:`TokenSubsetAttention` options (``device`` and ``dtype`` included).
    """

    def __init__(self, dim: int, size: int, num_heads: int, mlp_dim: int,
                 eval_selection: Literal["random", "fixed", "full"] = "random", eval_seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(dim, size, num_heads, mlp_dim, **kwargs)
        self.eval_selection, self.eval_seed = eval_selection, eval_seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map B×C×H×W in, map B×C×H×W out (written into a copy; the author wrote into the input)."""
        b, _, h, w = x.shape
        n, mode = h * w, "random" if self.training else self.eval_selection
        if mode == "full":
            index = torch.arange(n, device=x.device)
        else:
            gen = None
            if mode == "fixed":
                gen = torch.Generator(device=x.device).manual_seed(self.eval_seed)
            # Drawn on the device (author: CPU randperm + nonzero every pass): same distribution, other stream.
            index = torch.randperm(n, device=x.device, generator=gen)[: self.tokens_for(h, w)].sort().values
        index = index.unsqueeze(0).expand(b, -1)  # B×K, the same positions for every image
        self._remember(None, index, (h, w))
        return self.attend(x, x, index)
