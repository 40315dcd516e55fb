"""Sizes a reader can take in at once, read from the source (AST, nothing imported): no function of the package
over ``MAX_FUNCTION_LINES`` lines, no module over ``MAX_MODULE_LINES``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vrag_rl"
MAX_FUNCTION_LINES = 90  # decorators and docstring included
MAX_MODULE_LINES = 400


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line: name has N lines`` for every function (methods and nested ones too) over ``limit``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - first + 1
                if lines > limit:
                    found.append(f"{path}:{node.lineno}: {node.name} has {lines} lines")
    return found


def long_modules(root: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{p}: {n} lines" for p in sorted(root.rglob("*.py")) if (n := len(p.read_text().splitlines())) > limit]


def test_no_function_is_over_the_limit():
    assert long_functions(PACKAGE) == []


def test_no_module_is_over_the_limit():
    assert long_modules(PACKAGE) == []


def test_a_planted_long_function_is_caught(tmp_path):
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"class C:\n    @staticmethod\n    def f():\n{body}")
    assert long_functions(tmp_path) == [f"{tmp_path / 'm.py'}:3: f has {MAX_FUNCTION_LINES + 2} lines"]
    assert long_functions(tmp_path, limit=MAX_FUNCTION_LINES + 2) == []
