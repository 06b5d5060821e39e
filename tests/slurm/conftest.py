"""The localhost Slurm cluster for tests under tests/slurm: the ``slurm_cluster`` fixture and job helpers.

``slurm_cluster`` starts a real cluster once per test session with ``tools/slurm_local.sh start`` (2 nodes,
accounting on, so ``sacct`` works) and purges it at the end with ``stop --purge``; see docs/slurm_localhost.md.
It needs root and Debian packages (installed on first use); without them the tests are skipped with the reason.
Mark tests that use it with ``@pytest.mark.slurm``.

Usage in a test::

    @pytest.mark.slurm
    def test_something(slurm_cluster, tmp_path):
        job_id = slurm_cluster.sbatch(tmp_path / "job.sh", "--nodes=2", cwd=tmp_path)
        result = slurm_cluster.wait_job(job_id, timeout=60)
        assert result.ok, result

Concurrent pytest sessions on one machine (two developers, CI) take turns: the fixture holds an exclusive lock
next to the state directory for its whole lifetime.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "slurm_local.sh"
SLURM_CONF = "/etc/slurm/slurm.conf"
READY_PREFIX = "SLURM_LOCALHOST_READY"
HOSTS_MARK = "# slurm-localhost"
# tools/slurm_local.sh exit statuses: 3 = packages missing and not installable, 4 = a cluster is already running.
EXIT_NO_PACKAGES = 3

START_TIMEOUT_S = 300.0  # cold start with apt-get is 20-40 s here; slow mirrors take longer
STOP_TIMEOUT_S = 180.0
LOCK_TIMEOUT_S = 600.0  # how long to wait for another session's cluster to finish
SACCT_GRACE_S = 15.0  # how long wait_job lets sacct disagree with slurmctld about a finished job

# sacct/squeue states after which a job does not change any more (REQUEUED, COMPLETING, ... are not final).
FINAL_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                          "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT"})


def state_dir() -> Path:
    """The cluster's state directory: the same default as tools/slurm_local.sh (``SLURM_LOCAL_DIR``)."""
    return Path(os.environ.get("SLURM_LOCAL_DIR") or Path(os.environ.get("TMPDIR") or "/tmp") / "vitpipe-slurm-local")


def client_env() -> dict[str, str]:
    """Environment for Slurm commands and jobs: no inherited ``SLURM_*`` (an outer allocation would confuse
    srun), our config, and one OpenMP thread (the nodes oversubscribe the host's cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=SLURM_CONF, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def venv_python() -> Path:
    """The project venv's interpreter, for jobs (``VITPIPE_VENV`` as in scripts/test.sh; else this interpreter)."""
    python = Path(os.environ.get("VITPIPE_VENV") or ROOT / ".venv") / "bin" / "python"
    return python if python.exists() else Path(sys.executable)


# ---------------------------------------------------------------- job helpers


@dataclass(frozen=True)
class JobResult:
    """Final state of a Slurm job (all tasks of an array job).

    Attributes:
        job_id: The job id as submitted (for an array: the array's id).
        state: ``COMPLETED`` if every task completed, else the first other final state (``FAILED``,
            ``CANCELLED``, ``TIMEOUT``, ...), without sacct's suffixes such as ``by 0``.
        exit_code: Exit status of the first task that did not exit 0 (0 if none).
        signal: Signal number from the same task's ``ExitCode`` (``exit:signal``).
        tasks: Per sacct/scontrol row: job id (``12``, ``12_0``) -> (state, ``exit:signal``).
        source: ``"sacct"``, or ``"scontrol"`` when accounting is disabled.
    """

    job_id: str
    state: str
    exit_code: int
    signal: int
    tasks: dict[str, tuple[str, str]] = field(default_factory=dict)
    source: str = "sacct"

    @property
    def ok(self) -> bool:
        """True if every task completed with exit status 0."""
        return self.state == "COMPLETED" and self.exit_code == 0


def _run(args: list[str], env: dict[str, str] | None, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env or client_env())


def _queued_states(job_id: str, env: dict[str, str] | None) -> list[str]:
    """States of the job's rows in ``squeue`` (pending, running, completing); [] once it left the queue."""
    proc = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], env)
    return proc.stdout.split() if proc.returncode == 0 else []  # unknown/finished ids make squeue fail


# One row per job (or array task): (state, "exit:signal", job name).
Row = tuple[str, str, str]
_SCONTROL_FIELDS = re.compile(r"^JobId=(\d+)(?: ArrayJobId=(\d+) ArrayTaskId=(\S+))? JobName=(.*?) UserId=.*?"
                              r" JobState=(\S+) .*?ExitCode=(\S+)")


def _sacct_rows(job_id: str, env: dict[str, str] | None) -> dict[str, Row] | None:
    """``{JobID: row}`` from sacct (job allocations only); None if accounting is disabled."""
    proc = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,JobName"], env)
    if proc.returncode != 0:
        if "disabled" in proc.stderr:
            return None
        return {}  # slurmdbd busy or lagging: treat as "no row yet"
    rows = {}
    for line in proc.stdout.splitlines():
        if line.count("|") >= 3:
            jid, state, exit_code, name = line.split("|", 3)
            rows[jid] = (state.split()[0] if state else "", exit_code, name)  # "CANCELLED by 0" -> "CANCELLED"
    return rows


def _scontrol_rows(job_id: str, env: dict[str, str] | None) -> dict[str, Row]:
    """``{JobId or ArrayJobId_ArrayTaskId: row}`` from slurmctld, which keeps finished jobs for MinJobAge (600 s)."""
    proc = _run(["scontrol", "-o", "show", "job", job_id], env)
    rows = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        if m := _SCONTROL_FIELDS.match(line):
            jid, array_id, task_id, name, state, exit_code = m.groups()
            rows[f"{array_id}_{task_id}" if array_id else jid] = (state, exit_code, name)
    return rows


def _result(job_id: str, rows: dict[str, Row], source: str) -> JobResult:
    tasks = {jid: (state, exit_code) for jid, (state, exit_code, _) in sorted(rows.items())}
    bad = [(state, ec) for state, ec in tasks.values() if state != "COMPLETED" or ec.split(":")[0] != "0"]
    state, exit_signal = bad[0] if bad else ("COMPLETED", "0:0")
    code, _, sig = exit_signal.partition(":")
    return JobResult(job_id, state, int(code or 0), int(sig or 0), tasks, source)


def _same_jobs(rows: dict[str, Row], known: dict[str, Row]) -> bool:
    """sacct agrees with slurmctld on ids, states and names (not exit codes: a cancelled job is 0:0 in sacct, 0:15
    in scontrol)."""
    return rows.keys() == known.keys() and all(rows[j][0::2] == known[j][0::2] for j in rows)


def _final(rows: dict[str, Row]) -> bool:
    return bool(rows) and all(state in FINAL_STATES for state, _, _ in rows.values())


def wait_job(job_id: int | str, timeout: float = 120.0, env: dict[str, str] | None = None,
             poll_s: float = 0.2) -> JobResult:
    """Polls ``squeue`` and ``sacct`` until the job (every task of an array job) reached a final state.

    Use this instead of ``sbatch --wait``, whose own back-off adds about 10 s. While the job is in ``squeue``
    (pending, running, completing, or pending again after a requeue) it is not done. After it left the queue,
    ``sacct`` decides, checked against slurmctld's own record (``scontrol show job``, kept for 600 s):

    * a missing sacct row counts as pending: a new job appears in sacct 1-2 s after sbatch;
    * so do non-final states and rows that disagree with slurmctld: final states lag by about 1 s more, a
      job can first show up as a placeholder named ``allocation``, and an array as one row ``<id>`` before its
      ``<id>_<task>`` rows.

    If sacct still disagrees 15 s after slurmctld saw the end, slurmctld's record is returned (``source ==
    "scontrol"``); the same happens when accounting is disabled.

    Args:
        job_id: Id printed by ``sbatch --parsable`` (an array's id covers all its tasks).
        timeout: Seconds to wait in total.
        env: Environment for the Slurm commands; default :func:`client_env`.
        poll_s: Seconds between polls.

    Returns:
        The final :class:`JobResult` (state, exit code, signal, per-task rows).

    Raises:
        TimeoutError: The job did not reach a final state in time; the message has the last state seen.
    """
    job_id = str(job_id)
    deadline = time.monotonic() + timeout
    ended_at = None  # when slurmctld first reported every task final
    last: object = "not seen yet"
    while True:
        queued = _queued_states(job_id, env)
        if queued:
            last = f"squeue: {queued}"
        else:
            known = _scontrol_rows(job_id, env)
            rows = _sacct_rows(job_id, env)
            if rows is None:  # accounting disabled
                if _final(known):
                    return _result(job_id, known, "scontrol")
            elif _final(rows) and (not known or _same_jobs(rows, known)):
                return _result(job_id, rows, "sacct")
            elif _final(known):
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > SACCT_GRACE_S:
                    return _result(job_id, known, "scontrol")
            last = f"sacct: {rows or 'no row yet'}; scontrol: {known or 'no record'}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f} s (last seen: {last})")
        time.sleep(poll_s)


def sbatch(script: str | Path, *args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None) -> str:
    """Submits a batch script with ``sbatch --parsable ARGS SCRIPT`` and returns the job id.

    Raises:
        RuntimeError: sbatch failed (its stderr is in the message).
    """
    proc = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True,
                          timeout=60, env=env or client_env(), cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


# ---------------------------------------------------------------- the cluster fixture


@dataclass(frozen=True)
class SlurmCluster:
    """A running localhost cluster, as yielded by the ``slurm_cluster`` fixture.

    Attributes:
        state_dir: tools/slurm_local.sh's state directory (logs in ``log/``, job completion in ``log/jobcomp.txt``).
        nodes: Node names, e.g. ``("node1", "node2")``; each resolves to 127.0.0.1 through /etc/hosts.
        partition: The default partition (``debug``).
        cluster: ``ClusterName`` (``localcluster``).
        env: Environment to pass to Slurm commands and jobs (see :func:`client_env`).
        python: The project venv's interpreter, for job scripts.
        accounting: Whether slurmdbd runs (``sacct`` works); always True from the fixture.
    """

    state_dir: Path
    nodes: tuple[str, ...]
    partition: str
    cluster: str
    env: dict[str, str]
    python: Path
    accounting: bool = True

    def run(self, *args: str, timeout: float = 60.0, check: bool = True,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Runs a command (``srun``, ``squeue``, ...) with the cluster's env; text output captured."""
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=self.env, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sbatch(self, script: str | Path, *args: str, cwd: str | Path | None = None) -> str:
        """:func:`sbatch` with the cluster's env; returns the job id."""
        return sbatch(script, *args, cwd=cwd, env=self.env)

    def wait_job(self, job_id: int | str, timeout: float = 120.0) -> JobResult:
        """:func:`wait_job` with the cluster's env: polls squeue/sacct until the job is final."""
        return wait_job(job_id, timeout=timeout, env=self.env)


def _script(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _tail(proc: subprocess.CompletedProcess, n: int = 60) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-n:])


def _lock(path: Path) -> int:
    """Takes an exclusive lock on PATH, waiting up to LOCK_TIMEOUT_S for another session; returns the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                pytest.fail(f"another test session has held {path} for {LOCK_TIMEOUT_S:.0f} s")
            time.sleep(1.0)


def _leftover(state: Path) -> bool:
    """True if an earlier run left a state dir or marked /etc/hosts lines behind."""
    try:
        hosts_marked = HOSTS_MARK in Path("/etc/hosts").read_text()
    except OSError:
        hosts_marked = False
    return state.exists() or hosts_marked


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A 2-node localhost Slurm cluster with accounting, started once per session and purged afterwards."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("the localhost Slurm cluster needs root on Linux (it installs packages, writes /etc/slurm)")
    state = state_dir()
    script_env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_NODES": "2",
                  "SLURM_LOCAL_ACCOUNTING": "1"}
    state.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(state.parent / f"{state.name}.session.lock")
    try:
        if _leftover(state):  # a crashed earlier session; the lock says nobody else is using it
            _script("stop", "--purge", env=script_env, timeout=STOP_TIMEOUT_S)
        try:
            proc = _script("start", env=script_env, timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _script("stop", "--purge", env=script_env, timeout=STOP_TIMEOUT_S)
            pytest.fail(f"tools/slurm_local.sh start did not finish within {START_TIMEOUT_S:.0f} s")
        if proc.returncode == EXIT_NO_PACKAGES:
            pytest.skip(f"Slurm packages are missing and cannot be installed: {_tail(proc, 5)}")
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines or not lines[-1].startswith(READY_PREFIX):
            pytest.fail(f"tools/slurm_local.sh start failed (exit {proc.returncode}):\n{_tail(proc)}")
        prefix = os.environ.get("SLURM_LOCAL_NODE_PREFIX") or "node"
        cluster = SlurmCluster(
            state_dir=state,
            nodes=(f"{prefix}1", f"{prefix}2"),
            partition=os.environ.get("SLURM_LOCAL_PARTITION") or "debug",
            cluster=os.environ.get("SLURM_LOCAL_CLUSTER") or "localcluster",
            env=client_env(),
            python=venv_python(),
        )
        try:
            yield cluster
        finally:
            proc = _script("stop", "--purge", env=script_env, timeout=STOP_TIMEOUT_S)
            if proc.returncode != 0:
                pytest.fail(f"tools/slurm_local.sh stop --purge failed (exit {proc.returncode}):\n{_tail(proc)}")
    finally:
        os.close(lock_fd)  # releases the lock
