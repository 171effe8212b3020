"""The shape issue 16 asks of src/: small files, short functions, a thin package root, methods that see the engine
only through its contract."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mnseg"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_ROOT_MODULES = 8


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length > limit:
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_file_is_longer_than_500_lines():
    long = [f"{p.relative_to(SRC)} ({n} lines)" for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, long


def test_no_function_is_longer_than_80_lines():
    found = [f for p in _sources() for f in long_functions(p)]
    assert not found, found


def test_the_package_root_holds_few_modules():
    root = sorted(p.name for p in SRC.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def _named_in_design(path: Path, text: str) -> bool:
    """A module is named by its path under src/mnseg (``engine/hooks.py``), or, in a row of its package, by its file
    name alone (``mn.py`` among the ``methods/`` row), or by a glob (``commands/*.py``)."""
    rel = path.relative_to(SRC).as_posix()
    if f"`{rel}`" in text or f"`{path.parent.relative_to(SRC).as_posix()}/*.py`" in text:
        return True
    package = path.parent.relative_to(SRC).as_posix()
    return any(f"`{package}/" in line and f"`{path.name}`" in line for line in text.splitlines())


def test_design_md_lists_every_module():
    text = (SRC.parents[1] / "docs" / "design.md").read_text()
    missing = [p.relative_to(SRC).as_posix() for p in _sources()
               if p.name != "__init__.py" and not _named_in_design(p, text)]
    assert not missing, missing
