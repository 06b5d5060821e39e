"""Baseline for bench/train_step.py: the plain loop a user writes around a timm model.

Run under torchrun. DistributedDataParallel + torch.optim.AdamW + cross-entropy on random tensors
(no loader), timed over ``--steps`` after ``--warmup`` steps; rank 0 prints one line
``plain-ddp step_ms=... img_per_s=...`` (global images per second).
"""

from __future__ import annotations

import argparse
import os
import time

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

import model  # noqa: F401  (registers vitpipe's models with timm)


def main() -> None:
    """Times the plain DDP loop."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_pico_patch4_32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = torch.nn.parallel.DistributedDataParallel(timm.create_model(a.model, num_classes=10))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = torch.randn(a.batch, 3, a.img_size, a.img_size), torch.randint(0, 10, (a.batch,))
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            dist.barrier()
            t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.barrier()
    seconds = (time.perf_counter() - t0) / a.steps
    if dist.get_rank() == 0:
        print(f"plain-ddp step_ms={seconds * 1e3:.1f} img_per_s={a.batch * dist.get_world_size() / seconds:.0f}")
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
