"""Building a run's model from its config: class count, strict weights, ``model.init_from``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.build import build_model, num_classes_of
from pipeline.checkpoint import export_weights
from pipeline.config import ConfigError, DataCfg, JobCfg, ModelCfg


def _cfg(num_classes: int = 10, **model: object) -> JobCfg:
    return JobCfg(model=ModelCfg(name="vit_nano_patch8_32", num_classes=num_classes, **model),
                  data=DataCfg(img_size=32, path="/nonexistent"))


def test_num_classes_from_the_config_reads_no_data() -> None:
    assert num_classes_of(_cfg(7)) == 7  # data.path does not exist: it is not read


def test_built_from_the_config() -> None:
    net = build_model(_cfg(num_classes=10, drop_path_rate=0.1, kwargs={"depth": 2}), 3)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 3)  # the explicit class count wins
    assert len(net.blocks) == 2


def test_weights_load_strictly_and_skip_init_from(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = export_weights(build_model(_cfg()).state_dict(), tmp_path / "w.safetensors")
    net = build_model(_cfg(init_from=str(tmp_path / "missing.safetensors")), weights=path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 build_model(_cfg(), weights=path).state_dict().values(), strict=True))
    with pytest.raises(RuntimeError):  # a different class count does not load strictly
        build_model(_cfg(3), weights=path)


def test_init_from_follows_init_mode(tmp_path: Path) -> None:
    path = export_weights(build_model(_cfg()).state_dict(), tmp_path / "w.safetensors")
    net = build_model(_cfg(3, init_from=str(path), init_mode="finetune"))  # new 3-way classifier
    assert net.head.out_features == 3
    with pytest.raises(ConfigError, match="model.init_from: "):
        build_model(_cfg(3, init_from=str(path), init_mode="strict"))
