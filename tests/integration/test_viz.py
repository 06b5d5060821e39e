"""`vitpipe viz masks` and the mask pictures callable from training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import create_model
from model.viz.filtervit import collect_filter_masks, render_filter_masks
from pipeline.checkpoint import export_weights
from pipeline.config import JobCfg, ModelCfg
from pipeline.config_io import dump_toml
from vitpipe.cli import main


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (32, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_masks_have_k_pixels_and_scores_per_filter_block() -> None:
    net = create_model("filtervit_pico")
    masks = collect_filter_masks(net, torch.randn(3, 3, 32, 32))
    assert [m.layer for m in masks] == [0, 1]
    for m in masks:
        assert m.selected.shape == (3, 7, 7) and (m.selected.flatten(1).sum(1) == 8).all()
        assert m.scores.shape == (3, 7, 7) and m.scores.min() > 0.4576
    assert all(layer.record is False for layer in net.filter_layers()) and net.training
    sheets = render_filter_masks(net, torch.randn(2, 3, 32, 32))
    assert len(sheets) == 2 and sheets[0].size == (5 * 32 + 4 * 4, 32)  # input + 2 × (score, top-K)


def test_viz_masks_command_random_weights(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["viz", "masks", "none", str(photos), "--model", "dropoutvit_pico", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"img{i}-{s}.png" for i in (0, 1) for s in ("masks", "L0-7-top8", "L1-7-top8"))


def test_viz_masks_command_from_a_run_directory(photos: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(JobCfg(model=ModelCfg(name="filtervit_pico", num_classes=3))))
    export_weights(create_model("filtervit_pico", num_classes=3).state_dict(), run / "final" / "model.safetensors")
    out = tmp_path / "out"
    assert main(["viz", "masks", str(run), str(photos), "--out", str(out), "--limit", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"img0-{s}.png" for s in ("masks", "L0-7-score", "L0-7-top8", "L1-7-score", "L1-7-top8"))
    top = np.asarray(Image.open(out / "img0-L0-7-top8.png"))
    assert top.shape == (32, 32, 3)


def test_viz_masks_user_errors(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["viz", "masks", "none", str(photos)]) == 2
    assert main(["viz", "masks", "none", str(photos), "--model", "vit_nano_patch8_32"]) == 2
    assert "no filter blocks" in capsys.readouterr().err
