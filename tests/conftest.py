"""Shared fixtures: the digits data set and tiny video data sets sharded once per session, CLI helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 24


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full digits data set as JPEG files, sharded by the real sharder (128 samples per shard)."""
    from vitpipe.demo import prepare_digits

    return prepare_digits(tmp_path_factory.mktemp("demo"))


def _make_video(path: Path, label: int) -> None:
    """24 frames at 24 fps, 64×48; frame i has grey level 8·i (plus the label in the blue channel)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(FRAMES):
            arr = np.full((48, 64, 3), 8 * i, np.uint8)
            arr[..., 2] = 100 * label
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="session")
def video_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 8 train + 4 val clips prepared by `vitpipe prep videolist` in each stored format."""
    from vitpipe.prep import main as prep_main

    src = tmp_path_factory.mktemp("videos")
    lists = {"train": [], "val": []}
    for split, count in (("train", 8), ("val", 4)):
        for i in range(count):
            name = f"{split}{i}.mp4"
            _make_video(src / name, i % 2)
            lists[split].append(f"{name} {i % 2}")
    for split, rows in lists.items():
        (src / f"{split}.txt").write_text("\n".join(rows) + "\n")
    out = {}
    for codec in ("h264", "vp9", "jpeg"):
        dest = tmp_path_factory.mktemp(codec)
        assert prep_main(["prep", "videolist", "--list", f"train={src / 'train.txt'}", "--list",
                          f"val={src / 'val.txt'}", "--root", str(src), "--out", str(dest), "--codec", codec,
                          "--fps", "24", "--short-side", "48", "--keyint", "6", "--shard-size", "2",
                          "--workers", "1"]) == 0
        out[codec] = dest
    return out


def shifted_difference(a, b) -> float:  # noqa: ANN001 - tensors; torch is imported by the callers
    """Mean |a − b| over the image interior, b allowed a one-pixel shift per axis: centre-crop offsets of
    x.5 round differently in torchvision (to even) and DALI (up)."""
    inner = a[..., 1:-1, 1:-1]
    return min((inner - b[..., 1 + dy:b.shape[-2] - 1 + dy, 1 + dx:b.shape[-1] - 1 + dx]).abs().mean().item()
               for dy in (-1, 0) for dx in (-1, 0))


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``python -m vitpipe ARGS`` and returns the completed process (text output captured)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vitpipe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
