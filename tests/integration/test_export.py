"""Self-describing exports: loaded by `model.export_load.load_export` and by timm's own call, and registered."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from model.export_load import ExportFormatError, load_export, read_export_info
from pipeline.build import build_model
from pipeline.config_io import load_config
from pipeline.engine import checkpoint_weights
from pipeline.export import export_run

CASES = [("video_structvit", "structvit_tiny_4_1_video", 2, (2, 3, 4, 32, 32)),
         ("filtervit", "filtervit_pico", 7, (2, 3, 32, 32))]


def _trained(run_dir: Path) -> torch.nn.Module:
    """The trained model, rebuilt from the run's last checkpoint (not from the export)."""
    ckpts = run_dir / "checkpoints"
    net = build_model(load_config(run_dir / "config.toml"))
    net.load_state_dict(checkpoint_weights(ckpts / (ckpts / "latest").read_text().strip()))
    return net.eval()


@pytest.mark.parametrize("kind, name, classes, shape", CASES)
def test_export_describes_itself_and_loads_two_ways(picture_runs: dict, kind: str, name: str, classes: int,
                                                    shape: tuple) -> None:
    path = picture_runs[kind].run_dir / "final" / "model.safetensors"
    info = read_export_info(path)
    assert (info["model"], info["num_classes"], info["input_size"]) == (name, classes, [3, 32, 32])
    assert info["mean"] == info["std"] == [0.5, 0.5, 0.5] and info["recipe"] == "vitnano_digits_cls_cpu_quick"
    assert len(info["code_version"]) >= 40 and "[model]" in info["config"]
    assert info.get("num_frames") == (4 if "video" in name else None)
    assert info["interpolation"] == ("bilinear" if "video" in name else "bicubic")
    x = torch.randn(*shape)
    with torch.no_grad():
        want = _trained(picture_runs[kind].run_dir)(x)
        net, cfg = load_export(path)  # the documented call
        assert not net.training and cfg["num_classes"] == classes and cfg["input_size"] == (3, 32, 32)
        assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5) and cfg.get("num_frames") == info.get("num_frames")
        torch.testing.assert_close(net(x), want, rtol=0, atol=0)
        # the spelled-out timm call of README.md / docs/models.md
        spelled = timm.create_model(name, pretrained=True, num_classes=classes, img_size=32,
                                    pretrained_cfg_overlay=dict(file=str(path), num_classes=classes,
                                                                input_size=(3, 32, 32), mean=(0.5,) * 3,
                                                                std=(0.5,) * 3)).eval()
        torch.testing.assert_close(spelled(x), want, rtol=0, atol=0)


def test_vitpipe_export_writes_the_same_facts(picture_runs: dict, tmp_path: Path) -> None:
    run_dir = picture_runs["filtervit"].run_dir
    out = export_run(run_dir, "latest", str(tmp_path / "again.safetensors"))
    final = read_export_info(run_dir / "final" / "model.safetensors")
    assert read_export_info(out) == final and final["label_names"] == [f"class{c}" for c in range(7)]


def test_registered_model_version_with_the_export_facts(picture_runs: dict) -> None:
    run = picture_runs["filtervit"]
    client = MlflowClient(run.uri, registry_uri=run.uri)
    (version,) = client.search_model_versions("name = 'vitpipe-demo-filtervit_pico'")
    assert version.run_id == run.run_id and version.source == f"runs:/{run.run_id}/checkpoint/model.safetensors"
    tags = version.tags
    assert (tags["vitpipe.model"], tags["vitpipe.num_classes"], tags["vitpipe.input_size"]) == \
        ("filtervit_pico", "7", "3x32x32")
    assert tags["vitpipe.mean"] == tags["vitpipe.std"] == "0.5,0.5,0.5" and tags["vitpipe.interpolation"] == "bicubic"
    assert tags["vitpipe.recipe"] == "vitnano_digits_cls_cpu_quick" and len(tags["vitpipe.code_version"]) >= 40
    video = picture_runs["video_structvit"]  # tracking.register_model is off by default
    assert not MlflowClient(video.uri, registry_uri=video.uri).search_registered_models()


def test_a_file_without_metadata_is_refused_in_one_line(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ExportFormatError, match="no vitpipe metadata .* re-export it with `vitpipe export"):
        read_export_info(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExportFormatError, match="is not a safetensors file"):
        load_export(tmp_path / "junk.safetensors")
