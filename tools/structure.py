"""Check the house size limits of the package: module, class and function lengths (run: python tools/structure.py).

A module counts its lines; a class or function counts from its ``def``/``class`` line through its last line,
decorators excluded. Nested functions and methods are measured too, each on its own.
"""

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kagglekd"

MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 450
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Offender:
    """One module, class or function over its limit; ``name`` is dotted (``Class.method``) inside a module."""

    path: str
    kind: str
    name: str
    lines: int
    limit: int

    def __str__(self) -> str:
        where = self.path if self.kind == "module" else f"{self.path}::{self.name}"
        return f"{where} ({self.kind}): {self.lines} lines > {self.limit}"


def definition_sizes(tree: ast.Module) -> list[tuple[str, str, int]]:
    """(kind, dotted name, lines) of every class and function in ``tree``, nested ones included."""
    sizes = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                name = f"{prefix}{child.name}"
                sizes.append((kind, name, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return sizes


def offenders(package: Path = PACKAGE) -> list[Offender]:
    """Every module, class and function under ``package`` (recursively) that is over its limit."""
    found = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        relative = path.relative_to(package.parent).as_posix()
        module_lines = len(text.splitlines())
        if module_lines > MAX_MODULE_LINES:
            found.append(Offender(relative, "module", relative, module_lines, MAX_MODULE_LINES))
        limits = {"class": MAX_CLASS_LINES, "function": MAX_FUNCTION_LINES}
        for kind, name, lines in definition_sizes(ast.parse(text, filename=str(path))):
            if lines > limits[kind]:
                found.append(Offender(relative, kind, name, lines, limits[kind]))
    return found


def main() -> int:
    found = offenders()
    for offender in found:
        print(offender)  # noqa: T201  (a command-line tool: the listing is its output)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
