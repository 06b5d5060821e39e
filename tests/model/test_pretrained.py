"""Initialising from local weights: strict, fine-tuning with a new classifier, image → video inflation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.factory import create_model
from model.pretrained import load_pretrained


def _save(net: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_strict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("vit_pico_patch4_32", num_classes=10)
    torch.manual_seed(1)
    target = create_model("vit_pico_patch4_32", num_classes=10)
    assert load_pretrained(target, _save(source, tmp_path / "w.safetensors"), "strict") == []
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(source.eval()(x), target.eval()(x))


def test_finetune_keeps_a_fresh_classifier_and_strict_refuses(tmp_path: Path) -> None:
    path = _save(create_model("vit_pico_patch4_32", num_classes=10), tmp_path / "w.safetensors")
    target = create_model("vit_pico_patch4_32", num_classes=4)
    with pytest.raises(ValueError, match=r"head.weight: \(10, .*\) in the file"):
        load_pretrained(target, path, "strict")
    assert sorted(load_pretrained(target, path, "finetune")) == ["head.bias", "head.weight"]
    with pytest.raises(ValueError, match="does not fit"):  # another architecture: named, not a deep crash
        load_pretrained(create_model("vit_nano_patch8_32", num_classes=10), path, "auto")


def test_image_to_video_inflation_reproduces_the_image_on_a_still_clip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    image = create_model("structvit_tiny_4_1", num_classes=10).eval()
    path = _save(image, tmp_path / "image.safetensors")
    video = create_model("structvit_tiny_4_1_video", num_classes=10).eval()
    with pytest.raises(ValueError, match="in the file"):
        load_pretrained(video, path, "finetune")  # 2-D kernels need inflation
    assert load_pretrained(video, path, "auto") == []
    frame = torch.randn(1, 3, 32, 32)
    clip = frame[:, :, None].expand(1, 3, 8, 32, 32)
    # a still clip gives the image's features away from the temporal borders: close, not bit-equal
    torch.testing.assert_close(video(clip), image(frame), rtol=0.1, atol=0.1)


def test_trainer_starts_from_a_previous_run(digits_shards: Path, tmp_path: Path) -> None:
    """``model.init_from`` with a new class count: the backbone comes from the file, the head is fresh."""
    from tests.conftest import run_cli

    torch.manual_seed(0)
    path = _save(create_model("vit_nano_patch8_32", num_classes=7, img_size=32), tmp_path / "w.safetensors")
    proc = run_cli("train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", f"--data.path={digits_shards}",
                   f"--run.output_dir={tmp_path}", "--run.name=ft", f"--model.init_from='{path}'",
                   "--schedule.max_steps=1", "--data.num_workers=0", "--tracking.enabled=false", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 fresh (head.weight, head.bias)" in proc.stderr
    bad = run_cli("train", "jobs/demo/vitnano_digits_cls_cpu_quick.toml", f"--data.path={digits_shards}",
                  f"--run.output_dir={tmp_path}", "--run.name=bad", "--model.init_from='nowhere.safetensors'")
    assert bad.returncode == 2 and "model.init_from" in bad.stderr and "Traceback" not in bad.stderr
