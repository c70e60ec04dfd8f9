"""The report's figures are legible: legends sit outside every plotting area and away from the
title, more than style.MAX_METHODS_IN_ONE_AXES methods get one panel row each with full rank in
every panel, the 2-D maps share one colour scale, and a quantity with one value per method is not
drawn as a line plot.

The figures are drawn from synthetic study folders (tests/report/test_report.py's writer) and
checked as matplotlib objects, captured where each figure module saves them.
"""

from __future__ import annotations

import json
import math

import matplotlib as mpl
import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure
from tests.report import test_report as synthetic

from rankscope.report import figures as F
from rankscope.report import load_study
from rankscope.report.collect import sorted_methods
from rankscope.report.figures import base, style

MODULES = ["training", "landscape", "landscape2d", "interpolation", "spectral", "similarity", "intruder", "downstream"]
FEW = ("full", "galore", "cola", "fira")                        # 4: one axes per quantity
MANY = ("full", "galore", "cola", "fira", "lora", "relora")    # 6: small multiples


@pytest.fixture
def captured(monkeypatch):
    """Every figure the figure modules save, by file stem, still open as matplotlib objects."""
    figures: dict[str, Figure] = {}
    original = base.save_figure

    def keep(figure, out_dir, name):
        figures[name] = figure
        return original(figure, out_dir, name)

    for module in MODULES:
        monkeypatch.setattr(f"rankscope.report.figures.{module}.save_figure", keep)
    return figures


def _study(tmp_path, methods, monkeypatch):
    for extra, offset in (("lora", 0.6), ("relora", 0.3)):  # the writer keys each method's offset
        monkeypatch.setitem(synthetic.OFFSET, extra, offset)
    root, _ = synthetic.make_study(tmp_path, methods=methods, seeds=(0, 1), predictor=False)
    return load_study(root)


def _draw(study, tmp_path, *names):
    out = tmp_path / "figures"
    profiles = F.ProfileCache(study)
    calls = {
        "training": lambda: F.fig_training_curves(study, "tiny", out),
        "random": lambda: F.fig_landscape_random(study, "tiny", out, profiles=profiles),
        "singular": lambda: F.fig_landscape_singular(study, "tiny", out, profiles=profiles),
        "landscape2d": lambda: F.fig_landscape2d(study, "tiny", out),
        "ccbh": lambda: F.fig_ccbh(study, "tiny", out),
        "spectral": lambda: F.fig_spectral(study, "tiny", out),
        "similarity": lambda: F.fig_similarity(study, "tiny", out),
        "intruder": lambda: F.fig_intruder(study, "tiny", out),
        "downstream": lambda: F.fig_downstream(study, "tiny", out),
    }
    results = []
    with mpl.rc_context(style.RC):
        for name in names:
            result = calls[name]()
            results += result if isinstance(result, list) else [result]
    return results


def _overlaps(a, b) -> bool:
    """Whether two display-space boxes share more than a pixel of area."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1


def _assert_legends_clear(figure: Figure, name: str) -> None:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legends = figure.legends + [ax.get_legend() for ax in figure.get_axes() if ax.get_legend()]
    assert legends, f"{name}: no legend"
    titles = [t for t in [figure._suptitle] if t is not None and t.get_text()]
    titles += [ax.title for ax in figure.get_axes() if ax.get_visible() and ax.get_title()]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for title in titles:
            assert not _overlaps(box, title.get_window_extent(renderer)), f"{name}: legend over '{title.get_text()}'"
        for ax in figure.get_axes():
            if ax.get_visible():
                assert not _overlaps(box, ax.get_window_extent(renderer)), f"{name}: legend over a plotting area"
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= figure.bbox.width + 1, f"{name}: legend cut off"


def test_the_legend_rule_keeps_clear_of_a_title_wider_than_the_axes():
    """The singular-direction summary's legend sat over its long title; the rule must hold for
    any title, so it is checked on the worst case: a title as wide as the page and 11 entries."""
    figure = style.new_figure(style.PANEL_HEIGHT + style.FOOTER_HEIGHT)
    axes = figure.subplots(1, 3)
    for ax in axes:
        ax.plot([0, 1], [0, 1])
        ax.set_title("top-5: expected sharpness")
    figure.suptitle("Sharpness and direction variance along top-K singular directions (tiny) — parameter scope: all"
                    " — and then some more words")
    base.method_legend(figure, ["full", "cola", "fira", "galore", "lora", "loro", "lowrank", "relora", "sltrain",
                                 "spectron", "frozen"])
    _assert_legends_clear(figure, "worst case")


@pytest.mark.parametrize("methods", [FEW, MANY], ids=["one-axes", "small-multiples"])
def test_legends_overlap_no_title_and_no_plotting_area(tmp_path, monkeypatch, captured, methods):
    study = _study(tmp_path, methods, monkeypatch)
    results = _draw(study, tmp_path, "training", "random", "singular", "spectral", "similarity", "intruder",
                    "downstream")
    assert all(r.skipped is None for r in results), [r.skipped for r in results]
    for name, figure in captured.items():
        _assert_legends_clear(figure, name)
        # The page shows a figure 1:1 only when it is no wider than the page.
        assert figure.get_figwidth() * figure.dpi <= style.PAGE_WIDTH_PX + 1, name


def _hex(method: str) -> str:
    return mcolors.to_hex(style.method_color(method))


def _colour_of(artist) -> str:
    colour = artist.get_color() if hasattr(artist, "get_color") else artist.get_facecolor()
    return mcolors.to_hex(np.atleast_2d(mcolors.to_rgba_array(colour))[0])


def test_many_methods_get_one_row_each_with_full_rank_in_every_panel(tmp_path, monkeypatch, captured):
    study = _study(tmp_path, MANY, monkeypatch)
    _draw(study, tmp_path, "training", "random", "similarity")
    rows = base.panel_methods(sorted_methods(MANY))  # full rank first, then alphabetical; full has no row
    assert rows == ["cola", "fira", "galore", "lora", "relora"]
    for name, columns in (("training_loss_tiny", 2), ("landscape_random_tiny", 3)):
        figure = captured[name]
        axes = np.array(figure.get_axes()).reshape(len(rows), columns)
        for row, method in enumerate(rows):
            assert axes[row, 0].get_ylabel() == method  # the row is named, in place of a legend entry
            for ax in axes[row]:
                colours = {_colour_of(line) for line in ax.get_lines()}
                assert _hex("full") in colours, f"{name}: no full-rank line for {method}"
                assert _hex(method) in colours, f"{name}: no line of {method}"
                # Only the row's method and full rank: the other methods stay in their own rows.
                others = {_hex(m) for m in MANY} - {_hex("full"), _hex(method)}
                assert not colours & others, f"{name}: another method's line in {method}'s panel"
        # Shared axes per column: rows compare at a glance.
        for column in range(columns):
            assert len({axes[row, column].get_ylim() for row in range(len(rows))}) == 1
    # Similarity: full rank's own lines would be the baseline itself; its seed-baseline band is in every row.
    figure = captured["similarity_tiny"]
    cka = [ax for ax in figure.get_axes() if ax.get_subplotspec().colspan.start == 3]
    assert len(cka) == len(rows)
    assert all(ax.collections for ax in cka), "a similarity panel without the seed-baseline band"


def test_few_methods_share_one_axes(tmp_path, monkeypatch, captured):
    study = _study(tmp_path, FEW, monkeypatch)
    _draw(study, tmp_path, "training")
    train_ax = captured["training_loss_tiny"].get_axes()[0]
    assert {_colour_of(line) for line in train_ax.get_lines()} == {_hex(m) for m in FEW}


def test_2d_landscape_maps_share_one_colour_scale_and_one_colourbar(tmp_path, monkeypatch, captured):
    study = _study(tmp_path, MANY, monkeypatch)
    (result,) = _draw(study, tmp_path, "landscape2d")
    figure = captured[result.name]
    maps = [ax for ax in figure.get_axes() if any(isinstance(c, ContourSet) for c in ax.get_children())
            and ax.get_title()]
    assert len(maps) == len(MANY)
    filled = [next(c for c in ax.get_children() if isinstance(c, ContourSet) and c.filled) for ax in maps]
    assert len({(c.norm.vmin, c.norm.vmax) for c in filled}) == 1
    assert len({tuple(c.levels) for c in filled}) == 1
    others = [ax for ax in figure.get_axes() if ax.get_visible() and ax not in maps]
    assert len(others) == 1  # the one colourbar
    # Readable maps: at least ~350 px wide in the 1250-px page.
    figure.canvas.draw()
    assert min(ax.get_window_extent().width for ax in maps) >= 340


def test_one_value_per_method_is_skipped_with_a_reason_not_drawn_as_a_line(tmp_path, monkeypatch, captured):
    study = _study(tmp_path, FEW, monkeypatch)
    (drawn,) = _draw(study, tmp_path, "ccbh")
    assert drawn.skipped is None and drawn.path.is_file()  # two checkpoint pairs per run: a curve
    interpolation = study.tables["interpolation"]
    keep = (interpolation["kind"] != "ccbh") | (interpolation["step_b"].astype(float) == synthetic.STEPS[-1])
    study.tables["interpolation"] = interpolation[keep]
    captured.clear()
    (skipped,) = _draw(study, tmp_path, "ccbh")
    assert skipped.path is None and "ccbh_tiny" not in captured
    assert "one consecutive-checkpoint pair per run" in skipped.skipped and "\n" not in skipped.skipped


def test_tuning_curves_of_many_methods_get_one_panel_each_with_full_rank_in_every_one(tmp_path, monkeypatch):
    """The tune stage's lr curves: 16 methods over overlapping lr ranges were one tangle."""
    from rankscope.report.figures.tuning import fig_tuning

    methods = ["full", "cola", "fira", "galore", "lora", "relora"]
    tune = tmp_path / "tune"
    tune.mkdir()
    rows, cells = [], []
    for index, method in enumerate(methods):
        for lr in (1e-3, 2e-3, 4e-3):
            rows.append({"method": method, "preset": "tiny", "optim.lr": lr, "seed": 0, "state": "done",
                         "score": 4.0 + 0.1 * index + abs(math.log2(lr / 2e-3)), "run": f"{method}-{lr:g}"})
        cells.append({"method": method, "preset": "tiny", "values": {"optim.lr": 2e-3}, "defaults": {"optim.lr": 1e-3}})
    pd.DataFrame(rows).to_csv(tune / "results.csv", index=False)
    (tune / "chosen.json").write_text(json.dumps({"metric": "val_loss", "seeds": [0], "cells": cells}))
    figures = {}
    original = base.save_figure
    monkeypatch.setattr("rankscope.report.figures.tuning.save_figure",
                        lambda figure, out, name: figures.setdefault(name, figure) and original(figure, out, name))
    (result,) = fig_tuning(tmp_path, tmp_path / "figures")
    assert "One panel per method" in result.caption
    figure = figures["tuning_tiny"]
    panels = [ax for ax in figure.get_axes() if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == methods
    for ax, method in zip(panels[1:], methods[1:]):
        colours = {_colour_of(line) for line in ax.get_lines()}
        assert {_hex("full"), _hex(method)} <= colours, method
    assert len({ax.get_ylim() for ax in panels}) == 1
    _assert_legends_clear(figure, "tuning_tiny")
