"""The zoo table: vitpipe's registered models, measured, beside published numbers; `vitpipe models`."""

from __future__ import annotations

import math

import pytest
import torch

import model.flops
from model.factory import create_model
from model.flops import count_macs
from model.zoo import PUBLISHED, format_table, input_size, measure, vitpipe_models
from vitpipe.cli import main


def test_zoo_lists_every_vitpipe_model_and_the_baselines() -> None:
    names = vitpipe_models()
    for name in ("filtervit_xs", "dropoutvit_xs", "filtervit_xxs", "filtervit_s", "swin_tiny_patch4_window7_224_fused",
                 "swin_large_patch4_window7_224_fused", "deit_small_patch16_224_fused", "vit_pico_patch4_32"):
        assert name in names
    assert "swin_tiny_patch4_window7_224" not in names  # timm's own names are not vitpipe's
    assert set(PUBLISHED) <= set(names)


def test_measured_filtervit_row_matches_published() -> None:
    row = measure("filtervit_xs")
    assert not row.error and row.classes == 100 and row.input_size == (3, 224, 224)
    assert round(row.params_m * 1e6) == 1_894_381 and math.isclose(row.gmacs, row.published.gmacs, abs_tol=0.005)
    text = format_table([row, measure("swin_pico_patch2_window4_32_fused")])
    assert text.startswith("| model |")
    assert "| filtervit_xs | 224×224 | 100 | 1.894 | 1.894 | 1.38 | 1.38 | 86.1 |" in text


def test_models_command_prints_the_table_and_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "*_pico"]) == 0
    out = capsys.readouterr().out
    assert "GMACs" in out and "filtervit_pico" in out and "dropoutvit_pico" in out and "vit_pico_patch4_32" not in out
    assert main(["models", "--names", "swin_tiny*"]) == 0
    assert capsys.readouterr().out.split() == ["swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224_fused"]


@pytest.mark.parametrize("name", ["vit_pico_patch4_32", "filtervit_pico", "dropoutvit_pico",
                                  "swin_pico_patch2_window4_32_fused", "structvit_tiny_4_2_video"])
def test_meta_device_macs_equal_real_tensor_macs(name: str) -> None:
    """The zoo counts on the meta device (shapes only); the count must be the one real tensors give."""
    torch.manual_seed(0)
    net = create_model(name)
    size = input_size(net.pretrained_cfg)
    real = count_macs(net, torch.randn(1, *size))
    meta = count_macs(create_model(name, device="meta"), torch.empty(1, *size, device="meta"))
    assert real == meta > 0
    assert math.isclose(measure(name).gmacs, real / 1e9, rel_tol=1e-12)


def test_measure_falls_back_to_real_tensors_without_a_meta_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_meta(net, inputs):  # noqa: ANN001, ANN202 - stands in for a model with a data-dependent op
        if inputs.is_meta:
            raise NotImplementedError("no meta kernel")
        return count_macs(net, inputs)

    expected = measure("vit_pico_patch4_32").gmacs
    monkeypatch.setattr(model.flops, "count_macs", no_meta)
    row = measure("vit_pico_patch4_32")
    assert not row.error and row.gmacs == expected
