"""The import graph of src/rankscope: no import cycles, and no module reaches into another
module's private names.

Every module is parsed with `ast` (nothing is imported); imports at the top level and inside
functions both count, since a function-level import only hides a cycle, it does not remove it.
A cycle is a strongly connected component of more than one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rankscope

SRC = Path(rankscope.__file__).parent
PACKAGE = "rankscope"

# Known cycles, each the set of modules of one strongly connected component with the reason it is
# allowed; none today. Delete an entry when its cycle is gone (a test checks).
ALLOWED_CYCLES: list[tuple[frozenset[str], str]] = []

# Imports of another module's private names that are allowed: (importing module, imported
# module, name) -> reason. None today.
ALLOWED_PRIVATE: dict[tuple[str, str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a (possibly relative) `from ... import` target."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest module of ours that `name` (a dotted path) lies in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported name or None, line) for every import of one of our modules,
    and the private attribute accesses on names bound to our modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    bound: dict[str, str] = {}  # local name -> our module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, modules)
                if target and alias.name.split(".")[0] == PACKAGE:
                    found.append((target, None, node.lineno))
                    if alias.asname:
                        bound[alias.asname] = target
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from package import submodule`
                    found.append((sub, None, node.lineno))
                    bound[alias.asname or alias.name] = sub
                else:
                    target = _known(base, modules)
                    if target:
                        found.append((target, alias.name, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append((bound[node.value.id], node.attr, node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            if target != name:
                graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def _a_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One closed path through the component, for the failure message."""
    members = set(component)
    start = component[0]
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, node, start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return component


def private_imports() -> list[tuple[str, str, str, int]]:
    """(importing module, imported module, private name, line) where the name belongs to another
    module. Allowed: a module's own names, a package reaching into its own submodules (its
    `__init__` re-exporting them), and private submodules used within their own package."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        for target, attr, line in _imports(name, path, modules):
            if attr is None:
                # `from package import _submodule`: private to that package
                private = target.rpartition(".")[2]
                if private.startswith("_") and not private.startswith("__"):
                    owner = target.rpartition(".")[0]
                    if not (name == owner or name.startswith(owner + ".")):
                        found.append((name, owner, private, line))
                continue
            if not attr.startswith("_") or attr.startswith("__"):
                continue
            if target == name or target.startswith(name + "."):  # itself, or a package's own submodule
                continue
            found.append((name, target, attr, line))
    return sorted(set(found))


def test_there_are_no_import_cycles():
    graph = import_graph()
    allowed = {members for members, _ in ALLOWED_CYCLES}
    cycles = [c for c in strongly_connected(graph) if frozenset(c) not in allowed]
    message = "\n".join(" -> ".join(_a_cycle(c, graph)) for c in cycles)
    assert not cycles, f"import cycles (strongly connected modules):\n{message}"


def test_the_allowed_cycles_still_exist():
    """An allow-list entry whose cycle is gone must be deleted, so the list stays honest."""
    present = {frozenset(c) for c in strongly_connected(import_graph())}
    stale = [reason for members, reason in ALLOWED_CYCLES if members not in present]
    assert not stale, f"these cycles are gone; delete their ALLOWED_CYCLES entries: {stale}"


def test_no_module_imports_another_modules_private_names():
    found = [f for f in private_imports() if f[:3] not in ALLOWED_PRIVATE]
    lines = "\n".join(f"{importer} line {line}: {target}.{attr}" for importer, target, attr, line in found)
    assert not found, f"imports of another module's private names:\n{lines}"


def test_the_allowed_private_imports_still_exist():
    present = {f[:3] for f in private_imports()}
    stale = [key for key in ALLOWED_PRIVATE if key not in present]
    assert not stale, f"these private imports are gone; delete their ALLOWED_PRIVATE entries: {stale}"


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    source = (
        "from . import sibling\nfrom ..other import thing\n"
        "def f():\n    from rankscope.pkg.sub import _hidden\n    import rankscope.pkg.sub as s\n    return s._x\n"
    )
    modules = {n: Path() for n in ("rankscope.pkg", "rankscope.pkg.mod", "rankscope.pkg.sibling",
                                    "rankscope.other", "rankscope.pkg.sub")}
    probe = tmp_path / "mod.py"
    probe.write_text(source)
    found = {(t, a) for t, a, _ in _imports("rankscope.pkg.mod", probe, modules)}
    assert found == {("rankscope.pkg.sibling", None), ("rankscope.other", "thing"),
                     ("rankscope.pkg.sub", "_hidden"), ("rankscope.pkg.sub", None), ("rankscope.pkg.sub", "_x")}


def test_only_the_locking_module_imports_fcntl():
    """One lock implementation (rankscope.locking), with its fallback where fcntl is missing."""
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            if "fcntl" in names and name != "rankscope.locking":
                found.append(f"{name} line {node.lineno}")
    assert not found, f"fcntl imported outside rankscope.locking: {found}"
