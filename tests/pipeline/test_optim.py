"""Warm-up + cosine schedule, LR scaling and no-decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from model import create_model
from pipeline.config import OptimCfg, ScheduleCfg
from pipeline.optim import build_optimizer, build_scheduler, lr_at, param_groups, peak_lr


def test_schedule_shape() -> None:
    cfg = ScheduleCfg(epochs=10, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    total, warm, peak = 100, 20, 1e-3
    assert lr_at(0, total, warm, peak, cfg) == pytest.approx(1e-6)
    assert lr_at(10, total, warm, peak, cfg) == pytest.approx((1e-6 + 1e-3) / 2)
    assert lr_at(20, total, warm, peak, cfg) == pytest.approx(peak)
    mid = lr_at(60, total, warm, peak, cfg)
    assert mid == pytest.approx(1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, total, warm, peak, cfg) == pytest.approx(1e-5)


def test_scheduler_drives_the_optimizer() -> None:
    net = torch.nn.Linear(4, 2)
    opt = build_optimizer(net, OptimCfg(lr=1e-3), 1e-3)
    sched = build_scheduler(opt, ScheduleCfg(epochs=2, warmup_epochs=1, warmup_lr=0.0, min_lr=0.0), 5, 1e-3)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1e-3)
    assert lrs[6] < lrs[5] and lrs[9] < lrs[6]


def test_lr_scaling_by_global_batch() -> None:
    assert peak_lr(OptimCfg(lr=5e-4, lr_base_batch=512), 1024) == pytest.approx(1e-3)
    assert peak_lr(OptimCfg(lr=5e-4), 1024) == 5e-4


def test_no_decay_on_biases_norms_and_tokens() -> None:
    net = create_model("vit_nano_patch8_32")
    decay, no_decay = param_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed"} <= no_decay_names
    assert all(n.endswith("bias") or "norm" in n or n in ("cls_token", "pos_embed") for n in no_decay_names)
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0


def test_layer_decay_scales_lr_by_depth() -> None:
    net = create_model("vit_pico_patch4_32")  # 4 blocks: embeddings, blocks 0..3, head → 6 layer ids
    opt = build_optimizer(net, OptimCfg(lr=1e-3, layer_decay=0.5), 1e-3)
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    lr_of = {name: by_param[id(p)] for name, p in net.named_parameters()}
    assert lr_of["head.weight"] == pytest.approx(1e-3)
    assert lr_of["blocks.3.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr_of["blocks.0.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.5**4)
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5**5)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(net.cls_token) not in decayed and id(net.blocks[0].attn.qkv.weight) in decayed


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        net = create_model("vit_pico_patch4_32")
        net.set_grad_checkpointing(ckpt)
        net(x).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
