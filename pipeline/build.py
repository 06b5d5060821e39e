"""The model of a run, built from its config: the one place the runtime turns a config into a network.

The trainer, ``evaluate_run`` and ``export_run`` all build through :func:`build_model`, so the
class count, image size and constructor arguments cannot drift apart between training and later
use of the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.factory import create_model
from model.pretrained import load_pretrained
from pipeline.config import ConfigError, JobCfg
from pipeline.data.shards import read_split


def num_classes_of(cfg: JobCfg) -> int:
    """The classifier's outputs: ``model.num_classes``, or (when 0) the class count of the training split.

    Raises:
        LoaderError: When ``model.num_classes`` is 0 and the training split cannot be read.
    """
    if cfg.model.num_classes:
        return cfg.model.num_classes
    _, classes = read_split(cfg.data.path, cfg.data.train_split)
    return len(classes)


def build_model(cfg: JobCfg, num_classes: int | None = None, *, weights: str | Path | None = None) -> torch.nn.Module:
    """Builds ``cfg.model`` for ``cfg.data.img_size`` and loads its starting weights.

    Args:
        cfg: The run's config.
        num_classes: Classifier outputs (default: :func:`num_classes_of`).
        weights: A weights file loaded strictly (a run's export); ``model.init_from`` is then ignored.
            None: fresh initialisation, then ``model.init_from`` by ``model.init_mode`` if set.

    Returns:
        The model, on the CPU, in fp32.

    Raises:
        ConfigError: When ``model.init_from`` does not fit the model.
        UnknownModelError: For a model name that is not registered.
    """
    m = cfg.model
    net = create_model(m.name, num_classes=num_classes or num_classes_of(cfg), img_size=cfg.data.img_size,
                       drop_path_rate=m.drop_path_rate, checkpoint_path=str(weights) if weights else None,
                       **m.kwargs)
    if m.init_from and weights is None:
        try:
            load_pretrained(net, m.init_from, m.init_mode)
        except ValueError as err:
            raise ConfigError(f"model.init_from: {err}") from err
    return net
