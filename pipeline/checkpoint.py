"""Checkpoints: every rank takes part, written atomically, a ``latest`` pointer, keep-last-k, fp32 export.

Layout under the run directory::

    checkpoints/step_00000120/          # one directory per checkpoint
        model.safetensors | pytorch_model/   # whole weights, or the engine's shards (see pipeline.engine)
        optimizer.bin, random_states_<rank>.pkl, custom_checkpoint_0.pkl (the LR scheduler)
        trainer_state.json              # step, epoch, loader position, MLflow run id, file sizes; written last
    checkpoints/latest                  # text: the name of the newest complete checkpoint
    final/model.safetensors             # fp32 weights; timm.create_model(name, checkpoint_path=...) loads them

Every rank writes its part into ``.step_N.tmp`` (accelerate's ``save_state``: ZeRO shards its
optimizer per rank); after a barrier rank 0 writes ``trainer_state.json`` with the size of every
file, renames the directory into place and moves ``latest``. A checkpoint whose state file is
missing or whose files do not have the recorded sizes is incomplete, and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from data_prep.format import atomic_write_bytes

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def save_checkpoint(acc: Any, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Saves model, optimizer, RNG and scheduler states plus ``trainer_state``; call on every rank.

    Args:
        acc: The accelerate ``Accelerator`` (its ``save_state`` writes the per-rank parts).
        ckpt_dir: The run's ``checkpoints`` directory (on a file system every rank sees).
        step: Optimizer step, used in the directory name.
        trainer_state: JSON-serialisable counters (step, epoch, loader position, run id).
        keep_last: How many step checkpoints to keep.

    Returns:
        The checkpoint's directory.
    """
    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".step_{step:08d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {**trainer_state, "files": _file_sizes(tmp)}
        atomic_write_bytes(tmp / STATE_FILE, json.dumps(state, indent=1).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_bytes(ckpt_dir / "latest", final.name.encode())
        for old in sorted(ckpt_dir.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old)
        logger.info("saved checkpoint %s", final)
    acc.wait_for_everyone()
    return final


def read_trainer_state(path: Path) -> dict[str, Any] | None:
    """The checkpoint's trainer state if the checkpoint is complete, else None (with a warning)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        logger.warning("checkpoint %s is incomplete (%s): trying the previous one", path, err)
        return None
    sizes = _file_sizes(path)
    bad = [f for f, size in state.get("files", {}).items() if sizes.get(f) != size]
    if bad:
        logger.warning("checkpoint %s is corrupt (%s differ from what was written): trying the previous one",
                       path, ", ".join(bad[:3]))
        return None
    return state


def find_resumable(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint: the ``latest`` one, else older ones, newest first.

    Returns:
        ``(directory, trainer state)``, or None when there is none.
    """
    candidates = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True)
    pointer = ckpt_dir / "latest"
    if pointer.is_file() and (ckpt_dir / pointer.read_text().strip()).is_dir():
        latest = ckpt_dir / pointer.read_text().strip()
        candidates = [latest, *[c for c in candidates if c != latest]]
    for path in candidates:
        state = read_trainer_state(path)
        if state is not None:
            return path, state
    return None


def export_weights(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """Writes fp32, contiguous weights as safetensors (atomically).

    Args:
        state_dict: Parameter and buffer tensors (any dtype and device).
        path: Output file; its folder is created.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))
    return path
