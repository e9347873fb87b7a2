"""The package's floors (CONTRIBUTING.md, "Floors"): every module of gsae_pl/ sits on one,
and every import points down or sideways on its own floor, never up, and closes no circle.

Every import counts: at module level, inside a function, under TYPE_CHECKING, the package
`__init__` that importing a submodule runs first, and the modules a plug-in registry loads
when it is first looked up (`Registry(key, "gsae_pl.pkg")` imports every module of pkg).
The one edge left out of the circle check is a plug-in's import of its own package's base
module, whose registry loads it: that pair is how a plug-in registers itself.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gsae_pl"

# From the bottom up; a module takes the first floor one of whose patterns it matches.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("utilities", ("gsae_pl.errors", "gsae_pl.yaml_io", "gsae_pl.registry",
                   "gsae_pl.collectives", "gsae_pl.cli", "gsae_pl.io", "gsae_pl.writable",
                   "gsae_pl.names", "gsae_pl.processes", "gsae_pl.seeds", "gsae_pl.ranges",
                   "gsae_pl.cache_root", "gsae_pl.allocator", "gsae_pl.resample_schedule",
                   "gsae_pl.commands", "gsae_pl.progress_lines")),
    ("architectures", ("gsae_pl.saes", "gsae_pl.saes.*")),
    ("loss terms, activation sources", ("gsae_pl.losses", "gsae_pl.losses.*",
                                        "gsae_pl.data", "gsae_pl.data.*")),
    ("evaluations", ("gsae_pl.eval", "gsae_pl.eval.*")),
    ("config", ("gsae_pl.config_checks", "gsae_pl.config")),
    ("one training run", ("gsae_pl.run", "gsae_pl.run.*")),
    ("interop, suites, tools", ("gsae_pl.saelens", "gsae_pl.suite", "gsae_pl.suite.*",
                                "gsae_pl.target_l0", "gsae_pl.inspect_*")),
    ("entry points", ("gsae_pl", "gsae_pl.fit", "gsae_pl.ablate", "gsae_pl.report",
                      "gsae_pl.export", "gsae_pl.cache", "gsae_pl.inspect")),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def floor_of(module: str) -> int:
    for index, (_, patterns) in enumerate(FLOORS):
        if any(fnmatch(module, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in tests/test_layers.py "
                         "and to the table in CONTRIBUTING.md")


def _target(mods: dict, name: str) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def edges(mods: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(importer, imported, where) for every import between gsae_pl modules."""
    found = []
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            for target in _imported(mods, name, is_package, node):
                if target != name:
                    found.append((name, target, where))
            registry = _registry_package(node)
            if registry:  # the registry's first lookup imports every module of the package
                found += [(name, m, f"{where} (registry loads)") for m in mods
                          if m.startswith(registry + ".") and m != name]
        parent = name.rpartition(".")[0]
        while parent in mods and parent != "gsae_pl":  # a.b.c runs a.b's __init__ first
            found.append((name, parent, f"{path.relative_to(ROOT)} (package __init__)"))
            parent = parent.rpartition(".")[0]
    return found


def _imported(mods: dict, name: str, is_package: bool, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = name.split(".") if is_package else name.split(".")[:-1]
            parts = parts[:len(parts) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                 for alias in node.names]
    else:
        return []
    return [t for t in (_target(mods, n) for n in names if n.startswith("gsae_pl")) if t]


def _registry_package(node: ast.AST) -> str | None:
    if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Registry"
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
        return node.args[1].value
    return None


def _is_registration(importer: str, imported: str) -> bool:
    """A plug-in importing its own package's base module (whose registry loads it)."""
    package = importer.rpartition(".")[0]
    return imported == f"{package}.base"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_floor_and_no_import_points_up():
    mods = modules()
    floors = {name: floor_of(name) for name in mods}
    upward = [f"{where}: {a} (floor '{FLOORS[floors[a]][0]}') imports {b} (floor "
              f"'{FLOORS[floors[b]][0]}')" for a, b, where in edges(mods)
              if floors[b] > floors[a]]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges(modules()):
        if not _is_registration(a, b):
            graph.setdefault(a, set()).add(b)
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_deferred_type_checking_and_registry_imports(tmp_path):
    """The rules can fail: a deferred import, one under TYPE_CHECKING and a registry's
    dynamic load are all edges."""
    mods = {"gsae_pl.low": tmp_path / "low.py", "gsae_pl.high": tmp_path / "high.py",
            "gsae_pl.pkg": tmp_path / "pkg" / "__init__.py",
            "gsae_pl.pkg.base": tmp_path / "pkg" / "base.py",
            "gsae_pl.pkg.plugin": tmp_path / "pkg" / "plugin.py"}
    (tmp_path / "pkg").mkdir()
    mods["gsae_pl.low"].write_text("def f():\n    from gsae_pl.high import g\n")
    mods["gsae_pl.high"].write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                    "    from gsae_pl import low\n")
    mods["gsae_pl.pkg"].write_text("")
    mods["gsae_pl.pkg.base"].write_text("R = Registry('k', 'gsae_pl.pkg')\n")
    mods["gsae_pl.pkg.plugin"].write_text("from gsae_pl.pkg.base import R\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path.parent
    try:
        found = {(a, b) for a, b, _ in edges(mods)}
    finally:
        ROOT = saved
    assert {("gsae_pl.low", "gsae_pl.high"), ("gsae_pl.high", "gsae_pl.low"),
            ("gsae_pl.pkg.base", "gsae_pl.pkg.plugin"),
            ("gsae_pl.pkg.plugin", "gsae_pl.pkg.base"),
            ("gsae_pl.pkg.plugin", "gsae_pl.pkg")} <= found
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_loading_a_config_does_not_import_lightning():
    """`load_config` (and every check it runs) needs neither Lightning nor the training
    stack: a fresh interpreter loads every shipped config and looks."""
    code = ("import sys, glob\nfrom gsae_pl.config import load_config\n"
            "for path in sorted(glob.glob('configs/**/*.yaml', recursive=True)):\n"
            "    load_config(path)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning') or m.startswith('gsae_pl.run'))\n"
            "print(' '.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "", f"loading a config imported: {out}"
