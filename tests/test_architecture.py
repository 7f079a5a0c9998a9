"""Imports point one way (DESIGN §8): no cycle, and the pure layers stay pure.

Every module of the package is parsed (``ast``); its imports -- at module level
and inside functions -- give the graph. The test fails on

* a cycle between modules, or between the package's top-level parts (``loop/``,
  ``engine/``, ``config.py``, ...: an import from a lower part back up);
* ``clipscope.math``, ``clipscope.clipping`` or ``clipscope.report`` reaching,
  through any chain of imports, the engine, or a module that imports or uses
  ``torch.nn``, ``torch.autograd`` or ``torch.func`` (or calls ``.backward``).

Lazy loads by name (``importlib.import_module`` in ``clipscope/__init__`` and the
CLI's command lookup) are not imports of the module that names them: they run
only when that name is used.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "clipscope"
PURE = ("clipscope.math", "clipscope.clipping", "clipscope.report")
FORBIDDEN_MODULES = ("clipscope.engine",)
FORBIDDEN_TORCH = ("torch.nn", "torch.autograd", "torch.func")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def parsed(module: str) -> tuple[frozenset[str], frozenset[str], tuple[str, ...]]:
    """``(clipscope modules imported, other modules imported, forbidden torch uses)``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    ours, theirs, torch_uses = set(), set(), []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # `from p import m`: the module p.m, else p
            base = _resolve(node, module, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.append(sub if sub in MODULES or base.split(".")[0] != PACKAGE else base)
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted and any(dotted.startswith(f) for f in FORBIDDEN_TORCH):
                torch_uses.append(f"{dotted} (line {node.lineno})")
            if node.attr == "backward":
                torch_uses.append(f".backward (line {node.lineno})")
            continue
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                if name in MODULES:
                    ours.add(name)
            else:
                theirs.add(name)
                if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_TORCH):
                    torch_uses.append(f"import {name} (line {node.lineno})")
    ours.discard(module)
    return frozenset(ours), frozenset(theirs), tuple(torch_uses)


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _parents(module: str) -> list[str]:
    """Return the packages whose ``__init__`` runs when ``module`` is imported."""
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def closure(module: str) -> set[str]:
    """Every clipscope module that importing ``module`` can import (parents' ``__init__`` too)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [p for p in _parents(name) if p in MODULES]
        todo += list(parsed(name)[0])
    return seen


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_every_module_parses_and_the_walk_sees_imports():
    assert "clipscope.loop.fit" in MODULES and "clipscope.math.stats" in MODULES
    assert "clipscope.engine.probe" in parsed("clipscope.smoothness")[0] | closure(
        "clipscope.smoothness"
    )
    assert "torch" in parsed("clipscope.clipping")[1]
    # imports inside functions count (the walker is not fooled by laziness)
    assert "clipscope.tasks" in parsed("clipscope.reproduce")[0]


def test_no_cycle_between_modules():
    graph = {m: set(parsed(m)[0]) for m in MODULES}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_between_the_packages_parts():
    """No arrow back up: the top-level parts (files and folders) form a DAG."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        graph.setdefault(_room(module), set()).update(
            _room(t) for t in parsed(module)[0] if _room(t) != _room(module)
        )
    cycle = _find_cycle(graph)
    assert cycle is None, "parts import each other: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "module", [m for m in MODULES if any(m == p or m.startswith(p + ".") for p in PURE)]
)
def test_pure_layers_reach_neither_the_engine_nor_autograd(module):
    reached = closure(module)
    engine = sorted(m for m in reached if any(m.startswith(f) for f in FORBIDDEN_MODULES))
    assert not engine, f"{module} reaches the engine through {engine}"
    uses = {m: parsed(m)[2] for m in reached if parsed(m)[2]}
    assert not uses, f"{module} reaches torch.nn/autograd code: {uses}"


def test_the_checks_can_fail():
    """The walker flags what it must (so a green run means something)."""
    assert closure("clipscope.loop.fit") & {"clipscope.engine.probe"}
    assert parsed("clipscope.engine.hvp")[2]  # it calls torch.autograd
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


# -- optional frameworks: each behind its own extra ----------------------------------------

#: framework (imported module prefix) -> the one module allowed to import it (its extra)
OPTIONAL = {
    "lightning": "clipscope.loop.integrations.lightning",
    "pytorch_lightning": "clipscope.loop.integrations.lightning",
    "transformers": "clipscope.loop.integrations.hf",
    "accelerate": "clipscope.loop.integrations.hf",
    "tensorboard": "clipscope.loop.integrations.tensorboard",
    "torch.utils.tensorboard": "clipscope.loop.integrations.tensorboard",
}
INTEGRATIONS = "clipscope.loop.integrations"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_optional_frameworks_are_imported_by_their_integration_module_only(module):
    for name in parsed(module)[1]:
        for framework, owner in OPTIONAL.items():
            if name == framework or name.startswith(framework + "."):
                assert module == owner, f"{module} imports {name} (extra of {owner})"
    if not module.startswith(INTEGRATIONS):
        reached = [m for m in parsed(module)[0] if m.startswith(INTEGRATIONS + ".")]
        assert not reached, f"{module} imports {reached}: integrations are imported by users only"


def test_import_clipscope_loads_no_optional_framework():
    import subprocess
    import sys

    code = (
        "import sys, clipscope, clipscope.loop; clipscope.Monitor; clipscope.fit\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'transformers', 'accelerate', 'tensorboard')"
        " or m.startswith('torch.utils.tensorboard')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert set(OPTIONAL.values()) <= set(MODULES)  # the owners exist (the check can fail)
