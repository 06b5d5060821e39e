"""One trainer per run directory, and none outliving its launcher (issue 14, build 5).

A 2-process ``vitpipe train`` runs in a session of its own: a second ``vitpipe train`` of the same run
exits 2 naming the holder; then the launcher's whole process group is SIGKILLed (torchrun's trainers
are in sessions of their own) and no trainer of the run may be alive 10 s later.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.rundir import LOCK_FILE, RunLockedError, lock_run_dir, release_run_dir
from tests.conftest import ROOT, run_cli

RECIPE = "jobs/demo/vitnano_digits_cls_cpu_quick.toml"


def _trainers(marker: str) -> list[int]:
    """Pids of live ``pipeline.train`` processes whose command line holds ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"pipeline.train" in cmd and any(marker.encode() in part for part in cmd):
            pids.append(int(entry.name))
    return pids


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_lock_records_the_holder_and_a_dead_holder_is_stale(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock_run_dir(run)
    holder = json.loads((run / LOCK_FILE).read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    other = subprocess.run([sys.executable, "-c", "import sys; from pipeline.rundir import lock_run_dir; "
                            "lock_run_dir(sys.argv[1])", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert other.returncode != 0 and f"pid {os.getpid()} on host {socket.gethostname()}" in other.stderr
    release_run_dir(run)
    # A holder that died (here: a process that took the lock and exited) leaves a free lock behind.
    dead = subprocess.run([sys.executable, "-c", "import sys; from pipeline.rundir import lock_run_dir; "
                           "lock_run_dir(sys.argv[1])", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert dead.returncode == 0, dead.stderr
    lock_run_dir(run)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    release_run_dir(run)
    with pytest.raises(RunLockedError, match="in use"):
        # Held through another open file description: flock conflicts even within one process.
        import fcntl

        fd = os.open(run / LOCK_FILE, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            lock_run_dir(run)
        finally:
            os.close(fd)


@pytest.mark.slow
def test_second_train_is_refused_and_killed_launcher_leaves_no_trainer(digits_shards: Path, tmp_path: Path) -> None:
    args = ["train", RECIPE, f"--data.path={digits_shards}", f"--run.output_dir={tmp_path}", "--run.name=locked",
            "--tracking.enabled=false", "--schedule.epochs=50", "--eval.every_epochs=0", "--data.num_workers=1",
            "--tracking.log_every_steps=1"]
    launcher = subprocess.Popen([sys.executable, "-m", "vitpipe", *args, "--nproc-per-node", "2"], cwd=ROOT,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "locked" / "log.rank0.txt"
    try:
        started = _wait(lambda: log.is_file() and "step 2 " in log.read_text(), 240)
        assert started, launcher.stderr.read()[-3000:] if launcher.poll() is not None else "no step 2"
        holder = json.loads((tmp_path / "locked" / LOCK_FILE).read_text())
        assert holder["pid"] in _trainers(str(tmp_path))  # rank 0 holds it

        second = run_cli(*args, timeout=180)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = [ln for ln in second.stderr.splitlines() if "error:" in ln]
        assert lines == [f"vitpipe train: error: {tmp_path / 'locked'} is in use: another training job holds it, "
                         f"pid {holder['pid']} on host {socket.gethostname()} (since {holder['since']}); "
                         "stop that job or wait for it to end"], second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert len(_trainers(str(tmp_path))) >= 2  # the first job trains on (trainers, loader workers, agent)

        os.killpg(launcher.pid, signal.SIGKILL)  # vitpipe and torchrun's agent; the trainers have their own sessions
        t0 = time.monotonic()
        gone = _wait(lambda: not _trainers(str(tmp_path)), 10.0)
        print(f"trainers gone {time.monotonic() - t0:.1f} s after the launcher's process group was killed")
        assert gone, f"trainers still alive 10 s after the launcher died: {_trainers(str(tmp_path))}"
        assert "received SIGTERM" in log.read_text()  # the parent-death signal, as for a preemption
    finally:
        for pid in _trainers(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
