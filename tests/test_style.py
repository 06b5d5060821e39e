"""Project rules that a reviewer would otherwise check by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["model", "pipeline", "data_prep", "vitpipe"]


def test_ruff_clean() -> None:
    """Lint, import order, Google docstrings and no print() outside tests/bench (pyproject's ruff rules)."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_modules_stay_small() -> None:
    long = [(str(p.relative_to(ROOT)), n) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 800]
    assert not long


def test_model_package_knows_nothing_of_distribution() -> None:
    banned = ("torch.distributed", "deepspeed", "accelerate", "mlflow")
    offenders = [(str(p.relative_to(ROOT)), b) for p in (ROOT / "model").rglob("*.py")
                 for b in banned if f"import {b}" in p.read_text() or f"from {b}" in p.read_text()]
    assert not offenders


def test_training_code_does_not_import_data_prep_internals() -> None:
    """pipeline/ reads datasets through data_prep.format only (tests/test_architecture.py checks every import)."""
    imports = [line.strip() for p in (ROOT / "pipeline").rglob("*.py") for line in p.read_text().splitlines()
               if line.lstrip().startswith(("from data_prep", "import data_prep"))]
    assert imports and all(i.startswith("from data_prep.format import ") for i in imports)
