"""Recognising a transformers function by its code: the AST of its body, docstring, comments and formatting aside.

Used where moetune swaps in a fused kernel only for code it reproduces exactly (fast_norms, fast_rotary).
"""

from __future__ import annotations

import ast
import inspect
import textwrap

__all__ = ["body_dump", "parse_function", "source_body_dump"]


def body_dump(statements: list[ast.stmt]) -> str:
    """A comparable dump of a function body (its docstring dropped)."""
    if statements and isinstance(statements[0], ast.Expr) and isinstance(statements[0].value, ast.Constant) \
            and isinstance(statements[0].value.value, str):
        statements = statements[1:]
    return ast.dump(ast.Module(body=statements, type_ignores=[]))


def source_body_dump(source: str) -> str:
    """body_dump of a body written as source text (the forms a module knows)."""
    return body_dump(ast.parse(source).body)


def parse_function(function) -> ast.FunctionDef | None:
    """The FunctionDef of `function`'s source, or None (no source: built at runtime, a C function)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, ast.FunctionDef) else None
