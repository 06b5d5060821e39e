"""Checkpoints written atomically, a ``latest`` pointer, keep-last-k, and the fp32 weight export.

Layout under the run directory::

    checkpoints/step_00000120.pt   # model, optimizer, scheduler, step, epoch, MLflow run id
    checkpoints/latest             # text: the file name of the newest complete checkpoint
    final/model.safetensors        # fp32 weights that timm.create_model(name, checkpoint_path=...) loads

A checkpoint is written to a temporary file in the same directory and renamed into place, so a
crash never leaves a partial file under a final name; ``latest`` is replaced the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Saves a training state (called on the main rank) and prunes older checkpoints.

    Args:
        ckpt_dir: The run's ``checkpoints`` directory.
        step: Optimizer step, used in the file name.
        state: Picklable state (state dicts, counters).
        keep_last: How many step checkpoints to keep.

    Returns:
        The checkpoint's path.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:08d}.pt"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    atomic_write_bytes(ckpt_dir / "latest", path.name.encode())
    for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep_last]:
        old.unlink()
    logger.info("saved checkpoint %s", path)
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names, or None."""
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    return path if path.is_file() else None


def load_latest(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """Loads the newest readable checkpoint: the ``latest`` one, else older ones, newest first.

    A corrupt or truncated file is skipped with a warning naming it (a crash can leave one when the
    file system does not honour the rename order).

    Returns:
        ``(path, state)``, or None when no checkpoint can be read.
    """
    candidates = sorted(ckpt_dir.glob("step_*.pt"), reverse=True)
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        candidates = [latest, *[c for c in candidates if c != latest]]
    for path in candidates:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file means "try the previous one"
            logger.warning("checkpoint %s is unreadable (%s): trying the previous one", path, err)
            continue
        if not isinstance(state, dict) or "step" not in state:
            logger.warning("checkpoint %s is incomplete: trying the previous one", path)
            continue
        return path, state
    return None


def export_weights(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """Writes fp32, contiguous weights as safetensors (atomically).

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path
