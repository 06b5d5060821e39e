"""``vitpipe ui``: the MLflow tracking UI over the project's store, on loopback unless ``--host`` says otherwise.

The server is ``mlflow server`` in its own session (process group); ``vitpipe ui`` owns it: SIGHUP (the ssh
session to a login node closed), SIGINT and SIGTERM stop the whole group, and the server gets a parent-death
signal should ``vitpipe ui`` itself be killed. Before starting it the port is bound once to see that it is free,
and the server counts as up only when our own process group listens on the port and answers ``/health``.

``--auth`` serves MLflow's basic-auth app: the admin user comes from ``--auth-file`` (one line
``user:password``, readable by its owner only) or from ``VITPIPE_UI_USER`` / ``VITPIPE_UI_PASSWORD``; the
auth config and user store live beside the runs (``<runs>/mlflow-auth.ini``, ``<runs>/mlflow-auth.db``).
MLflow's telemetry is off unless the environment sets ``MLFLOW_DISABLE_TELEMETRY`` itself. The printed address
opens the latest experiment's runs table in MLflow's "Model training" view.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import errno
import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from vitpipe.errors import UserError

logger = logging.getLogger("vitpipe")

DEFAULT_HOST = "127.0.0.1"
USER_ENV, PASSWORD_ENV = "VITPIPE_UI_USER", "VITPIPE_UI_PASSWORD"
AUTH_CONFIG, AUTH_DB = "mlflow-auth.ini", "mlflow-auth.db"
MIN_PASSWORD = 12
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


class _Stop(Exception):
    """Raised by the signal handler: a stop signal arrived."""


def add_ui_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the options of ``vitpipe ui`` to its sub-parser."""
    p.add_argument("--runs", default="runs", help="runs directory holding mlflow.db (default: %(default)s)")
    p.add_argument("--port", type=int, default=5000, help="port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--host", default=None,
                   help=f"address to listen on (default: {DEFAULT_HOST}); anything but loopback is reachable "
                        "from other machines and prints a warning")
    p.add_argument("--auth", action="store_true",
                   help=f"require a login (MLflow basic auth); the admin user from --auth-file or ${USER_ENV} "
                        f"(default admin) and ${PASSWORD_ENV}")
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help="file with one line user:password, mode 600 (implies --auth)")


# ---------------------------------------------------------------- ports and processes (/proc, no psutil)


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes of TCP listeners on ``port`` (any address, IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def port_owners(port: int) -> set[int]:
    """Pids of the processes (that this user may inspect) holding a TCP listener on ``port``."""
    targets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    owners = set()
    for pid_dir in Path("/proc").iterdir() if targets else ():
        if not pid_dir.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in targets for fd in (pid_dir / "fd").iterdir()):
                owners.add(int(pid_dir.name))
        except OSError:  # gone, or another user's process
            continue
    return owners


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state not in "ZX":
            members.append(int(stat.parent.name))
    return members


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(raw.decode(errors="replace").replace("\0", " ").split())


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _describe(pid: int) -> str:
    """``another `vitpipe ui` (pid N)`` if ``pid`` or one of its ancestors is one, else its command line."""
    ancestor = pid
    for _ in range(4):  # uvicorn <- mlflow server <- vitpipe ui
        cmd = _cmdline(ancestor)
        if "vitpipe" in cmd and " ui" in cmd:
            return f"another `vitpipe ui` (pid {ancestor})"
        ancestor = _parent(ancestor)
        if ancestor <= 1:
            break
    cmd = _cmdline(pid)
    return f"pid {pid} ({cmd[:60]})" if cmd else f"pid {pid}"


def _busy_message(host: str, port: int) -> str:
    owners = sorted(port_owners(port))
    who = ", ".join(_describe(p) for p in owners[:3]) if owners else "another program"
    return f"port {port} on {host} is in use by {who}; choose another with --port, or --port 0 for a free one"


def claim_port(host: str, port: int) -> int:
    """Binds ``host:port`` once to check it is free (``port`` 0: picks a free one); returns the port.

    Raises:
        UserError: The port is out of range, in use, or not allowed; or ``host`` is no local address.
    """
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (0-65535; 0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(_busy_message(host, port)) from None
            if err.errno == errno.EACCES:
                raise UserError(f"port {port} needs privileges; choose one above 1023 with --port") from None
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
        return s.getsockname()[1]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- credentials and the auth app


def read_credentials(auth_file: str | None) -> tuple[str, str]:
    """The admin user and password: ``auth_file`` (``user:password``), else the environment.

    Raises:
        UserError: No credentials, an unreadable or group/world-readable file, or a malformed line.
    """
    if auth_file:
        path = Path(auth_file)
        try:
            mode, text = path.stat().st_mode, path.read_text()
        except OSError as err:
            raise UserError(f"cannot read --auth-file {path}: {err.strerror or err}") from None
        if mode & 0o077:
            raise UserError(f"--auth-file {path} is readable by other users; `chmod 600 {path}` first")
        line = text.strip().splitlines()[0] if text.strip() else ""
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise UserError(f"--auth-file {path}: expected one line user:password")
        return user, _long_enough(password, f"--auth-file {path}")
    password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        raise UserError(f"--auth needs credentials: --auth-file FILE (one line user:password, mode 600) or "
                        f"${PASSWORD_ENV} (and ${USER_ENV}, default admin)")
    return os.environ.get(USER_ENV) or "admin", _long_enough(password, f"${PASSWORD_ENV}")


def _long_enough(password: str, source: str) -> str:
    if len(password) < MIN_PASSWORD:  # MLflow's own rule, checked here to fail on one line
        raise UserError(f"the password in {source} is shorter than {MIN_PASSWORD} characters (MLflow's minimum)")
    return password


def write_auth_config(runs: Path, user: str) -> Path:
    """Writes ``<runs>/mlflow-auth.ini`` (no password in it) and creates the user store owner-only."""
    from data_prep.format import atomic_write_bytes

    db = (runs / AUTH_DB).resolve()
    if not db.exists():  # owner-only from the start: it holds the password hashes
        os.close(os.open(db, os.O_CREAT | os.O_WRONLY, 0o600))
    config = runs / AUTH_CONFIG
    atomic_write_bytes(config, (
        "# Written by `vitpipe ui --auth` on each start; the admin password comes from the environment.\n"
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{db}\n"
        f"admin_username = {user}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n").encode())
    return config


def _auth_env(runs: Path, user: str, password: str) -> dict[str, str]:
    return {"MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(runs, user).resolve()),
            "MLFLOW_AUTH_ADMIN_USERNAME": user, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}


def check_login(url: str, user: str, password: str, runs: Path) -> None:
    """Checks that the admin credentials open the API (the stored user may have an older password)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise UserError(f"user {user!r} exists in {runs / AUTH_DB} with another password (MLflow sets it "
                            "only when it creates the user): use that one, or delete the file to start over") from None
        raise UserError(f"the MLflow server answered {err.code} to the login check") from None


def _warn_readable_store(runs: Path) -> None:
    if runs.resolve().stat().st_mode & 0o005 and (runs / "mlflow.db").stat().st_mode & 0o004:
        logger.warning("%s is readable by other users: --auth guards the server, not the file; `chmod 700 %s`",
                       runs / "mlflow.db", runs)


# ---------------------------------------------------------------- the server process


def _server_preexec() -> None:
    """In the server, before exec: SIGTERM when ``vitpipe ui`` dies (Linux), so it never outlives it."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the signal handlers still stop the server
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: no job runner; telemetry off unless the user's environment decides."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra or {})}
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def start_server(store: Path, port: int, host: str = DEFAULT_HOST,
                 env: dict[str, str] | None = None, app_name: str | None = None) -> subprocess.Popen:
    """Starts ``mlflow server`` over a SQLite store in its own session (process group).

    Args:
        store: The ``mlflow.db`` file.
        port: Port to listen on.
        host: Address to listen on.
        env: Extra environment for the server (auth settings).
        app_name: MLflow app (``basic-auth``), or None for the plain server.

    Returns:
        The server process; its pid is also its process group id.
    """
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store.resolve()}",
           "--default-artifact-root", (store.parent / "mlartifacts").resolve().as_uri(),
           "--host", host, "--port", str(port), "--workers", "1"]
    if app_name:
        cmd += ["--app-name", app_name]
    # The server's own output goes to stderr: stdout carries only the address line.
    return subprocess.Popen(cmd, env=server_env(env), start_new_session=True, stdout=sys.stderr.fileno(),
                            stdin=subprocess.DEVNULL, preexec_fn=_server_preexec)


def _ours(proc: subprocess.Popen, port: int) -> bool:
    """True if a process of the server's group holds the listener on ``port``."""
    for pid in port_owners(port):
        try:
            if os.getpgid(pid) == proc.pid:
                return True
        except OSError:
            continue
    return False


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Waits until the server's own process group listens on the port and ``url/health`` answers OK.

    Raises:
        UserError: The server exited (e.g. the port was taken meanwhile) or did not answer in time.
    """
    port = int(url.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if port_owners(port) or _listening_inodes(port):
                raise UserError(_busy_message(url.split("//")[1].rsplit(":", 1)[0], port))
            raise UserError(f"mlflow server exited with status {proc.returncode} (its output is above)")
        if _ours(proc, port):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
        time.sleep(0.3)
    raise UserError(f"mlflow server did not answer at {url} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stops the server's whole process group (it was started in its own session) and waits for it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_members(proc.pid):
                return
            time.sleep(0.1)
    proc.wait()


# ---------------------------------------------------------------- the command


def _on_signal(signum: int, _frame: object) -> None:
    raise _Stop(signum)


def _address(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def start_page(store: Path) -> str:
    """The UI page to open: the latest experiment's runs table, in MLflow's "Model training" view.

    MLflow 3 opens an experiment on its GenAI overview unless the URL or the browser's stored choice says
    otherwise; the URL parameter is not stored, so the sidebar's "Model training" switch is for later visits.
    """
    import sqlite3

    view = "?workflowType=machine_learning"
    try:
        with sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True) as db:
            row = db.execute("SELECT experiment_id FROM runs WHERE lifecycle_stage = 'active' "
                             "ORDER BY start_time DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        row = None
    return f"/#/experiments/{row[0]}/runs{view}" if row else f"/#/experiments{view}"


def run_ui_command(args: argparse.Namespace) -> int:
    """Serves the UI until SIGHUP, SIGINT (Ctrl-C) or SIGTERM; every server process ends with it."""
    runs = Path(args.runs)
    store = runs / "mlflow.db"
    if not store.is_file():
        raise UserError(f"no tracking store at {store}; run `vitpipe demo` or `vitpipe train` first")
    host = args.host or DEFAULT_HOST
    auth = bool(args.auth or args.auth_file)
    credentials = read_credentials(args.auth_file) if auth else None
    port = claim_port(host, args.port)
    if not _is_loopback(host):
        sys.stderr.write(f"vitpipe ui: warning: listening on {host}:{port}, reachable from other machines"
                         f"{'' if auth else ' — without --auth anyone who reaches it can read and change runs'}\n")
    env = _auth_env(runs, *credentials) if credentials else None
    if credentials:
        _warn_readable_store(runs)
    url = _address(host, port)
    previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    proc = None
    try:
        proc = start_server(store, port, host, env, "basic-auth" if auth else None)
        wait_healthy(url, proc)
        if credentials:
            check_login(url, *credentials, runs)
        login = f", login as {credentials[0]!r}" if credentials else ""
        sys.stdout.write(f"MLflow UI for {store.resolve()} at {url}{start_page(store)}  (Ctrl-C stops it{login})\n")
        sys.stdout.flush()
        proc.wait()
        if proc.returncode:
            raise UserError(f"mlflow server exited with status {proc.returncode}")
    except _Stop as stop:
        logger.info("vitpipe ui: %s, stopping the server", signal.Signals(stop.args[0]).name)
    finally:
        for sig in STOP_SIGNALS:  # a second signal must not interrupt the clean-up
            signal.signal(sig, signal.SIG_IGN)
        if proc is not None:
            stop_server(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
