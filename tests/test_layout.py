"""The package's imports can be followed from the files alone, as static tools read them.

The repository root is the `ortseq` package (pyproject maps it), so an absolute `ortseq.x` import
inside the package only resolves through the installed import hook. Inside the package every
internal import is relative, and this test resolves each one from the files, with no install and
without importing anything: the target module must exist, and each imported name must be defined
at its top level or be a submodule.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("exporter", "runtime", "graphs")


def package_files() -> list[Path]:
    files = [ROOT / "__init__.py"]
    for folder in PACKAGE_FOLDERS:
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def module_path(parts: list[str]) -> Path | None:
    """The file of the module at `parts` below the repository root ([] is the root package)."""
    base = ROOT.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def top_level_names(path: Path) -> set[str]:
    names = {"__file__", "__name__", "__doc__", "__path__"}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try)):  # names bound in a top-level if/try (fallback imports)
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    names.update((a.asname or a.name).split(".")[0] for a in child.names)
                elif isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                    names.add(child.name)
                elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                    names.add(child.id)
    return names


def unresolved_imports(path: Path) -> list[str]:
    """Each internal import of `path` that the files do not back, as 'file:line: why'."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1]  # an __init__'s package is its own folder, a module's the folder holding it
    problems = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            problems += [f"{where}: absolute import {a.name}" for a in node.names if a.name.split(".")[0] == "ortseq"]
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if (node.module or "").split(".")[0] == "ortseq":
                problems.append(f"{where}: absolute import from {node.module} (use a relative import)")
            continue
        if node.level - 1 > len(package):
            problems.append(f"{where}: relative import climbs above the package")
            continue
        target = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        target_file = module_path(target)
        if target_file is None:
            problems.append(f"{where}: no module {'/'.join(target) or '(root)'}")
            continue
        defined = top_level_names(target_file)
        for alias in node.names:
            if alias.name != "*" and alias.name not in defined and module_path([*target, alias.name]) is None:
                problems.append(
                    f"{where}: {alias.name} is neither defined in {target_file.relative_to(ROOT)} nor a submodule"
                )
    return problems


def test_every_internal_import_resolves_from_the_files():
    files = package_files()
    assert len(files) > 50, "the package's files were not found"
    problems = [problem for path in files for problem in unresolved_imports(path)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_broken_import(tmp_path, monkeypatch):
    """The resolver itself must be able to fail: a module importing a missing name and a missing module."""
    folder = tmp_path / "runtime"
    folder.mkdir()
    (tmp_path / "__init__.py").write_text("")
    (folder / "__init__.py").write_text("")
    (folder / "a.py").write_text("X = 1\n")
    (folder / "b.py").write_text(
        "from .a import X\nfrom .a import Y\nfrom .missing import Z\nfrom ortseq.runtime import a\n"
    )
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    problems = unresolved_imports(folder / "b.py")
    assert len(problems) == 3, problems
    assert "Y is neither defined" in problems[0] and "no module runtime/missing" in problems[1]
    assert "absolute import" in problems[2]


def test_the_root_file_imports_on_its_own_as_pytest_imports_it_from_any_folder():
    """In a checkout whose folder is not a valid package name pytest imports the root __init__.py as a
    module named __init__ with no package: it must not fail there, or no test is collected at all."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("__init__", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__all__
