"""Training curves and validation perplexity per seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankscope.report.collect import (
    Study,
    finite,
    is_control,
    method_label,
    sorted_methods,
)
from rankscope.report.figures import style
from rankscope.report.figures.base import (
    FigureResult,
    draw_rows,
    mean_band,
    method_color,
    method_legend,
    method_rows,
    no_data,
    preset_runs,
    reference_legend,
    rows_height,
    save_figure,
    seed_note,
    step_axis,
)


def fig_training_curves(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"training_loss_{preset}", f"Training and validation loss ({preset})"
    log_rows = study.training[study.training["preset"].astype(str) == str(preset)]
    if log_rows.empty or not finite(log_rows["loss"]).any():
        return FigureResult(name, title, skipped=f"no metrics.jsonl with training loss for preset {preset}")
    methods = sorted_methods(log_rows["method"].unique())
    val_rows = log_rows[finite(log_rows["val_loss"])]
    train_rows = log_rows[finite(log_rows["loss"])]
    if style.use_small_multiples(methods):
        figure = _training_rows(train_rows, val_rows, methods)
        layout = " One row per method; full rank (near-black) in every panel, axes shared per column."
    else:
        figure = style.new_figure(style.PANEL_HEIGHT + style.FOOTER_HEIGHT)
        train_ax, val_ax = figure.subplots(1, 2)
        drawn = mean_band(train_ax, train_rows, "step", "loss", methods)
        train_ax.set_ylabel("training loss [nats/token]")
        train_ax.set_title("training loss (logged steps)")
        step_axis(train_ax)
        if val_rows.empty:
            no_data(val_ax, "no validation evaluations logged")
        else:
            mean_band(val_ax, val_rows, "step", "val_loss", methods, marker="o")
            step_axis(val_ax)
            val_ax.set_ylabel("validation loss [nats/token]")
        val_ax.set_title("validation loss (exact, token-weighted)")
        method_legend(figure, drawn)
        layout = ""
    figure.suptitle(title)
    caption = "Loss curves from each run's metrics.jsonl." + layout + _control_note(methods) + seed_note(log_rows)
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))


def _training_rows(train_rows, val_rows, methods):
    """Small multiples: per method, its training loss and validation loss next to full rank's."""
    figure = style.new_figure(rows_height(methods))
    rows, axes = method_rows(figure, methods, ["training loss [nats/token] (logged steps)",
                                               "validation loss [nats/token] (exact, token-weighted)"])

    def train(ax, drawn_methods, method):
        return bool(mean_band(ax, train_rows, "step", "loss", drawn_methods, on_top=method))

    def validation(ax, drawn_methods, method):
        return bool(mean_band(ax, val_rows, "step", "val_loss", drawn_methods, marker="o", on_top=method))

    draw_rows(axes[:, 0], rows, methods, train)
    draw_rows(axes[:, 1], rows, methods, validation)
    for ax in axes[-1]:
        step_axis(ax)
    style.legend(figure, reference_legend(methods))
    return figure


def _control_note(methods) -> str:
    controls = [m for m in methods if is_control(m)]
    if not controls:
        return ""
    return (f" Dashed grey: the control ({', '.join(controls)}: block matrices at init, only embeddings, head and "
            "norms train), a yardstick for the regime, not a method.")


def fig_val_ppl(study: Study, preset: str, out_dir: Path, **_) -> FigureResult:
    name, title = f"val_ppl_{preset}", f"Validation perplexity per seed ({preset})"
    runs = preset_runs(study, preset)
    runs = runs[finite(runs["val_ppl"])]
    if runs.empty:
        return FigureResult(name, title, skipped=f"no run of preset {preset} has a validation perplexity")
    methods = sorted_methods(runs["method"].unique())
    figure = style.new_figure(style.PANEL_HEIGHT + 0.6)
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
    return FigureResult(name, title, caption, save_figure(figure, out_dir, name))
