"""Shared fixtures: the digits data set sharded once per session, and CLI helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full digits data set as JPEG files, sharded by the real sharder (128 samples per shard)."""
    from vitpipe.demo import prepare_digits

    return prepare_digits(tmp_path_factory.mktemp("demo"))


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``python -m vitpipe ARGS`` and returns the completed process (text output captured)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vitpipe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
