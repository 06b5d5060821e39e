"""The localhost Slurm cluster (tools/slurm_local.sh) behaves like a real 2-node cluster.

Each test submits real jobs to the cluster that the session fixture ``slurm_cluster`` started.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ALL_REDUCE = """\
import datetime
import os

import torch
import torch.distributed as dist

rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                        rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
value = torch.tensor([rank + 1.0])
dist.all_reduce(value)
print(f"rank={rank} node={os.environ['SLURMD_NODENAME']} sum={value.item()}", flush=True)
dist.destroy_process_group()
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _queue_state(cluster, job_id: str) -> str:
    return cluster.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def test_srun_spans_both_nodes(slurm_cluster) -> None:
    proc = slurm_cluster.run("srun", "-N2", "-n2", "-t", "1", "bash", "-c",
                             'echo "$SLURMD_NODENAME $SLURM_PROCID $SLURM_JOB_NODELIST"', timeout=60)
    assert sorted(proc.stdout.split("\n")[:-1]) == ["node1 0 node[1-2]", "node2 1 node[1-2]"]
    # MASTER_ADDR=node1 must resolve (marked /etc/hosts line).
    for node in slurm_cluster.nodes:
        assert slurm_cluster.run("getent", "hosts", node).stdout.split()[0] == "127.0.0.1"


def test_sbatch_gloo_all_reduce_across_nodes(slurm_cluster, tmp_path: Path) -> None:
    worker = _write(tmp_path / "all_reduce.py", ALL_REDUCE)
    job = _write(tmp_path / "job.sh", f"""#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --time=2
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))  # a fixed port would collide between jobs on one host
export OMP_NUM_THREADS=1
srun {slurm_cluster.python} {worker}
""")
    job_id = slurm_cluster.sbatch(job, f"--output={tmp_path}/out-%j.txt", cwd=tmp_path)
    result = slurm_cluster.wait_job(job_id, timeout=120)
    out = (tmp_path / f"out-{job_id}.txt").read_text()
    assert result.ok, (result, out)
    lines = sorted(line for line in out.splitlines() if line.startswith("rank="))
    assert lines == ["rank=0 node=node1 sum=3.0", "rank=1 node=node2 sum=3.0"], out


def test_job_array_runs_every_task(slurm_cluster, tmp_path: Path) -> None:
    job = _write(tmp_path / "array.sh", '#!/bin/bash\necho "task=$SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT"\n')
    job_id = slurm_cluster.sbatch(job, "--array=0-1", f"--output={tmp_path}/arr-%A_%a.txt", cwd=tmp_path)
    result = slurm_cluster.wait_job(job_id, timeout=60)
    assert result.ok, result
    assert sorted(result.tasks) == [f"{job_id}_0", f"{job_id}_1"]
    for task in (0, 1):
        assert (tmp_path / f"arr-{job_id}_{task}.txt").read_text().strip() == f"task={task} of 2"


def test_requeue_reruns_with_restart_count(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "requeue.txt"
    job = _write(tmp_path / "requeue.sh", """#!/bin/bash
echo "start restart=${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then sleep 300; fi  # the first run waits to be requeued
echo "done restart=${SLURM_RESTART_COUNT:-0}"
""")
    job_id = slurm_cluster.sbatch(job, "--requeue", "--open-mode=append", f"--output={out}", "--time=5",
                                  cwd=tmp_path)
    _wait_for(lambda: out.exists() and "start restart=0" in out.read_text(), 60, "the first run")
    slurm_cluster.run("scontrol", "requeue", job_id)
    # A requeued job is held for cred_expire + 1 s; releasing it at once needs the job back in PENDING.
    _wait_for(lambda: _queue_state(slurm_cluster, job_id) == "PENDING", 60, "the requeued job to be pending")
    # Released in the same second as the requeue, slurmd refuses the launch credential (not newer than the
    # revocation) and the job ends FAILED without output: let the second turn first.
    time.sleep(2)
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    result = slurm_cluster.wait_job(job_id, timeout=60)
    text = out.read_text()
    assert result.ok, (result, text)
    # The output file also holds slurmstepd's "CANCELLED ... DUE TO JOB REQUEUE" line from the first run.
    runs = [line for line in text.splitlines() if not line.startswith("slurmstepd")]
    assert runs == ["start restart=0", "start restart=1", "done restart=1"], text
    assert "DUE TO JOB REQUEUE" in text


def test_sacct_records_finished_jobs(slurm_cluster, tmp_path: Path) -> None:
    good = slurm_cluster.sbatch(_write(tmp_path / "good.sh", "#!/bin/bash\nsrun true\n"), "--nodes=2",
                                "--job-name=vitpipe-good", "--output=/dev/null", cwd=tmp_path)
    bad = slurm_cluster.sbatch(_write(tmp_path / "bad.sh", "#!/bin/bash\nexit 3\n"),
                               "--job-name=vitpipe-bad", "--output=/dev/null", cwd=tmp_path)
    assert slurm_cluster.wait_job(good, timeout=60).ok
    failed = slurm_cluster.wait_job(bad, timeout=60)
    assert (failed.state, failed.exit_code, failed.source) == ("FAILED", 3, "sacct")
    rows = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", f"{good},{bad}",
                             "-o", "JobID,JobName,State,ExitCode,NNodes,Cluster").stdout.split()
    assert sorted(rows) == sorted([f"{good}|vitpipe-good|COMPLETED|0:0|2|{slurm_cluster.cluster}",
                                   f"{bad}|vitpipe-bad|FAILED|3:0|1|{slurm_cluster.cluster}"])
