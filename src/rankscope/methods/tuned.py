"""Optimizer defaults tuned by rankscope itself for the presets the literature never trained.

Each method's `optim_defaults(preset)` holds its official harness's values (the literature's,
tuned for 60M+ models and 10k+ steps). For `tiny` and `20m` no paper has values; there the
defaults come from rankscope's own tuning study, whose chosen values are shipped in
`tuned_defaults.yaml` next to this file (how they were measured: docs/tuning.md). The literature
values stay the defaults from 60m up. `optim_defaults_for` is what every run resolves against;
`default_kinds` says, field by field, which kind of default a method has at a preset.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import yaml

from rankscope.errors import ConfigError
from rankscope.methods.base import Method, OptimDefaults
from rankscope.optim.roles import ROLE_FIELDS

TUNED_FILE = Path(__file__).resolve().with_name("tuned_defaults.yaml")
LITERATURE = "literature"
TUNED_HERE = "tuned here"
# The OptimDefaults fields a tuning study may set (the others are properties of the method); the
# per-role fields carry the dense lrs a shared-dense tuning fixed for every method.
TUNABLE_FIELDS = ("lr", "weight_decay", "eps", "grad_clip", *ROLE_FIELDS)


@functools.lru_cache(maxsize=1)
def tuned_table() -> dict[str, dict[str, dict[str, float]]]:
    """{preset: {method: {field: value}}} from tuned_defaults.yaml (empty when it has none)."""
    data = yaml.safe_load(TUNED_FILE.read_text()) if TUNED_FILE.is_file() else None
    table = (data or {}).get("presets") or {}
    for preset, per_method in table.items():
        for method, values in (per_method or {}).items():
            unknown = sorted(set(values or {}) - set(TUNABLE_FIELDS))
            if unknown:
                raise ConfigError(f"{TUNED_FILE}: {preset}/{method} sets {unknown}; only {', '.join(TUNABLE_FIELDS)} "
                                  "can be tuned defaults")
    return table


def tuned_values(method: str, preset: str) -> dict[str, float]:
    return dict((tuned_table().get(str(preset).strip().lower()) or {}).get(method) or {})


def optim_defaults_for(method_cls: type[Method], preset: str) -> OptimDefaults:
    """The method's official defaults, with the values tuned here for this preset in their place."""
    tuned = tuned_values(method_cls.name, preset)
    return dataclasses.replace(method_cls.optim_defaults(preset), **{k: float(v) for k, v in tuned.items()})


def default_kinds(method_cls: type[Method], preset: str) -> dict[str, str]:
    """For each tunable field: "tuned here" (tuned_defaults.yaml) or "literature" (the official harness)."""
    tuned = tuned_values(method_cls.name, preset)
    return {name: TUNED_HERE if name in tuned else LITERATURE for name in TUNABLE_FIELDS}


def tuned_source() -> dict[str, Any]:
    """Where the tuned values come from (study file, commit of the measurement, document)."""
    data = yaml.safe_load(TUNED_FILE.read_text()) if TUNED_FILE.is_file() else None
    return dict((data or {}).get("source") or {})
