"""The training state vitpipe saves in its own files, in formats that load without unpickling.

accelerate's ``save_state`` would pickle registered objects (``custom_checkpoint_<i>.pkl``, loaded
with ``weights_only=False``: a planted object runs code) and the RNG states (``random_states_<r>.pkl``).
So the scheduler and the EMA are not registered with accelerate, and a checkpoint holds instead:

* ``scheduler.json``: the LR scheduler's ``state_dict`` (numbers and lists), loaded with ``json``
  and only into the keys the live scheduler has;
* ``ema.safetensors``: the EMA weights (main process);
* ``rng_state_<rank>.safetensors``: each rank's Python, NumPy, torch (CPU and CUDA) generator states
  as tensors, with accelerate's step counter in the metadata. accelerate's own pickle of the same
  states is removed right after ``save_state`` wrote it, so nothing is left for it to load.

What accelerate still loads: ``model.safetensors`` (safetensors) and ``optimizer.bin``
(``torch.load(weights_only=True)`` with accelerate's small NumPy allow-list); under DeepSpeed its
own files, through torch's weights-only unpickler too (:func:`pipeline.engine.weights_only_loads`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save, save_model

from data_prep.format import atomic_write_bytes

logger = logging.getLogger(__name__)

SCHEDULER_FILE = "scheduler.json"
EMA_FILE = "ema.safetensors"
RNG_FILE = "rng_state_{rank}.safetensors"
ACCELERATE_RNG_FILE = "random_states_{rank}.pkl"
"""The pickle accelerate's ``save_state`` writes on every rank; removed right after."""


class StateError(ValueError):
    """A state file does not fit the live object it is loaded into."""


@dataclass
class StateObjects:
    """The live objects saved beside the weights and the optimizer."""

    scheduler: Any
    """An LR scheduler with ``state_dict``/``load_state_dict`` of plain numbers and lists."""
    ema: torch.nn.Module | None = None
    """The EMA model (timm ``ModelEmaV3``), or None."""


def write_state_files(folder: Path, acc: Any, objects: StateObjects, rank: int) -> None:
    """Writes scheduler and EMA (main process) and this rank's RNG states; removes accelerate's RNG pickle."""
    (folder / ACCELERATE_RNG_FILE.format(rank=rank)).unlink(missing_ok=True)
    if acc.is_main_process:
        state = objects.scheduler.state_dict()
        atomic_write_bytes(folder / SCHEDULER_FILE, json.dumps(state, indent=1).encode())
        if objects.ema is not None:
            save_model(objects.ema, str(folder / EMA_FILE))
    atomic_write_bytes(folder / RNG_FILE.format(rank=rank), _rng_bytes(acc.step))


def load_state_files(folder: Path, acc: Any, objects: StateObjects, rank: int) -> None:
    """Loads scheduler, EMA and this rank's RNG states (fresh seeds, with a warning, if it has none).

    Raises:
        StateError: A file that does not fit (another scheduler, missing EMA weights).
        OSError, ValueError: A file that cannot be read or parsed.
    """
    _load_scheduler(folder / SCHEDULER_FILE, objects.scheduler)
    if objects.ema is not None:
        if not (folder / EMA_FILE).is_file():
            raise StateError(f"{folder} has no {EMA_FILE} (the run had no EMA) but optim.ema_decay is set")
        load_model(objects.ema, str(folder / EMA_FILE), strict=True)
    rng = folder / RNG_FILE.format(rank=rank)
    if rng.is_file():
        acc.step = _restore_rng(rng)
    else:  # a resume on more processes than wrote the checkpoint
        logger.info("no saved RNG state for rank %d in %s: fresh seeds", rank, folder)


def _load_scheduler(path: Path, scheduler: Any) -> None:
    state = json.loads(path.read_text())
    expected = scheduler.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        raise StateError(f"{path}: keys {sorted(state) if isinstance(state, dict) else type(state).__name__} "
                         f"do not fit the scheduler's {sorted(expected)}")
    scheduler.load_state_dict(state)


def _rng_bytes(accelerate_step: int) -> bytes:
    """This process's generator states as safetensors bytes (tensors + JSON metadata)."""
    version, py_state, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"python": torch.tensor(py_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np_keys.astype(np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python_version": version, "python_gauss": gauss, "numpy_kind": kind, "numpy_pos": int(pos),
            "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached),
            "accelerate_step": int(accelerate_step)}
    return save(tensors, metadata={"vitpipe": json.dumps(meta)})


def _restore_rng(path: Path) -> int:
    """Restores the generator states written by :func:`_rng_bytes`; returns accelerate's step counter."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {})["vitpipe"])
    tensors = load_file(str(path))
    random.setstate((meta["python_version"], tuple(tensors["python"].tolist()), meta["python_gauss"]))
    np.random.set_state((meta["numpy_kind"], tensors["numpy"].numpy().astype(np.uint32), meta["numpy_pos"],
                         meta["numpy_has_gauss"], meta["numpy_cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    return int(meta["accelerate_step"])
