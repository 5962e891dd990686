"""Layering rule of docs/ARCHITECTURE.md ("Layers and the layering test"), checked on the source.

Every module under ``celltune/`` is parsed with :mod:`ast` (imports inside functions and
under ``TYPE_CHECKING`` count too) and mapped to a layer. Two rules:

(a) a module imports only from its own layer or layers to its left::

        errors, files → data → model → losses → train → tasks → eval, analysis → report → cli

    ``eval`` and ``analysis`` share a rank (they compute; either may use the other);
    ``report`` draws and writes, so it may import ``eval`` and ``analysis`` but not the
    other way round. The package ``celltune/__init__.py`` is the public API and may
    re-export from any layer; ``celltune/__main__.py`` is an entry point (rank of ``cli``).

(b) no import cycles between modules (strongly connected components of the module graph).

The checker is written to work on any package directory so that the last tests can show it
catches an upward import and a loop in a small synthetic package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "celltune"

#: first component below the package -> rank (left = low); same rank = peers
LAYERS: dict[str, int] = {
    "errors": 0,
    "files": 0,
    "data": 1,
    "model": 2,
    "losses": 3,
    "train": 4,
    "tasks": 5,
    "eval": 6,
    "analysis": 6,
    "report": 7,
    "cli": 8,
    "__main__": 8,
}
#: modules allowed to import from every layer (public API re-exports)
ANY_LAYER = ("__init__",)


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (the most specific module that exists)
    line: int


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package directory)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def collect_imports(root: Path, package: str) -> tuple[dict[str, Path], list[Import]]:
    """All package-internal imports of every module under ``root``."""
    modules = module_names(root, package)
    found: list[Import] = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join([*base, node.module] if node.module else base)
                else:
                    stem = node.module or ""
                # ``from pkg import sub`` imports the submodule when there is one
                names = [f"{stem}.{a.name}" for a in node.names] or [stem]
            for name in names:
                if name != package and not name.startswith(package + "."):
                    continue
                target = _resolve(name, modules)
                if target is not None and target != mod:
                    found.append(Import(mod, target, node.lineno))
    return modules, found


def layer_of(module: str, package: str, layers: Mapping[str, int]) -> str | None:
    """First component below the package (``celltune.data.io`` -> ``data``)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1] if parts[1] in layers else None


def layer_violations(
    imports: Iterable[Import],
    package: str,
    layers: Mapping[str, int] = LAYERS,
    any_layer: Iterable[str] = ANY_LAYER,
) -> list[str]:
    """One line per import that points to a layer to the right of its module's layer."""
    free = set(any_layer)
    bad = []
    for imp in imports:
        src, dst = layer_of(imp.source, package, layers), layer_of(imp.target, package, layers)
        if src in free:
            continue
        if dst in free:  # importing the package itself reaches every layer
            dst_rank = max(layers.values())
        elif dst is None:
            bad.append(f"{imp.source}:{imp.line} imports {imp.target}, which has no layer")
            continue
        else:
            dst_rank = layers[dst]
        if src is None:
            bad.append(f"{imp.source} has no layer (add it to LAYERS)")
        elif dst_rank > layers[src]:
            bad.append(f"{imp.source}:{imp.line} ({src}) imports {imp.target} ({dst}): upward")
    return sorted(set(bad))


def import_cycles(modules: Iterable[str], imports: Iterable[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    cycles.append(sorted(comp))
    return sorted(cycles)


def check_package(root: Path, package: str) -> tuple[list[str], list[list[str]]]:
    modules, imports = collect_imports(root, package)
    return layer_violations(imports, package), import_cycles(modules, imports)


# ------------------------------------------------------------------ the real tree


@pytest.fixture(scope="module")
def celltune_imports() -> tuple[dict[str, Path], list[Import]]:
    return collect_imports(ROOT, "celltune")


def test_every_module_has_a_layer(celltune_imports) -> None:
    modules, _ = celltune_imports
    missing = [m for m in modules if layer_of(m, "celltune", LAYERS) is None]
    assert not missing, f"modules outside every layer (add them to LAYERS): {missing}"


def test_no_upward_imports(celltune_imports) -> None:
    _, imports = celltune_imports
    assert len(imports) > 100  # the parser sees the package's imports at all
    bad = layer_violations(imports, "celltune")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles(celltune_imports) -> None:
    modules, imports = celltune_imports
    cycles = import_cycles(modules, imports)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_function_level_imports_are_seen(celltune_imports) -> None:
    _, imports = celltune_imports
    # cli modules import their work inside the command functions
    assert any(
        i.source == "celltune.cli.stats" and i.target.startswith("celltune.analysis")
        for i in imports
    )


# ------------------------------------------------------------------ the checker itself


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_reports_upward_import_and_loop(tmp_path: Path) -> None:
    pkg = tmp_path / "celltune"
    _write(
        pkg,
        {
            "__init__.py": "from celltune.cli import main\n",  # the API may import anything
            "errors.py": "",
            "data/__init__.py": "",
            # upward, inside a function: data must not import tasks
            "data/io.py": "def f():\n    from celltune.tasks.extra import go\n    return go\n",
            "tasks/extra.py": "",
            "tasks/__init__.py": "",
            "tasks/run.py": "from celltune.data import io\nfrom . import helper\n",
            # a loop inside one layer, via a relative import and a TYPE_CHECKING import
            "tasks/helper.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .run import go\n"
            ),
            "cli/__init__.py": "",
            "cli/main.py": "import celltune.tasks.run\nfrom celltune.errors import X\n",
            "analysis/__init__.py": "",
            "analysis/stats.py": "from celltune.report import plots\n",  # analysis → report
            "report/__init__.py": "",
            "report/plots.py": "from celltune.analysis.stats import S\n",
        },
    )
    bad, cycles = check_package(pkg, "celltune")
    assert any("celltune.data.io:2" in b and "celltune.tasks.extra" in b for b in bad), bad
    assert any(b.startswith("celltune.analysis.stats") and "report.plots" in b for b in bad)
    assert len(bad) == 2, bad  # cli → tasks, report → analysis, API → cli are allowed
    assert ["celltune.tasks.helper", "celltune.tasks.run"] in cycles
    assert ["celltune.analysis.stats", "celltune.report.plots"] in cycles
    assert len(cycles) == 2, cycles


def test_checker_passes_a_clean_package(tmp_path: Path) -> None:
    pkg = tmp_path / "celltune"
    _write(
        pkg,
        {
            "__init__.py": "",
            "data/__init__.py": "from celltune.data.io import read\n",
            "data/io.py": "from celltune.errors import E\n",
            "errors.py": "",
            "report/__init__.py": "",
            "report/run.py": "from celltune.data import io\nfrom celltune import errors\n",
        },
    )
    assert check_package(pkg, "celltune") == ([], [])
