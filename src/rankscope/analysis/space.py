"""Which parameters an analysis perturbs or measures, and how a point is written into a model.

- :class:`ParameterSpace` keeps an fp32 master copy of the floating parameters and writes every
  evaluated point (θ + α·d, or an interpolated θ) afresh from it, never by stepping from the
  previous point, so perturb-and-restore cannot drift (METRICS.md §1, numerics).
- :func:`target_modules` finds the attention and MLP projections of every block;
  :func:`scope_parameter_names` the parameters of a landscape scope; :func:`dense_weight` and
  :func:`layer_factors` what a targeted layer exposes to the spectral metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from rankscope.errors import AnalysisError
from rankscope.models import TARGET_LINEARS, LlamaConfig, build_model

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class ParameterSpace:
    """The floating parameters of ``model`` (frozen ones included, integer buffers never), with
    an fp32 master copy from which every evaluated point is written afresh."""

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None) -> None:
        self.model = model
        params = dict(model.named_parameters())
        wanted = list(params) if names is None else list(names)
        missing = [n for n in wanted if n not in params]
        if missing:
            raise AnalysisError(f"the model has no parameters {missing[:3]}")
        self.params = {n: params[n] for n in wanted if params[n].is_floating_point()}
        with torch.no_grad():
            self.master = {n: p.detach().to(torch.float32).clone() for n, p in self.params.items()}
        self._dirty: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def shapes(self, names: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.master[n].shape) for n in (self.params if names is None else names)}

    @torch.no_grad()
    def set_point(self, alpha: float, direction: Mapping[str, torch.Tensor]) -> None:
        """Write θ + α·d (from the master) into every parameter ``direction`` names; the others
        stay at θ. α = 0 writes the master itself."""
        self.restore(exclude=direction.keys())
        alpha = float(alpha)
        for name, d in direction.items():
            param, master = self.params[name], self.master[name]
            if alpha == 0.0:
                param.copy_(master)
            elif param.dtype == torch.float32:
                torch.add(master, d, alpha=alpha, out=param)
            else:
                param.copy_(torch.add(master, d, alpha=alpha))
            self._dirty.add(name)

    @torch.no_grad()
    def set_plane_point(self, x: float, y: float, d1: Mapping[str, torch.Tensor], d2: Mapping[str, torch.Tensor]) -> None:
        """Write θ + x·d1 + y·d2 (from the master, in fp32) into every parameter either direction
        names; the others stay at θ."""
        names = set(d1) | set(d2)
        self.restore(exclude=names)
        for name in names:
            value = self.master[name].clone()
            for coefficient, direction in ((x, d1), (y, d2)):
                if name in direction and coefficient != 0.0:
                    value.add_(direction[name], alpha=float(coefficient))
            self.params[name].copy_(value)
            self._dirty.add(name)

    @torch.no_grad()
    def set_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Write the given tensors (e.g. an interpolated point) into the named parameters."""
        self.restore(exclude=values.keys())
        for name, value in values.items():
            self.params[name].copy_(value)
            self._dirty.add(name)

    @torch.no_grad()
    def restore(self, exclude: Iterable[str] = ()) -> None:
        """Put θ back (bit for bit) into every parameter written since the last restore."""
        keep = set(exclude)
        for name in list(self._dirty):
            if name not in keep:
                self.params[name].copy_(self.master[name])
                self._dirty.discard(name)


@dataclass(frozen=True)
class TargetMatrix:
    name: str  # qualified module name, e.g. layers.0.self_attn.q_proj
    layer: int
    module: nn.Module


def target_modules(model: nn.Module) -> list[TargetMatrix]:
    """The attention and MLP projections of every block, whatever module sits there (a method may
    drop one, e.g. CoLA's ungated MLP has no gate_proj)."""
    found = []
    for index, block in enumerate(model.layers):
        for attr in TARGET_LINEARS:
            parent_name = "self_attn" if attr in _ATTENTION else "mlp"
            module = getattr(getattr(block, parent_name), attr, None)
            if module is not None:
                found.append(TargetMatrix(f"layers.{index}.{parent_name}.{attr}", index, module))
    return found


def scope_parameter_names(model: nn.Module, scope: str) -> list[str]:
    """Floating parameters perturbed under a landscape scope: ``all`` (embeddings, head, norms
    included) or ``blocks`` (the attention and MLP matrices and their method-specific tensors)."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    if scope == "all":
        return names
    if scope == "blocks":
        prefixes = tuple(t.name + "." for t in target_modules(model))
        return [n for n in names if n.startswith(prefixes)]
    raise AnalysisError(f"unknown landscape scope {scope!r}; use all or blocks")


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The effective dense weight of a targeted layer (None where it has none, as CoLA)."""
    if callable(getattr(module, "effective_weight", None)):
        with torch.no_grad():
            weight = module.effective_weight()
        return None if weight is None else weight.detach()
    weight = getattr(module, "weight", None)
    return weight.detach() if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def layer_factors(module: nn.Module) -> dict[str, torch.Tensor]:
    if callable(getattr(module, "factors", None)):
        with torch.no_grad():
            return {f"factor_{k}": v.detach() for k, v in module.factors().items() if v.ndim == 2}
    return {}


def build_dense_model(model_config: LlamaConfig, state: Mapping[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A plain LlamaModel holding ``state`` (a dense_state_dict)."""
    plain = build_model(model_config)
    plain.load_state_dict(dict(state), strict=True)
    return plain.to(device).eval()
