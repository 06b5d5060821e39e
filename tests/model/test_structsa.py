"""StructSA: fused (grouped conv + SDPA) vs literal (correlation-first) vs a naive reference; ConvSA; params."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.layers.structsa import (
    StructSA,
    kv_grid_size,
    structsa_fused,
    structsa_literal,
    structsa_literal_chunked,
)

# (grid, stride, D): 2-D and 3-D grids, odd and even sides, stride 1 and 2 (spatial-only for video).
CASES = [((6, 5), (1, 1), d) for d in (1, 4, 8)] + [((6, 6), (2, 2), d) for d in (1, 4, 8)] + \
        [((4, 5, 5), (1, 1, 1), d) for d in (1, 3, 4, 8)] + [((4, 6, 6), (1, 2, 2), d) for d in (1, 4, 8)] + \
        [((5, 7), (2, 2), 4), ((3, 5, 7), (1, 2, 2), 4)]
IDS = [f"{'x'.join(map(str, g))}-s{max(s)}-D{d}" for g, s, d in CASES]


def _neighbourhoods(x: torch.Tensor, grid: tuple[int, ...], kernel: tuple[int, ...],
                    stride: tuple[int, ...]) -> torch.Tensor:
    """(B, N, C) -> zero-padded M-neighbourhoods at the strided positions, (B, C, N', M), by plain unfolding."""
    b, _, c = x.shape
    xg = x.transpose(1, 2).reshape(b, c, *grid)
    pads = [p for k in reversed(kernel) for p in (k // 2, k // 2)]
    xg = F.pad(xg, pads)
    for axis, (k, s) in enumerate(zip(kernel, stride, strict=True)):
        xg = xg.unfold(2 + axis, k, s)  # (B, C, *grid', *kernel) once all axes are unfolded
    return xg.reshape(b, c, math.prod(xg.shape[2:2 + len(grid)]), math.prod(kernel))


def _naive(q, k, v, kw, vw, grid, stride, heads, scale):  # noqa: ANN001, ANN202 - the spec §9 pseudocode
    b, n, c = q.shape
    d, kernel = kw.shape[0] // c, tuple(kw.shape[2:])
    hk = kw.reshape(c, d, -1)  # H^K[m, c, d] = hk[c, d, m]
    hv = vw.reshape(c, d, -1)  # H^V[m, d, c] = hv[c, d, m]
    kj, vj = _neighbourhoods(k, grid, kernel, stride), _neighbourhoods(v, grid, kernel, stride)
    s = torch.einsum("bic,bcjm,cdm->bicjd", q, kj, hk)  # per-channel terms of s_{i,j,d}
    s = s.reshape(b, n, heads, c // heads, *s.shape[-2:]).sum(3) * scale  # (B, N, h, N', D)
    a = s.flatten(-2).softmax(-1).view_as(s)
    a_c = a.repeat_interleave(c // heads, dim=2)  # (B, N, C, N', D): each channel sees its head's A
    kappa = torch.einsum("bicjd,cdm->bicjm", a_c, hv)  # dynamic per-(i, j), per-channel kernels
    return torch.einsum("bicjm,bcjm->bic", kappa, vj)


def _inputs(grid, d, dtype, c=8, b=2, seed=0):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    n, m = math.prod(grid), 3 ** len(grid)
    q, k, v = (torch.randn(b, n, c, generator=g, dtype=dtype) for _ in range(3))
    kw, vw = (0.4 * torch.randn(c * d, 1, *(3,) * len(grid), generator=g, dtype=dtype) for _ in range(2))
    assert kw[0, 0].numel() == m
    return q, k, v, kw, vw


@pytest.mark.parametrize(("grid", "stride", "d"), CASES, ids=IDS)
def test_literal_matches_naive_reference_float64(grid, stride, d) -> None:  # noqa: ANN001
    q, k, v, kw, vw = _inputs(grid, d, torch.float64)
    scale = 4 ** -0.5
    ref = _naive(q, k, v, kw, vw, grid, stride, 2, scale)
    out = structsa_literal(q, k, v, kw, vw, grid, stride, 2, scale)[0]
    assert (out - ref).abs().max() <= 1e-12


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize(("grid", "stride", "d"), CASES, ids=IDS)
def test_fused_matches_literal(grid, stride, d, dtype, tol) -> None:  # noqa: ANN001
    q, k, v, kw, vw = _inputs(grid, d, dtype, seed=1)
    fused = structsa_fused(q, k, v, kw, vw, grid, stride, 2)  # SDPA's default scale is dh^-0.5 = 4^-0.5
    literal, attn, _ = structsa_literal(q, k, v, kw, vw, grid, stride, 2, 4 ** -0.5)
    assert (fused - literal).abs().max() <= tol
    n_kv = math.prod(kv_grid_size(grid, (3,) * len(grid), stride))
    assert attn.shape == (2, math.prod(grid), 2, d, n_kv)
    torch.testing.assert_close(attn.sum((-2, -1)), torch.ones_like(attn[..., 0, 0]))


def _convsa(x, layer: StructSA, grid):  # noqa: ANN001, ANN202 - independent ConvSA: depthwise-conv K/V + softmax
    b, n, c = x.shape
    conv = F.conv2d if len(grid) == 2 else F.conv3d
    pad = tuple(k // 2 for k in layer.kernel_size)
    q, k, v = layer.qkv(x).chunk(3, -1)

    def dw(t, w):  # noqa: ANN001, ANN202
        return conv(t.transpose(1, 2).reshape(b, c, *grid), w, None, layer.kv_stride, pad, 1, c).flatten(2)

    k, v = dw(k, layer.k_conv.weight), dw(v, layer.v_conv.weight)  # (B, C, N')
    h, dh = layer.num_heads, c // layer.num_heads
    q = q.reshape(b, n, h, dh).transpose(1, 2)
    k, v = k.reshape(b, h, dh, -1).transpose(2, 3), v.reshape(b, h, dh, -1).transpose(2, 3)
    a = (q @ k.transpose(2, 3) * dh ** -0.5).softmax(-1)
    return layer.proj((a @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize(("grid", "stride"), [((6, 5), 1), ((6, 6), 2), ((4, 5, 5), 1), ((4, 6, 6), 2)])
def test_d1_is_convsa(grid, stride) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    layer = StructSA(8, 2, struct_dim=1, kv_stride=stride, ndim=len(grid)).double()
    x = torch.randn(2, math.prod(grid), 8, dtype=torch.float64)
    ref = _convsa(x, layer, grid)
    for fused in (True, False):
        assert (layer(x, grid, fused=fused) - ref).abs().max() <= 1e-12


def test_shared_kernels_give_the_simple_version() -> None:
    """H^K_{m,c,d} = U^K_{m,d}, H^V_{m,d,c} = U^V_{m,d}: the dot-product StructSA of paper §3.2 (Eq. 2-3, 5)."""
    grid, c, d, h = (5, 6), 8, 4, 2
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 30, c, generator=g, dtype=torch.float64) for _ in range(3))
    uk, uv = torch.randn(d, 9, generator=g, dtype=torch.float64), torch.randn(d, 9, generator=g, dtype=torch.float64)
    kw, vw = uk.repeat(c, 1).reshape(c * d, 1, 3, 3), uv.repeat(c, 1).reshape(c * d, 1, 3, 3)
    out = structsa_fused(q, k, v, kw, vw, grid, (1, 1), h)
    # Simple version per head: correlation map q_i·Kᵀ (a scalar image) convolved with the D kernels U^K.
    dh = c // h
    qh, kh = q.reshape(30, h, dh).transpose(0, 1), k.reshape(30, h, dh).transpose(0, 1)
    corr = (qh @ kh.transpose(1, 2)).reshape(h * 30, 1, *grid)  # (h·N queries, 1, H, W)
    a = F.conv2d(corr, uk.reshape(d, 1, 3, 3), padding=1).reshape(h, 30, -1) * dh ** -0.5
    a = a.softmax(-1).reshape(h, 30, d, 30)
    vj = _neighbourhoods(v, grid, (3, 3), (1, 1))[0]  # (C, N, M)
    ctx = torch.einsum("dm,cjm->djc", uv, vj).reshape(d, 30, h, dh)  # Σ_m U^V_{m,d} v_{j⊕m}
    ref = torch.einsum("hidj,djhe->ihe", a, ctx).reshape(1, 30, c)
    assert (out - ref).abs().max() <= 1e-12


@pytest.mark.parametrize(("ndim", "d", "c"), [(2, 4, 320), (2, 8, 384), (3, 4, 64), (2, 1, 384)])
def test_parameter_delta_is_2mcd(ndim, d, c) -> None:  # noqa: ANN001
    base = sum(p.numel() for p in StructSA(c, struct_dim=0, ndim=ndim).parameters())
    for stride in (1, 2):
        net = StructSA(c, struct_dim=d, kv_stride=stride, ndim=ndim)
        assert sum(p.numel() for p in net.parameters()) - base == 2 * 3 ** ndim * c * d


@pytest.mark.parametrize("grid", [(6, 5), (4, 6, 6)])
def test_layer_paths_agree_forward_and_backward(grid) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    layer = StructSA(16, 2, struct_dim=4, kv_stride=2, ndim=len(grid)).double()
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64, requires_grad=True)
    grads = []
    for fused in (True, False):
        layer.zero_grad()
        x.grad = None
        y = layer(x, grid, fused=fused)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()] + [y.detach()])
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 1e-10


def test_vanilla_struct_dim_0_is_plain_attention() -> None:
    torch.manual_seed(0)
    layer = StructSA(16, 2, struct_dim=0).double()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    q, k, v = layer.qkv(x).reshape(1, 20, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = layer.proj(((q @ k.transpose(-1, -2)) * 8 ** -0.5).softmax(-1).matmul(v).transpose(1, 2).reshape(1, 20, 16))
    for fused in (True, False):
        assert (layer(x, (4, 5), fused=fused) - ref).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="struct_dim=0"):
        StructSA(16, 2, struct_dim=0, kv_stride=2)


def test_attention_maps_for_selected_queries() -> None:
    torch.manual_seed(0)
    layer = StructSA(16, 2, struct_dim=4, kv_stride=1)
    x = torch.randn(1, 30, 16)
    attn, merged = layer.attention_maps(x, (5, 6), [0, 17])
    full_attn, full_merged = layer.attention_maps(x, (5, 6), list(range(30)))
    torch.testing.assert_close(attn, full_attn[:, [0, 17]])
    assert merged.shape == (1, 2, 16, 30)


def test_fused_path_compiles() -> None:
    torch.manual_seed(0)
    layer = StructSA(16, 2, struct_dim=4, kv_stride=2, ndim=3)
    x = torch.randn(1, 2 * 4 * 4, 16)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, (2, 4, 4)), layer(x, (2, 4, 4)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("grid", "stride", "d"), [((6, 5), 1, 4), ((6, 6), 2, 8), ((4, 6, 6), 2, 4), ((5, 5), 1, 0)])
def test_prefix_tokens_fused_matches_literal(grid, stride, d) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    layer = StructSA(16, 2, struct_dim=d, kv_stride=stride, ndim=len(grid), num_prefix_tokens=1).double()
    x = torch.randn(2, 1 + math.prod(grid), 16, dtype=torch.float64)
    assert (layer(x, grid, fused=True) - layer(x, grid, fused=False)).abs().max() <= 1e-10


# Query-chunked literal path: grids whose query count (30, 36, 100, 144) is not a multiple of the chunk (7, 16, 13).
CHUNK_CASES = [((6, 5), (1, 1), 4, 7), ((6, 6), (2, 2), 8, 16), ((4, 5, 5), (1, 1, 1), 3, 7),
               ((4, 6, 6), (1, 2, 2), 4, 13)]
CHUNK_IDS = [f"{'x'.join(map(str, g))}-s{max(s)}-D{d}-chunk{ch}" for g, s, d, ch in CHUNK_CASES]


@pytest.mark.parametrize(("grid", "stride", "d", "chunk"), CHUNK_CASES, ids=CHUNK_IDS)
def test_chunked_literal_matches_literal_and_fused_forward_and_backward(grid, stride, d, chunk) -> None:  # noqa: ANN001
    assert math.prod(grid) % chunk
    inputs = _inputs(grid, d, torch.float64, seed=2)
    weight = torch.linspace(-1, 1, math.prod(inputs[0].shape), dtype=torch.float64).view_as(inputs[0])
    paths = {
        "chunked": lambda *t: structsa_literal_chunked(*t, grid, stride, 2, 4 ** -0.5, query_chunk=chunk),
        "literal": lambda *t: structsa_literal(*t, grid, stride, 2, 4 ** -0.5)[0],
        "fused": lambda *t: structsa_fused(*t, grid, stride, 2),
    }
    results = {}
    for name, fn in paths.items():
        leaves = [t.clone().requires_grad_() for t in inputs]  # q, k, v, k_weight, v_weight
        y = fn(*leaves)
        (y * weight).sum().backward()
        results[name] = [y.detach()] + [t.grad for t in leaves]
    for name in ("literal", "fused"):
        for a, b in zip(results["chunked"], results[name], strict=True):
            assert (a - b).abs().max() <= 1e-10, name


@pytest.mark.parametrize(("grid", "d", "prefix"), [((6, 5), 4, 0), ((4, 6, 6), 4, 1), ((5, 5), 0, 1)])
def test_layer_literal_query_chunk_matches_fused(grid, d, prefix) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    stride = 2 if d and len(grid) == 3 else 1
    layer = StructSA(16, 2, struct_dim=d, kv_stride=stride, ndim=len(grid), num_prefix_tokens=prefix).double()
    x = torch.randn(2, prefix + math.prod(grid), 16, dtype=torch.float64, requires_grad=True)
    grads = []
    for kwargs in ({"fused": True}, {"fused": False, "query_chunk": 11}):
        layer.zero_grad()
        x.grad = None
        y = layer(x, grid, **kwargs)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 1e-10
    with torch.no_grad():  # no checkpointing without autograd; same output
        assert (layer(x, grid, fused=False, query_chunk=5) - grads[0][0]).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="query_chunk"):
        layer(x, grid, fused=False, query_chunk=0)


def test_chunked_literal_saves_only_inputs_for_backward() -> None:
    """Activation checkpointing: autograd keeps no O(Nq·N·C) tensor, unlike the unchunked literal path."""
    grid, c = (6, 6), 8
    q, k, v, kw, vw = (t.requires_grad_() for t in _inputs(grid, 4, torch.float32, c=c, b=1))
    n = math.prod(grid)

    def largest_saved(fn) -> int:  # noqa: ANN001
        sizes = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return max(sizes)

    assert largest_saved(lambda: structsa_literal(q, k, v, kw, vw, grid, (1, 1), 2, 0.5)[0]) >= n * n * c
    assert largest_saved(lambda: structsa_literal_chunked(q, k, v, kw, vw, grid, (1, 1), 2, 0.5,
                                                          query_chunk=4)) <= n * c
