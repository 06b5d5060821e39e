"""What every part of ``bench/gpu.sh`` shares: its context, its result file, skip reasons, the sizes.

A part runs in its own process (``bench/gpu/part.py NAME``). It reads the run's context (``ctx.json``:
smoke or not, the work directory, the results of the parts before it) and writes its :class:`Result`
atomically after every figure, so that a part killed at its time box still leaves what it measured.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

PIP_NAMES = {"nvidia.dali": "nvidia-dali", "av": "av (PyAV)", "webdataset": "webdataset", "deepspeed": "deepspeed",
             "pytest": "pytest", "timm": "timm", "accelerate": "accelerate", "torch": "torch"}

# Sizes of the full (device) run and of the CPU smoke run. The device figures are sized so that each
# part ends well inside its time box on one H100/H200 with 16 cores (see run.py PARTS).
SIZES: dict[str, dict[str, Any]] = {
    "device": dict(images=5000, classes=50, shard_size=250, jpeg_quality=95, clips=32, clip_frames=96,
                   img_size=224, batch=128, seconds=6.0, rounds=2, warmup=4,
                   clip_size=224, frames=16, stride=4, video_batch=4, video_seconds=5.0,
                   structsa=["--device", "cuda", "--dtype", "bf16", "--cases", "image,video", "--frames", "8",
                             "--warmup", "2", "--repeat", "5", "--max-literal-gb", "40"],
                   models=[("swin_tiny_patch4_window7_224_fused", 224), ("vit_base_patch16_224_fused", 224),
                           ("structvit_s_4_1", 224), ("filtervit_xs", 224)],
                   model_batch=128, model_warmup=3, model_iters=10,
                   train_model="vit_base_patch16_224_fused", train_size=224, train_batch=128, train_steps=50,
                   log_every=10, engine_batch=64, engine_steps=30),
    "smoke": dict(images=24, classes=4, shard_size=8, jpeg_quality=95, clips=4, clip_frames=16,
                  img_size=64, batch=8, seconds=0.5, rounds=1, warmup=1,
                  clip_size=64, frames=4, stride=2, video_batch=2, video_seconds=0.5,
                  structsa=["--device", "cpu", "--dtype", "fp32", "--cases", "image", "--paths", "fused", "--warmup",
                            "0", "--repeat", "1"],
                  models=[("vit_pico_patch4_32", 32)], model_batch=8, model_warmup=1, model_iters=2,
                  train_model="vit_pico_patch4_32", train_size=32, train_batch=8, train_steps=4,
                  log_every=2, engine_batch=8, engine_steps=4),
}

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "GH200": 989.0}
"""Peak dense bf16 TFLOP/s by device name (NVIDIA datasheets: H100 SXM / H200 989, A100 312)."""


def peak_tflops(device_name: str) -> float:
    """The peak dense bf16 TFLOP/s of a device named ``device_name`` (0 when unknown, e.g. a CPU)."""
    for key, value in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in device_name:
            return value
    return 0.0


def missing(*modules: str) -> str | None:
    """``"skipped: <package> not installed"`` for the first module that cannot be imported, else None."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"skipped: {PIP_NAMES.get(name, name)} not installed"
    return None


def load_bench(name: str) -> ModuleType:
    """Imports ``bench/<name>.py`` (the existing benchmark scripts are the parts' implementations)."""
    key = f"bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as JSON through a temporary file and a rename (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


class Result:
    """The result file of one part: tables of figures, notes, data for later parts and a final status."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.obj: dict[str, Any] = {"status": "running", "tables": [], "notes": [], "data": {}}
        self.t0 = time.perf_counter()
        self.flush()

    def table(self, title: str, columns: list[str]) -> list[list[Any]]:
        """Adds a table and returns its row list (append rows, then :meth:`flush`)."""
        rows: list[list[Any]] = []
        self.obj["tables"].append({"title": title, "columns": columns, "rows": rows})
        return rows

    def note(self, text: str) -> None:
        """Adds a line printed under the part's tables."""
        self.obj["notes"].append(text)
        print(text, flush=True)
        self.flush()

    def flush(self) -> None:
        """Writes what the part has so far."""
        self.obj["seconds"] = round(time.perf_counter() - self.t0, 1)
        write_json(self.path, self.obj)

    def finish(self, status: str = "ok") -> None:
        """Sets the final status and writes the file."""
        self.obj["status"] = status
        self.flush()


def load_ctx(path: Path) -> dict[str, Any]:
    """The run's context, with ``sizes`` resolved for smoke or device."""
    ctx = json.loads(path.read_text())
    ctx["sizes"] = SIZES["smoke" if ctx["smoke"] else "device"]
    return ctx


def earlier(ctx: dict[str, Any], part: str) -> dict[str, Any] | None:
    """The result of an earlier part of this run (None if it has not run)."""
    path = Path(ctx["results_dir"]) / f"{part}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value: float | None, digits: int = 1) -> str:
    """A figure for a table: thousands separators, ``–`` for missing or NaN."""
    if value is None or value != value:
        return "–"
    return f"{value:,.{digits}f}"
