"""The full-rank seed baseline: how far apart two full-rank runs of different seeds are, by every
metric that compares a run with a full-rank run, and every low-rank comparison read against it.

A comparison is one row of similarity.csv (L2, relative L2, cosine, CKA per layer and checkpoint)
or one IMBH row of interpolation.csv whose partner is a full-rank run. Its ``pairing`` says how
the two runs relate: ``same-seed`` (shared initialisation and data order) or ``cross-seed``;
comparisons of a run with itself are checks and never used here.

- **Seed baseline** of a metric: its values over every pair of full-rank runs of different seeds
  (each unordered pair once; relative L2, which divides by the reference's norm, once per
  direction, both read from the stored row since it also holds each side's mean norm).
- **Spread**: the range, min..max over the seed pairs. A low-rank value inside it is as close to
  full rank as another full-rank seed is; outside it is **farther than** (or **closer than**) every
  full-rank seed pair, by the metric's direction (CKA and cosine: higher is closer; L2, relative
  L2, barrier: lower is closer). Values within a rounding tolerance of the range (the same pair
  computed from its two sides differs in the last digits) count as inside.
- A scale with fewer than 2 full-rank seeds has no baseline; :meth:`SeedBaselines.missing` says why.

Final-checkpoint measures of a comparison use the definitions of the run features
(:mod:`rankscope.analysis.features`): mean over layers at the run's last analysed checkpoint,
plus CKA of the last layer, and IMBH at the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rankscope.report.collect import REFERENCE_METHOD, Study, applicable_mask, finite, sorted_methods
from rankscope.report.stats import format_number

PAIRWISE_METRICS = ("l2", "relative_l2", "cosine", "cka", "imbh")
HIGHER_IS_CLOSER = {"l2": False, "relative_l2": False, "cosine": True, "cka": True, "imbh": False}
METRIC_NAMES = {"l2": "L2 distance", "relative_l2": "relative L2", "cosine": "cosine", "cka": "linear CKA",
                "imbh": "IMBH barrier"}
# Final-checkpoint measure (named like the run feature it extends) -> (metric, over layers: mean | last | None).
FINAL_MEASURES: dict[str, tuple[str, str | None]] = {
    "cka_last_layer": ("cka", "last"),
    "cka_to_reference": ("cka", "mean"),
    "cosine_to_reference": ("cosine", "mean"),
    "relative_l2_to_reference": ("relative_l2", "mean"),
    "imbh_to_full": ("imbh", None),
}
MEASURE_LABELS = {
    "cka_last_layer": "CKA to full-rank, last layer",
    "cka_to_reference": "CKA to full-rank, mean over layers",
    "cosine_to_reference": "cosine to full-rank, mean over layers",
    "relative_l2_to_reference": "relative L2 to full-rank, mean over layers",
    "imbh_to_full": "IMBH to full-rank",
}
PAIRINGS = ("same-seed", "cross-seed")
SPREAD = "min..max over the seed pairs"
RELATIVE_TOLERANCE = 1e-5  # of max(1, |bound|): rounding between the two sides of one pair
WITHIN, FARTHER, CLOSER = "within seed baseline", "farther than seed baseline", "closer than seed baseline"
COLUMNS = ["preset", "run", "method", "seed", "partner", "partner_seed", "pairing", "step", "layer", "metric", "value"]


@dataclass
class Baseline:
    """One metric's seed baseline (over full-rank seed pairs), or the reason there is none."""

    metric: str  # a pairwise metric or a final measure
    higher_is_closer: bool
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pairs: list[str] = field(default_factory=list)
    missing: str = ""

    @property
    def n(self) -> int:
        return int(self.values.size)

    @property
    def mean(self) -> float:
        return float(self.values.mean()) if self.n else math.nan

    @property
    def std(self) -> float:
        return float(self.values.std(ddof=1)) if self.n >= 2 else math.nan

    @property
    def low(self) -> float:
        return float(self.values.min()) if self.n else math.nan

    @property
    def high(self) -> float:
        return float(self.values.max()) if self.n else math.nan

    def reading(self, value: float) -> str:
        """Where ``value`` lies against the range: within, farther than or closer than it."""
        if not self.n:
            return "baseline missing"
        if value is None or not np.isfinite(value):
            return "no value"
        tolerance = RELATIVE_TOLERANCE * max(1.0, abs(self.low), abs(self.high))
        if self.low - tolerance <= value <= self.high + tolerance:
            return WITHIN
        below = value < self.low
        return FARTHER if below == self.higher_is_closer else CLOSER

    def cell(self) -> str:
        """The baseline as a table cell: mean [min, max], number of seed pairs."""
        if not self.n:
            return "baseline missing"
        pairs = f"{self.n} pair" + ("s" if self.n != 1 else "")
        if self.metric in ("relative_l2", "relative_l2_to_reference"):
            pairs = f"{len(set(self.pairs))} pair" + ("s" if len(set(self.pairs)) != 1 else "") + ", both directions"
        return f"{format_number(self.mean)} [{format_number(self.low)}, {format_number(self.high)}] ({pairs})"


def _identities(study: Study) -> dict[str, tuple[str, int | None]]:
    runs = study.runs
    return {str(r.run): (str(r.method), None if pd.isna(r.seed) else int(r.seed)) for r in runs.itertuples(index=False)}


def _fill_partner(frame: pd.DataFrame, identities: dict[str, tuple[str, int | None]]) -> pd.DataFrame:
    """Partner method, seed and pairing; tables written before those columns get them from the
    runs' identities (their only partner then was the full-rank run of the same seed)."""
    frame = frame.copy()
    for column in ("partner_method", "partner_seed", "pairing"):
        if column not in frame.columns:
            frame[column] = np.nan
    known = frame["partner"].astype(str).map(identities)
    method = known.map(lambda pair: pair[0] if isinstance(pair, tuple) else REFERENCE_METHOD)
    seed = known.map(lambda pair: pair[1] if isinstance(pair, tuple) else np.nan)
    frame["partner_method"] = frame["partner_method"].where(frame["partner_method"].notna(), method).astype(str)
    frame["partner_seed"] = pd.to_numeric(frame["partner_seed"], errors="coerce").fillna(pd.to_numeric(seed, errors="coerce"))
    derived = np.where(frame["partner"].astype(str) == frame["run"].astype(str), "self",
                       np.where(frame["partner_seed"] == pd.to_numeric(frame["seed"], errors="coerce"), "same-seed", "cross-seed"))
    frame["pairing"] = frame["pairing"].where(frame["pairing"].notna() & (frame["pairing"].astype(str) != ""), derived)
    return frame


def comparisons(study: Study) -> pd.DataFrame:
    """Every comparison of a run with a full-rank partner (self-comparisons left out), one row per
    (run, partner, step, layer, metric); IMBH rows have no layer. Seed-baseline pairs appear once
    (relative L2 once per direction)."""
    identities = _identities(study)
    parts = []
    similarity = study.tables.get("similarity")
    if similarity is not None and "reference_run" in similarity.columns:
        rows = similarity[applicable_mask(similarity) & finite(similarity["value"])]
        rows = rows[rows["metric"].isin(["l2", "relative_l2", "cosine", "cka", "mean_norm"])]
        rows = rows.rename(columns={"reference_run": "partner", "reference_method": "partner_method",
                                    "reference_seed": "partner_seed"})
        parts.append(_fill_partner(rows, identities))
    interpolation = study.tables.get("interpolation")
    if interpolation is not None and "other_run" in interpolation.columns:
        rows = interpolation[(interpolation["kind"] == "imbh") & applicable_mask(interpolation)]
        rows = rows[finite(rows["barrier"])].rename(columns={"other_run": "partner", "other_method": "partner_method",
                                                             "other_seed": "partner_seed"})
        rows = rows.assign(metric="imbh", value=pd.to_numeric(rows["barrier"], errors="coerce"), layer=np.nan)
        parts.append(_fill_partner(rows, identities))
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.concat([p[[*COLUMNS, "partner_method"]] for p in parts], ignore_index=True)
    frame = frame[(frame["partner_method"] == REFERENCE_METHOD) & frame["pairing"].isin(PAIRINGS)].drop(columns="partner_method")
    for column in ("seed", "partner_seed", "step", "layer", "value"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame = pd.concat([frame, _reversed_relative_l2(frame)], ignore_index=True)
    frame = frame[frame["metric"] != "mean_norm"]
    return _one_row_per_pair(frame).reset_index(drop=True)


def _baseline_mask(frame: pd.DataFrame) -> pd.Series:
    return (frame["method"] == REFERENCE_METHOD) & (frame["pairing"] == "cross-seed")


def _reversed_relative_l2(frame: pd.DataFrame) -> pd.DataFrame:
    """A seed pair's relative L2 with the other run as the reference: L2 / the run's own mean norm."""
    pairs = frame[_baseline_mask(frame) & frame["metric"].isin(["l2", "mean_norm"])]
    if pairs.empty:
        return pd.DataFrame(columns=COLUMNS)
    keys = ["preset", "run", "method", "seed", "partner", "partner_seed", "pairing", "step", "layer"]
    wide = pairs.pivot_table(index=keys, columns="metric", values="value", aggfunc="first", dropna=False).reset_index()
    wide = wide[finite(wide.get("l2", pd.Series(dtype=float))) & finite(wide.get("mean_norm", pd.Series(dtype=float)))]
    wide = wide[wide["mean_norm"] > 0]
    return pd.DataFrame({
        "preset": wide["preset"], "run": wide["partner"], "method": REFERENCE_METHOD, "seed": wide["partner_seed"],
        "partner": wide["run"], "partner_seed": wide["seed"], "pairing": "cross-seed", "step": wide["step"],
        "layer": wide["layer"], "metric": "relative_l2", "value": wide["l2"] / wide["mean_norm"],
    }, columns=COLUMNS)


def _one_row_per_pair(frame: pd.DataFrame) -> pd.DataFrame:
    """A seed pair analysed from both sides (or a reversed row that duplicates a stored one) counts
    once: the lower seed's row is kept; relative L2 keeps one row per direction."""
    baseline = frame[_baseline_mask(frame)].sort_values(["seed", "run"], kind="stable")
    run, partner = baseline["run"].astype(str), baseline["partner"].astype(str)
    lower_first = baseline["seed"] < baseline["partner_seed"]
    unordered = np.where(lower_first, run + "|" + partner, partner + "|" + run)
    pair = np.where(baseline["metric"] == "relative_l2", run + ">" + partner, unordered)
    baseline = baseline.assign(_pair=pair).drop_duplicates(["preset", "step", "layer", "metric", "_pair"])
    return pd.concat([frame[~_baseline_mask(frame)], baseline.drop(columns="_pair")])


def final_measures(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, partner, measure) at the run's last checkpoint of that metric family."""
    rows = []
    keys = ["preset", "run", "method", "seed", "partner", "partner_seed", "pairing"]
    for key, group in frame.groupby(keys, sort=False, dropna=False):
        head = dict(zip(keys, key))
        for measure, (metric, over_layers) in FINAL_MEASURES.items():
            rows_of = group[group["metric"] == metric]
            if rows_of.empty:
                continue
            last = rows_of["step"].max()
            at = rows_of[rows_of["step"] == last]
            value = (at["value"].mean() if over_layers != "last"
                     else float(at.loc[at["layer"].idxmax(), "value"]))
            rows.append({**head, "step": last, "measure": measure, "value": float(value)})
    return pd.DataFrame(rows, columns=[*keys, "step", "measure", "value"])


def _pair_name(run: str, partner: str) -> str:
    return " / ".join(sorted((str(run), str(partner))))


class SeedBaselines:
    """The seed baselines of a study and every low-rank comparison read against them."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.long = comparisons(study)
        self.final = final_measures(self.long)
        runs = study.runs[(study.runs["method"] == REFERENCE_METHOD) & finite(study.runs["val_loss"])]
        self.full_seeds = {str(p): sorted(int(s) for s in g["seed"].dropna()) for p, g in runs.groupby("preset")}

    def missing(self, preset: str) -> str:
        """Why the scale has no seed baseline ('' when it has one)."""
        seeds = self.full_seeds.get(str(preset), [])
        if len(seeds) < 2:
            listed = f" (seed {seeds[0]})" if seeds else ""
            return (f"the study has {len(seeds)} finished full-rank run{'' if len(seeds) == 1 else 's'} at scale "
                    f"{preset}{listed}; the seed baseline compares full-rank runs of different seeds, so it needs ≥ 2")
        pairs = self.long[(self.long["preset"].astype(str) == str(preset)) & _baseline_mask(self.long)]
        if pairs.empty:
            return (f"no two of the full-rank seeds {seeds} at scale {preset} were compared: the analysis ran without "
                    "baseline references; rerun the study's analyze stage, or `rankscope analyze` with "
                    "--baseline-references")
        return ""

    def _baseline(self, rows: pd.DataFrame, metric: str, preset: str, run_column: str = "run") -> Baseline:
        higher = HIGHER_IS_CLOSER[FINAL_MEASURES[metric][0] if metric in FINAL_MEASURES else metric]
        reason = self.missing(preset)
        if reason or rows.empty:
            return Baseline(metric, higher, missing=reason or "no full-rank seed pair has this value")
        pairs = [_pair_name(a, b) for a, b in zip(rows[run_column], rows["partner"])]
        return Baseline(metric, higher, rows["value"].to_numpy(dtype=float), pairs)

    def final_baseline(self, preset: str, measure: str) -> Baseline:
        """The baseline of a final-checkpoint measure at one scale."""
        final = self.final
        rows = final[(final["preset"].astype(str) == str(preset)) & _baseline_mask(final) & (final["measure"] == measure)]
        return self._baseline(rows, measure, preset)

    def layer_baseline(self, preset: str, metric: str, step: float, layer: float | None = None) -> Baseline:
        """The baseline of a metric at one checkpoint (and layer; None for IMBH)."""
        long = self.long
        rows = long[(long["preset"].astype(str) == str(preset)) & _baseline_mask(long) & (long["metric"] == metric)
                    & (long["step"] == step)]
        rows = rows[rows["layer"].isna()] if layer is None else rows[rows["layer"] == layer]
        return self._baseline(rows, metric, preset)

    def final_table(self, preset: str) -> pd.DataFrame:
        """Per (measure, method, pairing): the comparisons at the final checkpoint against the
        baseline: their mean, std, count, the baseline, difference of the mean to the baseline mean,
        the reading of the mean and how many single comparisons lie outside the range."""
        final = self.final[self.final["preset"].astype(str) == str(preset)]
        rows = []
        for measure in FINAL_MEASURES:
            baseline = self.final_baseline(preset, measure)
            rows.append(self._summary_row(preset, measure, REFERENCE_METHOD, "seed baseline", baseline.values, baseline, {}))
            low_rank = final[(final["method"] != REFERENCE_METHOD) & (final["measure"] == measure)]
            for method in sorted_methods(final.loc[final["method"] != REFERENCE_METHOD, "method"].unique()):
                for pairing in PAIRINGS:
                    values = low_rank[(low_rank["method"] == method) & (low_rank["pairing"] == pairing)]["value"]
                    rows.append(self._summary_row(preset, measure, method, pairing, values.to_numpy(dtype=float), baseline, {}))
        return pd.DataFrame(rows)

    def layer_table(self, preset: str) -> pd.DataFrame:
        """The same per checkpoint and layer (IMBH: per checkpoint): every low-rank comparison read
        against the seed baseline where and when it was measured."""
        long = self.long[self.long["preset"].astype(str) == str(preset)]
        rows = []
        for (metric, step, layer), group in long.groupby(["metric", "step", "layer"], sort=True, dropna=False):
            baseline = self.layer_baseline(preset, metric, step, None if pd.isna(layer) else layer)
            where = {"step": step, "layer": layer}
            rows.append(self._summary_row(preset, metric, REFERENCE_METHOD, "seed baseline", baseline.values, baseline, where))
            low_rank = group[group["method"] != REFERENCE_METHOD]
            for (method, pairing), values in low_rank.groupby(["method", "pairing"], sort=True)["value"]:
                rows.append(self._summary_row(preset, metric, method, pairing, values.to_numpy(dtype=float), baseline, where))
        return pd.DataFrame(rows)

    @staticmethod
    def _summary_row(preset: str, metric: str, method: str, pairing: str, values: np.ndarray, baseline: Baseline,
                     where: dict) -> dict:
        values = values[np.isfinite(values)]
        mean = float(values.mean()) if values.size else math.nan
        is_baseline = pairing == "seed baseline"
        return {
            "preset": preset, "metric": metric, **where, "method": method, "pairing": pairing, "n": int(values.size),
            "mean": mean, "std": float(values.std(ddof=1)) if values.size >= 2 else math.nan,
            "min": float(values.min()) if values.size else math.nan, "max": float(values.max()) if values.size else math.nan,
            "baseline_pairs": baseline.n, "baseline_mean": baseline.mean, "baseline_min": baseline.low,
            "baseline_max": baseline.high,
            "difference_to_baseline": math.nan if is_baseline else mean - baseline.mean,
            "reading": "" if is_baseline else baseline.reading(mean),
            "outside_baseline": (math.nan if is_baseline or not baseline.n
                                 else int(sum(baseline.reading(v) != WITHIN for v in values))),
            "baseline_missing": baseline.missing,
        }


__all__ = ["CLOSER", "FARTHER", "FINAL_MEASURES", "MEASURE_LABELS", "PAIRWISE_METRICS", "SPREAD", "WITHIN", "Baseline",
           "SeedBaselines", "comparisons", "final_measures"]
