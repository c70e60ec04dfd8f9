"""The context of an analysis: the runs it reads (their configs and checkpoints), the probe set
they share, a small cache of loaded models, and the context shared by every run of one
`analyze_runs` call. (Called runs.py before; renamed so it is not mistaken for run.py, which
orders the work.)

Who is compared with whom (similarity, IMBH) is decided here (:class:`AnalysisContext`): every
run with the reference (the full-rank run of its seed) and with each **baseline reference** (the
full-rank runs of the other seeds), each comparison labelled by its :func:`pairing`. Two runs of
one method and different seeds are a symmetric seed pair: :func:`pair_owner` says from which side
it is analysed, so that a study analysing each seed's group on its own computes every pair once.

Everything here is checked before any heavy work (:func:`check_inputs`), so bad input fails in
seconds with one line naming the fix.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankscope.analysis.probe import Probe
from rankscope.analysis.settings import AnalysisSettings
from rankscope.config import REFERENCE_METHOD
from rankscope.errors import AnalysisError, CheckpointError
from rankscope.models import NotDenseError, dense_state_dict


@dataclass
class RunInfo:
    path: Path
    name: str
    config: Any  # RunConfig
    checkpoints: list[Any]  # CheckpointInfo, oldest first
    model_config: dict[str, Any]
    data_fingerprint: str | None

    @property
    def method(self) -> str:
        return self.config.method.name

    @property
    def preset(self) -> str:
        return self.config.model.preset

    @property
    def seed(self) -> int:
        return int(self.config.train.seed)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def checkpoint(self, step: int):
        return next(c for c in self.checkpoints if c.step == step)

    def previous_step(self, step: int) -> int | None:
        earlier = [s for s in self.steps if s < step]
        return earlier[-1] if earlier else None


def inspect_run(run_dir: str | Path) -> RunInfo:
    """Read a run's config and checkpoint list; raise a one-line error for anything unusable."""
    from rankscope.train import checkpoint as ckpt
    from rankscope.train.setup import read_run_config

    path = Path(run_dir)
    if not path.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; pass the folder `rankscope train --out` wrote")
    config = read_run_config(path)
    checkpoints = ckpt.intact_checkpoints(path)  # a damaged checkpoint is skipped with a warning naming it
    if not checkpoints:
        raise CheckpointError(
            f"run {run_dir} has no complete checkpoint to analyse; train it with --checkpoint-every or --checkpoint-steps first"
        )
    meta = checkpoints[-1].meta
    return RunInfo(path, path.resolve().name, config, checkpoints, dict(meta.get("model_config") or {}), meta.get("data_fingerprint"))


def pairing(run: RunInfo, other: RunInfo) -> str:
    """How two compared runs relate: the same run (``self``), two runs of one seed (``same-seed``:
    shared initialisation and data order) or of different seeds (``cross-seed``)."""
    if run.path.resolve() == other.path.resolve():
        return "self"
    return "same-seed" if run.seed == other.seed else "cross-seed"


def pair_owner(run: RunInfo, other: RunInfo) -> RunInfo:
    """The run whose analysis holds the comparison of ``run`` with a baseline reference ``other``.

    Two runs of one method and different seeds (full-rank seed 0 and seed 1: a pair of the seed
    baseline) give the same numbers from either side, so the pair is analysed once, from the run
    with the lower (seed, name); any other pair belongs to ``run``."""
    if run.method != other.method or run.seed == other.seed:
        return run
    return min((run, other), key=lambda r: (r.seed, r.name))


def _same_shape(run: RunInfo, reference: RunInfo, role: str, subject: str = "run") -> None:
    """Raise unless ``reference`` (a reference or baseline reference) has the shape of ``run``."""
    if run.model_config != reference.model_config:
        differing = sorted(k for k in set(run.model_config) | set(reference.model_config)
                           if run.model_config.get(k) != reference.model_config.get(k))
        detail = ", ".join(f"{k} {run.model_config.get(k)} vs {reference.model_config.get(k)}" for k in differing[:3])
        raise AnalysisError(
            f"{role} {reference.name} has another model shape than {subject} {run.name} ({detail}); "
            f"pass a {role} of the same preset and overrides"
        )


def check_baselines(baselines: list[RunInfo], reference: RunInfo) -> list[str]:
    """Raise for unusable baseline references (the reference itself, a reference's seed, twice,
    another shape); return warnings (a method other than the reference's)."""
    seen: set[Path] = set()
    warnings = []
    for baseline in baselines:
        path = baseline.path.resolve()
        if path == reference.path.resolve():
            raise AnalysisError(f"baseline reference {baseline.name} is the reference itself; "
                                "pass the full-rank runs of the other seeds as --baseline-references")
        if path in seen:
            raise AnalysisError(f"baseline reference {baseline.name} is given twice; list each run once")
        seen.add(path)
        if baseline.seed == reference.seed:
            raise AnalysisError(
                f"baseline reference {baseline.name} has seed {baseline.seed}, the seed of the reference {reference.name}; "
                "baseline references are full-rank runs of the other seeds"
            )
        _same_shape(reference, baseline, "baseline reference", subject="reference")
        if baseline.method != reference.method:
            warnings.append(f"baseline reference {baseline.name} was trained with method {baseline.method!r}, "
                            f"not {reference.method!r} like the reference")
    return warnings


def check_inputs(runs: list[RunInfo], reference: RunInfo, settings: AnalysisSettings) -> list[str]:
    """Raise for unusable run sets (name clashes, missing steps, other shapes); return warnings."""
    names: dict[str, Path] = {}
    for run in runs:
        if run.name in names and names[run.name].resolve() != run.path.resolve():
            raise AnalysisError(f"two runs are both named {run.name!r} ({names[run.name]} and {run.path}); rename one folder")
        names[run.name] = run.path
        if settings.steps is not None:
            missing = [s for s in settings.steps if s not in run.steps]
            if missing:
                raise AnalysisError(f"run {run.name} has no checkpoint at steps {missing}; available steps: {run.steps}")
        _same_shape(run, reference, "reference")
    warnings = []
    if reference.method != REFERENCE_METHOD:
        warnings.append(f"reference {reference.name} was trained with method {reference.method!r}, not full-rank")
    return warnings


def run_probe(run: RunInfo, probe_size: int | None, cache: dict[str, tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, str]:
    """The run's probe sequences (first ``probe_size`` of them) and its data fingerprint."""
    import dataclasses

    from rankscope.data import prepare_data

    data_cfg = run.config.data
    key = json.dumps(dataclasses.asdict(data_cfg), sort_keys=True, default=str)
    if key not in cache:
        prepared = prepare_data(data_cfg)
        cache[key] = (prepared.probe, prepared.fingerprint)
    probe, fingerprint = cache[key]
    if probe_size is not None:
        if probe_size > probe.shape[0]:
            raise AnalysisError(
                f"--probe-size {probe_size} exceeds the {probe.shape[0]} probe sequences of run {run.name}; "
                f"lower --probe-size or train with --set data.probe_sequences={probe_size}"
            )
        probe = probe[:probe_size]
    return probe, fingerprint


class ModelCache:
    """A few loaded models keyed by (run, step), least recently used dropped first."""

    def __init__(self, device: torch.device, size: int = 3) -> None:
        self.device = device
        self.size = size
        self._loaded: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._dense: dict[tuple[str, int], dict[str, torch.Tensor] | str] = {}

    def get(self, run: RunInfo, step: int):
        from rankscope.train.setup import load_run_model

        key = (str(run.path), step)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        loaded = load_run_model(run.path, step, device=self.device)
        self._loaded[key] = loaded
        while len(self._loaded) > self.size:
            old, _ = self._loaded.popitem(last=False)
            self._dense.pop(old, None)
        return loaded

    def dense(self, run: RunInfo, step: int) -> dict[str, torch.Tensor] | str:
        """The run's dense state dict at ``step`` (on the device), or the reason it has none."""
        key = (str(run.path), step)
        if key not in self._dense:
            loaded = self.get(run, step)
            try:
                self._dense[key] = {k: v.detach().clone() for k, v in dense_state_dict(loaded.model).items()}
            except NotDenseError:
                self._dense[key] = f"method {run.method!r} has no dense equivalent (nonlinear factorization)"
        return self._dense[key]


@dataclass
class AnalysisContext:
    """Everything shared by the runs of one `analyze_runs` call."""

    settings: AnalysisSettings
    reference: RunInfo
    runs: list[RunInfo]
    probe: Probe
    models: ModelCache
    show_progress: bool
    warnings: list[str]
    baselines: list[RunInfo] = field(default_factory=list)  # full-rank runs of the other seeds
    pair_curves: dict[tuple[str, str, int], tuple[np.ndarray | None, str]] = field(default_factory=dict)

    def references(self, run: RunInfo) -> list[RunInfo]:
        """The full-rank runs ``run`` is compared with (similarity, IMBH): the reference, then each
        baseline reference but the run itself and seed pairs analysed from the other side
        (:func:`pair_owner`)."""
        chosen = [self.reference]
        for baseline in self.baselines:
            if baseline.path.resolve() != run.path.resolve() and pair_owner(run, baseline) is run:
                chosen.append(baseline)
        return chosen

    def analysed_elsewhere(self, run: RunInfo) -> list[str]:
        """The baseline references whose seed pair with ``run`` is analysed from their own side."""
        return [b.name for b in self.baselines if b.path.resolve() != run.path.resolve() and pair_owner(run, b) is not run]

    def others(self, run: RunInfo) -> list[RunInfo]:
        """IMBH partners: the references of :meth:`references`, then every other given run with the
        same preset and seed."""
        partners = self.references(run)
        seen = {p.path.resolve() for p in partners}
        for other in self.runs:
            if other.path.resolve() in seen or other.path.resolve() == run.path.resolve():
                continue
            if other.preset == run.preset and other.seed == run.seed:
                partners.append(other)
                seen.add(other.path.resolve())
        return partners
