"""Self-describing exports: what a run's ``final/model.safetensors`` says about itself, and one call to load it.

A vitpipe export carries, in its safetensors metadata (``vitpipe.*`` keys, strings; lists and numbers as
JSON), everything needed to rebuild the model and feed it: the registered model name, the number of classes
and the constructor arguments, the input size (and frames per clip for video), mean/std, the resize
interpolation and crop, the class names, the recipe and the code version. Nothing but the metadata header
is read to describe it (:func:`read_export_info`); nothing is unpickled.

    from model.export_load import load_export
    net, cfg = load_export("runs/<run>/final/model.safetensors")   # eval mode, weights loaded strictly
    cfg["input_size"], cfg["mean"], cfg["std"], cfg.get("num_frames")

is the same as timm's own call, spelled out (``import model`` registers vitpipe's names with timm)::

    import model, timm
    net = timm.create_model(name, pretrained=True, num_classes=N, img_size=S, **model_kwargs,
                            pretrained_cfg_overlay=dict(file=P, num_classes=N, input_size=(3, S, S),
                                                        mean=MEAN, std=STD, interpolation=I, crop_pct=C))

with the values from :func:`read_export_info` (:func:`timm_arguments` returns exactly these arguments).
A video model takes clips ``(B, 3, T, S, S)`` with ``T = num_frames``; timm's config has no frame count,
so it is in the returned config (and in the overlay's ``notes``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PREFIX = "vitpipe."
"""Prefix of vitpipe's keys in the safetensors metadata."""

#: Metadata fields stored as JSON (lists, numbers, tables); the others are plain strings.
JSON_FIELDS = frozenset({"num_classes", "input_size", "num_frames", "mean", "std", "crop_pct", "model_kwargs",
                         "label_names", "video"})
#: Fields every vitpipe export has.
REQUIRED = ("model", "num_classes", "input_size", "mean", "std")
#: Fields that go into timm's ``pretrained_cfg`` (all are :class:`timm.models.PretrainedCfg` fields).
TIMM_CFG_FIELDS = ("num_classes", "input_size", "mean", "std", "interpolation", "crop_pct", "label_names")


class ExportFormatError(ValueError):
    """The file is not a vitpipe export (no or incomplete ``vitpipe.*`` metadata)."""


def encode_metadata(info: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata of an export: ``format = pt`` and one ``vitpipe.<field>`` string per field.

    Args:
        info: Field → value (see :data:`JSON_FIELDS`; fields whose value is None are left out).

    Returns:
        String → string, for ``safetensors.torch.save(..., metadata=...)``.
    """
    out = {"format": "pt"}
    for key, value in info.items():
        if value is not None:
            out[PREFIX + key] = json.dumps(value) if key in JSON_FIELDS else str(value)
    return out


def read_export_info(path: str | Path) -> dict[str, Any]:
    """Reads what an export says about itself from its safetensors header (no tensor is read).

    Returns:
        Field → value: ``model``, ``num_classes``, ``input_size`` ``[3, S, S]``, ``mean``, ``std``, and when
        known ``num_frames`` (video), ``interpolation``, ``crop_pct``, ``model_kwargs``, ``label_names``,
        ``video`` (clip sampling and views), ``recipe``, ``config`` (the resolved TOML), ``code_version``.

    Raises:
        FileNotFoundError: If there is no such file.
        ExportFormatError: If the file is not a safetensors file with vitpipe's metadata.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such export")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ExportFormatError(f"{path} is not a safetensors file ({err})") from err
    info = {k.removeprefix(PREFIX): v for k, v in metadata.items() if k.startswith(PREFIX)}
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise ExportFormatError(f"{path} has no vitpipe metadata ({', '.join(missing)} missing): exported before "
                                "exports described themselves; re-export it with `vitpipe export RUN_DIR`")
    return {k: json.loads(v) if k in JSON_FIELDS else v for k, v in info.items()}


def timm_arguments(path: str | Path, info: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The model name and the keyword arguments of the ``timm.create_model`` call that loads an export.

    Returns:
        ``(name, kwargs)``: ``timm.create_model(name, **kwargs)`` builds the model with the export's weights
        loaded strictly (``pretrained=True`` from ``pretrained_cfg_overlay['file']``; nothing is downloaded).
    """
    info = read_export_info(path) if info is None else info
    overlay: dict[str, Any] = {"file": str(path)}
    overlay.update({k: tuple(v) if isinstance(v, list) else v for k, v in info.items() if k in TIMM_CFG_FIELDS})
    if info.get("num_frames"):
        overlay["notes"] = (f"{info['num_frames']} frames",)
    kwargs = {**info.get("model_kwargs", {}), "num_classes": info["num_classes"],
              "img_size": info["input_size"][-1]}
    return info["model"], {"pretrained": True, **kwargs, "pretrained_cfg_overlay": overlay}


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Loads an export into a ready model, with its preprocessing config.

    Args:
        path: A vitpipe export (``final/model.safetensors``, ``vitpipe export``'s output).
        device: Where to put the model.

    Returns:
        ``(model, cfg)``: the model in eval mode with the export's weights (loaded strictly), and timm's
        ``pretrained_cfg`` of it (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
        ``num_classes``, ``label_names``) plus, for video, ``num_frames`` and ``video`` (clip sampling and
        evaluation views).

    Raises:
        FileNotFoundError: If there is no such file.
        ExportFormatError: If the file is not a vitpipe export.
        RuntimeError: If the weights do not fit the model the metadata names.
    """
    import timm

    import model  # noqa: F401  (registers vitpipe's names with timm)

    info = read_export_info(path)
    name, kwargs = timm_arguments(path, info)
    net = timm.create_model(name, **kwargs).to(device).eval()
    cfg = dict(net.pretrained_cfg)
    cfg.update({k: info[k] for k in ("num_frames", "video") if info.get(k)})
    return net, cfg
