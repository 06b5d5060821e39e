"""StructSA fused (grouped conv + one SDPA call) vs literal (correlation-first) — time and peak memory, fwd+bwd.

Three paths per case: ``fused``; ``literal`` (all queries at once); ``chunked`` (the same literal definition
evaluated ``--query-chunk`` queries at a time under activation checkpointing, so that its memory stays
bounded where the unchunked literal path does not fit).

Cases (StructViT stage 3: C = 320, 5 heads of 64, D = 4, 3×3(×3) kernels, stride 1):
  image  14×14 tokens        (StructViT-S/B image stage 3 at 224²)
  video  T×14×14 tokens      (T = 8: StructViT-S video stage 3 at 16 frames)

Each (case, path) runs in its own subprocess so that the CPU peak (max RSS growth) is not polluted by the
previous run; on CUDA the peak is ``torch.cuda.max_memory_allocated``. The literal path materialises
O(Nq·N′·C·D) tensors for Nq queries at once (Nq = N unchunked, ``--query-chunk`` chunked) and is skipped,
with its estimate printed, when that estimate exceeds ``--max-literal-gb``.

    python bench/structsa.py                              # CPU, float32
    python bench/structsa.py --device cuda --dtype bf16   # GPU (record in bench/RESULTS.md); or bfloat16
    python bench/structsa.py --cases video --warmup 0 --repeat 1   # CPU video: minutes per literal step
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short name -> torch name
PATHS = ("fused", "literal", "chunked")


def _literal_gb(n: int, n_kv: int, c: int, d: int, itemsize: int) -> float:
    # correlation volume + its conv output (D×) + channel-expanded attention (D×) + merged map, fwd + saved,
    # for n queries at once (all of them unchunked, one block chunked).
    return (2 + 2 * d) * n * n_kv * c * itemsize / 1e9


def _run_one(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from model.layers.structsa import StructSA

    dtype = getattr(torch, DTYPES.get(args.dtype, args.dtype))
    grid = (14, 14) if args.case == "image" else (args.frames, 14, 14)
    torch.manual_seed(0)
    layer = StructSA(320, head_dim=64, struct_dim=args.struct_dim, kv_stride=args.stride, ndim=len(grid))
    layer = layer.to(args.device, dtype)
    n = 1
    for g in grid:
        n *= g
    x = torch.randn(args.batch, n, 320, device=args.device, dtype=dtype, requires_grad=True)
    fused = args.path == "fused"
    chunk = args.query_chunk if args.path == "chunked" else None

    def step() -> None:
        y = layer(x, grid, fused=fused, query_chunk=chunk)
        y.float().square().mean().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, high-water mark before any step
    for _ in range(args.warmup):  # warm-up (and, on CUDA, kernel selection)
        step()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:  # growth of the process high-water mark over the model + inputs: what a fwd+bwd step needs
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {"case": args.case, "path": args.path, "tokens": n, "ms": 1e3 * statistics.median(times),
            "peak_mib": peak}


def _dump(path: Path | None, rows: list[dict]) -> None:
    """Writes the rows so far (atomically) when ``--json`` is given."""
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(path)


def main() -> None:
    """Runs every (case, path) in a subprocess and prints a table with the literal/fused ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=[*DTYPES, *DTYPES.values()])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--frames", type=int, default=8, help="temporal tokens of the video case")
    ap.add_argument("--struct-dim", type=int, default=4)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default="image,video")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--query-chunk", type=int, default=64, help="queries per block of the chunked literal path")
    ap.add_argument("--max-literal-gb", type=float, default=8.0)
    ap.add_argument("--json", type=Path, help="also write every row (timed, skipped or failed) to this JSON file")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process
        print(json.dumps(_run_one(args)))
        return
    print(f"StructSA stage 3, C=320, 5 heads, D={args.struct_dim}, stride {args.stride}, batch {args.batch}, "
          f"{args.dtype} on {args.device}; fwd+bwd, median of {args.repeat} after {args.warmup} warm-up; peak = "
          f"{'CUDA max allocated above the inputs' if args.device == 'cuda' else 'growth of the max RSS over setup'}"
          f"; chunked = literal, {args.query_chunk} queries per block, activation checkpointing")
    print(f"{'case':<22}{'path':<14}{'ms':>10}{'peak MiB':>11}")
    itemsize = 4 if DTYPES.get(args.dtype, args.dtype) == "float32" else 2
    rows: list[dict] = []
    for case in args.cases.split(","):
        n = 196 if case == "image" else 196 * args.frames
        n_kv = n if args.stride == 1 else n // 4
        label = f"{case} ({n} tokens)"
        res = {}
        for path in args.paths.split(","):
            queries = min(n, args.query_chunk) if path == "chunked" else n
            est = _literal_gb(args.batch * queries, n_kv, 320, args.struct_dim, itemsize)
            if path != "fused" and est > args.max_literal_gb:
                print(f"{label:<22}{path:<14}  skipped: needs ≈ {est:.0f} GB > --max-literal-gb {args.max_literal_gb}")
                rows.append({"case": case, "path": path, "tokens": n, "skipped": f"needs ≈ {est:.0f} GB"})
                _dump(args.json, rows)
                continue
            cmd = [sys.executable, __file__, "--case", case, "--path", path] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("case", "path", "cases", "paths", "json") and v is not None]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:  # e.g. -9: killed for memory
                print(f"{label:<22}{path:<14}  failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
                rows.append({"case": case, "path": path, "tokens": n, "failed": f"exit {out.returncode}: "
                             f"{out.stderr.strip().splitlines()[-1:]}"})
                _dump(args.json, rows)
                continue
            r = res[path] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            _dump(args.json, rows)
            print(f"{label:<22}{path:<14}{r['ms']:>10.1f}{r['peak_mib']:>11.0f}", flush=True)
        for num, den in (("literal", "fused"), ("chunked", "fused"), ("chunked", "literal")):
            if num in res and den in res:
                a, b = res[num], res[den]
                print(f"{'':<22}{'ratio':<14}{a['ms'] / b['ms']:>9.1f}×{a['peak_mib'] / b['peak_mib']:>10.1f}×"
                      f"   ({num} / {den})", flush=True)


if __name__ == "__main__":
    main()
