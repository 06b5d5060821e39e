"""Off the step path: host syncs per training step, tracking time per step, final export; before vs after.

Usage: python bench/step_path.py [--baseline REV] [--nproc 2] [--steps 20] [--engines ddp,zero1,zero2,zero3]
                                 [--log-calls 200] [--rounds 3] [--export-model vit_small_patch16_224]
                                 [--parts syncs,tracking,export]

Every part runs the code at ``--baseline`` (a commit, extracted with ``git archive``; default 588c8bd,
the trainer before this work) next to the working tree, in the same run, on the same machine:

1. ``syncs``: host syncs per optimizer step. ``python -m pipeline.host_sync`` (the CUDA-free counter of
   the working tree, copied into the baseline tree) trains the quick demo recipe (ViT-Nano, digits) for
   ``--steps`` steps on ``--nproc`` processes (gloo) with each engine, metrics every 10 steps, and
   counts the calls that read a tensor's value on the host, per step and per call site. Reads of
   host tensors by design (AdamW's CPU step counters, the DataLoader's seed) are counted apart.
2. ``tracking``: time the training loop spends in ``log()`` of the 6 training metrics, the baseline's
   synchronous ``MlflowLogger`` against the working tree's asynchronous one (and MLflow's own
   ``log_batch(synchronous=False)`` for reference), ``--log-calls`` calls per logger, interleaved in
   ``--rounds`` rounds; on a local SQLite store, a local ``mlflow server``, and that server stopped with
   SIGSTOP (a hung server; ``MLFLOW_HTTP_REQUEST_TIMEOUT`` = 2 s instead of the trainer's 10 s to keep
   the run short, so the synchronous figure there is a floor). One call = one step at
   ``tracking.log_every_steps = 1``. ``close()`` is timed too: what the asynchronous logger still has to
   deliver at the end.
3. ``export``: the end of a run (``save_final``) with ZeRO-2 and ZeRO-3 on ``--nproc`` processes for
   ``--export-model`` (patch 4 at 32 px): seconds each rank spends on the export after the last
   checkpoint (the baseline: rank 0 merges the checkpoint's shards with ``zero_to_fp32`` while the others
   wait in a barrier; now: every rank gathers the fp32 weights, rank 0 writes them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"
ENGINES = {"ddp": [], **{f"zero{s}": ["--engine.backend=deepspeed", f"--engine.zero_stage={s}"] for s in range(4)}}
METRICS = {"train/loss": 2.3, "train/lr": 1e-3, "train/img_per_s": 1234.5, "train/data_wait": 0.01,
           "train/tflops_per_proc": 0.5, "train/mfu": 0.3}


# ----------------------------------------------------------------------------- the two trees
def baseline_tree(rev: str, out: Path) -> Path:
    """The repository at ``rev`` (git archive), with the working tree's counter module added."""
    tree = out / f"baseline-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    shutil.copy(ROOT / "pipeline" / "host_sync.py", tree / "pipeline" / "host_sync.py")
    return tree


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def digits(tree: Path, out: Path) -> Path:
    """The demo's digits shards, written by the tree's own sharder."""
    code = "import sys; from pathlib import Path; from vitpipe.demo import prepare_digits; " \
           "print(prepare_digits(Path(sys.argv[1])))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tree, env=_env(tree), capture_output=True,
                          text=True, check=True)
    return Path(proc.stdout.strip().splitlines()[-1])


def count(tree: Path, shards: Path, out: Path, nproc: int, args: list[str]) -> list[dict[str, Any]]:
    """Runs the counting harness under torchrun in ``tree``; one result per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline.host_sync", RECIPE, "--out", str(out / "syncs"), f"--data.path={shards}",
           f"--run.output_dir={out}", "--run.name=bench", "--data.num_workers=1", "--eval.every_epochs=0",
           "--tracking.system_metrics_s=0", *args]
    proc = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{tree.name}: {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted((out / "syncs").glob("syncs.rank*.json"))]


# ----------------------------------------------------------------------------- 1. syncs
def _per_step(result: dict[str, Any]) -> tuple[float, float, str]:
    """Mean reads per steady-state step (no log, not an epoch's first), per log step, and every step's reads."""
    steady = [s["reads"] for s in result["steps"] if not s["log"] and not s["epoch_start"]]
    logs = [s["reads"] for s in result["steps"] if s["log"]]
    return statistics.mean(steady), statistics.mean(logs), " ".join(str(s["reads"]) for s in result["steps"])


def _short(site: str) -> str:
    method, where = site.split(" ", 1)
    for marker in ("site-packages/", "/pipeline/"):
        if marker in where:
            where = ("pipeline/" if marker == "/pipeline/" else "") + where.split(marker, 1)[1]
    return f"{method} {where}"


def bench_syncs(trees: dict[str, Path], data: dict[str, Path], out: Path, a: argparse.Namespace) -> None:
    """Prints host reads per steady-state step and per log step, per engine, before and after."""
    print(f"\n## 1. Host syncs per optimizer step ({a.nproc} processes, gloo, {a.steps} steps, "
          f"metrics every 10 steps; rank 0; steady = steps without metrics, not an epoch's first)")
    print(f"{'engine':<7} {'code':<7} {'steady':>6} {'log':>5} {'host':>5}  reads at steps 1..{a.steps}")
    sites: dict[str, dict[str, int]] = {}
    for engine in a.engines:
        for side, tree in trees.items():
            results = count(tree, data[side], out / f"syncs-{side}-{engine}", a.nproc,
                            [f"--schedule.max_steps={a.steps}", "--tracking.log_every_steps=10", *ENGINES[engine]])
            steady, log, per_step = _per_step(results[0])
            same = all(_per_step(r)[2] == per_step for r in results[1:])
            print(f"{engine:<7} {side:<7} {steady:>6.2f} {log:>5.2f} {results[0]['host_reads']:>5}  {per_step}"
                  + ("" if same else "  (other ranks differ)"))
            sites[f"{engine} {side}"] = results[0]["sites"]
    print("reads by call site over the whole run (steps, evaluation, checkpoints), rank 0:")
    for name, by_site in sites.items():
        print(f"  {name:<13} " + "; ".join(f"{_short(s)} ×{n}" for s, n in by_site.items()))


# ----------------------------------------------------------------------------- 2. tracking
def _load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _MlflowAsync:
    """MLflow's own asynchronous logging, for reference: ``log_batch(synchronous=False)``; close() waits."""

    def __init__(self, uri: str, experiment: str, run_name: str, *args: Any, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.ops: list[Any] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.ops.append(self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()],
                                              synchronous=False))

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        for op in self.ops:
            try:
                op.wait()
            except Exception:  # noqa: BLE001 - a failed batch is dropped by MLflow: counted below as not delivered
                pass
        self.client.set_terminated(self.run_id, status)


def _time_logger(factory: Any, uri: str, name: str, calls: int, out: Path,
                 server: Any = None) -> dict[str, float]:
    """Times ``calls`` log() calls and close(); with ``server``, it is stopped (SIGSTOP) while they run.

    Returns:
        ms per call (mean, median, max), close seconds, and records delivered (or, with a stopped
        server, written to the pending file) out of ``calls``.
    """
    from mlflow.tracking import MlflowClient

    pending = out / f"{name}.pending.json"
    lg = factory(uri, "bench", name, {}, {}, pending_file=pending)
    if server is not None:
        os.killpg(server.pid, signal.SIGSTOP)
    try:
        times = []
        for step in range(1, calls + 1):
            t0 = time.perf_counter()
            lg.log(METRICS, step)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lg.close("FINISHED")
        close_s = time.perf_counter() - t0
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGCONT)
    if server is not None:
        saved = json.loads(pending.read_text())["records"] if pending.is_file() else []
        delivered = -sum(r["kind"] == "metrics" for r in saved)  # negative: saved, not delivered
    else:
        delivered = len(MlflowClient(uri).get_metric_history(lg.run_id, "train/loss"))
    return {"mean_ms": 1e3 * statistics.mean(times), "median_ms": 1e3 * statistics.median(times),
            "max_ms": 1e3 * max(times), "close_s": close_s, "delivered": delivered, "calls": calls}


def bench_tracking(trees: dict[str, Path], out: Path, a: argparse.Namespace) -> None:
    """Prints the time log() and close() take, per store and logger."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"  # the loggers only set it when unset
    sys.path.insert(0, str(ROOT))
    from pipeline import metrics as after
    from pipeline.dist import free_port
    from vitpipe.ui import start_server, stop_server, wait_healthy

    before = _load_module(trees["before"] / "pipeline" / "metrics.py", "metrics_before")
    loggers = {"before: synchronous": before.MlflowLogger, "after: asynchronous": after.MlflowLogger,
               "MLflow async (ref.)": _MlflowAsync}
    (out / "server").mkdir()
    port = free_port()
    server = start_server(out / "server" / "mlflow.db", port)
    http = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(http, server)
        print(f"\n## 2. Tracking time per step: log() of {len(METRICS)} metrics, {a.log_calls} calls per logger, "
              f"{a.rounds} interleaved rounds (median of the rounds' means)")
        print(f"{'store':<22} {'logger':<21} {'ms/call':>8} {'p50 ms':>7} {'max ms':>8} {'close s':>8} "
              f"{'delivered':>10}")
        stores = {"local SQLite": f"sqlite:///{out / 'sqlite' / 'mlflow.db'}", "mlflow server": http}
        (out / "sqlite").mkdir()
        for store, uri in stores.items():
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in loggers}
            for r in range(a.rounds):
                for name, factory in loggers.items():
                    rows[name].append(_time_logger(factory, uri, f"{store}-{name}-{r}".replace(" ", "_")
                                                   .replace(":", ""), a.log_calls, out))
            for name, results in rows.items():
                _print_row(store, name, results)
        hung = {"before: synchronous": 3, "after: asynchronous": a.log_calls}
        for name, calls in hung.items():
            _print_row("server hung (SIGSTOP)", name, [_time_logger(loggers[name], http, f"hung-{name[:6]}",
                                                                     calls, out, server)])
        print("  (hung server: 'pending' = records close() could not deliver and wrote to the pending file)")
    finally:
        stop_server(server)


def _print_row(store: str, name: str, results: list[dict[str, float]]) -> None:
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    delivered = f"{int(med['delivered'])}/{int(med['calls'])}" if med["delivered"] >= 0 \
        else f"pending {-int(med['delivered'])}"
    print(f"{store:<22} {name:<21} {med['mean_ms']:>8.2f} {med['median_ms']:>7.2f} {med['max_ms']:>8.1f} "
          f"{med['close_s']:>8.2f} {delivered:>10}")


# ----------------------------------------------------------------------------- 3. export
def bench_export(trees: dict[str, Path], data: dict[str, Path], out: Path, a: argparse.Namespace) -> None:
    """Prints the seconds each rank spends exporting the final weights, before and after."""
    print(f"\n## 3. Final export: {a.export_model} (patch 4, 32 px), {a.nproc} processes; seconds after the "
          "last checkpoint, per rank")
    print(f"{'engine':<7} {'code':<8} {'export s per rank':>28} {'checkpoint s':>13} {'file MB':>8} "
          f"{'rank 0 reads MB':>16}")
    for engine in ("zero2", "zero3"):
        for side, tree in trees.items():
            dest = out / f"export-{side}-{engine}"
            results = count(tree, data[side], dest, a.nproc,
                            ["--schedule.max_steps=2", "--tracking.enabled=false", "--data.batch_size=16",
                             f"--model.name={a.export_model}", "--model.kwargs={ patch_size = 4 }",
                             *ENGINES[engine]])
            export = [r["seconds"]["save_final"] - r["seconds"]["last_checkpoint"] for r in results]
            size = (dest / "bench" / "final" / "model.safetensors").stat().st_size / 1e6
            # The baseline merges every rank's model and optimizer shard file of the last checkpoint.
            shards = sum(f.stat().st_size for f in (dest / "bench" / "checkpoints").glob("step_*/pytorch_model/*.pt"))
            per_rank = ", ".join(f"r{r['rank']} {s:.2f}" for r, s in zip(results, export, strict=True))
            print(f"{engine:<7} {side:<8} {per_rank:>28} {results[0]['seconds']['last_checkpoint']:>13.2f} "
                  f"{size:>8.1f} {(shards / 1e6 if side == 'before' else 0.0):>16.1f}")


def main() -> None:
    """Prints the three tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="588c8bd")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--engines", default="ddp,zero1,zero2,zero3")
    p.add_argument("--log-calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--export-model", default="vit_small_patch16_224")
    p.add_argument("--parts", default="syncs,tracking,export")
    a = p.parse_args()
    a.engines = a.engines.split(",")
    out = Path(tempfile.mkdtemp(prefix="bench-step-path-"))
    trees = {"before": baseline_tree(a.baseline, out), "after": ROOT}
    print(f"before = {a.baseline} (git archive), after = working tree; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    parts = a.parts.split(",")
    data = {side: digits(tree, out / f"data-{side}") for side, tree in trees.items()} if set(parts) - {"tracking"} \
        else {}
    if "syncs" in parts:
        bench_syncs(trees, data, out, a)
    if "tracking" in parts:
        bench_tracking(trees, out, a)
    if "export" in parts:
        bench_export(trees, data, out, a)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
