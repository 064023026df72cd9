"""The library's import graph: no circles, and no arrow from a lower layer to a higher one.

Every ``import`` / ``from ... import`` statement in ``mmfast/`` counts, wherever it stands: at the top
of a module, inside a function (a lazy import is still a dependency, and a circle through one is still a
circle), or under ``TYPE_CHECKING``. Strings are not imports: the command router (``mmfast.cli``), the
package's lazy name table (``mmfast.__init__``) and the patch table's rule files (``RULE_MODULES``) name
their targets as strings, and are checked below only for pointing at modules that exist.

Layers, lowest first; a module may import its own layer (without a circle) and the layers below:

    0  mmfast (the package root: ``__version__`` and a name table), utils
    1  ops, distributed, data
    2  nn, compat (drop-in surfaces of other libraries over ops)
    3  models (the systems, their shared pieces, the patch table and rules)
    4  eval, training (the engine and its recipes), bench, testing
    5  apps: cli, the demo orchestrator and each system's demo stage (``*.demo``), build tools

Inside models, the same rule over tiers: the shared pieces (KV cache, HF attention adapter, ``kind``, the
batched serving engine) < the patch table and its rules < clip < llava (its vision tower converts CLIP's)
< nextgpt (built on LLaVA) < chat (``mmfast chat`` over both).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mmfast"

LAYERS = {
    "": 0, "utils": 0,
    "ops": 1, "distributed": 1, "data": 1,
    "nn": 2, "compat": 2,
    "models": 3,
    "eval": 4, "training": 4, "bench": 4, "testing": 4,
    "cli": 5, "demo": 5,
}
APP = 5
# Build tools: scripts that write a committed file, run by hand; nothing in the library imports them.
TOOLS = {"mmfast.models.llava.tokenizer_tiny"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()
EXTENSIONS = {"mmfast._C"}  # compiled from csrc/ by setup.py (absent until built)


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path) -> set[str]:
    """The mmfast modules that ``mod`` imports (any statement, any depth)."""
    is_pkg = path.name == "__init__.py"
    base = mod if is_pkg else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                src = ".".join(parts + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            # ``from pkg import submodule`` depends on the submodule; ``from mod import name`` on mod.
            names = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
        else:
            continue
        for n in names:
            if n == "mmfast" or n.startswith("mmfast."):
                target = _resolve(n)
                if target and target != mod:
                    out.add(target)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _defined(mod: str) -> set[str]:
    """Names a module offers: top-level definitions and imports, and every string constant (lazy name tables)."""
    tree = ast.parse(MODULES[mod].read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    names |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return names


def _dangling() -> list[str]:
    """Imports of mmfast modules or names that do not exist (a moved module left behind in an import)."""
    bad = []
    for mod, path in MODULES.items():
        base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bad += [f"{mod}: import {a.name}" for a in node.names
                        if a.name.startswith("mmfast") and a.name not in MODULES]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    src = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                if not (src == "mmfast" or src.startswith("mmfast.")):
                    continue
                if src not in MODULES:
                    bad.append(f"{mod}: from {src} import ...")
                    continue
                bad += [f"{mod}: from {src} import {a.name}" for a in node.names
                        if a.name != "*" and f"{src}.{a.name}" not in MODULES.keys() | EXTENSIONS
                        and a.name not in _defined(src)]
    return bad


def layer(mod: str) -> int:
    parts = mod.split(".")
    if mod in TOOLS or parts[-1] == "demo" or parts[-1].startswith("demo_"):
        return APP
    top = parts[1] if len(parts) > 1 else ""
    if top not in LAYERS:
        raise AssertionError(f"{mod}: mmfast/{top} has no layer; add it to LAYERS in tests/test_layout.py")
    return LAYERS[top]


MODEL_TIERS = {"patch": 1, "clip": 2, "llava": 3, "nextgpt": 4, "chat": 5}  # anything else under models: 0


def model_tier(mod: str) -> int:
    parts = mod.split(".")
    return MODEL_TIERS.get(parts[2], 0) if len(parts) > 2 else 0


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    cycles = _cycles(GRAPH)
    detail = [" <-> ".join(c) + "\n    " + "\n    ".join(
        f"{a} -> {b}" for a in c for b in sorted(GRAPH[a]) if b in c) for c in cycles]
    assert not cycles, "import circles in mmfast/:\n" + "\n".join(detail)


def test_no_arrow_runs_up():
    up = [f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
          for a in sorted(GRAPH) for b in sorted(GRAPH[a]) if layer(b) > layer(a)]
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(up)


def test_models_tiers():
    inside = [m for m in GRAPH if m.startswith("mmfast.models.") and layer(m) == LAYERS["models"]]
    up = [f"{a} (tier {model_tier(a)}) -> {b} (tier {model_tier(b)})" for a in sorted(inside)
          for b in sorted(GRAPH[a]) if b in inside and model_tier(b) > model_tier(a)]
    assert not up, "inside mmfast/models, imports that run up the tiers:\n" + "\n".join(up)


def test_imports_point_at_modules_that_exist():
    bad = _dangling()
    assert not bad, "imports of mmfast modules or names that do not exist:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_the_graph_sees_lazy_imports():
    # A function-level import counts: the facade's generate() reaches the generation loop lazily.
    assert "mmfast.models.llava.generate" in GRAPH["mmfast.models.llava.model"]


@pytest.mark.parametrize("target", sorted(
    {t for t, _ in importlib.import_module("mmfast.cli").COMMANDS.values()}
    | set(importlib.import_module("mmfast")._LAZY.values())
    | set(importlib.import_module("mmfast.models.patch").RULE_MODULES)))
def test_string_targets_exist(target):
    mod, _, attr = target.partition(":")
    assert mod in MODULES, f"{target}: no module {mod}"
    if attr:
        tree = ast.parse(MODULES[mod].read_text())
        names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        names |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        assert attr in names, f"{target}: {mod} defines no {attr}"
    assert importlib.util.find_spec(mod) is not None
