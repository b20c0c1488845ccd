"""Source text of the classes and functions a model is made of, for the model analysis.

The analysis reads a model's source (which mixers it calls, how it builds masks and positions) for
hundreds of classes per model. ``inspect.getsource`` of a *class* parses the class's whole module
file with ``ast`` on every call, which made applying Ulysses to a small model take seconds; here each
file is parsed once and a class's lines are looked up by its qualified name. The cache holds only
text read from files that do not change while the process runs (no behaviour depends on it beyond
speed), so it is a plain memo, not state a teardown has to undo.
"""

from __future__ import annotations

import ast
import functools
import inspect
import linecache
from typing import Any


@functools.lru_cache(maxsize=256)
def _class_spans(filename: str) -> dict[str, tuple[int, int]]:
    """``{qualified class name: (first line, last line)}`` of every class in ``filename`` (1-based,
    decorators included, as ``inspect.getsource`` gives them)."""
    text = "".join(linecache.getlines(filename))
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return {}
    spans: dict[str, tuple[int, int]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name = prefix + child.name
                first = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                spans.setdefault(name, (first, child.end_lineno or child.lineno))
                visit(child, name + ".")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, prefix + child.name + ".<locals>.")

    visit(tree, "")
    return spans


@functools.lru_cache(maxsize=8192)
def source_of(obj: Any) -> str:
    """The source text of a class or function, ``""`` where there is none (built-ins, C code,
    classes made at run time)."""
    try:
        if inspect.isclass(obj):
            filename = inspect.getsourcefile(obj)
            span = _class_spans(filename).get(obj.__qualname__) if filename else None
            if span is None:
                return inspect.getsource(obj)
            lines = linecache.getlines(filename)
            return "".join(lines[span[0] - 1 : span[1]])
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""
