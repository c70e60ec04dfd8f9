"""The report's training-dynamics section: update spectral norms over training, loss spikes.

Reads the `dynamics` and `spike` entries that `rankscope.train.dynamics` adds to each run's
metrics.jsonl (every `train.dynamics_every` steps and at every spike) and draws, per scale:
- the largest ‖ΔW‖₂ over the targeted matrices, and the largest update-to-weight ratio, against
  the step, one line per method (mean over seeds), with Spectron's bound ‖ΔW‖₂ ≲ lr dashed;
- the training loss with every detected spike marked;
and tabulates the spikes per method with the matrices whose update jumped most often.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from rankscope.report.collect import Study, finite, method_label, sorted_methods
from rankscope.report.figures import STYLE, FigureResult, method_color
from rankscope.report.figures.base import line_style, save_figure, sized_figure


def bounds_its_update(method: str) -> bool:
    """Whether the method keeps ‖ΔW‖₂ at about its lr (``Method.update_bound``, Spectron's); a
    method this installation does not know is taken as unbounded."""
    from rankscope import methods
    from rankscope.errors import RankscopeError

    try:
        return bool(getattr(methods.get(method), "update_bound", False))
    except RankscopeError:
        return False

UPDATE_COLUMNS = ["run", "method", "preset", "seed", "step", "trigger", "max_update_norm", "max_update_lr",
                  "max_update_ratio", "max_factor_update_norm"]
SPIKE_COLUMNS = ["run", "method", "preset", "seed", "step", "loss", "median", "ratio", "jumped"]


def read_dynamics(study: Study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per dynamics measurement, one row per spike) over every run of the study."""
    updates, spikes = [], []
    for run in study.runs.itertuples(index=False):
        path = study.run_dir(run.run) / "metrics.jsonl"
        if not path.is_file():
            continue
        keys = {"run": run.run, "method": run.method, "preset": run.preset, "seed": run.seed}
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last line; collect.read_training_logs notes it
            if isinstance(record.get("dynamics"), dict):
                d = record["dynamics"]
                updates.append({**keys, "step": record.get("step"), "trigger": d.get("trigger"),
                                **{k: d.get(k) for k in UPDATE_COLUMNS[6:]}})
            if isinstance(record.get("spike"), dict):
                s = record["spike"]
                spikes.append({**keys, "step": record.get("step"), "loss": s.get("loss"), "median": s.get("median"),
                               "ratio": s.get("ratio"), "jumped": [m.get("matrix") for m in s.get("matrices", [])]})
    update_frame = pd.DataFrame(updates, columns=UPDATE_COLUMNS)
    for column in UPDATE_COLUMNS[6:]:
        update_frame[column] = pd.to_numeric(update_frame[column], errors="coerce")
    return update_frame, pd.DataFrame(spikes, columns=SPIKE_COLUMNS)


def _matrix_kind(name: str) -> str:
    """layers.3.mlp.down_proj -> mlp.down_proj"""
    return re.sub(r"^layers\.\d+\.", "", str(name))


def spike_table(runs: pd.DataFrame, spikes: pd.DataFrame, preset: str) -> pd.DataFrame:
    """Per method: runs, spikes, spikes per run, the steps of the first spikes, and the matrix
    kinds whose update jumped most often at a spike."""
    in_preset = runs[runs["preset"].astype(str) == str(preset)]
    rows = []
    for method in sorted_methods(in_preset["method"].dropna().unique()):
        n_runs = int((in_preset["method"] == method).sum())
        mine = spikes[(spikes["method"] == method) & (spikes["preset"].astype(str) == str(preset))]
        kinds = Counter(_matrix_kind(m) for jumped in mine["jumped"] for m in jumped)
        rows.append({
            "method": method_label(method), "runs": n_runs, "spikes": len(mine),
            "spikes per run": len(mine) / n_runs if n_runs else np.nan,
            "largest loss / median": float(mine["ratio"].max()) if len(mine) else np.nan,
            "first spike steps": ", ".join(str(int(s)) for s in sorted(mine["step"])[:5]) or "–",
            "update jumped most often": ", ".join(f"{k} ({n})" for k, n in kinds.most_common(3)) or "–",
        })
    return pd.DataFrame(rows)


def _mean_over_seeds(frame: pd.DataFrame, column: str) -> pd.Series:
    return frame[finite(frame[column])].groupby("step")[column].mean()


def fig_update_norms(updates: pd.DataFrame, preset: str, out_dir: Path) -> FigureResult:
    name, title = f"dynamics_updates_{preset}", f"Update spectral norms during training ({preset})"
    rows = updates[(updates["preset"].astype(str) == str(preset)) & (updates["trigger"] == "period")]
    if rows.empty:
        return FigureResult(name, title, skipped=f"no dynamics measurements for preset {preset} "
                                                 "(train.dynamics_every was 0, or the runs have not logged any yet)")
    methods = sorted_methods(rows["method"].unique())
    figure = sized_figure(11, 4)
    norm_ax, ratio_ax = figure.subplots(1, 2)
    no_dense = []
    for method in methods:
        mine = rows[rows["method"] == method]
        color = method_color(method)
        norms = _mean_over_seeds(mine, "max_update_norm")
        if norms.empty:
            no_dense.append(method)
            continue
        norm_ax.plot(norms.index, norms.values, color=color, label=method_label(method), linewidth=1.6,
                     linestyle=line_style(method))
        ratios = _mean_over_seeds(mine, "max_update_ratio")
        ratio_ax.plot(ratios.index, ratios.values, color=color, label=method_label(method), linewidth=1.6,
                      linestyle=line_style(method))
        if bounds_its_update(method):
            bound = _mean_over_seeds(mine, "max_update_lr")
            norm_ax.plot(bound.index, bound.values, color=color, linestyle="--", linewidth=1.2,
                         label=f"{method} bound (lr)")
    for ax, label in ((norm_ax, "max over matrices of ‖ΔW‖₂"), (ratio_ax, "max over matrices of ‖ΔW‖₂ / ‖W‖₂")):
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
    norm_ax.set_title("largest update (spectral norm)")
    ratio_ax.set_title("largest update relative to its weight")
    figure.legend(*norm_ax.get_legend_handles_labels(), loc="outside right upper", frameon=False)
    figure.suptitle(title)
    caption = ("Every train.dynamics_every steps, the spectral norm of each targeted matrix's one-step "
               "update ΔW by power iteration (factored layers through their factors); lines are the mean "
               "over seeds of the largest one. Spectron scales its step so that ‖ΔW‖₂ stays about the lr "
               "(dashed).")
    if no_dense:
        caption += f" Not drawn: {', '.join(no_dense)} (no dense W: B·σ(A·x); factor updates are in metrics.jsonl)."
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def fig_spikes(study: Study, spikes: pd.DataFrame, preset: str, out_dir: Path) -> FigureResult:
    name, title = f"dynamics_spikes_{preset}", f"Training loss with loss spikes marked ({preset})"
    log_rows = study.training[(study.training["preset"].astype(str) == str(preset)) & finite(study.training["loss"])]
    if log_rows.empty:
        return FigureResult(name, title, skipped=f"no training loss logged for preset {preset}")
    mine = spikes[spikes["preset"].astype(str) == str(preset)]
    figure = sized_figure(11, 4)
    ax = figure.subplots()
    for method in sorted_methods(log_rows["method"].unique()):
        color = method_color(method)
        for _, run in log_rows[log_rows["method"] == method].groupby("run"):
            ax.plot(run["step"], run["loss"], color=color, linewidth=1.0, alpha=0.7, linestyle=line_style(method))
        marked = mine[mine["method"] == method]
        ax.plot([], [], color=color, linestyle=line_style(method), label=f"{method_label(method)} ({len(marked)} spikes)")
        if len(marked):
            ax.scatter(marked["step"], marked["loss"], color=color, marker="x", s=45, zorder=3)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss [nats/token]")
    figure.legend(*ax.get_legend_handles_labels(), loc="outside right upper", frameon=False)
    figure.suptitle(title)
    caption = ("Training loss of every run (one line per seed); × marks a spike: a step whose loss exceeds "
               "train.spike_factor × the median of the previous train.spike_window losses.")
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def dynamics_section(document, study: Study, preset: str, figures_dir: Path, tables_dir: Path,
                     skipped_lines: list[str]) -> None:
    """Add the training-dynamics heading, figures and spike table of one scale to the report."""
    import matplotlib as mpl

    updates, spikes = read_dynamics(study)
    in_preset = updates[updates["preset"].astype(str) == str(preset)]
    if in_preset.empty and spikes[spikes["preset"].astype(str) == str(preset)].empty:
        return  # runs without dynamics (train.dynamics_every = 0): nothing to say
    document.heading("Training dynamics", 3)
    with mpl.rc_context(STYLE):
        results = [fig_update_norms(updates, preset, figures_dir), fig_spikes(study, spikes, preset, figures_dir)]
    for result in results:
        if result.path is not None:
            document.figure(result)
        else:
            document.paragraph(f"*Figure skipped — {result.title}: not drawn — {result.skipped}*")
            skipped_lines.append(f"{result.title}: not drawn — {result.skipped}")
    table = spike_table(study.runs, spikes, preset)
    table.to_csv(tables_dir / f"dynamics_spikes_{preset}.csv", index=False)
    document.table(table, "Loss spikes per method (all seeds). A spike's update is measured at the spike step; "
                          "matrices whose update per unit lr jumped by the spike factor over their own median.")
