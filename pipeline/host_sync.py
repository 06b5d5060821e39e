"""Counting host synchronisations on any device, CUDA-free: a diagnostic for tests and bench scripts.

On an accelerator the host queues kernels and runs ahead; reading a tensor's value on the host
(``loss.item()``, ``bool(t)``, ``t.tolist()``, ``t.cpu()``...) makes it wait until every kernel queued
before has run, so the next step's work is not queued in time. On a CPU nothing is queued and such
reads cost nothing, which hides them. :class:`HostSyncCounter` makes them visible everywhere: while
it is active, every call of a Tensor method that hands a tensor's value to the host (or copies it to
the CPU) is counted, with its call site, whatever the tensor's device.

A few reads are of tensors that live on the host on every machine, by design of the library that
reads them; they are counted apart (:data:`HOST_TENSOR_SITES`, ``host_reads``), not as syncs.

What it does not see: reads made inside C++ (a kernel whose output size depends on values, e.g.
``nonzero``, is counted by name; a C++ ``item()`` is not), and ``Tensor.to(device)`` copies in either
direction: on a CPU the loader's copy to the training device and a copy back to the host are the same
call. Not for training runs: it replaces methods of ``torch.Tensor`` while active.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from data_prep.format import atomic_write_bytes

READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__complex__")
"""Tensor methods that hand a value to the host."""

DATA_DEPENDENT = ("nonzero", "masked_select", "unique")
"""Tensor methods whose output size depends on the values (the host reads the size)."""

HOST_TENSOR_SITES = {
    ("torch/optim/optimizer.py", "_get_value"): "the optimizer's per-parameter step count: a CPU tensor "
    "unless the optimizer is capturable or fused (PyTorch's comment there: item() of a CPU tensor is faster)",
    ("torch/utils/data/dataloader.py", "__init__"): "the DataLoader's base seed, drawn from a CPU generator "
    "when an epoch's iterator starts",
}
"""Call sites ``(file suffix, function)`` whose reads are of host tensors on every machine: counted apart."""


class HostSyncCounter:
    """Counts host reads of tensor values while active (a context manager; not re-entrant).

    Attributes:
        count: Reads counted so far (host syncs on an accelerator).
        sites: ``"method file:line"`` → reads, the line being the caller of the method.
        host_reads: Reads at :data:`HOST_TENSOR_SITES` (host tensors: no sync anywhere), counted apart.
        host_sites: The same per call site.
    """

    def __init__(self) -> None:
        self.count = self.host_reads = 0
        self.sites: collections.Counter[str] = collections.Counter()
        self.host_sites: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, Any] = {}
        self._inside = threading.local()
        self._mark = 0

    def __enter__(self) -> HostSyncCounter:
        for name in (*READS, *DATA_DEPENDENT):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    def take(self) -> int:
        """Reads counted since the previous call (or since the start)."""
        delta, self._mark = self.count - self._mark, self.count
        return delta

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if getattr(self._inside, "depth", 0) == 0:
                self._record(name, sys._getframe(1))
            self._inside.depth = getattr(self._inside, "depth", 0) + 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._inside.depth -= 1

        return wrapper

    def _record(self, name: str, frame: Any) -> None:
        code = frame.f_code
        site = f"{name} {code.co_filename}:{frame.f_lineno}"
        if any(code.co_filename.endswith(suffix) and code.co_name == function
               for suffix, function in HOST_TENSOR_SITES):
            self.host_reads += 1
            self.host_sites[site] += 1
        else:
            self.count += 1
            self.sites[site] += 1


def count_training(recipe: str, overrides: list[str]) -> dict[str, Any]:
    """Trains a recipe under the counter and attributes the host reads to optimizer steps.

    Set-up happens before counting. A step's reads are those made from the end of the previous
    step to the end of this one: fetching its batches, forward, backward, optimizer, and the
    step-boundary work (metrics at log steps, the preemption check). Reads during evaluation,
    checkpoints and the final export are counted apart, and those phases are timed.

    Returns:
        ``steps``: one ``{"step", "reads", "log", "epoch_start"}`` per optimizer step; ``reads_apart``
        and ``seconds``: reads in and wall time of ``eval``, ``checkpoint`` (all checkpoints),
        ``last_checkpoint`` and ``save_final`` (seconds: the last checkpoint plus the export; reads: the
        export's), and reads ``between`` a step's end and one of those phases; ``sites``,
        ``host_reads``, ``host_sites`` (see :class:`HostSyncCounter`); ``rank``, ``world_size``.
    """
    from pipeline.config_io import load_config
    from pipeline.trainer import Trainer

    cfg = load_config(recipe, overrides)
    trainer = Trainer(cfg, Path(recipe).stem)
    steps: list[dict[str, Any]] = []
    reads = dict.fromkeys(("eval", "checkpoint", "save_final", "between"), 0)
    seconds = dict.fromkeys(("eval", "checkpoint", "last_checkpoint", "save_final"), 0.0)
    with HostSyncCounter() as counter:
        def after_step(meter: Any, _original: Callable[..., Any] = trainer.after_step) -> None:
            accum = trainer.cfg.engine.grad_accum_steps
            log = trainer.step % trainer.cfg.tracking.log_every_steps == 0 or trainer.step == trainer.total_steps
            try:
                _original(meter)
            finally:
                steps.append({"step": trainer.step, "reads": counter.take(), "log": log,
                              "epoch_start": trainer.batch_in_epoch == accum})

        def apart(kind: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                outer = counter.take()  # reads since the last step end (the loop's own bookkeeping)
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    took = time.perf_counter() - start
                    seconds[kind] += took
                    if kind == "checkpoint":
                        seconds["last_checkpoint"] = took
                    reads[kind] += counter.take()
                    reads["between"] += outer
            return wrapper

        trainer.after_step = after_step
        trainer.run_eval = apart("eval", trainer.run_eval)
        trainer.save_checkpoint = apart("checkpoint", trainer.save_checkpoint)
        trainer.save_final = apart("save_final", trainer.save_final)
        try:
            trainer.fit()
        finally:
            trainer.acc.end_training()
    return {"rank": trainer.rank, "world_size": trainer.world_size, "steps": steps, "reads_apart": reads,
            "seconds": seconds, "sites": dict(counter.sites.most_common()), "host_reads": counter.host_reads,
            "host_sites": dict(counter.host_sites.most_common())}


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.host_sync RECIPE --out DIR [--section.key=value ...]`` (torchrun too).

    Writes ``DIR/syncs.rank<N>.json`` (see :func:`count_training`).
    """
    parser = argparse.ArgumentParser(prog="pipeline.host_sync", description=count_training.__doc__)
    parser.add_argument("recipe")
    parser.add_argument("--out", required=True, type=Path)
    args, overrides = parser.parse_known_args(argv)
    result = count_training(args.recipe, overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / f"syncs.rank{result['rank']}.json", json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
