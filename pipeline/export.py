"""Consolidated fp32 weights from any checkpoint directory, and ``export_run`` (``vitpipe export``).

The result loads strictly with ``timm.create_model(name, checkpoint_path=...)``; how a checkpoint
is merged from the engine's per-rank shards is the engine's business
(:func:`pipeline.engine.checkpoint_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.build import build_model
from pipeline.checkpoint import export_weights, read_trainer_state
from pipeline.config_io import load_config
from pipeline.engine import MODEL_DIR, checkpoint_weights
from pipeline.rundir import RunError, config_of


class ExportError(RunError):
    """The directory is not a complete vitpipe checkpoint."""


def consolidate(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Reads a checkpoint directory's model weights as one fp32 state dict.

    Args:
        ckpt_dir: A ``checkpoints/step_N`` directory.

    Returns:
        Parameter and buffer tensors, fp32, on the CPU, with the model's own key names.

    Raises:
        ExportError: When the directory holds no model weights.
    """
    weights = checkpoint_weights(ckpt_dir)
    if weights is None:
        raise ExportError(f"{ckpt_dir} holds no model weights (model.safetensors or {MODEL_DIR}/)")
    return weights


def export_run(run_dir: Path, checkpoint: str, out: str | None) -> Path:
    """Consolidates a checkpoint of the run to fp32 safetensors and verifies it loads strictly.

    Args:
        run_dir: The run directory (holds ``config.toml`` and ``checkpoints/``).
        checkpoint: A directory name under ``checkpoints/`` (``step_N``), or ``latest``.
        out: Output file (default: ``<run_dir>/export/<checkpoint>.safetensors``).

    Returns:
        The written file.

    Raises:
        RunError: When ``run_dir`` is not a run directory.
        ExportError: When the checkpoint is missing or incomplete.
    """
    cfg = load_config(config_of(run_dir))
    ckpts = run_dir / "checkpoints"
    if checkpoint == "latest":
        if not (ckpts / "latest").is_file():
            raise ExportError(f"{run_dir} has no checkpoints/latest")
        checkpoint = (ckpts / "latest").read_text().strip()
    if not (ckpts / checkpoint).is_dir() or read_trainer_state(ckpts / checkpoint) is None:
        raise ExportError(f"{ckpts / checkpoint} is not a complete checkpoint")
    path = export_weights(consolidate(ckpts / checkpoint),
                          Path(out) if out else run_dir / "export" / f"{checkpoint}.safetensors")
    build_model(cfg, weights=path)  # strict load: raises on any mismatch
    return path
