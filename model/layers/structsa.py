"""Structural self-attention (StructSA), channel-wise version, for 2-D and 3-D token grids.

Paper: M. Kim, P. H. Seo, C. Schmid, M. Cho, "Learning Correlation Structures for Vision Transformers",
CVPR 2024 (arXiv 2404.03924), App. A.1; spec ``shared/specs/structvit.md`` §2.

Per head, with queries q_i, keys k_j and values v_j (linear projections of the tokens), D key kernels
H^K ∈ R^{M×C×D} and D value kernels H^V ∈ R^{M×D×C} (depthwise, bias-free, zero padding, stride S on the
key/value grid):

    s_{i,j,d} = τ Σ_m Σ_c q_{i,c} k_{j⊕m,c} H^K_{m,c,d}        (convolution over the correlation volume)
    A_i       = softmax over all (j, d) jointly                   (D·N′ entries)
    y_{i,c}   = Σ_j Σ_d A_{i,(j,d)} Σ_m H^V_{m,d,c} v_{j⊕m,c}      (contextual value aggregation)

Two code paths share one set of weights:

* :func:`structsa_fused` reorders the sums onto the keys and values (spec §2.5): two grouped convolutions make
  D "virtual" key and value sets, and one ``scaled_dot_product_attention`` call attends over the D·N′ virtual
  tokens. No N×N map is materialised (flash/memory-efficient kernels are eligible).
* :func:`structsa_literal` computes the correlation-first definition: the channel-wise correlation volume
  (O(N²C) memory), the convolution over the correlation map, the joint softmax, and the aggregation of the
  values with the per-key dynamic kernels κ_{i,j} folded back onto the grid (the "merged" structural
  attention map of App. D). It is the reference for tests and the source of attention maps.
  :func:`structsa_literal_chunked` evaluates the same definition (its output only) for blocks of queries under
  activation checkpointing, so that forward and backward stay within O(block·N·C·D) memory; it makes the literal
  path measurable at video sizes, where the whole correlation volume does not fit.

Weight layout: ``k_weight[c·D + d, 0, m] = H^K[m, c, d]`` and ``v_weight[c·D + d, 0, m] = H^V[m, d, c]`` (the
layout of a grouped ``ConvNd(C, C·D, groups=C)``); channel c belongs to head ⌊c / d_head⌋. ``struct_dim = 0``
is vanilla softmax attention over the raw keys (the UniFormer/DeiT baseline); ``struct_dim = 1`` is ConvSA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Grid = tuple[int, ...]


def _conv(x: torch.Tensor, weight: torch.Tensor, stride: Grid, padding: Grid, groups: int) -> torch.Tensor:
    return (F.conv2d if x.dim() == 4 else F.conv3d)(x, weight, None, stride, padding, 1, groups)


def _conv_t(x: torch.Tensor, weight: torch.Tensor, stride: Grid, padding: Grid, out_padding: Grid,
            groups: int) -> torch.Tensor:
    fn = F.conv_transpose2d if x.dim() == 4 else F.conv_transpose3d
    return fn(x, weight, None, stride, padding, out_padding, groups)


def kv_grid_size(grid: Grid, kernel: Grid, stride: Grid) -> Grid:
    """Key/value grid after the strided, zero-padded ("same" for stride 1) depthwise convolution."""
    return tuple((g + 2 * (k // 2) - k) // s + 1 for g, k, s in zip(grid, kernel, stride, strict=True))


def structsa_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_weight: torch.Tensor | None,
                   v_weight: torch.Tensor | None, grid: Grid, stride: Grid, num_heads: int,
                   dropout_p: float = 0.0, num_prefix: int = 0) -> torch.Tensor:
    """StructSA as one SDPA call over D·N′ virtual keys/values (spec §2.5, §2.10).

    Args:
        q: Queries, (B, P + N, C).
        k: Keys, (B, P + N, C): P prefix tokens, then the grid, N = prod(grid).
        v: Values, (B, P + N, C).
        k_weight: Key kernels, (C·D, 1, *kernel); ``None`` for vanilla attention (D = 0).
        v_weight: Value kernels, (C·D, 1, *kernel); ``None`` for vanilla attention.
        grid: Token grid, (H, W) or (T, H, W).
        stride: Key/value stride, same length as ``grid``.
        num_heads: h; C must be divisible by it.
        dropout_p: Attention dropout probability.
        num_prefix: P tokens off the grid (a class token): queries, and raw keys/values in the same softmax.

    Returns:
        The attended values, (B, P + N, C), heads concatenated (before the output projection).
    """
    b, n, c = q.shape
    dh = c // num_heads
    q = q.view(b, n, num_heads, dh).transpose(1, 2)  # (B, h, N, dh)
    if k_weight is None or v_weight is None:
        k_cat = k.view(b, n, num_heads, dh).transpose(1, 2)
        v_cat = v.view(b, n, num_heads, dh).transpose(1, 2)
    else:
        pad = tuple(s // 2 for s in k_weight.shape[2:])
        k_cat = _expand(k[:, num_prefix:], k_weight, grid, stride, pad, num_heads)
        v_cat = _expand(v[:, num_prefix:], v_weight, grid, stride, pad, num_heads)
        if num_prefix:
            k_pre = k[:, :num_prefix].reshape(b, num_prefix, num_heads, dh).transpose(1, 2)  # (B, h, P, dh)
            v_pre = v[:, :num_prefix].reshape(b, num_prefix, num_heads, dh).transpose(1, 2)
            k_cat, v_cat = torch.cat([k_pre, k_cat], dim=2), torch.cat([v_pre, v_cat], dim=2)
    y = F.scaled_dot_product_attention(q, k_cat, v_cat, dropout_p=dropout_p)  # (B, h, N, dh)
    return y.transpose(1, 2).reshape(b, n, c)


def _expand(x: torch.Tensor, weight: torch.Tensor, grid: Grid, stride: Grid, pad: Grid,
            num_heads: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, h, D·N′, dh) virtual tokens: D depthwise convolutions in one grouped conv."""
    b, _, c = x.shape
    xt = _conv(x.transpose(1, 2).reshape(b, c, *grid), weight, stride, pad, groups=c)  # (B, C·D, *grid′)
    # Output channel c·D + d with c = head·dh + e  ->  (B, h, dh, D·N′), then tokens last-but-one.
    return xt.reshape(b, num_heads, c // num_heads, -1).transpose(-1, -2)


def structsa_literal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_weight: torch.Tensor,
                     v_weight: torch.Tensor, grid: Grid, stride: Grid, num_heads: int, scale: float,
                     num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlation-first StructSA (spec §2.4), for any subset of queries.

    Memory is O(Nq·N·C): use it for tests, benchmarks and attention maps, not for training.

    Args:
        q: Queries, (B, Nq, C); any Nq (e.g. one query position for a visualisation).
        k: Keys, (B, P + N, C): P prefix tokens, then the grid.
        v: Values, (B, P + N, C).
        k_weight: Key kernels H^K, (C·D, 1, *kernel).
        v_weight: Value kernels H^V, (C·D, 1, *kernel).
        grid: Token grid, (H, W) or (T, H, W).
        stride: Key/value stride.
        num_heads: h.
        scale: Logit scale τ (d_head^-0.5).
        num_prefix: P tokens off the grid, attended as raw keys/values in the same joint softmax.

    Returns:
        ``(y, attn, merged)``: the output (B, Nq, C) before the projection; the joint-softmax attention
        A (B, Nq, h, D, N′); and the merged structural map (B, Nq, C, N) with
        ``merged[b, i, c, p] = Σ_{(j, m): j⊕m = p} κ_{i,j,m,c}``, so that ``y[b, i, c] = Σ_p merged · v[b, p, c]``.
    """
    b, nq, c = q.shape
    dh, kernel = c // num_heads, tuple(k_weight.shape[2:])
    pad = tuple(s // 2 for s in kernel)
    grid_kv = kv_grid_size(grid, kernel, stride)
    k_pre, k = k[:, :num_prefix], k[:, num_prefix:]
    v_pre, v = v[:, :num_prefix], v[:, num_prefix:]
    # 1. Channel-wise correlation volume diag(q_i) Kᵀ, one C-channel map over the key grid per query.
    corr = q.unsqueeze(-1) * k.transpose(1, 2).unsqueeze(1)  # (B, Nq, C, N)
    # 2. Convolve the correlation map with the D key kernels; sum over the channels of each head.
    s = _conv(corr.reshape(b * nq, c, *grid), k_weight, stride, pad, groups=c)  # (B·Nq, C·D, *grid′)
    s = s.reshape(b, nq, num_heads, dh, -1, math.prod(grid_kv)).sum(3) * scale  # (B, Nq, h, D, N′)
    # 3. One softmax over the D·N′ entries (and the P raw prefix keys) of each (query, head).
    s_pre = (q.view(b, nq, num_heads, 1, dh) * k_pre.view(b, 1, num_prefix, num_heads, dh).transpose(2, 3)).sum(-1)
    joint = torch.cat([s_pre * scale, s.flatten(-2)], -1).softmax(-1)  # (B, Nq, h, P + D·N′)
    a_pre, attn = joint[..., :num_prefix], joint[..., num_prefix:].view_as(s)
    # 4. Dynamic kernels κ_{i,j} = Σ_d A_{i,(j,d)} H^V_{:,d,c} placed at every key position j and summed onto
    #    the grid: the transposed grouped convolution with the value kernels (the adjoint of step 2's conv).
    a_c = attn.unsqueeze(3).expand(b, nq, num_heads, dh, *attn.shape[3:]).reshape(b * nq, -1, *grid_kv)
    out_pad = tuple(g - ((gk - 1) * st - 2 * p + kk)
                    for g, gk, st, p, kk in zip(grid, grid_kv, stride, pad, kernel, strict=True))
    merged = _conv_t(a_c, v_weight, stride, pad, out_pad, groups=c).reshape(b, nq, c, -1)  # (B, Nq, C, N)
    # 5. Contextual value aggregation (plus the prefix values).
    y = (merged * v.transpose(1, 2).unsqueeze(1)).sum(-1)  # (B, Nq, C)
    if num_prefix:
        v_pre = v_pre.view(b, num_prefix, num_heads, dh).transpose(1, 2)  # (B, h, P, dh)
        y = y + torch.einsum("bihp,bhpe->bihe", a_pre, v_pre).reshape(b, nq, c)
    return y, attn, merged


def structsa_literal_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_weight: torch.Tensor,
                             v_weight: torch.Tensor, grid: Grid, stride: Grid, num_heads: int, scale: float,
                             num_prefix: int = 0, query_chunk: int = 64) -> torch.Tensor:
    """Output of the correlation-first StructSA (spec §2.4), evaluated ``query_chunk`` queries at a time.

    The math is :func:`structsa_literal`'s, run on blocks of queries (every query needs all keys and values,
    and nothing is shared between queries, so the blocks are independent). Each block runs under
    ``torch.utils.checkpoint``: the forward keeps only the block's inputs and output, the backward
    recomputes one block at a time. Peak memory is O(query_chunk·N·C·D) instead of O(Nq·N·C·D); the cost is
    one extra forward. The maps are not returned (the merged map alone is O(Nq·N·C)); take them for
    selected queries from :func:`structsa_literal`.

    Args:
        q: Queries, (B, Nq, C).
        k: Keys, (B, P + N, C): P prefix tokens, then the grid.
        v: Values, (B, P + N, C).
        k_weight: Key kernels H^K, (C·D, 1, *kernel).
        v_weight: Value kernels H^V, (C·D, 1, *kernel).
        grid: Token grid, (H, W) or (T, H, W).
        stride: Key/value stride.
        num_heads: h.
        scale: Logit scale τ (d_head^-0.5).
        num_prefix: P tokens off the grid, attended as raw keys/values in the same joint softmax.
        query_chunk: Queries per block (the last block may be smaller).

    Returns:
        The output (B, Nq, C) before the projection, equal to ``structsa_literal(...)[0]``.
    """
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")

    def block(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, kw: torch.Tensor,
              vw: torch.Tensor) -> torch.Tensor:
        return structsa_literal(qb, kb, vb, kw, vw, grid, stride, num_heads, scale, num_prefix)[0]

    outs = []
    for qb in q.split(query_chunk, dim=1):  # (B, ≤ query_chunk, C) each
        if torch.is_grad_enabled():
            outs.append(checkpoint(block, qb, k, v, k_weight, v_weight, use_reentrant=False))
        else:
            outs.append(block(qb, k, v, k_weight, v_weight))
    return torch.cat(outs, dim=1)


def _as_tuple(value: int | Sequence[int], ndim: int) -> Grid:
    return tuple(value) if isinstance(value, Sequence) else (value,) * ndim


class StructSA(nn.Module):
    """Multi-head channel-wise StructSA with qkv and output projections.

    ``forward`` takes tokens (B, N, C) laid out row-major on ``grid_size`` ((H, W) or (T, H, W)) and returns
    (B, N, C). ``fused=True`` (default) runs :func:`structsa_fused`; ``fused=False`` runs the literal path
    (:func:`structsa_literal`, or :func:`structsa_literal_chunked` when ``forward`` gets a ``query_chunk``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        *,
        head_dim: int = 64,
        struct_dim: int = 4,
        kernel_size: int | Sequence[int] = 3,
        kv_stride: int | Sequence[int] = 1,
        ndim: int = 2,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
        num_prefix_tokens: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Builds the layer.

        Args:
            dim: Channels C.
            num_heads: h; default ``dim // head_dim``.
            head_dim: Channels per head when ``num_heads`` is not given (64 in StructViT).
            struct_dim: D, the number of key kernels and value kernels per channel; 0 = vanilla attention.
            kernel_size: M as a side length (3 -> 3×3 or 3×3×3) or a per-axis tuple.
            kv_stride: Key/value stride S: an int is spatial-only ((S, S) for images, (1, S, S) for video),
                a tuple is taken per axis.
            ndim: 2 for image grids (H, W), 3 for video grids (T, H, W).
            qkv_bias: Bias on the qkv projection (UniFormer: True).
            attn_drop: Dropout on the attention weights (fused path only).
            proj_drop: Dropout after the output projection.
            fused: Default code path of ``forward``.
            num_prefix_tokens: P tokens before the grid (e.g. a class token): they query, and are attended as
                raw (unconvolved) keys/values in the same joint softmax (a reading, the paper is silent).
            device: Where to allocate parameters (``"meta"`` allocates nothing).
            dtype: Parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads or dim // head_dim
        if dim % self.num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {self.num_heads}")
        self.dim, self.struct_dim, self.ndim, self.fused = dim, struct_dim, ndim, fused
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = (dim // self.num_heads) ** -0.5
        self.kernel_size = _as_tuple(kernel_size, ndim)
        s = kv_stride if isinstance(kv_stride, Sequence) else (1,) * (ndim - 2) + (kv_stride, kv_stride)
        self.kv_stride = tuple(s)
        if struct_dim == 0 and any(x != 1 for x in self.kv_stride):
            raise ValueError("vanilla attention (struct_dim=0) has no key/value convolution to stride")
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.k_conv = self.v_conv = None
        if struct_dim > 0:
            conv = nn.Conv2d if ndim == 2 else nn.Conv3d
            kw = dict(stride=self.kv_stride, padding=tuple(k // 2 for k in self.kernel_size), groups=dim, bias=False)
            self.k_conv = conv(dim, dim * struct_dim, self.kernel_size, **kw, **dd)
            self.v_conv = conv(dim, dim * struct_dim, self.kernel_size, **kw, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def reset_parameters(self) -> None:
        """PyTorch's default init for every sub-layer (the spec's reading of the paper's unstated init)."""
        for m in (self.qkv, self.k_conv, self.v_conv, self.proj):
            if m is not None:
                m.reset_parameters()

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv(x).chunk(3, dim=-1)  # 3 × (B, N, C)

    def _weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.k_conv is None or self.v_conv is None:
            return None, None
        return self.k_conv.weight, self.v_conv.weight

    def forward(self, x: torch.Tensor, grid_size: Grid, fused: bool | None = None,
                query_chunk: int | None = None) -> torch.Tensor:
        """Attention over a token grid.

        Args:
            x: Tokens, (B, P + N, C), N = prod(grid_size), P = ``num_prefix_tokens``.
            grid_size: (H, W) or (T, H, W).
            fused: Overrides the layer's default code path.
            query_chunk: Literal path only: evaluate it for this many queries at a time, with activation
                checkpointing (:func:`structsa_literal_chunked`); ``None`` evaluates all queries at once.

        Returns:
            (B, P + N, C).
        """
        q, k, v = self._qkv(x)
        kw, vw = self._weights()
        if self.fused if fused is None else fused:
            drop = self.attn_drop if self.training else 0.0
            y = structsa_fused(q, k, v, kw, vw, grid_size, self.kv_stride, self.num_heads, drop,
                               self.num_prefix_tokens)
        elif query_chunk is not None:
            kw, vw = self._literal_weights(q, grid_size)
            y = structsa_literal_chunked(q, k, v, kw, vw, grid_size, self.kv_stride, self.num_heads, self.scale,
                                         self.num_prefix_tokens, query_chunk)
        else:
            y = self._literal(q, k, v, grid_size)[0]
        return self.proj_drop(self.proj(y))

    def _literal_weights(self, q: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        kw, vw = self._weights()
        if kw is None or vw is None:  # D = 0: one identity kernel per channel is vanilla attention
            kw = vw = torch.ones(self.dim, 1, *(1,) * len(grid), device=q.device, dtype=q.dtype)
        return kw, vw

    def _literal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kw, vw = self._literal_weights(q, grid)
        return structsa_literal(q, k, v, kw, vw, grid, self.kv_stride, self.num_heads, self.scale,
                                self.num_prefix_tokens)

    def attention_maps(self, x: torch.Tensor, grid_size: Grid,
                       query_index: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Literal-path attention for selected query positions (for visualisation).

        Args:
            x: Tokens, (B, N, C).
            grid_size: (H, W) or (T, H, W).
            query_index: Indices of the Nq queries in the token sequence (prefix tokens first).

        Returns:
            ``(attn, merged)``: A (B, Nq, h, D, N′) and the merged structural map (B, Nq, C, N).
        """
        q, k, v = self._qkv(x)
        idx = torch.as_tensor(query_index, device=x.device)
        _, attn, merged = self._literal(q[:, idx], k, v, grid_size)
        return attn, merged

    def extra_repr(self) -> str:
        """Summary line for ``print(module)``."""
        return (f"dim={self.dim}, num_heads={self.num_heads}, struct_dim={self.struct_dim}, "
                f"kernel_size={self.kernel_size}, kv_stride={self.kv_stride}, fused={self.fused}")
