"""The package's import structure: no import cycles, and a runtime that never needs torch or the exporter.

Imports are read with ast from the source files (every import statement, function-level ones too: a
lazy import is still a dependency), so the checks cover code paths the tests never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import tomllib
from helpers import ROOT

PACKAGE = "ortseq"
SUBPACKAGES = ("runtime", "graphs", "exporter")
HEAVY = ("torch", "transformers")


def package_modules() -> dict[str, ast.Module]:
    """Module name -> parsed source, for every .py file of the installed package."""
    files = [ROOT / "__init__.py"] + [path for sub in SUBPACKAGES for path in sorted((ROOT / sub).rglob("*.py"))]
    modules = {}
    for path in files:
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = ast.parse(path.read_text(), filename=str(path))
    return modules


def imported_names(name: str, tree: ast.Module, is_package: bool) -> set[str]:
    """Absolute names of everything the module imports (for `from X import Y`: X.Y and X)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 more
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between package modules, external top-level packages each module imports).

    An import of a.b.c also runs a and a.b (their __init__): those are edges too, except for the
    importer's own enclosing packages (Python imports a package's __init__ before its submodules).
    """
    modules = package_modules()
    edges, external = {}, {}
    for name, tree in modules.items():
        imported = imported_names(name, tree, is_package=name == PACKAGE or _is_package(name))
        targets = set()
        for target in imported:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if prefix in modules and not name.startswith(prefix + ".") and prefix != name:
                    targets.add(prefix)
        edges[name] = targets
        external[name] = {target.split(".")[0] for target in imported if not target.startswith(PACKAGE)}
    return edges, external


def _is_package(name: str) -> bool:
    return (ROOT.joinpath(*name.split(".")[1:]) / "__init__.py").is_file()


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    edges, _ = import_graph()
    assert len(edges) > 40, "the import graph should cover the whole package"
    cycle = find_cycle(edges)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_runtime_reaches_neither_the_exporter_nor_torch_or_transformers():
    edges, external = import_graph()
    runtime = [name for name in edges if name.startswith(f"{PACKAGE}.runtime")]
    assert "ortseq.runtime.model" in runtime
    for module in runtime:
        reached, todo = set(), [module]
        while todo:  # every module the runtime module loads, transitively
            current = todo.pop()
            for target in edges[current]:
                if target not in reached:
                    reached.add(target)
                    todo.append(target)
        exporter = sorted(name for name in reached if name.startswith(f"{PACKAGE}.exporter"))
        assert not exporter, f"{module} imports {exporter}"
        heavy = sorted({(name, lib) for name in {module, *reached} for lib in external[name] if lib in HEAVY})
        assert not heavy, f"{module} pulls in torch/transformers through {heavy}"


def test_importing_the_runtime_loads_neither_torch_nor_transformers_nor_the_exporter():
    code = (
        "import sys, ortseq.runtime, ortseq.runtime.model, ortseq.runtime.cli, ortseq.runtime.bundle\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
        " or m.startswith('ortseq.exporter'))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_subpackage_is_installed():
    """A package directory missing from pyproject's packages list is silently left out of a wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name in package_modules() if name == PACKAGE or _is_package(name)}
    assert found == listed


def test_every_registered_family_has_its_exporter_module_and_every_family_module_is_registered():
    """graphs/families.py is the one list: each entry is exported by the Family of that name in
    exporter/families/NAME.py, and no family module there is left out of it."""
    from ortseq.exporter.families import FAMILIES, family_named
    from ortseq.graphs import families

    assert [family.name for family in FAMILIES] == list(families.NAMES)
    for family in FAMILIES:
        assert family.registration == families.registered(family.name)
        assert family_named(family.name) is family
    modules = {path.stem for path in (ROOT / "exporter" / "families").glob("*.py")} - {"__init__", "base"}
    assert modules == {entry.exporter_module for entry in families.REGISTRY}


def test_every_trained_tiny_kind_is_one_of_the_familys_tiny_models():
    from ortseq.exporter.families import FAMILIES

    for family in FAMILIES:
        assert set(family.trained_tiny_kinds) <= set(family.tiny_builders()), family.name
