"""Recognising a transformers function by its code: the AST of its body, docstring, comments and formatting aside.

Used where moetune swaps in a fused kernel only for code it reproduces exactly (fast_norms, fast_rotary).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

__all__ = ["body_dump", "hub_wrapped", "known_form", "parse_function", "source_body_dump"]


def hub_wrapped(obj, name: str):
    """The modeling function `name` inside the `kernels` package's wrapper, or obj itself.

    With `kernels` installed, transformers (5.25 seen) turns each modeling function decorated for Hub kernels
    (`apply_rotary_pos_emb`, ...) into an instance of an nn.Module class `Func` whose forward calls the function,
    or a Hub kernel activated for the model (moetune loads none). The function is held in that forward's closure.
    """
    forward = getattr(type(obj), "forward", None)
    if type(obj).__name__ != "Func" or not isinstance(forward, types.FunctionType) or not forward.__closure__:
        return obj
    found = [cell.cell_contents for cell in forward.__closure__
             if isinstance(cell.cell_contents, types.FunctionType) and cell.cell_contents.__name__ == name]
    return found[0] if len(found) == 1 else obj


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


def known_form(function, known_bodies: dict[str, str], arg_names: tuple[str, ...]) -> str | None:
    """The name known_bodies gives `function`'s body (a body_dump -> name map), when the function is undecorated and
    takes exactly arg_names (no *args, **kwargs or keyword-only arguments); else None."""
    node = parse_function(function)
    if node is None or node.decorator_list:
        return None
    args = node.args
    if tuple(a.arg for a in args.args) != arg_names or args.vararg or args.kwarg or args.kwonlyargs:
        return None
    return known_bodies.get(body_dump(node.body))
