"""Training curves and validation perplexity per seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankscope.report.collect import Study, finite, is_control, method_label, sorted_methods
from rankscope.report.figures.base import (
    FigureResult,
    _mean_band,
    _method_legend,
    _new_figure,
    _no_data,
    _preset_runs,
    _save,
    _seed_note,
    _step_axis,
    method_color,
)


def fig_training_curves(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"training_loss_{preset}", f"Training and validation loss ({preset})"
    log_rows = study.training[study.training["preset"].astype(str) == str(preset)]
    if log_rows.empty or not finite(log_rows["loss"]).any():
        return FigureResult(name, title, skipped=f"no metrics.jsonl with training loss for preset {preset}")
    methods = sorted_methods(log_rows["method"].unique())
    figure = _new_figure(11, 4)
    train_ax, val_ax = figure.subplots(1, 2)
    drawn = _mean_band(train_ax, log_rows[finite(log_rows["loss"])], "step", "loss", methods)
    train_ax.set_ylabel("training loss [nats/token]")
    train_ax.set_title("training loss (logged steps)")
    _step_axis(train_ax)
    val_rows = log_rows[finite(log_rows["val_loss"])]
    if val_rows.empty:
        _no_data(val_ax, "no validation evaluations logged")
    else:
        _mean_band(val_ax, val_rows, "step", "val_loss", methods, marker="o")
        _step_axis(val_ax)
        val_ax.set_ylabel("validation loss [nats/token]")
    val_ax.set_title("validation loss (exact, token-weighted)")
    _method_legend(figure, drawn)
    figure.suptitle(title)
    caption = "Loss curves from each run's metrics.jsonl." + _control_note(methods) + _seed_note(log_rows)
    return FigureResult(name, title, caption, _save(figure, out_dir, name))


def _control_note(methods) -> str:
    controls = [m for m in methods if is_control(m)]
    if not controls:
        return ""
    return (f" Dashed grey: the control ({', '.join(controls)}: block matrices at init, only embeddings, head and "
            "norms train), a yardstick for the regime, not a method.")


def fig_val_ppl(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"val_ppl_{preset}", f"Validation perplexity per seed ({preset})"
    runs = _preset_runs(study, preset)
    runs = runs[finite(runs["val_ppl"])]
    if runs.empty:
        return FigureResult(name, title, skipped=f"no run of preset {preset} has a validation perplexity")
    methods = sorted_methods(runs["method"].unique())
    figure = _new_figure(max(4.5, 1.0 + 0.9 * len(methods)), 3.8)
    ax = figure.subplots()
    for index, method in enumerate(methods):
        values = runs.loc[runs["method"] == method, "val_ppl"].astype(float).to_numpy()
        offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(index + offsets, values, color=method_color(method), s=22, alpha=0.75, zorder=3)
        error = np.std(values, ddof=1) if len(values) >= 2 else None
        ax.errorbar(index + 0.3, values.mean(), yerr=error, fmt="D", color=method_color(method),
                    markersize=6, capsize=4, linewidth=1.5, zorder=4)
    ax.set_xticks(range(len(methods)), [method_label(m) for m in methods])
    for label, method in zip(ax.get_xticklabels(), methods):
        label.set_color(method_color(method))
    ax.set_xlim(-0.6, len(methods) - 0.3)
    ax.grid(axis="x", visible=False)
    ax.set_ylabel("validation perplexity")
    ax.set_xlabel("method")
    ax.set_title(title)
    caption = ("Dots: individual seeds; diamond: mean, error bar ± 1 std over seeds (where ≥ 2 seeds). "
               "Perplexity is exp of the exact token-weighted mean next-token loss on the validation set.")
    return FigureResult(name, title, caption, _save(figure, out_dir, name))
