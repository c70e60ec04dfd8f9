"""Whether a study's regime can tell methods apart at all, stated before any ranking.

Every low-rank method changes the block matrices (q, k, v, o, gate, up, down) and nothing else.
The `frozen` control keeps them at their seeded init and trains only the embeddings, LM head and
norm gains. Where that control's final val loss comes within `margin` nats of the best method's
(or beats it), the regime cannot separate methods by what they do to the block matrices: the
loss is decided by the parts every method trains alike, and a ranking of the methods there orders
runs, not methods (../shared/evidence/short-regime.md: the demo's old regime put the control 0.13
nats from the best method and 0.62 nats ahead of tuned full rank).

The margin is the study's `report.informative_margin` (regime.json, else study.yaml, else the
study spec's default).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rankscope.report.collect import REFERENCE_METHOD, Study, finite, is_control
from rankscope.report.stats import format_number, mean_std
from rankscope.study.spec import CAN_SEPARATE, CANNOT_SEPARATE, NOT_CHECKED

HOW_TO_ADD = "`controls: [frozen]` in the study file adds the frozen-blocks control"


@dataclass(frozen=True)
class SeedMean:
    """The final val loss of one method (or control) at one scale over its finished seeds."""

    method: str
    mean: float
    std: float
    seeds: int

    def text(self) -> str:
        spread = f" ± {format_number(self.std, 2)}" if self.seeds >= 2 else ""
        return f"val loss {format_number(self.mean)}{spread} over {self.seeds} seed{'' if self.seeds == 1 else 's'}"


@dataclass(frozen=True)
class Verdict:
    """The informativeness of one scale: the control against the best method and full rank."""

    preset: str
    margin: float
    control: SeedMean | None
    best: SeedMean | None
    full: SeedMean | None
    not_checked: str = ""  # why no verdict was reached ("" when `control` and `best` exist)

    @property
    def checked(self) -> bool:
        return self.control is not None and self.best is not None

    @property
    def gap(self) -> float:
        """How far the control is behind the best method, in nats (negative: ahead of it)."""
        return self.control.mean - self.best.mean if self.checked else math.nan

    @property
    def gap_to_full(self) -> float:
        """How far the control is behind full rank, in nats (negative: ahead of it)."""
        return self.control.mean - self.full.mean if self.control and self.full else math.nan

    @property
    def informative(self) -> bool | None:
        """True when the control is more than `margin` behind the best method; None if not checked."""
        return None if not self.checked else bool(self.gap > self.margin)

    @property
    def control_beats_full(self) -> bool:
        return bool(self.gap_to_full < 0)

    @property
    def reading(self) -> str:
        return NOT_CHECKED if self.informative is None else (CAN_SEPARATE if self.informative else CANNOT_SEPARATE)

    def sentence(self) -> str:
        """The verdict in words, with the numbers behind it."""
        if not self.checked:
            return f"**Whether this regime can separate the methods was not checked** at scale {self.preset}: {self.not_checked}."
        control = f"the {self.control.method} control, block matrices at init: {self.control.text()}"
        best = f"the best method, {self.best.method} ({self.best.text()})"
        if self.informative:
            return (f"**This regime can separate methods by what they do to the block matrices:** training only the "
                    f"embeddings, LM head and norms ({control}) ends {format_number(self.gap, 3)} nats behind {best}, "
                    f"more than the informative margin of {format_number(self.margin, 3)} nats." + self._full_clause())
        position = (f"gets within {format_number(self.gap, 3)} nats of {best}" if self.gap >= 0
                    else f"ends {format_number(-self.gap, 3)} nats *ahead* of {best}")
        return (f"**This regime cannot tell apart methods that differ only in the block matrices:** training only the "
                f"embeddings, LM head and norms ({control}) {position} — the informative margin is "
                f"{format_number(self.margin, 3)} nats — so whatever separates the methods here is not what they do to "
                "the block matrices." + self._full_clause())

    def _full_clause(self) -> str:
        if self.full is None or self.control is None:
            return f" No finished full-rank ({REFERENCE_METHOD}) run at this scale to set the control against."
        if self.control_beats_full:
            return (f" **The control beats full rank** by {format_number(-self.gap_to_full, 3)} nats (full rank: "
                    f"{self.full.text()}).")
        if self.best is not None and self.best.method == REFERENCE_METHOD:
            return ""  # the best method is full rank: the gap above is the gap to full rank
        return f" It is {format_number(self.gap_to_full, 3)} nats behind full rank ({self.full.text()})."

    def ranking_caveat(self) -> str:
        """What the Ranking subsection opens with: the verdict, and for a regime that cannot
        separate the methods, what that means for the order below."""
        if self.informative is False:
            return ("**Caveat before any ranking.** " + self.sentence() + " The pairs below are separated in loss "
                    "by what every method trains alike, not by what they do to the block matrices.")
        return self.sentence()

    def row(self) -> dict:
        """One row of tables/informativeness.csv."""
        row = {"preset": self.preset, "margin": self.margin, "verdict": self.reading,
               "gap_control_minus_best": self.gap, "gap_control_minus_full": self.gap_to_full,
               "control_beats_full": self.control_beats_full if self.control and self.full else None,
               "not_checked": self.not_checked}
        for role, group in (("control", self.control), ("best", self.best), ("full", self.full)):
            row[f"{role}_method"] = group.method if group else None
            row.update({f"{role}_{k}": getattr(group, k) if group else math.nan for k in ("mean", "std", "seeds")})
        return row


def _seed_means(runs: pd.DataFrame) -> list[SeedMean]:
    out = []
    for method, group in runs.groupby("method", sort=True):
        mean, std, seeds = mean_std(group["val_loss"].astype(float))
        out.append(SeedMean(str(method), mean, std, seeds))
    return out


def informativeness(study: Study, preset: str, margin: float) -> Verdict:
    """The verdict of one scale from the final val loss of the runs that finished training."""
    runs = study.runs[(study.runs["preset"].astype(str) == str(preset)) & finite(study.runs["val_loss"])]
    means = _seed_means(runs)
    controls = [m for m in means if is_control(m.method)]
    contenders = [m for m in means if not is_control(m.method)]
    full = next((m for m in contenders if m.method == REFERENCE_METHOD), None)
    # The lowest control and the lowest method: any control that reaches the best method is enough.
    control = min(controls, key=lambda m: m.mean, default=None)
    best = min(contenders, key=lambda m: m.mean, default=None)
    if control is None:
        trained = {str(m) for m in study.runs.loc[study.runs["preset"].astype(str) == str(preset), "method"]}
        unfinished = sorted(m for m in trained if is_control(m))
        why = (f"the control ({', '.join(unfinished)}) has no finished run here, so nothing shows how far training "
               "only the embeddings, head and norms gets" if unfinished else
               f"the study has no control run here ({HOW_TO_ADD}, whose block matrices stay at init)")
        return Verdict(str(preset), margin, None, best, full, why)
    if best is None:
        return Verdict(str(preset), margin, control, None, full, "no method other than the control finished here")
    return Verdict(str(preset), margin, control, best, full)


def informative_margin(study_dir: Path) -> float:
    """The study's `report.informative_margin`: regime.json, else study.yaml, else the default."""
    from rankscope.study.spec import ReportSpec

    for read in (_margin_from_regime, _margin_from_study_file):
        value = read(Path(study_dir))
        if value is not None:
            return value
    return float(ReportSpec().informative_margin)


def _number_or_none(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _margin_from_regime(study_dir: Path) -> float | None:
    path = study_dir / "regime.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return None
    return _number_or_none(data.get("informative_margin")) if isinstance(data, dict) else None


def _margin_from_study_file(study_dir: Path) -> float | None:
    import yaml

    path = study_dir / "study.yaml"
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return None
    report = data.get("report") if isinstance(data, dict) else None
    return _number_or_none(report.get("informative_margin")) if isinstance(report, dict) else None


def study_verdicts(study: Study) -> dict[str, Verdict]:
    """The verdict of every scale, with the study's margin."""
    margin = informative_margin(study.study_dir)
    return {preset: informativeness(study, preset, margin) for preset in study.presets()}


def verdict_table(verdicts: dict[str, Verdict]) -> pd.DataFrame:
    """tables/informativeness.csv: one row per scale."""
    return pd.DataFrame([verdict.row() for verdict in verdicts.values()])


__all__ = ["CANNOT_SEPARATE", "CAN_SEPARATE", "NOT_CHECKED", "SeedMean", "Verdict", "informative_margin",
           "informativeness", "study_verdicts", "verdict_table"]
