"""``vitpipe submit`` and ``vitpipe prep --slurm`` on the real 2-node localhost Slurm cluster (``slurm_cluster``).

* a 2-node training job (torchrun per node, c10d rendezvous, gloo on CPUs, fake GPUs scheduled) runs to the end;
* a second job gets SIGUSR1 from ``scancel --signal`` mid-run: it checkpoints, requeues itself, resumes and ends
  with the same metrics as the first, in one MLflow run; its run name has quotes, spaces and ``$(...)``;
* a 2-task prep array and its dependent merge job write the same dataset as one process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli
from tests.data_prep.test_images_scale import make_imagenet

pytestmark = pytest.mark.slurm

RECIPE = "jobs/demo/vitnano_digits_cls_2xcpu.toml"
STEPS = 22  # 2 epochs x 1,438 // (2 processes x 64)


@pytest.fixture(scope="module")
def cluster_file(slurm_cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cluster") / "cluster.toml"
    path.write_text(f"""
[slurm]
partition = {json.dumps(slurm_cluster.partition)}
time = "00:15:00"
cpus_per_task = 1
[requeue]
signal_lead_s = 60
max_requeues = 2
[environment]
python = {json.dumps(str(slurm_cluster.python))}
[env]
OMP_NUM_THREADS = "1"
[eval]
cpus_per_task = 1
time = "00:10:00"
[prep]
tasks = 2
throttle = 0
cpus_per_task = 1
mem = ""
time = "00:10:00"
merge_time = "00:10:00"
""")
    return path


def _submit(cluster, cluster_file: Path, runs: Path, shards: Path, name: str) -> str:
    proc = run_cli("submit", RECIPE, "--nodes", "2", "--gpus-per-node", "1", "--cluster", str(cluster_file),
                   f"--data.path={shards}", f"--run.output_dir={runs}", f"--run.name={name}", env=cluster.env,
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted training job (\d+)", proc.stdout).group(1)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def _diagnose(cluster, job_id: str, output: Path) -> str:
    """Slurm's view of a failed job, for the assertion message."""
    parts = [cluster.run("scontrol", "show", "job", job_id, check=False).stdout,
             cluster.run("sacct", "-D", "-j", job_id, "-o", "JobID,State,ExitCode,Start,End,NodeList",
                         check=False).stdout]
    for log in sorted((cluster.state_dir / "log").glob("slurm*.log")):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if f"JobId={job_id}" in ln
                 or f"job {job_id}" in ln.lower() or f"StepId={job_id}" in ln]
        parts.append(f"--- {log.name}\n" + "\n".join(lines[-30:]))
    parts.append("--- output\n" + (output.read_text()[-3000:] if output.exists() else "none"))
    return "\n".join(parts)


def _queue_state(cluster, job_id: str) -> tuple[str, str]:
    """(state, reason) in squeue; ("", "") once the job left the queue."""
    out = cluster.run("squeue", "-h", "-j", job_id, "-o", "%T|%r", check=False).stdout.strip()
    return tuple(out.split("|", 1)) if "|" in out else ("", "")


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def full_run(slurm_cluster, cluster_file: Path, digits_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted 2-node job: (runs directory, job id, run directory)."""
    runs = tmp_path_factory.mktemp("runs")
    job_id = _submit(slurm_cluster, cluster_file, runs, digits_shards, "full")
    result = slurm_cluster.wait_job(job_id, timeout=300)
    assert result.ok, f"{result}\n{_diagnose(slurm_cluster, job_id, runs / 'full' / 'slurm' / f'job-{job_id}.out')}"
    return runs, job_id, runs / "full"


def test_two_node_training_job_runs_to_completion(slurm_cluster, full_run) -> None:
    runs, job_id, run_dir = full_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["val_top1"] > 0.5 and summary["val_samples"] == 359
    output = (run_dir / "slurm" / f"job-{job_id}.out").read_text()
    assert "[node1] vitpipe.slurm_task: started" in output and "[node2] vitpipe.slurm_task: started" in output
    assert f"rendezvous node1:{20000 + int(job_id) % 10000}" in output and "ended: FINISHED" in output
    assert (run_dir / "slurm" / "train.sbatch").is_file() and (run_dir / "final" / "model.safetensors").is_file()

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "full"
    assert run.data.tags["vitpipe.slurm_job_id"] == job_id and run.data.tags["vitpipe.world_size"] == "2"
    assert run.data.tags["vitpipe.slurm_attempts"] == "1" and run.data.tags["vitpipe.slurm_requeues"] == "0"
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss")] == list(range(1, STEPS + 1))
    assert len(_history(client, run.info.run_id, "val/top1")) == 2  # after each epoch
    assert [a.path for a in client.list_artifacts(run.info.run_id, "slurm")] == ["slurm/train.sbatch"]

    status = run_cli("status", str(run_dir), env=slurm_cluster.env, timeout=60)
    assert status.returncode == 0 and f"job {job_id}" in status.stdout and "COMPLETED" in status.stdout
    assert "FINISHED at step 22" in status.stdout


def test_evaluation_job_reproduces_the_final_accuracy(slurm_cluster, cluster_file: Path, full_run) -> None:
    runs, _, run_dir = full_run
    proc = run_cli("submit", "--eval", str(run_dir), "--cluster", str(cluster_file), env=slurm_cluster.env,
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted evaluation job (\d+)", proc.stdout).group(1)
    result = slurm_cluster.wait_job(job_id, timeout=180)
    assert result.ok, f"{result}\n{_diagnose(slurm_cluster, job_id, run_dir / 'slurm' / f'eval-{job_id}.out')}"
    evaluated = json.loads((run_dir / "slurm" / f"eval-{job_id}.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert evaluated["samples"] == 359 and evaluated["top1"] == pytest.approx(summary["val_top1"], abs=1e-9)


def test_status_and_cancel_of_a_pending_job(slurm_cluster, cluster_file: Path, digits_shards: Path,
                                            tmp_path: Path) -> None:
    proc = run_cli("submit", RECIPE, "--nodes", "2", "--cluster", str(cluster_file), "--sbatch=--begin=now+3600",
                   f"--data.path={digits_shards}", f"--run.output_dir={tmp_path}", "--run.name=later",
                   env=slurm_cluster.env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted training job (\d+)", proc.stdout).group(1)
    status = run_cli("status", "later", "--runs", str(tmp_path), env=slurm_cluster.env, timeout=60)
    assert re.search(rf"train +job {job_id} +PENDING .*reason BeginTime", status.stdout), status.stdout
    cancel = run_cli("cancel", str(tmp_path / "later"), env=slurm_cluster.env, timeout=60)
    assert cancel.returncode == 0 and f"cancelled job(s) {job_id}" in cancel.stdout
    assert slurm_cluster.wait_job(job_id, timeout=60).state == "CANCELLED"
    again = run_cli("cancel", str(tmp_path / "later"), env=slurm_cluster.env, timeout=60)
    assert "no queued or running job" in again.stdout


def test_usr1_checkpoints_requeues_resumes_into_one_mlflow_run(slurm_cluster, cluster_file: Path, full_run,
                                                               digits_shards: Path) -> None:
    runs, full_job, full_dir = full_run
    name = """cut 'it' "now" $(touch pwned-by-name) `touch pwned-by-name2`"""  # no "/": a name is one directory
    job_id = _submit(slurm_cluster, cluster_file, runs, digits_shards, name)
    run_dir = runs / name
    log = run_dir / "log.rank0.txt"
    _wait_for(lambda: log.is_file() and "step 5 " in log.read_text(), 240, "step 5 of the second job")
    slurm_cluster.run("scancel", "--signal=USR1", job_id)

    t0 = time.monotonic()
    _wait_for(lambda: _queue_state(slurm_cluster, job_id)[0] == "PENDING", 120, "the job to requeue itself")
    t_requeued = time.monotonic() - t0
    held = slurm_cluster.run("scontrol", "show", "-o", "job", job_id, check=False).stdout
    hold = re.search(r"StartTime=(\S+)", held)
    print(f"requeue hold: pending at {time.strftime('%H:%M:%S')}, BeginTime {hold.group(1) if hold else '?'}")
    # Skip the requeue hold (cred_expire + 1 s), but only after the nodes cleaned up the first run and a second
    # has passed: slurmd refuses a job credential not newer than the previous run's revocation (same second).
    _wait_for(lambda: not slurm_cluster.run("sinfo", "-h", "-t", "completing", "-o", "%N", check=False).stdout.strip(),
              60, "the nodes to finish the first run")
    time.sleep(2.0)
    while (state := _queue_state(slurm_cluster, job_id))[0] == "PENDING" and time.monotonic() - t0 < 120:
        slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        time.sleep(1.0)
    t_restarted = time.monotonic() - t0
    result = slurm_cluster.wait_job(job_id, timeout=300)
    output_file = run_dir / "slurm" / f"job-{job_id}.out"
    timing = f"requeued after {t_requeued:.0f} s, restarted after {t_restarted:.0f} s ({state}), " \
             f"done after {time.monotonic() - t0:.0f} s"
    assert result.ok, f"{result}\n{timing}\n{_diagnose(slurm_cluster, job_id, output_file)}"
    output = output_file.read_text()
    print(timing)

    # Slurm signalled every process of the step: the trainers checkpointed, torchrun's agents survived.
    assert "SIGUSR1 from Slurm" in output and "forwarding" not in output
    assert f"requeueing job {job_id} (requeue 1 of at most 2)" in output
    assert "attempt 1 ended: PREEMPTED" in output and "attempt 2 ended: FINISHED" in output  # one file, appended
    attempts = [json.loads(line) for line in (run_dir / "slurm" / "attempts.jsonl").read_text().splitlines()]
    assert [(a["restart"], a["outcome"]) for a in attempts] == [(0, "PREEMPTED"), (1, "FINISHED")]
    show = slurm_cluster.run("scontrol", "show", "job", job_id).stdout
    assert "Restarts=1" in show
    rank_logs = "".join(p.read_text() for p in run_dir.glob("log.rank*.txt"))
    assert "received SIGUSR1" in rank_logs and "resumed from" in rank_logs
    assert "second signal" not in rank_logs  # each trainer got it once: from Slurm, not forwarded again
    # A clean preemption is clean in the job's output: no launcher report, no srun error; one line per rank.
    assert "Traceback" not in output and "ChildFailedError" not in output, output
    assert "srun: error" not in output, output
    assert "every trainer exited for a requeue (status 75)" in output
    for rank_log in run_dir.glob("log.rank*.txt"):
        assert rank_log.read_text().count("received SIGUSR1") == 1, rank_log
    stopped = int(re.search(r"preempted at step (\d+)", rank_logs).group(1))
    assert 5 <= stopped < STEPS
    assert not list(ROOT.glob("pwned-by-name*"))  # the name stayed text in the script, sbatch and the job (cwd ROOT)

    summary = json.loads((run_dir / "summary.json").read_text())
    full = json.loads((full_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["steps"] == STEPS
    assert (summary["val_top1"], summary["val_top5"]) == (full["val_top1"], full["val_top5"])
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vitpipe-slurm-demo").experiment_id
    runs_by_name = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert sorted(runs_by_name) == sorted(["full", name])  # one MLflow run for the requeued job
    cut = runs_by_name[name]
    assert cut.info.run_id == summary["mlflow_run_id"] and cut.info.status == "FINISHED"
    assert cut.data.tags["vitpipe.resumed"] == "true" and cut.data.tags["vitpipe.slurm_requeues"] == "1"
    assert cut.data.tags["vitpipe.slurm_job_ids"] == job_id
    for key in ("train/loss", "val/top1", "val/loss"):
        assert _history(client, cut.info.run_id, key) == _history(client, full["mlflow_run_id"], key), key
    status = run_cli("status", str(run_dir), env=slurm_cluster.env, timeout=60).stdout
    assert f"attempts   2: {job_id}#0 PREEMPTED, {job_id}#1 FINISHED" in status and "restarts 1" in status


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != "slurm"}


def test_prep_array_and_merge_write_what_one_process_writes(slurm_cluster, cluster_file: Path,
                                                            tmp_path: Path) -> None:
    src = make_imagenet(tmp_path / "src", bad=False)
    out = tmp_path / "array out"
    proc = run_cli("prep", "imagenet", "--src", str(src), "--out", str(out), "--shard-size", "4", "--slurm",
                   "--cluster", str(cluster_file), env=slurm_cluster.env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    array_id, merge_id = re.search(r"prep array job (\d+) \(2 tasks\) and merge job (\d+)", proc.stdout).groups()
    array, merge = slurm_cluster.wait_job(array_id, timeout=180), slurm_cluster.wait_job(merge_id, timeout=180)
    logs = "\n".join(p.read_text() for p in sorted((out / "slurm").glob("*.out")))
    assert array.ok and sorted(array.tasks) == [f"{array_id}_0", f"{array_id}_1"], (array, logs[-3000:])
    assert merge.ok, (merge, logs[-3000:])
    assert "every shard, index and manifest row checks out" in logs

    ref = subprocess.run([sys.executable, "-m", "vitpipe", "prep", "imagenet", "--src", str(src), "--out",
                          str(tmp_path / "ref"), "--shard-size", "4", "--workers", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    assert _files(out) == _files(tmp_path / "ref")
    status = run_cli("status", str(out), env=slurm_cluster.env, timeout=60)
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 3  # two array tasks and the merge
