"""Wall time and held-out accuracy of `vitpipe demo`, for 1 and 2 training processes.

Usage: python bench/bench_demo.py [--nproc 1 2] [--quick] [--out DIR]

Each configuration runs the real demo (JPEG writing and sharding are done once, then skipped) in a
fresh subprocess and prints one line: processes, wall seconds of the whole command, training
seconds, steps, top-1 and top-5. The baseline it compares is the single-process run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(out: Path, nproc: int, quick: bool) -> dict:
    """Runs one demo and returns its summary plus the command's wall time."""
    cmd = [sys.executable, "-m", "vitpipe", "demo", "--out", str(out), "--nproc-per-node", str(nproc)]
    if quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    run_dir = Path(re.search(r"run directory\s+(\S+)", proc.stdout).group(1))
    return {**json.loads((run_dir / "summary.json").read_text()), "wall": wall}


def main() -> None:
    """Runs every configuration and prints a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-demo-"))
    subprocess.run([sys.executable, "-c", f"from vitpipe.demo import prepare_digits; "
                    f"from pathlib import Path; prepare_digits(Path({str(out)!r}))"], check=True)
    print(f"{'procs':>5} {'wall s':>7} {'train s':>8} {'steps':>6} {'top-1 %':>8} {'top-5 %':>8}")
    for nproc in args.nproc:
        s = run_once(out, nproc, args.quick)
        print(f"{nproc:>5} {s['wall']:>7.1f} {s['seconds']:>8.1f} {s['steps']:>6} "
              f"{s['val_top1']:>8.2f} {s['val_top5']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
