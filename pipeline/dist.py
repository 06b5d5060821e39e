"""Rank and world size from the launcher's environment (torchrun, DeepSpeed, srun); the orphan guard."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    local_rank: int
    """Rank on this node."""
    world_size: int
    """Number of processes."""

    @property
    def is_main(self) -> bool:
        """Whether this is global rank 0."""
        return self.rank == 0


def world_info_from_env() -> WorldInfo:
    """Reads rank and world size set by torchrun/DeepSpeed (``RANK``...) or Slurm (``SLURM_PROCID``...)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return WorldInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return WorldInfo(0, 0, 1)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Returns rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums a list of numbers over all ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(values: list[int]) -> list[int]:
    """Element-wise maximum of a list of integers over all ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ORPHAN_POLL_S = 1.0
ORPHAN_GRACE_S = 8.0
"""Seconds an orphaned trainer has for its checkpoint (SIGTERM, as for a preemption) before it ends anyway."""


def watch_launcher(exit_status: int) -> bool:
    """Ends this trainer when its launcher (torchrun's agent) dies; only under torchrun.

    torchrun starts each trainer in a session of its own, so a ``kill -9`` of the launcher's process
    group, or of the agent, leaves the trainers running: they would go on training beside a rerun.
    Two guards, both sending this process SIGTERM (which :mod:`pipeline.preempt` turns into a
    checkpoint and exit at the next step boundary; before its handler is installed SIGTERM ends the
    process at once): the kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG)``, Linux), and a
    daemon thread that notices the parent pid change (any OS; also covers a death between ``fork``
    and ``prctl``). :data:`ORPHAN_GRACE_S` seconds later the thread ends the process with
    ``exit_status`` whatever it is doing.

    Args:
        exit_status: Status of the forced exit (the preemption status: the run can be resumed).

    Returns:
        Whether the guard was installed (False outside torchrun, e.g. ``nohup python -m pipeline.train``).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    parent = os.getppid()
    by_kernel = _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # pragma: no cover - the agent died before the call above
        by_kernel = False
    threading.Thread(target=_watch, args=(parent, exit_status, not by_kernel), name="vitpipe-orphan-watch",
                     daemon=True).start()
    return True


def _set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; whether the kernel will send it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the thread still watches
        return False


def _watch(parent: int, exit_status: int, send: bool) -> None:
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    logger.error("the launcher (pid %d) is gone: checkpointing and exiting (at the latest in %.0f s)",
                 parent, ORPHAN_GRACE_S)
    if send:  # the kernel's parent-death signal has been sent already otherwise (a second one means "now")
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_S)
    logger.error("orphaned trainer still running after %.0f s: exiting with status %d", ORPHAN_GRACE_S,
                 exit_status)
    logging.shutdown()
    os._exit(exit_status)
