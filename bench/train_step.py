"""Training-step time and img/s: vitpipe's engines (DDP, DeepSpeed ZeRO-1/2/3) against a plain loop.

Usage: python bench/train_step.py [--nproc 2] [--steps 40] [--model vit_pico_patch4_32] [--batch 64]

Each engine runs the real trainer (`vitpipe train`, torchrun, gloo on CPU / NCCL on GPU) on the
embedded digits data set for ``--steps`` optimizer steps; the step time is read from the logged
``train/img_per_s`` of the second half of the run (after warm-up, including the loader). The
baseline is bench/plain_ddp_step.py (DDP around the same timm model on random tensors, no loader):
the loop a user would otherwise write. timm's own ``benchmark.py`` is not shipped in its wheel, so
it cannot be run from an installed environment. Prints one line per engine with the ratio to DDP.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"ddp": [], **{f"zero{s}": ["--engine.backend=deepspeed", f"--engine.zero_stage={s}"] for s in (1, 2, 3)}}


def run_engine(name: str, extra: list[str], out: Path, shards: Path, a: argparse.Namespace) -> float:
    """Trains with one engine and returns the mean global img/s over the second half of the steps."""
    cmd = [sys.executable, "-m", "vitpipe", "train", "jobs/demo/vitpico_digits_cls_cpu.toml",
           "--nproc-per-node", str(a.nproc), f"--data.path={shards}", f"--run.output_dir={out}",
           f"--run.name={name}", f"--schedule.max_steps={a.steps}", f"--model.name={a.model}",
           f"--data.batch_size={a.batch}", "--tracking.log_every_steps=5", "--tracking.system_metrics_s=0",
           "--eval.every_epochs=0", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vitpipe-demo").experiment_id],
                                filter_string=f"attributes.run_name = '{name}'")
    history = client.get_metric_history(run.info.run_id, "train/img_per_s")
    late = [m.value for m in history if m.step > a.steps // 2]
    return sum(late) / len(late)


def run_plain(a: argparse.Namespace) -> float:
    """Runs the plain DDP baseline and returns its global img/s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           str(ROOT / "bench" / "plain_ddp_step.py"), "--model", a.model, "--batch", str(a.batch),
           "--steps", str(a.steps)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"img_per_s=(\d+)", out).group(1))


def main() -> None:
    """Prints img/s and ms per step for each engine and the baseline."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--model", default="vit_pico_patch4_32")
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-step-"))
    sys.path.insert(0, str(ROOT))
    from vitpipe.demo import prepare_digits

    shards = prepare_digits(out)
    rows = {"plain DDP loop (baseline, no loader)": run_plain(a)}
    rows.update({name: run_engine(name, extra, out, shards, a) for name, extra in ENGINES.items()})
    ddp = rows["ddp"]
    print(f"{a.nproc} processes, {a.model}, batch {a.batch}/process, {a.steps} steps")
    print(f"{'engine':<38} {'img/s':>8} {'ms/step':>8} {'vs ddp':>7}")
    for name, ips in rows.items():
        print(f"{name:<38} {ips:>8.0f} {a.batch * a.nproc / ips * 1e3:>8.1f} {ips / ddp:>7.2f}")


if __name__ == "__main__":
    main()
