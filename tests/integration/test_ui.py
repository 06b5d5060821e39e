"""`vitpipe ui`: the login of --auth, port problems as one line, and no server left after a stop signal.

Real servers (``mlflow server`` under uvicorn) over a real SQLite store; processes are found in /proc.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vitpipe.ui import group_members

PASSWORD = "correct-horse-battery"
API = "/api/2.0/mlflow/experiments/search?max_results=5"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs directory with a real tracking store holding one experiment."""
    from mlflow.tracking import MlflowClient

    runs = tmp_path_factory.mktemp("ui-runs")
    MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").create_experiment("ui-test")
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ui(runs: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitpipe", "ui", "--runs", str(runs), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _address(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    url = re.search(r"http://127\.0\.0\.1:\d+", line)
    assert url, (line, proc.stderr.read() if proc.poll() is not None else "")
    return url.group(0)


def _server_group(ui_pid: int) -> int:
    """The process group of the `vitpipe ui`'s server: its child's pid (the child leads its own session)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ui_pid:
            return int(stat.parent.name)
    raise AssertionError(f"vitpipe ui (pid {ui_pid}) has no server process")


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + API, headers=headers), timeout=10) as reply:
            json.load(reply)
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def _one_line_exit_2(proc: subprocess.CompletedProcess | subprocess.Popen, stderr: str) -> str:
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitpipe ui: error: "), stderr
    return lines[0]


def _assert_stopped(proc: subprocess.Popen, pgid: int, members: list[int], port: int) -> None:
    assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]
    assert group_members(pgid) == [], "server processes left"
    assert not [pid for pid in members if Path(f"/proc/{pid}").exists() and pid in group_members(pgid)]
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_auth_login_and_busy_port(runs: Path, tmp_path: Path) -> None:
    auth_file = tmp_path / "ui-login"
    auth_file.write_text(f"vit:{PASSWORD}\n")
    auth_file.chmod(0o600)
    proc = _ui(runs, "--port", "0", "--auth-file", str(auth_file))
    try:
        url = _address(proc)
        port = int(url.rsplit(":", 1)[1])
        pgid = _server_group(proc.pid)
        members = group_members(pgid)
        assert _status(url) == 401  # no credentials: MLflow's basic-auth app refuses
        assert _status(url, ("vit", "wrong-password-123")) == 401
        assert _status(url, ("vit", PASSWORD)) == 200
        with urllib.request.urlopen(url + "/health", timeout=10) as reply:
            assert reply.status == 200
        assert (runs / "mlflow-auth.db").stat().st_mode & 0o077 == 0  # the password hashes: owner only
        assert PASSWORD not in (runs / "mlflow-auth.ini").read_text()
        # a second `vitpipe ui` on the same port: one line naming the holder, exit 2, before any server starts
        second = subprocess.run([sys.executable, "-m", "vitpipe", "ui", "--runs", str(runs), "--port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        line = _one_line_exit_2(second, second.stderr)
        assert f"port {port}" in line and f"another `vitpipe ui` (pid {proc.pid})" in line, line
        assert _status(url, ("vit", PASSWORD)) == 200  # the first one still serves
    finally:
        proc.send_signal(signal.SIGTERM)
    _assert_stopped(proc, pgid, members, port)


def test_port_held_by_another_program_and_out_of_range(runs: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "vitpipe", "ui", "--runs", str(runs), "--port", str(port)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    line = _one_line_exit_2(busy, busy.stderr)
    assert f"port {port} on 127.0.0.1 is in use by pid {os.getpid()}" in line, line
    for bad in ("99999", "-1"):
        out = subprocess.run([sys.executable, "-m", "vitpipe", "ui", "--runs", str(runs), f"--port={bad}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert "is not a TCP port" in _one_line_exit_2(out, out.stderr)
    nologin = subprocess.run([sys.executable, "-m", "vitpipe", "ui", "--runs", str(runs), "--auth"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if not k.startswith("VITPIPE_UI_")})
    assert "--auth needs credentials" in _one_line_exit_2(nologin, nologin.stderr)


def test_stop_signals_leave_no_server(runs: Path) -> None:
    """SIGHUP (the ssh session closed) and SIGINT, each to its own `vitpipe ui`, started side by side; the
    second listens on all addresses, which needs --host and prints a warning."""
    procs = {signal.SIGHUP: _ui(runs, "--port", str(_free_port())),
             signal.SIGINT: _ui(runs, "--port", str(_free_port()), "--host", "0.0.0.0")}
    seen = {}
    try:
        for sig, proc in procs.items():
            line = proc.stdout.readline()
            url = re.search(r"http://[0-9.]+:(\d+)", line)
            assert url, (line, proc.stderr.read() if proc.poll() is not None else "")
            pgid = _server_group(proc.pid)
            seen[sig] = (pgid, group_members(pgid), int(url.group(1)))
            assert len(seen[sig][1]) >= 2, seen  # mlflow server and its uvicorn worker
        for sig, proc in procs.items():
            proc.send_signal(sig)
        for sig, proc in procs.items():
            _assert_stopped(proc, *seen[sig])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    err = procs[signal.SIGINT].stderr.read()
    assert "vitpipe ui: warning: listening on 0.0.0.0" in err and "without --auth" in err, err[-2000:]


def test_telemetry_off_unless_the_user_turns_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitpipe.ui import server_env

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    assert server_env()["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # the user's own choice wins
    assert server_env()["MLFLOW_DISABLE_TELEMETRY"] == "false"
