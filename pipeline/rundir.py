"""Run directories: how a run is named, when a directory may be (re)used, and what a finished one holds.

A run lives in ``<run.output_dir>/<run.name>``; an empty ``run.name`` becomes
``<recipe stem>-<UTC time>``. A directory whose ``summary.json`` says ``FINISHED`` is never reused;
one that holds a run (``config.toml``) is resumed, or refused when ``checkpoint.resume`` is false.
The trainer and the Slurm submitter decide with the same functions. One job at a time trains in a run
directory: its rank 0 holds ``<run_dir>/.lock`` (:func:`lock_run_dir`). OS errors while writing a run
(a full disk) are reported on one line (:func:`storage_message`) after :func:`free_space`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path

from pipeline.config import ConfigError, JobCfg

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
SUMMARY_FILE = "summary.json"


class RunError(ValueError):
    """A run directory lacks what a command needs (no config, no weights, no complete checkpoint)."""


def default_run_name(recipe_stem: str, now: datetime | None = None) -> str:
    """The name of a run whose ``run.name`` is empty: ``<recipe stem>-<YYYYmmdd-HHMMSS>`` in UTC.

    Args:
        recipe_stem: Recipe file name without suffix.
        now: The time to use (default: now, UTC).
    """
    return f"{recipe_stem}-{now or datetime.now(UTC):%Y%m%d-%H%M%S}"


def run_dir_of(cfg: JobCfg, recipe_stem: str) -> Path:
    """The absolute run directory ``<run.output_dir>/<run.name or default_run_name(recipe_stem)>``."""
    return Path(cfg.run.output_dir).resolve() / (cfg.run.name or default_run_name(recipe_stem))


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuses a directory that holds a finished run, or any run when ``resume`` is false.

    Args:
        run_dir: The run directory (need not exist).
        resume: ``checkpoint.resume``: whether an unfinished run there may be continued.

    Raises:
        ConfigError: Naming ``run.name`` and the directory.
    """
    name = run_dir.name
    if not resume and (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"run.name = {name!r}: {run_dir} already holds a run and checkpoint.resume is false")
    summary = run_dir / SUMMARY_FILE
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "FINISHED":
        raise ConfigError(f"run.name = {name!r}: {run_dir} holds a finished run; choose another run.name")


def config_of(run_dir: Path) -> Path:
    """The resolved config a run left (``<run_dir>/config.toml``).

    Raises:
        RunError: When ``run_dir`` is not a run directory.
    """
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunError(f"{run_dir} is not a run directory: no config.toml")
    return run_dir / CONFIG_FILE


# ------------------------------------------------------------------------------------------ the lock
LOCK_FILE = ".lock"
RESERVE_FILE = ".space_reserve"
RESERVE_BYTES = 256 * 1024
"""Space set aside at the start of a run, given back on a full disk so that ``summary.json`` can be written."""

_held: dict[Path, int] = {}  # run directory -> open lock file descriptor, for this process's lifetime


class RunLockedError(RunError):
    """Another live process trains in this run directory."""


def _proc_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot (field 22 of ``/proc/<pid>/stat``); "" if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _holder_alive(holder: dict) -> bool:
    """Whether the process a lock record names still runs (only decidable on its own host)."""
    if holder.get("host") != socket.gethostname():
        return True  # another host: assume it runs
    pid = int(holder.get("pid", 0))
    if pid <= 0 or not Path(f"/proc/{pid}").exists():
        return False
    return not holder.get("proc_start") or _proc_start(pid) == holder["proc_start"]


def _describe(holder: dict) -> str:
    since = holder.get("since", "?")
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {since})"


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def lock_run_dir(run_dir: Path) -> None:
    """Takes the run directory's exclusive lock (``<run_dir>/.lock``) for the life of this process.

    The lock is an ``flock`` held by the training job's rank 0; the kernel drops it when that process
    ends, however it ends, so a lock left by a crash is free again. The file records the holder's host,
    pid and start time: a second job is told who holds it, and where ``flock`` is not supported (some
    network file systems) the record alone decides, a dead pid on the same host counting as stale.
    Taking a lock this process already holds does nothing.

    Raises:
        RunLockedError: When another live process holds it (naming its host and pid).
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, run_dir)
        pid = os.getpid()
        record = {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
                  "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    _held[run_dir] = fd


def _acquire(fd: int, run_dir: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunLockedError(f"{run_dir} is in use: another training job holds it, "
                             f"{_describe(_read_holder(fd))}; stop that job or wait for it to end") from None
    except OSError as err:  # ENOLCK / EOPNOTSUPP: a file system without flock; the record decides
        holder = _read_holder(fd)
        if holder and _holder_alive(holder) and holder.get("pid") != os.getpid():
            raise RunLockedError(f"{run_dir} is in use by {_describe(holder)} (no file lock on this file "
                                 f"system: {err.strerror}; remove {run_dir / LOCK_FILE} if that job is gone)") from None
        logger.warning("%s: file locks not supported (%s); relying on the recorded holder", run_dir, err.strerror)
        return
    holder = _read_holder(fd)
    if holder.get("pid") and holder.get("pid") != os.getpid():
        logger.info("%s: taking over the lock record left by %s, which has ended", run_dir, _describe(holder))


def release_run_dir(run_dir: Path) -> None:
    """Releases this process's lock on ``run_dir`` (if held); the record is left for the next holder to replace."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def reserve_space(run_dir: Path) -> None:
    """Sets :data:`RESERVE_BYTES` aside in the run directory (see :func:`free_space`); best effort."""
    try:
        with open(Path(run_dir) / RESERVE_FILE, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)
    except OSError as err:
        logger.warning("could not reserve space in %s: %s", run_dir, err.strerror)


def free_space(run_dir: Path) -> None:
    """After an OS error (a full disk): gives back the reserve and removes temporary checkpoint directories.

    What stays is every complete checkpoint, so that a rerun after space is freed resumes.
    """
    run_dir = Path(run_dir)
    (run_dir / RESERVE_FILE).unlink(missing_ok=True)
    for tmp in (run_dir / "checkpoints").glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("removed the incomplete checkpoint %s", tmp)


def release_run_dirs() -> None:
    """Releases every run directory lock this process holds (the end of a run in a long-lived process)."""
    for run_dir in list(_held):
        release_run_dir(run_dir)


class StorageError(RunError):
    """An OS error while writing a run (a full disk, a quota, an I/O error), reported on one line."""


def storage_message(err: BaseException, where: Path | None) -> str | None:
    """One line naming the path and the OS error behind ``err`` (or its causes); None if it is none.

    torch reports a failed checkpoint write as a ``RuntimeError`` ("file write failed") without a path:
    then ``where`` is named, with the space left there.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, FileNotFoundError):
            return None  # a missing input: already a user error with its own message
        if isinstance(err, OSError) and err.errno:
            path = err.filename or where
            name = errno.errorcode.get(err.errno, str(err.errno))
            return f"{path}: {err.strerror or os.strerror(err.errno)} ({name}{_free(path)})"
        if isinstance(err, RuntimeError) and any(s in str(err) for s in ("file write failed", "unexpected pos")):
            return f"{where}: writing a checkpoint failed ({str(err).splitlines()[0][-80:]}{_free(where)})"
        err = err.__cause__ or err.__context__
    return None


def _free(path: Path | str | None) -> str:
    """``, N MB free there`` for the file system holding ``path`` (or its nearest existing parent)."""
    if path is None:
        return ""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"; {shutil.disk_usage(probe).free / 1e6:.1f} MB free there"
    except OSError:
        return ""
