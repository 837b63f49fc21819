"""Packages import only downwards: an AST scan of every module in src/lemonslice.

Order, bottom to top: gguf, ops, models, engine, then slicing / convert / text / surgery / plan
(one level), eval, server and pipeline, cli. Top-level modules (errors.py, paths.py) sit below everything and
import no package; `testing` (test support) and `__main__` (the entry point) sit above
everything, and no library package may import them. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import lemonslice

SRC = Path(lemonslice.__file__).parent
LEVELS = {
    "gguf": 0, "ops": 1, "models": 2, "engine": 3, "slicing": 4, "convert": 4, "text": 4, "surgery": 4, "plan": 4,
    "eval": 5,
    "server": 5, "pipeline": 5,
    "cli": 6, "testing": 7, "__main__": 7,
}
BOTTOM = -1  # errors.py, paths.py, the package's own __init__


def _level(part: str) -> int:
    return LEVELS.get(part, BOTTOM)


def _imported(mod: ast.ImportFrom | ast.Import, here: tuple[str, ...], is_pkg: bool) -> list[tuple[str, ...]]:
    """Dotted paths (inside lemonslice, without its name) that one import statement reaches."""
    if isinstance(mod, ast.Import):
        return [tuple(a.name.split(".")[1:]) for a in mod.names if a.name.split(".")[0] == "lemonslice"]
    if mod.level == 0:
        parts = (mod.module or "").split(".")
        if parts[0] != "lemonslice":
            return []
        base = tuple(parts[1:])
    else:
        # `here` is the module's path; relative imports start at its package.
        pkg = here if is_pkg else here[:-1]
        up = mod.level - 1
        if up > len(pkg):
            return []
        base = pkg[: len(pkg) - up] + (tuple(mod.module.split(".")) if mod.module else ())
    if base:
        return [base]
    return [(a.name,) for a in mod.names]  # `from .. import errors` names modules of the root


def violations(root: Path) -> list[str]:
    """'file:line: import ... reaches up from <pkg> to <pkg>' for every upward import under `root`."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("").parts
        is_pkg = rel[-1] == "__init__"
        here = rel[:-1] if is_pkg else rel
        if not here:
            continue  # lemonslice/__init__.py
        src_level = _level(here[0]) if len(here) > 1 or here[0] in LEVELS else BOTTOM
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(node, here, is_pkg):
                if target and target[0] != here[0] and _level(target[0]) > src_level:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)} "
                               f"reaches up from {here[0]} to {target[0]}")
    return out


def test_no_package_imports_from_above():
    found = violations(SRC)
    assert not found, "upward imports:\n" + "\n".join(found)


def test_an_upward_import_is_caught(tmp_path):
    copy = tmp_path / "lemonslice"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    target = copy / "gguf" / "reader.py"
    target.write_text(target.read_text() + "\n\ndef _late():\n    from ..engine import Engine  # noqa: F401\n")
    (copy / "errors.py").write_text((copy / "errors.py").read_text() + "\nimport lemonslice.cli\n")
    found = violations(copy)
    assert len(found) == 2, found
    assert found[0].startswith("lemonslice/errors.py:") and "import lemonslice.cli" in found[0]
    assert found[1].startswith("lemonslice/gguf/reader.py:") and "from ..engine import Engine" in found[1]
    assert found[1].endswith("reaches up from gguf to engine")
