"""Training and inference throughput (img/s) of FilterViT-XS, DropoutViT-XS and Swin-T against their baselines.

Usage: python bench/models.py [--device cuda] [--batch 64] [--iters 20] [--warmup 5] [--repeats 3] [--amp bf16]

Pairs, measured in the same process on the same machine, each with the ratio ours / baseline:

* ``filtervit_xs`` (gather/scatter on top-K indices) vs ``filtervit_xs impl=mask`` (the author's
  boolean-mask + ``nonzero`` formulation, one host-device sync per filter block);
* ``dropoutvit_xs`` vs ``dropoutvit_xs impl=mask``;
* ``swin_tiny_patch4_window7_224_fused`` (SDPA with the bias as a float mask) vs timm's
  ``swin_tiny_patch4_window7_224`` (manual softmax, timm's default).

Inference: eval mode, ``no_grad``. Training: forward, cross-entropy, backward and an AdamW step.
Random input at 224², timed with device synchronisation after warm-up iterations (warm-up and
timing both run the measured mode). Each figure is the best of ``--repeats`` rounds; rounds visit
the models in turn, so machine load hits every model alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from model import create_model

PAIRS = [
    ("FilterViT-XS", ("filtervit_xs", {}), ("filtervit_xs", {"impl": "mask"})),
    ("DropoutViT-XS", ("dropoutvit_xs", {}), ("dropoutvit_xs", {"impl": "mask"})),
    ("Swin-T", ("swin_tiny_patch4_window7_224_fused", {}), ("swin_tiny_patch4_window7_224", {})),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], device: torch.device, warmup: int, iters: int, batch: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return batch * iters / (time.perf_counter() - t0)


def throughput(net: torch.nn.Module, device: torch.device, batch: int, warmup: int, iters: int,
               amp: torch.dtype | None) -> tuple[float, float]:
    """(training img/s, inference img/s) of ``net`` on random 224² input."""
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def train_step() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step() -> None:
        with autocast:
            net(x)

    net.train()
    train = _timed(train_step, device, warmup, iters, batch)
    net.eval()
    infer = _timed(infer_step, device, warmup, iters, batch)
    return train, infer


def main() -> None:
    """Prints img/s of each model and the ratios within each pair."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    nets = {}
    for _, *members in PAIRS:
        for name, kw in members:
            torch.manual_seed(0)
            nets[(name, tuple(kw.items()))] = create_model(name, **kw).to(device)
    best: dict[tuple, tuple[float, float]] = {}
    for r in range(args.repeats):
        for key, net in nets.items():
            t, i = throughput(net, device, args.batch, args.warmup, args.iters, amp)
            print(f"round {r}: {key[0]} {dict(key[1])}: train {t:.1f} img/s, infer {i:.1f} img/s", file=sys.stderr,
                  flush=True)
            old = best.get(key, (0.0, 0.0))
            best[key] = (max(old[0], t), max(old[1], i))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {gpu}; torch {torch.__version__}; batch {args.batch}; amp {args.amp}; "
          f"{args.iters} timed iterations after {args.warmup} warm-up, best of {args.repeats}")
    print(f"| {'model':<52} | {'train img/s':>11} | {'infer img/s':>11} |")
    print(f"|{'-' * 54}|{'-' * 12}:|{'-' * 12}:|")
    for _, *members in PAIRS:
        for name, kw in members:
            t, i = best[(name, tuple(kw.items()))]
            label = name + "".join(f" {k}={v}" for k, v in kw.items())
            print(f"| {label:<52} | {t:>11.1f} | {i:>11.1f} |")
    print()
    print(f"| {'pair (ours / baseline)':<52} | {'train ×':>11} | {'infer ×':>11} |")
    print(f"|{'-' * 54}|{'-' * 12}:|{'-' * 12}:|")
    for label, (n1, k1), (n2, k2) in PAIRS:
        (t1, i1), (t2, i2) = best[(n1, tuple(k1.items()))], best[(n2, tuple(k2.items()))]
        print(f"| {label:<52} | {t1 / t2:>11.2f} | {i1 / i2:>11.2f} |")


if __name__ == "__main__":
    main()
