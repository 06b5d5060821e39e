"""Helpers that run inside a Slurm training job (``python -m vitpipe.slurm_task ...``; no torch import).

``run -- CMD...`` is the srun task on every node. It starts ``CMD`` (torchrun's agent, under
``python -m vitpipe.launch``) with SIGUSR1 and SIGTERM ignored and waits for it, answering signals
itself, and exits with the command's status, except 0 for 75 (every trainer exited for a requeue), so
that srun reports no failed task for a clean preemption:

* torchrun's agent does not handle SIGUSR1, so the signal's default action would end it, and the
  step with it, while the trainers write their checkpoint; for SIGTERM the agent would send a second
  SIGTERM to the trainers, which makes them exit at once (see :mod:`pipeline.preempt`). Ignored
  signals stay ignored through ``exec``, so the agent survives both; the trainers install their own
  handlers and are the only processes that act on them.
* Slurm (``--signal=USR1@lead``, ``scancel --signal``, preemption, time limit) signals every process
  of the step: with ``proctrack/linuxproc`` the whole process tree under the task, with
  ``proctrack/cgroup`` every process in the step's cgroup. The trainers therefore already have the
  signal when the wrapper sees it coming from ``slurmstepd``, and forwarding it would be a second
  signal. A signal from any other sender (someone's ``kill -USR1 <task pid>``) reached the wrapper
  alone and is forwarded to the command's children, the trainers.

``begin RUN_DIR`` and ``end RUN_DIR --exit-code N`` bracket one attempt of the batch script: ``end``
prints ``FINISHED``, ``PREEMPTED`` or ``FAILED`` for the script to act on (from what the attempt wrote in
the run directory: srun's status, 0 for a requeue exit, cannot tell a preemption from a finished run),
appends the attempt to ``RUN_DIR/slurm/attempts.jsonl`` and records the Slurm job ids in the run's MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

logger = logging.getLogger("vitpipe.slurm_task")

FORWARDED = (signal.SIGUSR1, signal.SIGTERM)
JOBS_FILE = "jobs.json"
"""The jobs submitted for a directory, in ``<dir>/slurm/`` (written by :mod:`vitpipe.slurm_jobs`)."""
NODE_RANK = "@SLURM_NODEID@"
"""Replaced by the node index in the launcher's arguments (:func:`fill_node_rank`)."""
EXIT_PREEMPTED = 75
"""``pipeline.preempt.EXIT_PREEMPTED``: the trainers' (and ``vitpipe.launch``'s) status for "requeue me"."""
PREEMPT_MARK = "with status 75"
"""Every exit for a requeue in :mod:`pipeline.preempt` and the trainer logs these words
(``EXIT_PREEMPTED`` = 75); the constant is not imported to keep torch out of this module."""


# --------------------------------------------------------------------------------------- srun task
def run_task(cmd: list[str]) -> int:
    """Runs ``cmd`` with SIGUSR1/SIGTERM ignored, forwarding those signals from non-Slurm senders.

    Returns:
        The command's exit status (128 + N when signal N ended it).
    """
    signals = set(FORWARDED)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # from now on they wait for sigtimedwait below

    def child_setup() -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    proc = subprocess.Popen(cmd, preexec_fn=child_setup)  # noqa: PLW1509 - single-threaded parent
    logger.info("started pid %d: %s", proc.pid, " ".join(cmd[:6]) + (" ..." if len(cmd) > 6 else ""))
    while True:
        info = signal.sigtimedwait(signals, 0.5)
        if info is not None:
            _answer(info, proc.pid)
        status = proc.poll()
        if status is not None:
            return _task_status(status if status >= 0 else 128 - status)


def fill_node_rank(cmd: list[str]) -> list[str]:
    """``cmd`` with ``@SLURM_NODEID@`` replaced by this task's node index, in the launcher's options only.

    The batch script gives every node the same command line; torchrun's static rendezvous needs each
    node's rank. Arguments from the first ``-m`` on (the trainer's recipe and overrides) are kept as given.
    """
    node = os.environ.get("SLURM_NODEID", "0")
    end = cmd.index("-m", cmd.index("-m") + 1) if cmd.count("-m") > 1 else len(cmd)
    return [a.replace(NODE_RANK, node) for a in cmd[:end]] + cmd[end:]


def _task_status(status: int) -> int:
    """The srun task's exit status for the command's: 0 for a requeue exit (75), the same otherwise.

    srun reports every task that exits non-zero as ``srun: error: <node>: task N: Exited with exit code``;
    a clean preemption is not an error. The batch script decides from the run directory (see
    :func:`attempt_outcome`), not from srun's status.
    """
    if status == EXIT_PREEMPTED:
        logger.info("the trainers exited for a requeue (status %d): the task exits 0", status)
        return 0
    return status


def _answer(info: Any, child: int) -> None:
    name = signal.Signals(info.si_signo).name
    sender = _comm(info.si_pid)
    if sender == "slurmstepd":
        logger.warning("%s from Slurm: every process of the step has it; the trainers checkpoint and exit, "
                       "torchrun's agent ignores it", name)
        return
    targets = _children(child)
    logger.warning("%s from pid %d (%s): forwarding it to the trainers %s", name, info.si_pid, sender or "?",
                   targets)
    for pid in targets:
        try:
            os.kill(pid, info.si_signo)
        except ProcessLookupError:
            pass


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from ``/proc/*/stat``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


# ------------------------------------------------------------------------------------ one attempt
def _stamp(path: Path) -> list[int] | None:
    """Identity of a file version (inode, mtime in ns, size): changes whenever the file is rewritten."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_ino, st.st_mtime_ns, st.st_size]


def begin_attempt(run_dir: Path, job_script: str = "") -> dict[str, Any]:
    """Notes the start of an attempt in ``RUN_DIR/slurm/attempt.json``.

    It records the version of ``summary.json`` and the size of every rank log, so that the end of the
    attempt can tell what this attempt wrote without comparing clocks of different nodes.
    """
    folder = run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"job_id": os.environ.get("SLURM_JOB_ID", ""), "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
              "start": time.time(), "job_script": job_script, "summary": _stamp(run_dir / "summary.json"),
              "logs": {p.name: p.stat().st_size for p in run_dir.glob("log.rank*.txt")}}
    (folder / "attempt.json").write_text(json.dumps(record))
    return record


def attempt_outcome(run_dir: Path, attempt: dict[str, Any]) -> str:
    """``FINISHED``, ``PREEMPTED`` or ``FAILED`` for the attempt that started as ``attempt`` records.

    ``summary.json`` counts only when this attempt wrote it (another version than at the start);
    otherwise (rank 0 ended before writing it) a rank log line of this attempt that says it exits with
    status 75 means PREEMPTED.
    """
    summary = run_dir / "summary.json"
    if summary.is_file() and _stamp(summary) != attempt.get("summary"):
        try:
            status = json.loads(summary.read_text()).get("status")
        except ValueError:
            status = None
        if status in ("FINISHED", "PREEMPTED", "FAILED"):
            return status
    for log in run_dir.glob("log.rank*.txt"):
        with log.open("rb") as f:
            f.seek(attempt["logs"].get(log.name, 0))
            if PREEMPT_MARK.encode() in f.read():
                return "PREEMPTED"
    return "FAILED"


def end_attempt(run_dir: Path, exit_code: int) -> str:
    """Decides the attempt's outcome, appends it to ``slurm/attempts.jsonl`` and tags the MLflow run.

    Returns:
        The outcome (:func:`attempt_outcome`).
    """
    try:
        attempt = json.loads((run_dir / "slurm" / "attempt.json").read_text())
    except (OSError, ValueError):
        attempt = {"start": 0.0, "logs": {}, "summary": None, "job_id": os.environ.get("SLURM_JOB_ID", ""),
                   "job_script": ""}
    outcome = attempt_outcome(run_dir, attempt)
    record = {k: attempt.get(k) for k in ("job_id", "restart", "start")} | {
        "end": time.time(), "exit_code": exit_code, "outcome": outcome, "nodes": os.environ.get("SLURM_JOB_NODELIST")}
    with (run_dir / "slurm" / "attempts.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    try:
        tag_mlflow_run(run_dir, attempt.get("job_script") or "")
    except Exception as err:  # noqa: BLE001 - tracking never decides a job's fate
        logger.warning("could not record the Slurm job in MLflow: %s", err)
    return outcome


def read_jobs(folder: Path) -> list[dict[str, Any]]:
    """The jobs submitted for a run or prep directory (``<folder>/slurm/jobs.json``), oldest first."""
    path = folder / "slurm" / JOBS_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text())["jobs"]


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    """The attempts recorded in ``RUN_DIR/slurm/attempts.jsonl`` (oldest first)."""
    path = run_dir / "slurm" / "attempts.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mlflow_run_of(run_dir: Path) -> tuple[str | None, str | None]:
    """The run's MLflow run id and tracking URI, from ``summary.json`` or the latest checkpoint."""
    run_id = uri = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        run_id, uri = data.get("mlflow_run_id"), data.get("tracking_uri")
    if run_id is None:
        latest = run_dir / "checkpoints" / "latest"
        if latest.is_file():
            state = run_dir / "checkpoints" / latest.read_text().strip() / "trainer_state.json"
            if state.is_file():
                run_id = json.loads(state.read_text()).get("mlflow_run_id")
    if uri is None and (run_dir / "config.toml").is_file():
        cfg = tomllib.loads((run_dir / "config.toml").read_text())
        uri = cfg.get("tracking", {}).get("uri") or \
            f"sqlite:///{Path(cfg.get('run', {}).get('output_dir', 'runs')).resolve() / 'mlflow.db'}"
    return run_id, uri


def tag_mlflow_run(run_dir: Path, job_script: str = "") -> str | None:
    """Sets the Slurm tags of the run's MLflow run (job ids, attempts, requeues) and logs the batch script.

    Returns:
        The MLflow run id, or None when the run has none yet.
    """
    run_id, uri = mlflow_run_of(run_dir)
    if not run_id or not uri:
        return None
    attempts = read_attempts(run_dir)
    ids = [str(j["job_id"]) for j in read_jobs(run_dir)] + [str(a["job_id"]) for a in attempts]
    ids = list(dict.fromkeys(i for i in ids if i))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    tags = {"vitpipe.slurm_job_ids": ",".join(ids), "vitpipe.slurm_attempts": str(len(attempts)),
            "vitpipe.slurm_requeues": str(sum(1 for a in attempts if a.get("restart")))}
    if ids:
        tags["vitpipe.slurm_job_id"] = ids[-1]
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if job_script and Path(job_script).is_file():
        client.log_artifact(run_id, job_script, "slurm")
    return run_id


# ---------------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> int:
    """``python -m vitpipe.slurm_task {run,begin,end}``."""
    parser = argparse.ArgumentParser(prog="python -m vitpipe.slurm_task", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="the srun task: run CMD (torchrun), protecting the agent from signals")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p = sub.add_parser("begin", help="note the start of an attempt")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--job-script", default="", help="the rendered batch script (logged to MLflow)")
    p = sub.add_parser("end", help="print FINISHED/PREEMPTED/FAILED for the attempt and record it")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--exit-code", type=int, default=0)
    args = parser.parse_args(argv)
    node = os.environ.get("SLURMD_NODENAME", os.uname().nodename)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname).1s [{node}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run: give the command after --")
        return run_task(fill_node_rank(cmd))
    if args.command == "begin":
        begin_attempt(args.run_dir.resolve(), args.job_script)
        return 0
    sys.stdout.write(end_attempt(args.run_dir.resolve(), args.exit_code) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
