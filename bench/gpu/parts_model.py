"""Parts ``structsa`` (fused vs literal StructSA), ``models`` and ``models_compile`` (training img/s, MFU).

``structsa`` runs bench/structsa.py (each case and path in its own process, as that script does);
``models`` times a bf16 training step (forward, cross-entropy, backward, AdamW) on synthetic tensors with
bench/models.py's timer; the FLOPs are model/flops.py's count (training = 3 × forward).
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from common import BENCH, Result, earlier, fmt, load_bench, missing


def structsa(ctx: dict[str, Any], res: Result) -> None:
    """StructSA stage 3 (C = 320, 5 heads, D = 4): fused vs literal vs chunked literal, fwd+bwd ms and peak MiB."""
    out = res.path.with_name("structsa-rows.json")
    cmd = [sys.executable, str(BENCH / "structsa.py"), *ctx["sizes"]["structsa"], "--json", str(out)]
    table = res.table("StructSA stage 3 (StructViT-S/B image 14×14 at 224², video 8×14×14 at 16 frames), C = 320, "
                      "5 heads, D = 4, fwd+bwd; " + " ".join(ctx["sizes"]["structsa"]),
                      ["case", "tokens", "path", "ms", "peak MiB", "ms vs fused", "memory vs fused"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the script's own table, kept in the log as it goes
        print(line, end="", flush=True)
        _structsa_rows(out, table)
        res.flush()
    proc.wait()
    _structsa_rows(out, table)
    failed = [r for r in table if "failed" in str(r[3])]
    res.finish("ok" if proc.returncode == 0 and not failed else
               f"failed: structsa.py exit {proc.returncode}, {len(failed)} failed rows")


def _structsa_rows(path: Any, table: list[list[Any]]) -> None:
    import json

    if not path.is_file():
        return
    rows = json.loads(path.read_text())
    fused = {r["case"]: r for r in rows if r["path"] == "fused" and "ms" in r}
    table.clear()
    for r in rows:
        if "ms" not in r:
            table.append([r["case"], r["tokens"], r["path"], r.get("skipped") and f"skipped: {r['skipped']}"
                          or f"failed: {r.get('failed')}", "", "", ""])
            continue
        f = fused.get(r["case"])
        table.append([r["case"], r["tokens"], r["path"], fmt(r["ms"], 2), fmt(r["peak_mib"], 0),
                      f"{r['ms'] / f['ms']:.2f}×" if f else "–",
                      f"{r['peak_mib'] / f['peak_mib']:.2f}×" if f and f["peak_mib"] > 0 else "–"])


def _measure(name: str, size: int, batch: int, warmup: int, iters: int, compiled: bool,
             peak: float) -> dict[str, Any]:
    """Builds one model, counts its FLOPs and times its training step."""
    import torch

    from model import create_model
    from model.flops import count_flops

    models = load_bench("models")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    net = create_model(name, num_classes=1000).to(device)
    flops = count_flops(net, torch.randn(1, 3, size, size, device=device))
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda)
    run = torch.compile(net) if compiled else net
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step() -> None:
        with amp:
            loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    net.train()
    t0 = time.perf_counter()
    step()  # the first step (compilation, kernel selection) is timed apart
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first = time.perf_counter() - t0
    ips = models._timed(step, device, max(warmup - 1, 0), iters, batch)
    tflops = 3 * flops * ips / 1e12
    return {"model": name, "size": size, "params_m": params / 1e6, "gflops": flops / 1e9, "batch": batch,
            "img_per_s": ips, "tflops": tflops, "mfu": tflops / peak if peak else float("nan"), "first_s": first,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def _models(ctx: dict[str, Any], res: Result, compiled: bool) -> None:
    import torch

    if reason := missing("timm"):
        return res.finish(reason)
    s = ctx["sizes"]
    envres = earlier(ctx, "env") or {"data": {}}
    peak = float(envres["data"].get("peak_bf16_tflops") or 0.0)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    eager = {}
    if compiled:
        prev = earlier(ctx, "models") or {"data": {}}
        eager = prev["data"].get("rows", {})
    where = f"{torch.cuda.get_device_name(0)}, bf16 autocast" if cuda else "CPU, fp32"
    title = (f"Training step on synthetic tensors, {'torch.compile (inductor)' if compiled else 'eager'}: "
             f"{where}, batch {s['model_batch']}, forward + cross-entropy + backward + AdamW; {s['model_iters']} "
             f"timed steps after {s['model_warmup']}; MFU = 3 × forward FLOPs (model/flops.py) × img/s / peak "
             f"({fmt(peak, 0)} TFLOP/s dense bf16)")
    cols = ["model", "input", "params M", "GFLOPs/img (fwd)", "img/s", "TFLOP/s", "MFU", "first step s", "peak GiB"]
    table = res.table(title, cols + (["vs eager"] if compiled else []))
    width = len(cols) + compiled
    for name, size in s["models"]:  # listed up front: a model the time box cuts off still shows
        table.append([name, f"{size}²", "not reached (part time box)"] + [""] * (width - 3))
    res.flush()
    got: dict[str, Any] = {}
    for i, (name, size) in enumerate(s["models"]):
        try:
            r = _measure(name, size, s["model_batch"], s["model_warmup"], s["model_iters"], compiled, peak)
        except Exception as err:  # noqa: BLE001 - one model failing keeps the others' figures
            table[i] = [name, f"{size}²", f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"] + \
                [""] * (width - 3)
            res.flush()
            continue
        got[name] = r
        row = [name, f"{size}²", fmt(r["params_m"]), fmt(r["gflops"], 2), fmt(r["img_per_s"]), fmt(r["tflops"]),
               f"{100 * r['mfu']:.1f} %" if r["mfu"] == r["mfu"] else "–", fmt(r["first_s"], 1), fmt(r["peak_gib"], 1)]
        if compiled:
            e = eager.get(name)
            row.append(f"{r['img_per_s'] / e['img_per_s']:.2f}×" if e else "–")
        table[i] = row
        res.obj["data"]["rows"] = got
        res.flush()
        if cuda:
            torch.cuda.empty_cache()
    failed = [r[0] for r in table if str(r[2]).startswith("failed")]
    res.finish(f"failed: {', '.join(failed)}" if failed else "ok")


def models(ctx: dict[str, Any], res: Result) -> None:
    """Training img/s and MFU, eager, for Swin-T, ViT-B/16, StructViT-S-4-1 and FilterViT-XS."""
    _models(ctx, res, compiled=False)


def models_compile(ctx: dict[str, Any], res: Result) -> None:
    """The same models under ``torch.compile``, with the ratio to the eager figures of part ``models``."""
    _models(ctx, res, compiled=True)
