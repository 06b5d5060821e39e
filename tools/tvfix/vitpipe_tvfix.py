"""Make the CUDA-built PyPI torchvision importable on a CPU-only torch.

PyPI's torchvision 0.28 (the match for torch 2.13) is a CUDA build. On a ``+cpu`` torch its
compiled ops do not load, yet ``import torchvision`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` and fails because those operators do not exist.
``import timm`` fails with it.

This module is install tooling, not model code. ``tools/setup_env.sh`` copies it into the
environment's site-packages together with ``vitpipe_tvfix.pth``, which calls :func:`install`
at interpreter start. :func:`install` only adds a meta-path hook; the work runs on the first
``import torchvision`` and the hook then removes itself, so plain ``python`` starts at normal
speed and children started by ``torchrun``, ``deepspeed`` or ``srun`` are covered too.

The fix is idempotent and a no-op where torchvision's own ops load (a CUDA machine, a real CPU
torchvision): it only defines operator *schemas* that are missing. The ops stay unavailable.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# Keeps the torch.library.Library alive: if it is garbage-collected its definitions vanish.
_LIBRARIES: list = []

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _torchvision_ops_load(spec) -> bool:
    """Tries to load torchvision's compiled ``_C`` extension without importing torchvision."""
    import torch

    locations = spec.submodule_search_locations or []
    for folder in locations:
        for lib in sorted(Path(folder).glob("_C*.so")):
            try:
                torch.ops.load_library(str(lib))
                return True
            except (OSError, RuntimeError):
                return False
    return False


def define_missing_schemas() -> list[str]:
    """Defines the torchvision operator schemas that are not registered yet.

    Returns:
        The names of the operators that were defined (empty when nothing was missing).
    """
    import torch

    missing = []
    for name in _SCHEMAS:
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        except RuntimeError:
            missing.append(name)
    if missing:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            lib.define(_SCHEMAS[name])
        _LIBRARIES.append(lib)
    return missing


def fix_now() -> None:
    """Runs the fix immediately (before torchvision is imported)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _torchvision_ops_load(spec):
        return
    define_missing_schemas()


class _Hook(importlib.abc.MetaPathFinder):
    """Meta-path hook that runs :func:`fix_now` on the first ``import torchvision``."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if fullname != "torchvision":
            return None
        uninstall()
        try:
            fix_now()
        except Exception:  # noqa: BLE001 - never break the import itself
            pass
        return None  # let the normal finders import torchvision


def uninstall() -> None:
    """Removes the import hook."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Hook)]


def install() -> None:
    """Adds the import hook unless torchvision is already imported or the hook is present."""
    if "torchvision" in sys.modules or any(isinstance(f, _Hook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Hook())
