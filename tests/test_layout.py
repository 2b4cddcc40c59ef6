"""The package stays easy to read: no function over 80 lines (the argument parser, built as
a table, aside)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "latentflow"


def test_no_function_is_over_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 and not (path.name == "cli.py" and node.name == "build_parser"):
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({lines} lines)")
    assert not long, long
