"""Preemption: SIGUSR1/SIGTERM ask for a checkpoint at a step boundary and a requeue exit.

Slurm sends ``SIGUSR1`` ahead of the end of a job's time (``--signal=USR1@<seconds>``) and
``SIGTERM`` when it preempts or cancels a job. The handler only sets a flag; the trainer asks
:meth:`Preemption.requested` once per optimizer step, every rank, and all ranks get the same answer:
the flags are combined by an all-reduce (MAX) over a gloo process group of their own, on a host
buffer, started at one step and read at the next. The check never reads a device tensor, so it adds
no device-to-host synchronisation to the step (with NCCL the old check read a CUDA tensor every
step), and by the time it is read the reduction has long finished (every rank started it a whole
step earlier). The price is one step of latency: a signal received during step ``k`` stops the job
at step ``k + 1`` (``k + 2`` if it arrives after that step's reduction has started).

The first signal also arms a watchdog: if the process has not exited ``timeout_s`` later (a hung
collective, a stuck loader), the :meth:`Preemption.at_exit` callbacks run (they save what must not be
lost, e.g. queued metrics) and the process ends with :data:`EXIT_PREEMPTED` anyway. A second signal
does the same at once. Processes forked from the trainer (DataLoader workers) inherit the handler and,
under Slurm, the signal too: there the handler does nothing, so each rank logs its signal once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status after a preemption checkpoint (EX_TEMPFAIL): "requeue me and I will resume"."""

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Installs the signal handlers and answers "should this job stop now?".

    Under a process group, creating it creates a gloo group (a collective call: every rank constructs
    it at the same point).

    Args:
        timeout_s: Seconds after the first signal at which the process exits whatever it is doing.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.signal: int | None = None
        self.signalled_at: float | None = None
        self._callbacks: list[Callable[[], Any]] = []
        # The flag lives in host memory shared by a numpy array and the tensor the collective reduces.
        self._flag = np.zeros(1, dtype=np.float32)
        self._work: Any = None
        self._group = _host_group()
        self._pid = os.getpid()
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:
            # A process forked from the trainer (a persistent DataLoader worker) inherits this handler, and
            # Slurm signals every process of the step: only the trainer acts on (and logs) the signal.
            return
        if self.signal is not None:
            logger.error("second signal %s: exiting now with status %d", signal.Signals(signum).name, EXIT_PREEMPTED)
            self._exit()
        self.signal, self.signalled_at = signum, time.monotonic()
        logger.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        timer = threading.Timer(self.timeout_s, self._expire)
        timer.daemon = True
        timer.start()

    def _expire(self) -> None:
        logger.error("no clean exit %.0f s after the preemption signal: exiting with status %d",
                     self.timeout_s, EXIT_PREEMPTED)
        self._exit()

    def _exit(self) -> None:
        for callback in self._callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - the exit must happen whatever a callback does
                logger.exception("exit callback failed")
        os._exit(EXIT_PREEMPTED)

    def at_exit(self, callback: Callable[[], Any]) -> None:
        """Registers a quick callback run before a forced exit (watchdog or second signal)."""
        self._callbacks.append(callback)

    def time_left(self) -> float | None:
        """Seconds until the watchdog ends the process; None before any signal."""
        if self.signalled_at is None:
            return None
        return max(0.0, self.timeout_s - (time.monotonic() - self.signalled_at))

    def requested(self) -> bool:
        """Whether any rank had received a signal when the previous call was made (every rank calls it).

        A collective over the host group: every rank must call it the same number of times. Without
        a process group it answers for this process, at once.
        """
        if self._group is None:
            return self.signal is not None
        agreed = False
        if self._work is not None:
            self._work.wait()  # started a step ago on every rank: already complete
            agreed = bool(self._flag[0] > 0)
        self._flag[0] = 1.0 if self.signal is not None else 0.0
        self._work = dist.all_reduce(torch.from_numpy(self._flag), op=dist.ReduceOp.MAX, group=self._group,
                                     async_op=True)
        return agreed

    def restore(self) -> None:
        """Completes the reduction still in flight and puts the default handlers back.

        Every rank started that reduction, so it completes at once; the wait is bounded all the same,
        for a run that ends because another rank failed.
        """
        if self._work is not None:
            try:
                self._work.wait(timedelta(seconds=60))
            except Exception as err:  # noqa: BLE001 - a timeout or a broken group: the run is ending anyway
                logger.warning("the last preemption check did not complete (%s)", err)
            self._work = None
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def _host_group() -> Any:
    """A gloo group of all ranks (the default group when it is gloo); None without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    # Its own group even when the default one is gloo: the flag's reduction, in flight while the next
    # step runs, never interleaves with the engine's collectives.
    return dist.new_group(backend="gloo")


class Preempted(Exception):  # noqa: N818 - not an error: the job asks to be requeued
    """Raised out of the training loop after the preemption checkpoint is written."""
