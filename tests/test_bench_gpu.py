"""bench/gpu.sh: the smoke run on the CPU lists every part with a status, the CPU parts produce figures,
and a part that hangs is stopped at its time box with what it wrote kept."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_PARTS = ("env", "data", "structsa", "models", "loader_images", "loader_video", "train_loader")


@pytest.fixture(scope="module")
def gpu_run():
    spec = importlib.util.spec_from_file_location("bench_gpu_run", ROOT / "bench" / "gpu" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path, float]:
    out = tmp_path_factory.mktemp("gpu-results")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHON": sys.executable})
    return proc, out, time.perf_counter() - t0


def test_smoke_lists_every_part_with_figures(smoke, gpu_run) -> None:
    proc, out, wall = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wall < 180, f"the smoke run took {wall:.0f} s (CI allows it under 3 minutes)"
    assert "time boxes" in proc.stdout and "total" in proc.stdout  # the per-part budget, printed first
    (md,) = out.glob("gpu-cpu-smoke-*.md")
    run = json.loads(md.with_suffix(".json").read_text())
    parts = {p["name"]: p for p in run["parts"]}
    assert list(parts) == [p.name for p in gpu_run.PARTS]
    text = md.read_text()
    for name, part in parts.items():
        assert part["status"] and f"| {name} |" in text
        expected_gpu_only = next(p.gpu_only for p in gpu_run.PARTS if p.name == name)
        assert part["status"] == ("skipped: no CUDA device" if expected_gpu_only else "ok"), (name, part)
    for name in CPU_PARTS:  # each CPU part produced at least one row of numbers
        rows = [r for t in parts[name]["tables"] for r in t["rows"]]
        assert any(any(any(ch.isdigit() for ch in str(c)) for c in r[1:]) for r in rows), (name, rows)
    images = parts["loader_images"]["tables"][0]["rows"]
    assert float(images[0][1].replace(",", "")) > 0  # wds images/s
    assert sum("skipped: no CUDA device" in " ".join(map(str, r)) for r in images) == 3  # the DALI GPU rows
    assert parts["data"]["data"]["kb"] > 60  # ImageNet-like JPEG sizes (≈ 110 KB at q95)
    assert md.with_suffix(".log").is_file()


def test_budget_fits_eight_minutes(gpu_run, capsys) -> None:
    assert sum(p.budget for p in gpu_run.PARTS) <= gpu_run.TOTAL_S == 480
    assert gpu_run.main(["--list"]) == 0
    assert str(sum(p.budget for p in gpu_run.PARTS)) in capsys.readouterr().out


def test_a_hanging_part_is_stopped_and_keeps_its_figures(gpu_run, tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    code = (f"import json, time; open({str(result)!r}, 'w').write(json.dumps({{'status': 'running', "
            "'tables': [{'title': 't', 'columns': ['a'], 'rows': [[1]]}], 'notes': [], 'data': {}})); "
            "print('working', flush=True); time.sleep(60)")
    t0 = time.perf_counter()
    res = gpu_run.run_part([sys.executable, "-c", code], result, tmp_path / "log", 3, {})
    assert time.perf_counter() - t0 < 20
    assert res["status"].startswith("timeout") and res["tables"][0]["rows"] == [[1]]
    assert "working" in res["notes"]
    crashed = gpu_run.run_part([sys.executable, "-c", "raise SystemExit('boom')"], tmp_path / "none.json",
                               tmp_path / "log2", 10, {})
    assert crashed["status"].startswith("failed: exit 1") and "boom" in crashed["status"]
