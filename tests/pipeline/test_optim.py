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
