"""``import model`` registers every architecture family by explicit imports and pulls in nothing heavy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Known names of every family, by the module that registers them.
FAMILIES = {
    "model.structvit": ["structvit_tiny_4_1", "structvit_s_4_1", "structvit_b_4_1_video", "structvit_deit_s_4_1"],
    "model.filtervit": ["filtervit_xs", "filtervit_xxs", "filtervit_s", "dropoutvit_xs", "filtervit_pico"],
    "model.swin": ["swin_tiny_patch4_window7_224_fused", "swin_large_patch4_window7_224_fused",
                   "swin_pico_patch2_window4_32_fused"],
    "model.deit": ["deit_tiny_patch16_224_fused", "deit_small_patch16_224_fused", "deit_base_patch16_224_fused",
                   "vit_base_patch16_224_fused", "deit_pico_patch4_32_fused"],
    "model.vit_tiny": ["vit_pico_patch4_32", "vit_nano_patch8_32"],
}
#: Top-level packages that ``import model`` must not load.
BANNED = ("matplotlib", "pipeline", "data_prep", "vitpipe", "deepspeed", "accelerate", "mlflow")

_PROBE = """
import json, sys
import model
from timm.models import model_entrypoint
names = set(model.list_models())
modules = sorted(m for m in sys.modules if m == "model" or m.startswith("model."))
entry = {n: model_entrypoint(n).__module__ for n in json.loads(sys.argv[1]) if n in names}
import model.viz
loaded = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"modules": modules, "entry": entry, "top": loaded}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    """What a fresh interpreter holds after ``import model`` (and, for ``top``, ``import model.viz``)."""
    names = [n for family in FAMILIES.values() for n in family]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_model_registers_every_family_without_the_zoo_or_heavy_packages(probe: dict) -> None:
    """In a fresh interpreter: every family's names are registered by their own module, and no zoo/matplotlib."""
    got = probe
    assert got["entry"] == {n: mod for mod, names in FAMILIES.items() for n in names}
    assert "model.zoo" not in got["modules"]
    assert not set(BANNED) & set(got["top"]), "import model / model.viz loaded: " + \
        ", ".join(sorted(set(BANNED) & set(got["top"])))


def test_every_registering_module_is_imported_explicitly(probe: dict) -> None:
    """Each module of model/ with ``@register_model`` is imported by ``model/__init__.py`` (not via zoo.py)."""
    registering = {f"model.{p.stem}" for p in (ROOT / "model").glob("*.py") if "@register_model" in p.read_text()}
    assert registering == set(FAMILIES)
    assert set(FAMILIES) <= set(probe["modules"])
