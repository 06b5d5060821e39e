"""Preemption: SIGUSR1/SIGTERM ask for a checkpoint at the next step boundary and a requeue exit.

Slurm sends ``SIGUSR1`` ahead of the end of a job's time (``--signal=USR1@<seconds>``) and
``SIGTERM`` when it preempts or cancels a job. The handler only sets a flag; the trainer checks it
once per optimizer step, agrees on it across ranks (one small all-reduce), writes a checkpoint and
exits with :data:`EXIT_PREEMPTED`, which the batch scripts turn into ``scontrol requeue``.

The first signal also arms a watchdog: if the process has not exited ``timeout_s`` later (a hung
collective, a stuck loader), it is ended with :data:`EXIT_PREEMPTED` anyway. A second signal ends
the process at once with the same code.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status after a preemption checkpoint (EX_TEMPFAIL): "requeue me and I will resume"."""

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Installs the signal handlers and answers "should this job stop now?"."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.signal: int | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            logger.error("second signal %s: exiting now with status %d", signal.Signals(signum).name, EXIT_PREEMPTED)
            os._exit(EXIT_PREEMPTED)
        self.signal = signum
        logger.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        timer = threading.Timer(self.timeout_s, self._expire)
        timer.daemon = True
        timer.start()

    def _expire(self) -> None:
        logger.error("no clean exit %.0f s after the preemption signal: exiting with status %d",
                     self.timeout_s, EXIT_PREEMPTED)
        os._exit(EXIT_PREEMPTED)

    def requested(self) -> bool:
        """Whether any rank received a signal (a collective call: every rank must call it together)."""
        flag = 1.0 if self.signal is not None else 0.0
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([flag], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = t.item()
        return flag > 0

    def restore(self) -> None:
        """Puts the default handlers back."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


class Preempted(Exception):  # noqa: N818 - not an error: the job asks to be requeued
    """Raised out of the training loop after the preemption checkpoint is written."""
