"""`vitpipe viz masks` and the mask pictures callable from training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import create_model
from model.viz import render_pictures, why_no_pictures
from model.viz.filtervit import collect_filter_masks, render_filter_masks
from model.viz.panels import GAP, PANEL, font_size
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
    caption = int(font_size(PANEL) * 1.5)
    assert len(sheets) == 2 and sheets[0].size == (5 * PANEL + 4 * GAP, caption + PANEL)  # input + 2 × (score, top-K)


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
    assert top.shape == (int(font_size(PANEL) * 1.5) + PANEL, PANEL, 3)  # 32 px enlarged 8×, caption above
    crop = np.asarray(Image.open(out / "img0-masks.png"))[-PANEL:, :PANEL]  # the input panel of the sheet
    assert (crop[::8, ::8] == crop[7::8, 7::8]).all()  # nearest neighbour: one input pixel is an 8×8 block


def test_viz_masks_user_errors(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["viz", "masks", "none", str(photos)]) == 2
    assert main(["viz", "masks", "none", str(photos), "--model", "vit_nano_patch8_32"]) == 2
    assert "no filter blocks" in capsys.readouterr().err


@pytest.mark.parametrize("name, shape, grid", [
    ("structvit_tiny_4_1", (2, 3, 32, 32), (1, 2 + 4)),  # input, merged map, 4 detectors
    ("structvit_tiny_4_1_video", (2, 3, 4, 32, 32), (3, 2)),  # frame / merged / attention × 2 time positions
    ("structvit_tiny_4_1_video", (1, 2, 3, 8, 32, 32), (3, 4)),  # multi-view clips: the first view
    ("filtervit_pico", (2, 3, 32, 32), (1, 5)),
])
def test_pictures_are_panels_of_at_least_256_px(name: str, shape: tuple, grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    pictures = render_pictures(create_model(name, num_classes=3), torch.randn(*shape), (0.5,) * 3, (0.5,) * 3)
    rows, cols = grid
    panel = PANEL + int(font_size(PANEL) * 1.5)
    assert len(pictures) == shape[0]
    assert pictures[0].size == (cols * PANEL + (cols - 1) * GAP, rows * panel + (rows - 1) * GAP)
    assert pictures[0].mode == "RGB"


def test_models_without_pictures_say_why() -> None:
    assert "no model-specific visualisation" in why_no_pictures(create_model("vit_nano_patch8_32"))
    assert render_pictures(create_model("vit_nano_patch8_32"), torch.randn(1, 3, 32, 32), (0.5,) * 3, (0.5,) * 3) == []
    assert why_no_pictures(create_model("structvit_tiny_4_1_video")) == ""


def _logged_pictures(run) -> dict[str, list[tuple[int, str]]]:  # noqa: ANN001 - a tests.integration.conftest.Run
    """Key → [(step, artifact path)] of the full-size pictures the run logged for MLflow's image panel."""
    from mlflow.tracking import MlflowClient

    out: dict[str, list[tuple[int, str]]] = {}
    for artifact in MlflowClient(run.uri).list_artifacts(run.run_id, "images"):
        name = Path(artifact.path).name
        if name.endswith(".png"):  # beside each: a "+compressed.webp" thumbnail
            key, _, step, *_ = name.removesuffix(".png").split("+")
            out.setdefault(key.replace("~", "/"), []).append((int(step), artifact.path))
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("kind", ["image_structvit", "video_structvit", "filtervit"])
def test_pictures_are_logged_as_images_with_steps(picture_runs: dict, kind: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = picture_runs[kind]
    client = MlflowClient(run.uri)
    assert client.get_run(run.run_id).data.tags.get("mlflow.loggedImages", "").lower() == "true"
    pictures = _logged_pictures(run)
    assert list(pictures) == ["pictures/sample0"] and [s for s, _ in pictures["pictures/sample0"]] == [1, 2]
    assert not client.list_artifacts(run.run_id, "pictures")  # not plain artifacts any more
    for _, path in pictures["pictures/sample0"]:
        width, height = Image.open(client.download_artifacts(run.run_id, path, str(tmp_path))).size
        assert width >= 2 * PANEL and height >= PANEL, (kind, width, height)
