"""The launcher: torchrun's agent without its failure traceback (``python -m vitpipe.launch TORCHRUN-ARGS``).

``vitpipe train --nproc-per-node N`` (N > 1) and the Slurm batch script start the trainers through
:func:`main`, which takes exactly ``torchrun``'s arguments and runs torchrun's own agent
(``torch.distributed.run``). What differs is the end of a job whose trainers did not all exit 0:
torchrun raises ``ChildFailedError`` (a traceback and a "FAILED" report) and exits 1 whatever the
trainers said. Here the trainers' statuses are kept:

* every failed trainer exited 75 (a preemption checkpoint, see :mod:`pipeline.preempt`): exit 75, one
  log line, no report;
* the first trainer to fail exited 2 (a user error): exit 2. Rank 0 printed the one-line message
  itself; other ranks (under this launcher, ``VITPIPE_LAUNCHER=1``) write theirs into torchelastic's
  error file instead of the console, and a message that differs from rank 0's is printed here, once;
* anything else: one line per failed rank (rank, exit code or signal) and the first one's status
  (128 + N for signal N); the trainer's own traceback is above it in the output.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

logger = logging.getLogger("vitpipe")

LAUNCHER_ENV = "VITPIPE_LAUNCHER"
"""Set for the trainers this launcher starts: ranks other than 0 leave user errors to it."""
EXIT_PREEMPTED = 75  # pipeline.preempt.EXIT_PREEMPTED, not imported: this module stays light until main()
EXIT_USER_ERROR = 2
_TERMINATED = (-15, 128 + 15, -9, 128 + 9)  # trainers stopped by the agent once another one had failed


def torchrun(nproc: int, module_args: list[str]) -> int:
    """Runs ``python -m vitpipe.launch --standalone --nproc_per_node N <module args>`` here.

    Args:
        nproc: Processes to start.
        module_args: What torchrun runs, e.g. ``["-m", "pipeline.train", RECIPE, *overrides]``.

    Returns:
        The launcher's exit status (see the module docstring).
    """
    cmd = [sys.executable, "-m", "vitpipe.launch", "--standalone", f"--nproc_per_node={nproc}", *module_args]
    logger.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)


def failure_status(failures: dict[int, object], rank0_here: bool = False) -> tuple[int, list[str]]:
    """The launcher's exit status for torchrun's failed trainers, and the lines to print.

    Args:
        failures: Global rank -> ``ProcessFailure`` (``exitcode``, ``pid``, ``message``, ``timestamp``).
        rank0_here: Whether rank 0 ran under this launcher (``--standalone``): it printed its message itself,
            and the others' copies are left out (the agent may have stopped rank 0 before it counted as failed).

    Returns:
        ``(status, lines)``.
    """
    codes = {rank: f.exitcode for rank, f in failures.items()}
    own = [r for r, c in codes.items() if c not in _TERMINATED] or list(failures)  # not those the agent stopped
    first = min(own, key=lambda r: failures[r].timestamp)
    if all(c in (EXIT_PREEMPTED, *_TERMINATED) for c in codes.values()) and EXIT_PREEMPTED in codes.values():
        return EXIT_PREEMPTED, []
    if codes[first] == EXIT_USER_ERROR:
        if rank0_here and codes.get(0) == EXIT_USER_ERROR:
            return EXIT_USER_ERROR, []  # rank 0 printed it
        if rank0_here:  # the agent stopped rank 0 before it printed: say the first failure's message once
            message = failures[first].message
            return EXIT_USER_ERROR, [message] if isinstance(message, str) and message else []
        said = failures[0].message if 0 in failures else None
        lines = {f.message for r, f in sorted(failures.items()) if r != 0 and f.exitcode == EXIT_USER_ERROR
                 and isinstance(f.message, str) and f.message.startswith("pipeline.train:") and f.message != said}
        return EXIT_USER_ERROR, sorted(lines)
    lines = [f"vitpipe launch: rank {r} (pid {f.pid}) " + (f"exited with status {c}" if c >= 0 else
                                                           f"was killed by signal {-c}")
             for r, f in sorted(failures.items()) for c in [f.exitcode]]
    code = codes[first]
    return (code if code > 0 else 128 - code), lines


def main(argv: list[str] | None = None) -> int:
    """Runs torchrun's agent with ``argv`` (torchrun's own arguments) and maps the trainers' statuses."""
    os.environ[LAUNCHER_ENV] = "1"
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Its "failed (exitcode: N) local_rank: ..." line repeats what the status and main() say.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        args = sys.argv[1:] if argv is None else argv
        status, lines = failure_status(err.failures, rank0_here="--standalone" in args)
        for line in lines:
            sys.stderr.write(line + "\n")
        if status == EXIT_PREEMPTED:
            sys.stderr.write("vitpipe launch: every trainer exited for a requeue (status 75)\n")
        return status
    except SignalException as err:  # the agent was asked to stop (it stopped the trainers first)
        sys.stderr.write(f"vitpipe launch: stopped by signal {int(err.sigval)}\n")
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
