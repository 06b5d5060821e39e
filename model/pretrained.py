"""Initialising a model from local weights: strict, fine-tuning (new classifier), or image → video inflation.

The recipes of the papers start from other runs' weights: StructViT's video models from ImageNet-1K weights,
temporally inflated; Something-Something, Diving-48 and FineGym from Kinetics-400 weights with a new classifier.
:func:`load_pretrained` does all three from a file (``vitpipe export``'s safetensors, or a torch state dict),
never downloading anything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from model.structvit_convert import inflate_weight

logger = logging.getLogger(__name__)

InitMode = Literal["auto", "strict", "finetune", "inflate"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads weights from ``.safetensors`` or a torch file (a state dict, or one under ``state_dict``/``model``).

    Nothing is unpickled: a torch file is read by torch's ``weights_only`` unpickler, which refuses
    anything but tensors, numbers, strings and containers (an object planted to run code included).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be read as weights (naming the file and the reason).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - safetensors, zip and unpickler errors: one message
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a weights file that loads without unpickling code ({reason})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def classifier_prefix(net: nn.Module) -> str:
    """The parameter-name prefix of the model's classifier (timm's ``pretrained_cfg['classifier']``)."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return f"{cfg.get('classifier', 'head')}."


def load_pretrained(net: nn.Module, path: str | Path, mode: InitMode = "auto") -> list[str]:
    """Loads weights from ``path`` into ``net`` (in place).

    Args:
        net: The freshly built model.
        path: Weights file.
        mode: ``strict`` (every key and shape equal); ``finetune`` (all but a classifier whose shape differs,
            which keeps its fresh initialisation); ``inflate`` (as finetune, and 2-D kernels ``(O, I, kh, kw)``
            become the model's 3-D ``(O, I, kt, kh, kw)`` by repetition over time divided by ``kt``); ``auto``
            (inflate and finetune wherever shapes call for it).

    Returns:
        The keys left at their fresh initialisation (the classifier, when the class count changed).

    Raises:
        ValueError: On keys that do not match the model, naming them.
    """
    source, target = read_state_dict(path), net.state_dict()
    head = classifier_prefix(net)
    loaded, fresh, problems = {}, [], []
    for key, want in target.items():
        value = source.get(key)
        if value is None:
            if mode != "strict" and key.startswith(head):
                fresh.append(key)  # a backbone-only file
            else:
                problems.append(f"{key}: missing from {path}")
        elif value.shape == want.shape:
            loaded[key] = value
        elif mode in ("inflate", "auto") and value.dim() == 4 and want.dim() == 5 and \
                want.shape[:2] + want.shape[3:] == value.shape:
            loaded[key] = inflate_weight(value, want.shape[2])
        elif mode != "strict" and key.startswith(head):
            fresh.append(key)
        else:
            problems.append(f"{key}: {tuple(value.shape)} in the file, {tuple(want.shape)} in the model")
    problems += [f"{key}: not in the model" for key in source if key not in target]
    if problems:
        raise ValueError(f"{path} does not fit {type(net).__name__} (init mode {mode!r}): " + "; ".join(problems[:6])
                         + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else ""))
    net.load_state_dict({k: v.to(target[k].dtype) for k, v in loaded.items()}, strict=False)
    inflated = sum(1 for k in loaded if loaded[k].dim() == 5 and source[k].dim() == 4)
    logger.info("initialised from %s: %d tensors (%d inflated to video), %d fresh (%s)", path, len(loaded),
                inflated, len(fresh), ", ".join(fresh) or "none")
    return fresh
