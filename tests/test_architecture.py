"""The import rules of the layout (docs/architecture.md), checked on the code's own import statements.

* no import cycle between modules of the project (function-level imports count too);
* ``model`` imports nothing of ours outside ``model`` and nothing distributed or tracking-related;
* ``pipeline`` reads data sets through ``data_prep.format`` only;
* no library package (``model``, ``pipeline``, ``data_prep``) imports the command line ``vitpipe``;
* importing the trainer and both loaders loads no ``data_prep`` module but the format module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "pipeline", "data_prep", "vitpipe")
LIBRARIES = ("model", "pipeline", "data_prep")
MODEL_FORBIDDEN = ("pipeline", "data_prep", "vitpipe", "torch.distributed", "deepspeed", "accelerate", "mlflow")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports (anywhere in the file), resolved to the most specific known module."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _ours(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph restricted to project modules, without a module's edge to its own package."""
    return {m: {t for t in targets if t in graph and t != m and not m.startswith(t + ".")}
            for m, targets in graph.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _violations(graph: dict[str, set[str]], source: str, rule) -> list[str]:  # noqa: ANN001
    return sorted(f"{m} imports {t}" for m, targets in graph.items() if m.split(".")[0] == source
                  for t in targets if rule(t))


def test_no_import_cycles() -> None:
    cycle = _find_cycle(_ours(_graph()))
    assert cycle is None, " -> ".join(cycle or [])


def test_model_imports_nothing_of_ours_or_distributed() -> None:
    bad = _violations(_graph(), "model", lambda t: any(t == f or t.startswith(f + ".") for f in MODEL_FORBIDDEN))
    assert bad == []


def test_pipeline_reads_data_prep_only_through_the_format_module() -> None:
    bad = _violations(_graph(), "pipeline",
                      lambda t: t.split(".")[0] == "data_prep" and t not in ("data_prep", "data_prep.format"))
    assert bad == []


def test_no_library_imports_the_command_line() -> None:
    bad = [v for lib in LIBRARIES for v in _violations(_graph(), lib, lambda t: t.split(".")[0] == "vitpipe")]
    assert bad == []


def test_the_checker_sees_what_it_must() -> None:
    """The rules above would fail on a cycle, a forbidden import and a relative import (no vacuous pass)."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    graph = _graph()
    assert "pipeline.data.shards" in graph["pipeline.data.wds"]
    assert "data_prep.format" in graph["pipeline.data.shards"]
    assert "torch" in graph["model.structvit"] and "model.registry" in graph["model.structvit"]


def test_training_loads_only_the_format_module_of_data_prep() -> None:
    code = ("import sys, pipeline.trainer, pipeline.data.wds, pipeline.data.dali, pipeline.data.loaders; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'data_prep')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert set(out.split()) == {"data_prep", "data_prep.format"}
