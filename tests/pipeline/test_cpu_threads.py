"""CPU training threads: what is left per process after the loader workers, unless the launcher decided."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from pipeline.trainer import _set_cpu_threads


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch: pytest.MonkeyPatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    yield
    torch.set_num_threads(before)


def test_auto_leaves_the_loader_workers_their_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    _set_cpu_threads(0, 4, SimpleNamespace(num_processes=2))
    assert torch.get_num_threads() == 16 // 2 - 4
    _set_cpu_threads(0, 12, SimpleNamespace(num_processes=1))
    assert torch.get_num_threads() == 4
    _set_cpu_threads(0, 40, SimpleNamespace(num_processes=1))
    assert torch.get_num_threads() == 1  # never below one


def test_explicit_value_and_launcher_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_cpu_threads(3, 1, SimpleNamespace(num_processes=1))
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _set_cpu_threads(0, 1, SimpleNamespace(num_processes=1))
    assert torch.get_num_threads() == 3  # torchrun / the user set OMP_NUM_THREADS: left alone
