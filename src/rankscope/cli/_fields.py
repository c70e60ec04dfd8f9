"""Dataclass fields and module constants read from the source with `ast`, without importing it.

The CLI's help shows the defaults of config dataclasses that live next to torch (analysis
settings, bench configs, presets); importing them would make `rankscope --help` take seconds.
So the help reads the source instead: a field's annotation, its default (a literal, a
module-level constant, or the constant it imports from another rankscope module) and the
comments above and after it. `tests/test_cli.py` checks what this reads against the imported
dataclasses, so the two cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # src/rankscope
UNKNOWN = object()  # a default this reader cannot evaluate (e.g. a call)


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    name: str
    type: str  # the annotation as written
    default: Any  # the value, or UNKNOWN
    default_text: str  # the default as written (or "" for a required field)
    comment: str  # the comment after the field, then the comment lines directly above it, joined


def _module_path(module: str) -> Path:
    parts = module.split(".")
    if parts[0] != "rankscope":
        raise ValueError(f"{module!r} is not a rankscope module")
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


@functools.cache
def _parsed(module: str) -> tuple[ast.Module, list[str]]:
    try:
        text = _module_path(module).read_text(encoding="utf-8")
    except OSError:  # an install without sources: the help then shows no defaults, and still works
        text = ""
    return ast.parse(text), text.splitlines()


def _comment_after(line: str, end_col: int) -> str:
    """The comment after the code that ends at byte `end_col` of `line` ("" if none)."""
    rest = line.encode("utf-8")[end_col:].decode("utf-8", "replace").strip()
    return rest[1:].strip() if rest.startswith("#") else ""


def _value(node: ast.expr | None, module: str) -> Any:
    if node is None:
        return UNKNOWN
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name):
        return module_constant(module, node.id)
    func = node.func if isinstance(node, ast.Call) else None
    if func is not None and (getattr(func, "id", None) == "field" or getattr(func, "attr", None) == "field"):
        for keyword in node.keywords:
            if keyword.arg == "default":
                return _value(keyword.value, module)
            if keyword.arg == "default_factory" and isinstance(keyword.value, ast.Name):
                factory = {"dict": dict, "list": list, "tuple": tuple, "set": set}.get(keyword.value.id)
                return factory() if factory else UNKNOWN
    if isinstance(node, ast.Dict) and all(key is not None for key in node.keys):
        pairs = [(_value(key, module), _value(value, module)) for key, value in zip(node.keys, node.values)]
        if any(part is UNKNOWN for pair in pairs for part in pair):
            return UNKNOWN
        return dict(pairs)
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_value(item, module) for item in node.elts]
        if any(item is UNKNOWN for item in items):
            return UNKNOWN
        return tuple(items) if isinstance(node, ast.Tuple) else items
    return UNKNOWN


def _top_level_node(module: str, name: str) -> tuple[ast.AST | None, str]:
    """The node that gives `name` its value at module level: an assignment, or where it is
    imported from (followed into that rankscope module)."""
    tree, _ = _parsed(module)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return node.value, module
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            return node.value, module
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rankscope"):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _top_level_node(node.module, alias.name)
    return None, module


def module_constant(module: str, name: str) -> Any:
    """The literal value of a module-level constant (UNKNOWN if it is not a literal)."""
    node, where = _top_level_node(module, name)
    return _value(node, where) if node is not None else UNKNOWN


def dict_keys(module: str, name: str) -> tuple[str, ...]:
    """The string keys of a module-level dict display, e.g. PRESETS."""
    node, _ = _top_level_node(module, name)
    if not isinstance(node, ast.Dict):
        return ()
    return tuple(ast.literal_eval(key) for key in node.keys if key is not None)


@functools.cache
def dataclass_fields(module: str, cls: str) -> dict[str, FieldDoc]:
    """Every annotated field of class `cls` in `module`, in order."""
    tree, lines = _parsed(module)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None:
        return {}
    fields: dict[str, FieldDoc] = {}
    for item in node.body:
        if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
            continue
        if "ClassVar" in ast.unparse(item.annotation):
            continue
        above = []
        line = item.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, lines[line - 1].strip()[1:].strip())
            line -= 1
        end = item.end_lineno or item.lineno
        after = _comment_after(lines[end - 1], item.end_col_offset or 0)
        comment = "; ".join(part for part in [after, " ".join(part for part in above if part)] if part)
        fields[item.target.id] = FieldDoc(
            name=item.target.id, type=ast.unparse(item.annotation), default=_value(item.value, module),
            default_text=ast.unparse(item.value) if item.value is not None else "", comment=comment)
    return fields


def field_doc(module: str, cls: str, name: str) -> FieldDoc:
    """The field's FieldDoc, or an empty one where the source cannot be read."""
    return dataclass_fields(module, cls).get(name) or FieldDoc(name, "", UNKNOWN, "", "")


def shown(value: Any) -> str:
    """A default as the help prints it."""
    if value is UNKNOWN:
        return "?"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)
