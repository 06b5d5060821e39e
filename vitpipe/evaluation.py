"""``vitpipe eval``: evaluate a run's weights with the run's own resolved config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitpipe.cli import UserError


def evaluate_run(run_dir: Path, weights: str | None, split: str | None, overrides: list[str]) -> dict[str, Any]:
    """Builds the run's model, loads the weights strictly and evaluates a split in this process.

    Returns:
        ``{"top1", "top5", "loss", "samples", "split", "weights"}``.
    """
    import torch

    from model.factory import create_model
    from pipeline.config_io import load_config
    from pipeline.data.loaders import build_eval
    from pipeline.data.shards import read_split
    from pipeline.evaluate import evaluate

    cfg = load_config(_config_of(run_dir), overrides)
    weights_path = Path(weights) if weights else run_dir / "final" / "model.safetensors"
    if not weights_path.is_file():
        raise UserError(f"weights {weights_path} not found")
    split = split or cfg.data.val_split
    _, classes = read_split(cfg.data.path, cfg.data.train_split)
    net = create_model(cfg.model.name, num_classes=cfg.model.num_classes or len(classes),
                       img_size=cfg.data.img_size, checkpoint_path=str(weights_path), **cfg.model.kwargs)
    loader = build_eval(cfg, split, rank=0, world_size=1, device=torch.device("cpu"))
    result = evaluate(net, loader, torch.device("cpu"))
    return {**result, "split": split, "weights": str(weights_path)}


def export_run(run_dir: Path, checkpoint: str, out: str | None) -> Path:
    """Consolidates a checkpoint of the run to fp32 safetensors and verifies it loads strictly.

    Returns:
        The written file.
    """
    from model.factory import create_model
    from pipeline.checkpoint import export_weights, read_trainer_state
    from pipeline.config_io import load_config
    from pipeline.data.shards import read_split
    from pipeline.export import consolidate

    cfg = load_config(_config_of(run_dir))
    ckpts = run_dir / "checkpoints"
    if checkpoint == "latest":
        if not (ckpts / "latest").is_file():
            raise UserError(f"{run_dir} has no checkpoints/latest")
        checkpoint = (ckpts / "latest").read_text().strip()
    if not (ckpts / checkpoint).is_dir() or read_trainer_state(ckpts / checkpoint) is None:
        raise UserError(f"{ckpts / checkpoint} is not a complete checkpoint")
    path = export_weights(consolidate(ckpts / checkpoint),
                          Path(out) if out else run_dir / "export" / f"{checkpoint}.safetensors")
    _, classes = read_split(cfg.data.path, cfg.data.train_split)
    create_model(cfg.model.name, num_classes=cfg.model.num_classes or len(classes), img_size=cfg.data.img_size,
                 checkpoint_path=str(path), **cfg.model.kwargs)  # strict load: raises on any mismatch
    return path


def _config_of(run_dir: Path) -> Path:
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_dir} is not a run directory: no config.toml")
    return run_dir / "config.toml"
