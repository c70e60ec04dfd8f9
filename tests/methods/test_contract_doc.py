"""docs/internals.md documents the interfaces a contributor extends; these tests keep its Method
contract, Registry, Config and Presets lines equal to the code."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from rankscope import config as config_module
from rankscope.methods.base import Method
from rankscope.models import PRESETS
from rankscope.registry import Registry

INTERNALS = Path(__file__).resolve().parents[2] / "docs" / "internals.md"


def _section(title: str) -> str:
    text = INTERNALS.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _documented_method_class() -> ast.ClassDef:
    block = re.search(r"```python\n(.*?)```", _section("Method contract"), re.S)
    assert block, "docs/internals.md: the Method contract section has no ```python block"
    tree = ast.parse(block.group(1))
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Method"]
    return cls


def _public_names(cls: type) -> set[str]:
    names = {n for n in vars(cls) if not n.startswith("_")}
    return names | {"__init__"}


def _signature_of(function: ast.FunctionDef) -> list[tuple[str, str | None]]:
    """(name, default as source) for each parameter of a documented def."""
    args = function.args.args
    defaults = [None] * (len(args) - len(function.args.defaults)) + [ast.unparse(d) for d in function.args.defaults]
    return [(a.arg, d) for a, d in zip(args, defaults)]


def test_every_documented_method_name_exists_and_every_public_one_is_documented():
    documented = _documented_method_class()
    names = {n.target.id for n in documented.body if isinstance(n, ast.AnnAssign)}
    names |= {n.name for n in documented.body if isinstance(n, ast.FunctionDef)}
    assert not names - _public_names(Method), f"documented in internals.md but not on Method: {sorted(names - _public_names(Method))}"
    assert not _public_names(Method) - names, f"on Method but not in internals.md: {sorted(_public_names(Method) - names)}"


def test_documented_signatures_match_the_code():
    for node in _documented_method_class().body:
        if isinstance(node, ast.FunctionDef):
            raw = inspect.getattr_static(Method, node.name)
            is_classmethod = isinstance(raw, classmethod)
            assert is_classmethod == any(ast.unparse(d) == "classmethod" for d in node.decorator_list), node.name
            function = raw.__func__ if is_classmethod else raw
            code = [(p.name, None if p.default is inspect.Parameter.empty else repr(p.default))
                    for p in inspect.signature(function).parameters.values()]
            assert _signature_of(node) == code, f"Method.{node.name}: internals.md says {_signature_of(node)}, code {code}"
        elif isinstance(node, ast.AnnAssign):
            name = node.target.id
            value = getattr(Method, name)
            assert node.value is not None, f"Method.{name}: document its default"
            documented = ast.unparse(node.value)
            code = value.__name__ if isinstance(value, type) else repr(value)
            assert documented == code or ast.literal_eval(node.value) == value, f"Method.{name}: {documented} vs {code}"


def test_registry_line_names_only_what_registry_has():
    section = _section("Registry")
    documented = set(re.findall(r"`(\w+)\(", section)) - {"Registry"}
    public = {n for n in vars(Registry) if not n.startswith("_")}
    assert documented == public, f"internals.md Registry: documented {sorted(documented)}, code {sorted(public)}"


def test_config_line_names_only_functions_that_exist():
    documented = set(re.findall(r"`(\w+)\(", _section("Config")))
    missing = sorted(n for n in documented if not callable(getattr(config_module, n, None)))
    assert not missing, f"internals.md Config names {missing}, which rankscope.config does not have"


def test_presets_line_lists_every_preset():
    line = next(line for line in _section("Model").splitlines() if "`PRESETS" in line)
    following = _section("Model").split(line, 1)[1].split("`get_preset", 1)[0]
    listed = re.findall(r"[\w]+", (line.split(":", 2)[-1] + following))
    assert [n for n in listed if n in PRESETS] == list(PRESETS), f"internals.md PRESETS: {listed} vs {list(PRESETS)}"


@pytest.mark.parametrize("name", ["period_setting", "warmup_settings"])
def test_period_metadata_names_real_settings(name):
    """Each method's declared period / warm-up settings are int fields of its Settings."""
    import dataclasses

    from rankscope import methods
    from rankscope.models import get_preset

    for method in methods.names():
        cls = methods.get(method)
        value = getattr(cls, name)
        fields = {f.name for f in dataclasses.fields(cls.Settings)}
        declared = [] if value is None else [value] if isinstance(value, str) else list(value)
        assert set(declared) <= fields, f"{method}.{name} = {value!r}; its Settings has {sorted(fields)}"
        settings = cls.default_settings("tiny", get_preset("tiny"))
        for field in declared:
            assert getattr(settings, field) is None or isinstance(getattr(settings, field), int), (method, field)
