"""The GPU readiness run behind ``bash bench/gpu.sh``: every part in its own process, each in a time box.

Usage: ``bash bench/gpu.sh [--smoke] [--out DIR] [--work DIR] [--only PART ...] [--wheels DIR] [--list]``

Parts run in order (see :data:`PARTS`); each gets its own process and a time box of ``budget`` seconds
(the whole run stops at :data:`TOTAL_S`), so a crash or a hang of one part loses nothing else. After
every part the results are written again, atomically: ``OUT/gpu-<device>-<date>.md`` and ``.json`` (and
``.log``, the parts' output). ``--smoke`` runs the same code on the CPU with tiny sizes (CI); the parts
that need CUDA report ``skipped: no CUDA device`` and a part whose package is missing reports
``skipped: <package> not installed``. Exit status 1 when a part failed or ran out of time.

This file uses the standard library only: it never imports torch, so it starts at once everywhere.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOTAL_S = 480
"""The whole device run (8 minutes), start-up of the parts included; the budgets below sum to at most this."""


@dataclass(frozen=True)
class Part:
    """One time-boxed step of the run."""

    name: str
    budget: int
    """Seconds on one H100/H200 with 16 cores (its time box there)."""
    smoke: int
    """Time box of the CPU smoke run: a guard against hangs, with room for a loaded machine (a quiet 2-core
    machine takes about a minute for the whole smoke run; CI asserts under 3)."""
    gpu_only: bool
    what: str


PARTS = (
    Part("env", 10, 30, False, "device, driver, CUDA, torch, DALI and package versions"),
    Part("data", 50, 60, False, "ImageNet-like JPEGs + H.264/VP9 clips, sharded by `vitpipe prep`"),
    Part("pytest_gpu", 60, 5, True, "`pytest -m gpu`: nvJPEG/NVDEC vs CPU, NCCL, bf16 steps, GPU export on CPU"),
    Part("structsa", 45, 45, False, "StructSA fused vs literal (chunked): fwd+bwd ms, peak memory, bf16"),
    Part("models", 40, 45, False, "training img/s + MFU, eager, synthetic tensors (4 models)"),
    Part("models_compile", 70, 5, True, "the same under torch.compile"),
    Part("loader_images", 45, 45, False, "DALI GPU images/s (hw_decoder_load 0/0.65/0.9) vs wds on all cores"),
    Part("loader_video", 35, 50, False, "NVDEC clips/s (H.264, VP9) vs PyAV on the CPU"),
    Part("train_loader", 50, 70, False, "trainer through wds / DALI GPU: img/s, data-wait fraction, MFU"),
    Part("engines", 70, 5, True, "DDP vs ZeRO-1/2/3 step time on one GPU"),
)
assert sum(p.budget for p in PARTS) <= TOTAL_S, "the parts' budgets must fit the 8-minute run"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same code paths (CI)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results files go")
    p.add_argument("--work", type=Path, help="work directory for the data, kept (default: a temporary one, removed)")
    p.add_argument("--only", nargs="+", choices=[p.name for p in PARTS], help="run these parts only (data first)")
    p.add_argument("--wheels", type=Path, help="install the *.whl in DIR (pip --no-index, private target) first: "
                   "for a node that reaches no package index")
    p.add_argument("--list", action="store_true", help="print the parts and their time budget, and exit")
    return p.parse_args(argv)


def print_budget(smoke: bool) -> None:
    """Prints the per-part time box and its sum."""
    print(f"bench/gpu.sh{' --smoke' if smoke else ''}: parts and time boxes (s) — the device run must fit "
          f"{TOTAL_S} s (8 min) on one H100/H200")
    print(f"  {'part':<16}{'device s':>9}{'smoke s':>9}  {'needs':<8} what")
    for p in PARTS:
        print(f"  {p.name:<16}{p.budget:>9}{p.smoke:>9}  {'CUDA' if p.gpu_only else 'CPU ok':<8} {p.what}")
    print(f"  {'total':<16}{sum(p.budget for p in PARTS):>9}{sum(p.smoke for p in PARTS):>9}", flush=True)


def _kill(proc: subprocess.Popen) -> None:
    """Ends the part's whole process group (its trainer, DALI and loader workers too)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(cmd: list[str], result: Path, log: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Runs one part's process in a time box; returns its result (status set for a crash or a timeout).

    Args:
        cmd: The part's command; it writes ``result`` (JSON) as it goes.
        result: The part's result file (what it measured so far is kept when it is killed).
        log: Where its output goes.
        timeout: Seconds before the process group is ended.
        env: Its environment.
    """
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
    try:
        res = json.loads(result.read_text())
    except (OSError, ValueError):
        res = {"status": "running", "tables": [], "notes": [], "data": {}}
    tail = log.read_text(errors="replace").strip().splitlines()[-12:]
    if rc is None:
        res["status"] = f"timeout: stopped at its {timeout:.0f} s time box (figures so far kept)"
    elif res.get("status", "running") == "running" or (rc != 0 and not res["status"].startswith("failed")):
        last = tail[-1] if tail else ""
        res["status"] = f"failed: exit {rc}" + (f": {last[:200]}" if last else "")
    if not (res["status"] == "ok" or res["status"].startswith("skipped")):
        res.setdefault("notes", []).extend(["output tail:", *tail])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the part's processes that ended (all, but a killed one's)
    res["cpu_s"] = round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1)
    return res


def device_slug(env_result: dict[str, Any] | None, smoke: bool) -> str:
    """``nvidia-h100-80gb-hbm3``, ``cpu-smoke``, ...: the device part of the results file name."""
    data = (env_result or {}).get("data", {})
    name = data.get("device", "unknown") if data.get("gpus") else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug}-smoke" if smoke else slug


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(run: dict[str, Any]) -> str:
    """The markdown results file."""
    env = next((p for p in run["parts"] if p["name"] == "env"), {}).get("data", {})
    kind = "smoke run (CPU, tiny sizes; not figures to quote)" if run["smoke"] else "device run"
    lines = [f"# GPU readiness run: {env.get('device', 'unknown device')}, {run['date']}", "",
             f"`{run['command']}` — {kind}, {run['wall_s']:.0f} s in all (time box {run['total_budget_s']} s). "
             "Every figure below was taken in this run, on this machine:", ""]
    keys = ("device", "driver", "cuda", "torch", "dali", "pyav", "deepspeed", "timm", "cpu_cores", "peak_bf16_tflops")
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
              "| " + " | ".join(_cell(env.get(k, "–")) for k in keys) + " |", "",
              "## Parts", "", "| part | budget s | took s | CPU s | status |", "|---|---:|---:|---:|---|"]
    lines += [f"| {p['name']} | {p['budget_s']} | {p.get('wall_s', 0):.1f} | {p.get('cpu_s', 0):.1f} | "
              f"{_cell(p['status'])} |" for p in run["parts"]]
    for p in run["parts"]:
        lines += ["", f"## {p['name']}: {p['what']}", "", f"Status: {p['status']}."]
        for t in p.get("tables", []):
            lines += ["", f"**{t['title']}**", "", "| " + " | ".join(_cell(c) for c in t["columns"]) + " |",
                      "|" + "---|" * len(t["columns"])]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t["rows"]]
        if p.get("notes"):
            lines += ["", "```", *p["notes"], "```"]
    return "\n".join(lines) + "\n"


def write_results(run: dict[str, Any], out: Path, logs: Path) -> Path:
    """Writes ``.json``, ``.md`` and ``.log`` for the parts so far (atomically); returns the ``.md`` path."""
    sys.path.insert(0, str(ROOT))
    from data_prep.format import atomic_write_bytes  # standard library only

    env = next((p for p in run["parts"] if p["name"] == "env"), None)
    stem = out / f"gpu-{device_slug(env, run['smoke'])}-{run['date']}"
    atomic_write_bytes(stem.with_suffix(".json"), json.dumps(run, indent=1, default=str).encode())
    atomic_write_bytes(stem.with_suffix(".md"), render(run).encode())
    text = []
    for p in run["parts"]:
        path = logs / f"{p['name']}.log"
        body = path.read_text(errors="replace").splitlines()[-300:] if path.is_file() else []
        text += [f"===== {p['name']}: {p['status']}", *body]
    atomic_write_bytes(stem.with_suffix(".log"), ("\n".join(text) + "\n").encode())
    return stem.with_suffix(".md")


def install_wheels(wheels: Path, work: Path, env: dict[str, str]) -> str:
    """pip-installs ``wheels/*.whl`` into ``work/site`` without an index; returns a line for the results."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        return f"--wheels {wheels}: no *.whl there"
    site = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--target", str(site), *files]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return f"--wheels {wheels}: pip failed: {done.stderr.strip().splitlines()[-1:]}"
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).strip(os.pathsep)
    return f"--wheels {wheels}: installed {len(files)} wheels into {site}"


def main(argv: list[str] | None = None) -> int:
    """Runs the parts and writes the results; 0 when every part is ok or skipped."""
    a = parse_args(argv)
    print_budget(a.smoke)
    if a.list:
        return 0
    start, date = time.perf_counter(), dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    work = a.work or Path(tempfile.mkdtemp(prefix="vitpipe-gpu-"))
    logs, results = work / "logs", work / "results"
    for d in (logs, results, a.out):
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)}
    total = sum(p.smoke if a.smoke else p.budget for p in PARTS)
    run: dict[str, Any] = {"command": " ".join(["bash bench/gpu.sh", *(argv if argv is not None else sys.argv[1:])]),
                           "smoke": a.smoke, "date": date, "total_budget_s": total, "parts": [], "wall_s": 0.0}
    if a.wheels:
        run["wheels"] = install_wheels(a.wheels, work, env)
        print(run["wheels"], flush=True)
    ctx = work / "ctx.json"
    ctx.write_text(json.dumps({"smoke": a.smoke, "work": str(work), "results_dir": str(results)}))
    chosen = [p for p in PARTS if not a.only or p.name in a.only or p.name in ("env", "data")]
    md, cuda = None, None
    try:
        for part in chosen:
            budget = part.smoke if a.smoke else part.budget
            left = total - (time.perf_counter() - start)
            print(f"\n== {part.name} (time box {min(budget, max(left, 0)):.0f} s): {part.what}", flush=True)
            if part.gpu_only and cuda is False:
                res = {"status": "skipped: no CUDA device", "tables": [], "notes": [], "data": {}, "wall_s": 0.0}
            elif left < 5:
                res = {"status": "skipped: the run's total time box is spent", "tables": [], "notes": [], "data": {},
                       "wall_s": 0.0}
            else:
                cmd = [sys.executable, str(HERE / "part.py"), part.name, "--ctx", str(ctx),
                       "--result", str(results / f"{part.name}.json")]
                res = run_part(cmd, results / f"{part.name}.json", logs / f"{part.name}.log", min(budget, left), env)
            res.update(name=part.name, what=part.what, budget_s=budget)
            if part.name == "env":
                cuda = bool(res.get("data", {}).get("gpus"))
            run["parts"].append(res)
            run["wall_s"] = round(time.perf_counter() - start, 1)
            md = write_results(run, a.out, logs)
            print(f"== {part.name}: {res['status']} ({res['wall_s']:.1f} s, CPU {res.get('cpu_s', 0):.1f} s)",
                  flush=True)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nresults: {md} (and .json, .log); {run['wall_s']:.0f} s in all")
    bad = [p["name"] for p in run["parts"] if not (p["status"] == "ok" or p["status"].startswith("skipped"))]
    if bad:
        print(f"parts not ok: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
