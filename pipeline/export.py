"""Self-describing fp32 exports of a run (``final/model.safetensors``, ``vitpipe export``) and their registration.

An export is the consolidated fp32 weights plus, in the safetensors metadata, what is needed to use them
(:mod:`model.export_load`: model name, classes, input size and frames, mean/std, interpolation and crop, the
recipe and the code version), so that ``model.export_load.load_export(path)`` — or the spelled-out
``timm.create_model(..., pretrained_cfg_overlay=...)`` call — rebuilds the model without the run directory.
How a checkpoint is merged from the engine's per-rank shards is the engine's business
(:func:`pipeline.engine.checkpoint_weights`). :func:`register_export` records an export as a version in
MLflow's model registry (``tracking.register_model``).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from data_prep.format import atomic_write_bytes
from model.export_load import encode_metadata, read_export_info
from pipeline.build import build_model
from pipeline.checkpoint import read_trainer_state
from pipeline.config import JobCfg
from pipeline.config_io import dump_toml, load_config
from pipeline.data.loaders import is_video
from pipeline.data.shards import LoaderError, read_split
from pipeline.engine import MODEL_DIR, checkpoint_weights
from pipeline.rundir import RunError, config_of

logger = logging.getLogger(__name__)

EXPORT_ARTIFACT = "checkpoint/model.safetensors"
"""Where the final export is logged in the MLflow run's artifacts."""

#: Export facts that become tags of a registered model version (``vitpipe.<field>``).
TAG_FIELDS = ("model", "num_classes", "input_size", "num_frames", "mean", "std", "interpolation", "crop_pct",
              "recipe", "code_version")


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


def _video(cfg: JobCfg) -> bool:
    try:
        return is_video(cfg.data)
    except (LoaderError, ValueError, OSError):  # the data set is gone: the model's name tells
        return cfg.model.name.endswith("_video")


def _class_names(cfg: JobCfg, num_classes: int) -> list[str] | None:
    try:
        names = read_split(cfg.data.path, cfg.data.train_split)[1]
    except (LoaderError, ValueError, OSError):
        return None
    return names if len(names) == num_classes else None


def export_info(cfg: JobCfg, num_classes: int, *, recipe: str = "", code_version: str = "") -> dict[str, Any]:
    """What an export of this run says about itself (the fields of :func:`model.export_load.read_export_info`).

    Args:
        cfg: The run's resolved config.
        num_classes: The classifier's outputs.
        recipe: The recipe's name (file stem), when known.
        code_version: The code version that trained the run (git SHA).

    Returns:
        Field → value; the resolved config is stored whole under ``config``.
    """
    d, size = cfg.data, cfg.data.img_size
    info: dict[str, Any] = {"model": cfg.model.name, "num_classes": num_classes, "input_size": [3, size, size],
                            "mean": list(d.mean), "std": list(d.std), "model_kwargs": dict(cfg.model.kwargs),
                            "label_names": _class_names(cfg, num_classes), "recipe": recipe or None,
                            "code_version": code_version or None, "config": dump_toml(cfg)}
    if _video(cfg):
        v = d.video
        short = v.eval_short_side or size
        info.update(num_frames=v.frames, interpolation=v.interpolation, crop_pct=round(size / short, 6),
                    video={"frames": v.frames, "sampling": v.sampling, "stride": v.stride, "num_clips": v.num_clips,
                           "spatial_crops": v.spatial_crops, "eval_short_side": short})
    else:
        info.update(interpolation="bicubic", crop_pct=d.eval_crop_pct)  # the evaluation transform's
    return info


def write_export(weights: dict[str, torch.Tensor], path: Path, info: dict[str, Any]) -> Path:
    """Writes fp32, contiguous weights with the export's metadata as safetensors (atomically).

    Args:
        weights: Parameter and buffer tensors (any dtype and device).
        path: Output file; its folder is created.
        info: From :func:`export_info`.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    atomic_write_bytes(path, save(tensors, metadata=encode_metadata(info)))
    return path


def _num_classes(cfg: JobCfg, weights: dict[str, torch.Tensor]) -> int:
    """The export's class count: ``model.num_classes``, else the classifier's outputs in the weights."""
    if cfg.model.num_classes:
        return cfg.model.num_classes
    from timm.models import get_pretrained_cfg

    head = getattr(get_pretrained_cfg(cfg.model.name), "classifier", None) or "head"
    return int(weights[f"{head}.weight"].shape[0]) if f"{head}.weight" in weights else 0


def export_run(run_dir: Path, checkpoint: str, out: str | None) -> Path:
    """Consolidates a checkpoint of the run to a self-describing fp32 export and verifies it loads strictly.

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
    weights = consolidate(ckpts / checkpoint)
    num_classes = _num_classes(cfg, weights)
    previous = _previous_facts(run_dir)
    info = export_info(cfg, num_classes, recipe=previous.get("recipe", ""),
                       code_version=previous.get("code_version") or code_version())
    path = write_export(weights, Path(out) if out else run_dir / "export" / f"{checkpoint}.safetensors", info)
    build_model(cfg, num_classes, weights=path)  # strict load: raises on any mismatch
    return path


def _previous_facts(run_dir: Path) -> dict[str, Any]:
    """Recipe and code version from the run's own final export, when it has one that describes itself."""
    try:
        return read_export_info(run_dir / "final" / "model.safetensors")
    except (OSError, ValueError):
        return {}


def register_export(uri: str, run_id: str, name: str, info: dict[str, Any], run_dir: Path) -> Any:
    """Registers the run's logged export as a new version of the registered model ``name`` in MLflow.

    The version's source is the logged artifact (``runs:/<run id>/checkpoint/model.safetensors``); the export's
    facts are its tags (``vitpipe.model``, ``vitpipe.num_classes``, ``vitpipe.input_size``, ...).

    Args:
        uri: The run's tracking URI (the registry is the tracking store's).
        run_id: The MLflow run that logged the export.
        name: Registered model name (created on first use).
        info: From :func:`export_info`.
        run_dir: The run directory (a tag).

    Returns:
        The MLflow ``ModelVersion``, or None (with a warning) when the export is not in the run's artifacts.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    folder, file = EXPORT_ARTIFACT.rsplit("/", 1)
    if file not in {Path(a.path).name for a in client.list_artifacts(run_id, folder)}:
        logger.warning("model not registered: the run's %s was not delivered to MLflow", EXPORT_ARTIFACT)
        return None
    tags = {f"vitpipe.{k}": _tag(info[k]) for k in TAG_FIELDS if info.get(k) is not None}
    tags["vitpipe.run_dir"] = str(run_dir)
    try:
        client.create_registered_model(name, description="vitpipe exports (fp32 safetensors); load with "
                                       "model.export_load.load_export(path)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, f"runs:/{run_id}/{EXPORT_ARTIFACT}", run_id=run_id, tags=tags)
    logger.info("registered %s version %s in MLflow's model registry", name, version.version)
    return version


def code_version() -> str:
    """The code version: the commit of the vitpipe checkout, with ``-dirty`` for local changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def _tag(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "x".join(map(str, value)) if all(isinstance(v, int) for v in value) else \
            ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)
