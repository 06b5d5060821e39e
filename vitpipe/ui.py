"""``vitpipe ui``: the MLflow tracking UI over the project's store, on 127.0.0.1."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vitpipe.errors import UserError

logger = logging.getLogger("vitpipe")


def start_server(store: Path, port: int) -> subprocess.Popen:
    """Starts ``mlflow server`` on 127.0.0.1 over a SQLite store (without MLflow's job runner)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store.resolve()}",
           "--default-artifact-root", (store.parent / "mlartifacts").resolve().as_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # The server's own output goes to stderr: stdout carries only the address line.
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=sys.stderr.fileno())


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Waits until ``url/health`` answers OK, or raises if the server died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"mlflow server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise UserError(f"mlflow server did not answer at {url} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stops the server's whole process group (it was started in its own session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_ui_command(args: argparse.Namespace) -> int:
    """Serves the UI until Ctrl-C or SIGTERM."""
    from pipeline.dist import free_port  # imports torch: not when the parser is built
    store = Path(args.runs) / "mlflow.db"
    if not store.is_file():
        raise UserError(f"no tracking store at {store}; run `vitpipe demo` or `vitpipe train` first")
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(store, port)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        wait_healthy(url, proc)
        sys.stdout.write(f"MLflow UI for {store.resolve()} at {url}  (Ctrl-C stops it)\n")
        sys.stdout.flush()
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
    return 0
