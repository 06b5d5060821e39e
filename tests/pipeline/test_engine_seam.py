"""The engine seam: no module of ``pipeline`` but ``pipeline/engine.py`` decides on the backend or imports DeepSpeed.

The check reads each module's syntax tree: an import of ``deepspeed``, or the string ``"deepspeed"`` (or a
``"deepspeed.…"`` module path) anywhere in the code, is a backend decision made outside the seam. The one
exception is the config's declaration of the allowed values (``Literal["ddp", "deepspeed"]``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BACKEND = "deepspeed"
SEAM = ROOT / "pipeline" / "engine.py"


def _declared_values(tree: ast.AST) -> set[int]:
    """ids of the constants inside ``Literal[...]`` annotations (declarations, not decisions)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            name = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            if name == "Literal":
                ids.update(id(c) for c in ast.walk(node.slice) if isinstance(c, ast.Constant))
    return ids


def _is_backend(text: object) -> bool:
    return isinstance(text, str) and (text.lower() == BACKEND or text.startswith(BACKEND + "."))


def backend_uses(source: str, filename: str = "<code>") -> list[str]:
    """Where ``source`` imports DeepSpeed or names the backend as a value (``file:line: what``)."""
    tree = ast.parse(source, filename)
    declared = _declared_values(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{filename}:{node.lineno}: import {a.name}" for a in node.names if _is_backend(a.name)]
        elif isinstance(node, ast.ImportFrom) and _is_backend(node.module or ""):
            found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Constant) and _is_backend(node.value) and id(node) not in declared:
            found.append(f"{filename}:{node.lineno}: {node.value!r}")
    return found


def test_only_the_engine_knows_the_backend() -> None:
    modules = [p for p in sorted((ROOT / "pipeline").rglob("*.py")) if p != SEAM]
    assert len(modules) > 10
    found = [use for p in modules for use in backend_uses(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


def test_the_checker_sees_what_it_must() -> None:
    """No vacuous pass: comparisons, imports and module paths are found; the config's declaration is not."""
    assert backend_uses(SEAM.read_text())  # the seam itself names the backend
    code = '''
import deepspeed
from deepspeed.utils import zero_to_fp32
if cfg.backend == "deepspeed": pass
if backend in ("ddp", "deepspeed"): pass
cmd = ["-m", "deepspeed.checkpoint.ds_to_universal"]
match backend:
    case "deepspeed": pass
'''
    assert sorted(int(u.split(":")[1]) for u in backend_uses(code)) == [2, 3, 4, 5, 6, 8]
    assert backend_uses('backend: Literal["ddp", "deepspeed"] = "ddp"\n"""DeepSpeed ZeRO stages."""') == []
