"""`rankscope report` on synthetic study folders written in the documented formats
(docs/internals.md "Analysis outputs" and "Study layout", the trainer's run folder).

The numbers are made up but well formed; what is checked is what the report does with them:
the table equals mean / std computed here, the Welch p-value equals scipy's on the same numbers,
the report opens with the regime,
the HTML needs nothing outside itself, each method keeps its colour across figures.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from rankscope.report import ReportError, build_report, load_study
from rankscope.report.baseline import SeedBaselines
from rankscope.report.figures import METHOD_COLORS, imbh_matrix, method_color, palette
from rankscope.report.run_features import run_features
from rankscope.report.stats import compare_methods, format_number, mean_std

STEPS = [20, 60, 100]  # three checkpoints keep the figures quick to draw (the study picks up to five)
N_LAYERS = 2
MATRICES = [f"layers.{i}.{part}" for i in range(N_LAYERS) for part in ("self_attn.q_proj", "mlp.up_proj")]
TASKS = ["rs_cloze", "rs_word"]
SINGULAR_K = [1, 5]  # the study default is 1, 5, 10, 20; two values keep the figures quick to draw
# Per-method offsets, so methods differ clearly (and seeds only a little).
OFFSET = {"full": 0.0, "galore": 0.4, "cola": 0.8, "fira": 0.2}
SEED_GAP = 0.3  # extra drift of a comparison with the full-rank run of another seed


def _keys(run: str, method: str, preset: str, seed: int, step: int) -> dict:
    return {"run": run, "method": method, "preset": preset, "seed": seed, "step": step}


def write_run(study: Path, method: str, preset: str, seed: int, all_runs: list[tuple[str, int]]) -> dict:
    """One finished run folder with every file the report reads; returns its summary."""
    run = f"{method}-{preset}-s{seed}"
    run_dir = study / "runs" / run
    rng = np.random.default_rng(zlib.crc32(run.encode()))
    offset = OFFSET[method]
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "analysis").mkdir()
    config = {"model": {"preset": preset}, "method": {"name": method}, "train": {"seed": seed, "steps": STEPS[-1]}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))

    val_loss = 4.0 + offset + 0.05 * rng.standard_normal()
    summary = {
        "method": method, "preset": preset, "seed": seed, "steps": STEPS[-1], "tokens": 12800,
        "val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_tokens": 4096,
        "params": 1_000_000 - int(offset * 100_000), "trainable_params": 900_000,
        "tokens_per_sec": 5000.0 + 100 * rng.standard_normal(), "wall_time": 10.0,
        "memory": {"optimizer_state_bytes": int(8_000_000 * (1 - offset / 2)), "estimated_memory_bytes": 6_000_000},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with open(run_dir / "metrics.jsonl", "w") as log:
        log.write(json.dumps({"step": 0, "tokens": 0, "val_loss": 7.0, "val_ppl": math.exp(7.0)}) + "\n")
        for step in range(5, STEPS[-1] + 1, 5):
            record = {"step": step, "loss": 7.0 - 3.0 * step / STEPS[-1] + offset + 0.05 * rng.standard_normal(),
                      "lr": 1e-3}
            if step in STEPS:
                record["val_loss"] = 7.0 - 3.0 * step / STEPS[-1] + offset
            log.write(json.dumps(record) + "\n")
    accuracies = {task: 0.5 - 0.05 * offset + 0.02 * rng.standard_normal() for task in TASKS}
    evaluation = {"tasks": {t: {"acc": a, "acc_stderr": 0.01} for t, a in accuracies.items()},
                  "mean_acc": float(np.mean(list(accuracies.values()))), "unavailable": {}}
    (run_dir / "eval" / f"step_{STEPS[-1]:06d}.json").write_text(json.dumps(evaluation))
    summary["downstream"] = evaluation

    # landscape: quadratic profiles with method-dependent curvature
    alphas = {"random": np.linspace(-0.003, 0.003, 25), "singular": np.linspace(-0.05, 0.05, 25)}
    arrays = {f"alphas/{name}": grid for name, grid in alphas.items()}
    rows = []
    for step in STEPS:
        curvature = (1 + offset) * 2e4 * (1 + step / 100) * (1 + 0.05 * rng.standard_normal())
        random_profiles = curvature * (1 + 0.2 * rng.standard_normal((10, 1))) * alphas["random"] ** 2
        singular_profiles = (30 + 10 * offset) * (1 + 0.1 * rng.standard_normal()) / np.arange(1, 21)[:, None] \
            * alphas["singular"] ** 2
        arrays[f"random/all/step_{step:06d}"] = random_profiles
        arrays[f"singular/all/step_{step:06d}"] = singular_profiles
        for name, profiles, ks in (("random", random_profiles, [None]), ("singular", singular_profiles, SINGULAR_K)):
            for k in ks:
                chosen = profiles if k is None else profiles[:k]
                mean = chosen.mean(axis=0)
                es = float(np.mean([(mean[12 + m] + mean[12 - m]) / 2 - mean[12] for m in range(1, 13)]))
                dv = float(np.mean(chosen.var(axis=0)))
                for metric, value in (("expected_sharpness", es), ("direction_variance", dv),
                                      ("center_to_min", float(mean[12] - mean.min()))):
                    rows.append({**_keys(run, method, preset, seed, step), "direction_set": name,
                                 "k_max": k if k is not None else "", "scope": "all", "metric": metric, "value": value})
    pd.DataFrame(rows).to_csv(run_dir / "analysis" / "landscape.csv", index=False)
    np.savez(run_dir / "analysis" / "landscape_profiles.npz", **arrays)

    # interpolation: CCBH between consecutive checkpoints, IMBH to every other run at the final step
    rows = []
    for step_a, step_b in zip(STEPS[:-1], STEPS[1:]):
        barrier = (0.05 + 0.02 * offset) * 40 / step_b + 0.003 * rng.standard_normal()
        rows.append({**_keys(run, method, preset, seed, step_b), "kind": "ccbh", "step_a": step_a, "step_b": step_b,
                     "other_run": "", "other_method": "", "space": "native", "applicable": True, "reason": "",
                     "barrier": barrier, "relative_barrier": barrier / 4.0, "loss_a": 4.1, "loss_b": 4.0})
    for other_method, other_seed in all_runs:
        # The pipeline's partners: the runs of the same seed, and the full-rank runs of the other
        # seeds (a seed pair of full-rank runs from its lower seed's side only).
        cross = other_seed != seed
        if cross and (other_method != "full" or (method == "full" and other_seed < seed)):
            continue
        other = f"{other_method}-{preset}-s{other_seed}"
        applicable = "cola" not in (method, other_method)  # CoLA has no dense equivalent
        # A run against itself (the pipeline writes that pair as a check) has barrier ~0.
        barrier = 1e-8 if other == run else \
            0.1 + 0.1 * abs(OFFSET[other_method] - offset) + 0.05 * cross + 0.01 * rng.standard_normal()
        rows.append({**_keys(run, method, preset, seed, STEPS[-1]), "kind": "imbh", "step_a": STEPS[-1],
                     "step_b": STEPS[-1], "other_run": other, "other_method": other_method, "other_seed": other_seed,
                     "pairing": "self" if other == run else ("cross-seed" if cross else "same-seed"), "space": "dense",
                     "applicable": applicable, "reason": "" if applicable else "cola has no dense weight",
                     "barrier": barrier if applicable else "", "relative_barrier": barrier / 4 if applicable else "",
                     "loss_a": 4.0, "loss_b": 4.1})
    pd.DataFrame(rows).to_csv(run_dir / "analysis" / "interpolation.csv", index=False)

    # spectral: the study's W (native matrices) and the merged W; CoLA has no merged W
    rows = []
    for step in STEPS:
        for target in ("W_native", "dW_native", "W", "dW"):
            if target.startswith("d") and step == STEPS[0]:
                continue  # no update at the first checkpoint
            if method == "cola" and target in ("W", "dW"):
                for metric in ("effective_rank", "stable_rank"):
                    rows.append({**_keys(run, method, preset, seed, step), "target": target, "matrix": "mean", "layer": -1,
                                 "metric": metric, "value": "", "applicable": False, "reason": "cola has no dense weight"})
                continue
            per_metric: dict[str, list[float]] = {}
            for layer_matrix in MATRICES:
                values = {"effective_rank": 50 - 10 * offset + step / 10 + rng.standard_normal(),
                          "stable_rank": 10 - 2 * offset + 0.2 * rng.standard_normal(),
                          "spectral_gap": 0.2 + 0.05 * offset + 0.01 * rng.standard_normal(),
                          "sv_ratio": 0.8 - 0.05 * offset, "numerical_rank_ratio": 1.0 - 0.3 * offset,
                          "count_above": 40 - 5 * offset + step / 20,
                          "fro_norm": 5 + step / 50, "relative_fro_norm": 0.1 / (1 + step / 50)}
                layer = int(layer_matrix.split(".")[1])
                for metric, value in values.items():
                    per_metric.setdefault(metric, []).append(value)
                    rows.append({**_keys(run, method, preset, seed, step), "target": target, "matrix": layer_matrix,
                                 "layer": layer, "metric": metric, "value": value, "applicable": True, "reason": ""})
            for metric, values in per_metric.items():
                rows.append({**_keys(run, method, preset, seed, step), "target": target, "matrix": "mean",
                             "layer": -1, "metric": metric, "value": float(np.mean(values)), "applicable": True, "reason": ""})
            if target.startswith("d"):
                rows.append({**_keys(run, method, preset, seed, step), "target": target, "matrix": "pooled", "layer": -1,
                             "metric": "relative_fro_norm", "value": 0.05 + 0.01 * offset, "applicable": True, "reason": ""})
    pd.DataFrame(rows).to_csv(run_dir / "analysis" / "spectral.csv", index=False)

    # 2-D landscape at the last step: a bowl whose curvature grows with the method's offset
    axis = np.linspace(-0.003, 0.003, 5)
    x, y = np.meshgrid(axis, axis)
    surfaces = {"axes/random": axis, f"random/all/step_{STEPS[-1]:06d}": (1 + offset) * 2e4 * (x**2 + 0.5 * y**2)}
    np.savez(run_dir / "analysis" / "landscape2d_surfaces.npz", **surfaces)
    pd.DataFrame([{**_keys(run, method, preset, seed, STEPS[-1]), "pair": "random", "scope": "all", "metric": "mean_rise",
                   "value": float(surfaces[f"random/all/step_{STEPS[-1]:06d}"].mean())}]).to_csv(
        run_dir / "analysis" / "landscape2d.csv", index=False)

    # Hessian at the last step
    pd.DataFrame([{**_keys(run, method, preset, seed, STEPS[-1]), "scope": "all", "metric": metric, "value": value,
                   "standard_error": error, "hvps": 10, "converged": True, "applicable": True, "reason": ""}
                  for metric, value, error in (("max_eigenvalue", 30.0 * (1 + offset), float("nan")),
                                               ("min_eigenvalue", -2.0 * (1 + offset), float("nan")),
                                               ("trace", 900.0 * (1 + offset), 9.0))]).to_csv(
        run_dir / "analysis" / "hessian.csv", index=False)
    (run_dir / "analysis" / "meta.json").write_text(json.dumps({"settings": {
        "loss_average": "batch_mean", "singular_grid": "study", "singular_study_grid": [-0.05, 0.0501, 0.004],
        "singular_beyond_rank": "clamp", "zero_matrix_gap": "zero", "last_hidden": "final_norm"}}))

    # similarity to the full-rank run of the same seed and to those of the other seeds (a seed pair
    # of full-rank runs from its lower seed's side only); another seed adds SEED_GAP of drift
    rows = []
    seeds = sorted({s for _, s in all_runs})
    partners = [s for s in seeds if s == seed or method != "full" or s > seed]
    for reference_seed in partners:
        reference = f"full-{preset}-s{reference_seed}"
        pairing = "self" if reference == run else ("same-seed" if reference_seed == seed else "cross-seed")
        for step in STEPS:
            for layer in range(N_LAYERS + 1):
                drift = (offset + SEED_GAP * (pairing == "cross-seed")) * (layer + 1) * step / 100
                for metric, value in (("l2", 2 * drift), ("relative_l2", 0.2 * drift), ("cosine", 1 - 0.1 * drift),
                                      ("cka", 1 - 0.05 * drift + 0.005 * rng.standard_normal()), ("mean_norm", 10 + drift)):
                    rows.append({**_keys(run, method, preset, seed, step), "reference_run": reference,
                                 "reference_method": "full", "reference_seed": reference_seed, "pairing": pairing,
                                 "layer": layer, "metric": metric, "value": value, "applicable": True, "reason": ""})
    pd.DataFrame(rows).to_csv(run_dir / "analysis" / "similarity.csv", index=False)

    # intruder dimensions (k 3) against the same partners and the run's init: per matrix
    # round(10 * offset) + 1 for another seed, 3 against the init, none against itself
    rows = []
    for reference_seed in [*partners, None]:
        reference = "init" if reference_seed is None else f"full-{preset}-s{reference_seed}"
        pairing = ("init" if reference_seed is None else "self" if reference == run
                   else "same-seed" if reference_seed == seed else "cross-seed")
        count = {"self": 0, "same-seed": round(10 * offset), "cross-seed": round(10 * offset) + 1, "init": 3}[pairing]
        for step in STEPS:
            head = {**_keys(run, method, preset, seed, step), "reference_run": reference,
                    "reference_method": "full" if reference_seed is not None else method,
                    "reference_seed": seed if reference_seed is None else reference_seed, "pairing": pairing,
                    "applicable": method != "cola", "reason": "" if method != "cola" else "cola has no dense weight"}
            if method == "cola":
                rows += [{**head, "matrix": m, "layer": -1, "metric": "intruders", "value": ""} for m in ("total", "mean")]
                continue
            for layer_matrix in MATRICES:
                layer = int(layer_matrix.split(".")[1])
                rows.append({**head, "matrix": layer_matrix, "layer": layer, "metric": "intruders", "value": min(count, 3)})
                rows += [{**head, "matrix": layer_matrix, "layer": layer, "metric": f"similarity_{j}", "value": 0.9}
                         for j in (1, 2, 3)]
            rows.append({**head, "matrix": "total", "layer": -1, "metric": "intruders", "value": len(MATRICES) * min(count, 3)})
            rows.append({**head, "matrix": "mean", "layer": -1, "metric": "intruders", "value": min(count, 3)})
    pd.DataFrame(rows).to_csv(run_dir / "analysis" / "intruder.csv", index=False)
    return summary


def make_study(root: Path, methods=("full", "galore"), seeds=(0, 1), presets=("tiny",),
               failed: dict[str, str] | None = None, predictor: bool = True) -> tuple[Path, dict[str, dict]]:
    study = root / "study"
    (study / "runs").mkdir(parents=True)
    (study / "study.yaml").write_text(yaml.safe_dump({"methods": list(methods), "seeds": list(seeds)}))
    summaries, status = {}, {}
    for preset in presets:
        all_runs = [(m, s) for m in methods for s in seeds]
        for method, seed in all_runs:
            run = f"{method}-{preset}-s{seed}"
            summaries[run] = write_run(study, method, preset, seed, all_runs)
            status[run] = {"stage": "done", "error": None}
    for run, reason in (failed or {}).items():
        status[run] = {"stage": "failed", "error": reason}
    (study / "status.json").write_text(json.dumps(status))
    if predictor:
        pd.DataFrame([
            {"feature_set": "val_loss", "features": "val_loss", "n_rows": 4, "n_dropped": 0, "r2_in_sample": 0.84,
             "loso_pearson": float("nan"), "lomo_pearson": 0.86, "note": "LOSO cannot be computed: needs ≥ 2 scales"},
            {"feature_set": "geometry", "features": "es_random", "n_rows": 4, "n_dropped": 0, "r2_in_sample": 0.56,
             "loso_pearson": float("nan"), "lomo_pearson": -0.43, "note": ""},
            {"feature_set": "val_loss+geometry", "features": "val_loss,es_random", "n_rows": 4, "n_dropped": 0,
             "r2_in_sample": 0.91, "loso_pearson": float("nan"), "lomo_pearson": 0.9, "note": ""},
        ]).to_csv(study / "predictor.csv", index=False)
    return study, summaries


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    study, summaries = make_study(root, seeds=(0, 1, 2),
                                  failed={"galore-tiny-s3": "CUDA out of memory at step 3 (lower train.micro_batch_size)"})
    # The synthetic runs stand for runs at the literature's lrs (no shipped tuned defaults).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("rankscope.methods.tuned.tuned_table", lambda: {})
        report = build_report(study)
    return study, summaries, report


EXPECTED_FIGURES = [
    "training_loss_tiny", "val_ppl_tiny", "landscape_random_tiny", "landscape_singular_profiles_tiny",
    "landscape_singular_summary_tiny", "landscape2d_tiny", "ccbh_tiny", "imbh_tiny", "imbh_to_full_tiny", "spectral_tiny",
    "similarity_tiny", "intruder_tiny",
    "downstream_tiny", "predictor", "significance_map_tiny",
]


def test_every_file_is_written(built):
    study, _, report = built
    assert report == study / "report"
    for name in ("report.md", "report.html"):
        assert (report / name).stat().st_size > 0
    for name in EXPECTED_FIGURES:
        path = report / "figures" / f"{name}.png"
        assert path.is_file(), name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("results_tiny", "runs", "significance", "failed_runs", "predictor", "geometry_tiny", "regime", "chance",
                 "distance_to_full_tiny", "seed_baseline_tiny"):
        assert (report / "tables" / f"{name}.csv").is_file(), name
    assert "Figure skipped" not in (report / "report.md").read_text()


def test_results_table_equals_mean_and_std_by_hand(built):
    _, summaries, report = built
    table = pd.read_csv(report / "tables" / "results_tiny.csv").set_index("method")
    for method in ("full", "galore"):
        ppl = [summaries[f"{method}-tiny-s{seed}"]["val_ppl"] for seed in (0, 1, 2)]
        acc = [summaries[f"{method}-tiny-s{seed}"]["downstream"]["mean_acc"] for seed in (0, 1, 2)]
        assert table.loc[method, "val_ppl_mean"] == pytest.approx(sum(ppl) / 3, rel=1e-12)
        assert table.loc[method, "val_ppl_std"] == pytest.approx(np.std(ppl, ddof=1), rel=1e-9)
        assert table.loc[method, "downstream_acc_mean"] == pytest.approx(sum(acc) / 3, rel=1e-12)
        assert table.loc[method, "optimizer_state_bytes"] == summaries[f"{method}-tiny-s0"]["memory"]["optimizer_state_bytes"]
        assert table.loc[method, "n_seeds"] == 3
    markdown = (report / "report.md").read_text()
    full_ppl = [summaries[f"full-tiny-s{seed}"]["val_ppl"] for seed in (0, 1, 2)]
    # The shown cell is the same mean with the formatting of the report (4 significant digits).
    assert f"{np.mean(full_ppl):.{4 - 1 - int(math.floor(math.log10(np.mean(full_ppl))))}f} ±" in markdown


def test_welch_p_value_equals_scipy(built):
    _, summaries, report = built
    table = pd.read_csv(report / "tables" / "significance.csv")
    row = table[(table["metric"] == "val_loss") & (table["method"] == "galore")].iloc[0]
    galore = [summaries[f"galore-tiny-s{s}"]["val_loss"] for s in (0, 1, 2)]
    full = [summaries[f"full-tiny-s{s}"]["val_loss"] for s in (0, 1, 2)]
    expected = stats.ttest_ind(galore, full, equal_var=False)
    assert row["other"] == "full" and row["status"] == "tested"
    assert row["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert row["t_statistic"] == pytest.approx(expected.statistic, rel=1e-9)
    assert row["difference"] == pytest.approx(np.mean(galore) - np.mean(full), rel=1e-12)
    interval = expected.confidence_interval(0.95)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(interval.low, rel=1e-9), pytest.approx(interval.high, rel=1e-9))
    assert set(table["metric"]) >= {"val_loss", "downstream_acc", "es_random", "hessian_trace"}
    # Distances to full rank are read against the seed baseline, not tested against full's self-comparison.
    assert not set(table["metric"]) & {"imbh_to_full", "cka_to_reference", "cka_last_layer"}
    assert "val_ppl" not in set(table["metric"])  # exp(val loss) run by run: tested once, as val loss
    # Holm over the whole family: the adjusted p of the most significant test is m × p.
    tested = table[table["status"] == "tested"]
    smallest = tested.loc[tested["p_value"].idxmin()]
    assert smallest["p_adjusted"] == pytest.approx(min(1.0, len(tested) * smallest["p_value"]), rel=1e-12)
    markdown = (report / "report.md").read_text()
    assert f"{len(tested)} two-sided Welch tests over seeds in one Holm-corrected family" in markdown  # the findings
    assert f"all {len(tested)} tests of the report" in markdown  # the appendix


def test_the_report_opens_with_the_regime(built):
    _, summaries, report = built
    markdown = (report / "report.md").read_text()
    assert markdown.index("## Regime") < markdown.index("## Findings") < markdown.index("### Results")
    assert "## Definitions used" in markdown
    regime = pd.read_csv(report / "tables" / "regime.csv").set_index("method")
    summary = summaries["galore-tiny-s0"]
    assert regime.loc["galore", "tokens_per_param"] == pytest.approx(summary["tokens"] / summary["params"], rel=1e-12)
    assert regime.loc["galore", "steps"] == STEPS[-1] and regime.loc["galore", "seeds"] == 3
    # No optim.lr in the runs' configs: each method's default, which is the literature's.
    assert float(regime.loc["galore", "lr"]) == 0.01 and float(regime.loc["full", "lr"]) == 0.001
    assert set(regime["lr_source"]) == {"literature default"}
    assert "Learning rates: literature default — none was tuned for this regime." in markdown
    # The shipped offline tasks have 4 choices each: chance 25%, shown per task and next to the accuracies.
    chance = pd.read_csv(report / "tables" / "chance.csv").set_index("task")
    assert chance.loc["rs_cloze", "chance"] == pytest.approx(0.25) and chance.loc["rs_word", "chance"] == pytest.approx(0.25)
    assert "rs_cloze 25.0% (4 choices" in markdown
    assert "| baseline: unigram / chance |  | – | – | 25.0 |" in markdown
    # The synthetic runs have no data section in config.yaml: the unigram perplexity says why it is missing.
    assert "unigram perplexity (tiny): no run has a config.yaml with a data section" in markdown
    assert "full rank not tuned on the same budget: differences are not evidence that a method beats full rank" in markdown
    assert "tokens per parameter at most, against about 20 for compute-optimal training" in markdown


def test_shipped_tuned_lrs_outside_their_tuning_regime_do_not_count_as_tuned(tmp_path):
    """The synthetic runs are tiny runs, but not in the regime the shipped tiny lrs were tuned in
    (tuned_defaults.yaml's source.tiny.regime): they train at those lrs, and nothing is "better"."""
    study, _ = make_study(tmp_path, seeds=(0, 1, 2), predictor=False)
    report = build_report(study)
    regime = pd.read_csv(report / "tables" / "regime.csv").set_index("method")
    assert set(regime["lr_source"]) == {"tuned here, for another regime"}
    markdown = (report / "report.md").read_text()
    assert "full rank not tuned on the same budget" in markdown and "better than full rank" not in markdown


def test_html_is_self_contained(built):
    _, _, report = built
    text = (report / "report.html").read_text()
    sources = re.findall(r"src=['\"]([^'\"]*)['\"]", text)
    assert len(sources) == len(EXPECTED_FIGURES)
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert "<link" not in text and "http://" not in text and "https://" not in text
    assert "<table" in text and "<style>" in text


def _pixels_of(path: Path, color: str) -> int:
    import matplotlib.colors
    import matplotlib.image

    image = matplotlib.image.imread(path)[..., :3]
    target = np.array(matplotlib.colors.to_rgb(color))
    return int((np.abs(image - target).max(axis=-1) < 0.02).sum())


def test_each_method_keeps_its_colour_across_figures(built):
    _, _, report = built
    assert palette(["galore", "full"]) == {"galore": method_color("galore"), "full": method_color("full")}
    assert METHOD_COLORS["full"] == method_color("full") == "#222222"
    assert method_color("some_new_method") == method_color("some_new_method")
    assert len({method_color(m) for m in METHOD_COLORS}) == len(METHOD_COLORS)
    # The drawn pixels: galore's colour appears in both figures, fira's (not in the study) in neither.
    for name in ("training_loss_tiny", "landscape_random_tiny", "downstream_tiny"):
        path = report / "figures" / f"{name}.png"
        assert _pixels_of(path, method_color("galore")) > 50, name
        assert _pixels_of(path, method_color("fira")) == 0, name


def test_failed_run_is_listed_with_its_reason(built):
    _, _, report = built
    results = pd.read_csv(report / "tables" / "results_tiny.csv").set_index("method")
    assert results.loc["galore", "n_failed"] == 1
    assert "CUDA out of memory at step 3" in results.loc["galore", "failed_runs"]
    markdown = (report / "report.md").read_text()
    assert "galore-tiny-s3" in markdown and "CUDA out of memory at step 3" in markdown
    failed = pd.read_csv(report / "tables" / "failed_runs.csv")
    assert failed["run"].tolist() == ["galore-tiny-s3"]
    assert failed["seed"].tolist() == [3]


def _drop_analysis(study: Path) -> None:
    """Remove every run's analysis outputs (as if the analyze stage had not run)."""
    for run_dir in (study / "runs").iterdir():
        for path in (run_dir / "analysis").iterdir():
            path.unlink()


def test_two_seeds_are_not_testable_in_the_report(tmp_path):
    study, _ = make_study(tmp_path, seeds=(0, 1), predictor=False)
    _drop_analysis(study)  # the statement depends on seeds only; fewer figures keep the test quick
    report = build_report(study)
    markdown = (report / "report.md").read_text()
    assert "No test was computed" in markdown
    assert "val loss: not tested for **galore** (not testable; a test needs ≥ 3 seeds with a value in each group)" in markdown
    cells = pd.read_csv(report / "tables" / "significance_map_tiny.csv")
    assert set(cells.loc[cells["kind"] == "test", "cell"]) <= {"not testable", "no values"}
    assert "val loss: not testable — fewer than 3 seeds per method, so no order is given." in markdown
    table = pd.read_csv(report / "tables" / "significance.csv")
    assert table["p_value"].isna().all() and (table["status"] == "not testable").all()
    # Without predictor.csv the figure is skipped with a line, not a crash.
    assert "no STUDY_DIR/predictor.csv" in markdown


def test_missing_analysis_is_reported_not_fatal_through_the_cli(tmp_path, capsys):
    from rankscope.cli import main

    study, _ = make_study(tmp_path, predictor=False)
    _drop_analysis(study)
    assert main(["report", str(study)]) == 0
    report = study / "report"
    assert str(report / "report.html") in capsys.readouterr().out
    markdown = (report / "report.md").read_text()
    assert "no spectral.csv rows for preset tiny" in markdown
    assert (report / "figures" / "training_loss_tiny.png").is_file()
    assert not (report / "figures" / "spectral_tiny.png").exists()


def test_imbh_matrix_symmetric_with_not_applicable_cells(tmp_path):
    study, _ = make_study(tmp_path, methods=("full", "galore", "cola"), seeds=(0,), predictor=False)
    loaded = load_study(study)
    methods, values, state = imbh_matrix(loaded.tables["interpolation"])
    assert methods == ["full", "cola", "galore"]
    i, j = methods.index("full"), methods.index("galore")
    assert values[i, j] == values[j, i] and state[i, j] == 1
    c = methods.index("cola")
    assert state[c, i] == 0 and state[i, c] == 0 and np.isnan(values[c, i])
    assert state[i, i] == -1  # one seed: no same-method pair (the run-with-itself rows are not one)
    features = run_features(loaded).set_index("run")
    assert math.isnan(features.loc["full-tiny-s0", "imbh_to_full"])  # only the self pair: no value
    assert math.isnan(features.loc["cola-tiny-s0", "imbh_to_full"])  # not applicable
    galore_to_full = loaded.tables["interpolation"].query("run == 'galore-tiny-s0' and other_run == 'full-tiny-s0'")
    assert features.loc["galore-tiny-s0", "imbh_to_full"] == pytest.approx(float(galore_to_full["barrier"].iloc[0]))


def test_cola_is_in_every_table_with_not_applicable_cells_and_their_reasons(tmp_path):
    study, _ = make_study(tmp_path, methods=("full", "cola"), seeds=(0, 1), predictor=False)
    report = build_report(study)
    markdown = (report / "report.md").read_text()
    geometry = pd.read_csv(report / "tables" / "geometry_tiny.csv", keep_default_na=False).set_index("method")
    assert list(geometry.index) == ["full", "cola"]
    # Defined for CoLA: the study's W (its factors), the Hessian, the activations.
    for label in ("effective rank of W", "Hessian largest eigenvalue", "mean activation norm (mean over layers)"):
        assert geometry.loc["cola", label] not in ("n/a", "–") and "±" in geometry.loc["cola", label], label
    # Not defined for CoLA: a dense weight to merge or interpolate; the cell says so and a line says why.
    assert geometry.loc["cola", "effective rank of merged W"] == "n/a" and geometry.loc["cola", "IMBH to full-rank"] == "n/a"
    assert "cola, effective rank of merged W: not applicable — cola has no dense weight" in markdown
    assert "cola, IMBH to full-rank: not applicable — cola has no dense weight" in markdown
    assert "| cola |" in markdown.split("#### Spectra")[1].split("####")[0]


def test_the_report_states_its_definitions_and_shows_the_new_metrics(built):
    _, _, report = built
    markdown = (report / "report.md").read_text()
    assert "## Definitions used" in markdown
    assert "Probe loss (landscapes, barriers, Hessian): mean of per-batch mean losses (the study's) (`loss_average=batch_mean`)" in markdown
    assert "after the final RMSNorm, as HF hidden_states (the study's)" in markdown
    assert "numpy.arange(-0.05, 0.0501, 0.004), sharpness around index len // 2" in markdown
    for heading in ("#### Loss landscape, barriers and curvature", "#### Spectra", "#### Activations"):
        assert heading in markdown
    geometry = pd.read_csv(report / "tables" / "geometry_tiny.csv").set_index("method")
    for label in ("Hessian trace", "numerical rank / min(m, n) of W", "σ₂/σ₁ of W", "‖ΔW‖ / ‖W‖ pooled over matrices"):
        assert label in geometry.columns, label
    assert geometry.loc["galore", "Hessian largest eigenvalue"].startswith("42")  # 30 × (1 + 0.4), no spread over seeds
    assert geometry.loc["galore", "Hessian most negative eigenvalue"].startswith("-2.8")
    assert "2-D loss landscape at the last checkpoint" in markdown


def _similarity(study: Path, run: str, reference: str, metric: str, step: int = STEPS[-1]) -> pd.Series:
    table = pd.read_csv(study / "runs" / run / "analysis" / "similarity.csv")
    rows = table[(table["reference_run"] == reference) & (table["metric"] == metric) & (table["step"] == step)]
    return rows.set_index("layer")["value"].sort_index()


def test_the_full_rank_row_shows_the_seed_baseline_and_low_rank_values_are_read_against_it(built):
    study, _, report = built
    # Three seeds give three pairs, each stored in its lower seed's run: last-layer CKA at the final step.
    seed_pairs = ((0, 1), (0, 2), (1, 2))
    pairs = [_similarity(study, f"full-tiny-s{a}", f"full-tiny-s{b}", "cka").iloc[-1] for a, b in seed_pairs]
    geometry = pd.read_csv(report / "tables" / "geometry_tiny.csv").set_index("method")
    cell = geometry.loc["full", "CKA to full-rank (last layer)"]
    assert cell == f"{format_number(np.mean(pairs))} [{format_number(min(pairs))}, {format_number(max(pairs))}] (3 pairs)"
    # Relative L2 divides by the reference's norm: the baseline holds each pair in both directions.
    loaded = load_study(study)
    relative = SeedBaselines(loaded).final_baseline("tiny", "relative_l2_to_reference")
    expected_relative = []
    for a, b in seed_pairs:
        l2 = _similarity(study, f"full-tiny-s{a}", f"full-tiny-s{b}", "l2")
        norm = _similarity(study, f"full-tiny-s{a}", f"full-tiny-s{b}", "mean_norm")
        expected_relative += [_similarity(study, f"full-tiny-s{a}", f"full-tiny-s{b}", "relative_l2").mean(),
                              (l2 / norm).mean()]
    assert sorted(relative.values) == pytest.approx(sorted(expected_relative), rel=1e-12)

    distance = pd.read_csv(report / "tables" / "distance_to_full_tiny.csv")
    cka = distance[(distance["metric"] == "cka_last_layer") & (distance["method"] == "galore")].set_index("pairing")
    same = [_similarity(study, f"galore-tiny-s{s}", f"full-tiny-s{s}", "cka").iloc[-1] for s in (0, 1, 2)]
    other = [_similarity(study, f"galore-tiny-s{s}", f"full-tiny-s{t}", "cka").iloc[-1]
             for s in (0, 1, 2) for t in (0, 1, 2) if t != s]
    low, high, tolerance = min(pairs), max(pairs), 1e-5
    for pairing, values in (("same-seed", same), ("cross-seed", other)):
        assert cka.loc[pairing, "n"] == len(values)
        assert cka.loc[pairing, "mean"] == pytest.approx(np.mean(values), rel=1e-12)
        assert cka.loc[pairing, "difference_to_baseline"] == pytest.approx(np.mean(values) - np.mean(pairs), rel=1e-12)
        expected = "farther than seed baseline" if np.mean(values) < low - tolerance else (
            "closer than seed baseline" if np.mean(values) > high + tolerance else "within seed baseline")
        assert cka.loc[pairing, "reading"] == expected
    assert cka.loc["cross-seed", "reading"] == "farther than seed baseline"  # 0.4 + 0.3 drift vs 0.3
    baseline_row = distance[(distance["metric"] == "cka_last_layer") & (distance["method"] == "full")].iloc[0]
    assert baseline_row["pairing"] == "seed baseline" and baseline_row["n"] == 3
    # Per checkpoint and layer as well, labelled by pairing.
    layers = pd.read_csv(report / "tables" / "seed_baseline_tiny.csv")
    assert set(layers["pairing"]) == {"seed baseline", "same-seed", "cross-seed"} and set(layers["step"]) == set(STEPS)
    markdown = (report / "report.md").read_text()
    assert "### Distance from full rank against the full-rank seed baseline" in markdown
    assert "min..max over the seed pairs" in markdown and "The seed baseline is missing" not in markdown


def test_one_full_rank_seed_says_the_baseline_is_missing_and_why(tmp_path):
    study, _ = make_study(tmp_path, seeds=(0,), predictor=False)
    report = build_report(study)
    markdown = (report / "report.md").read_text()
    why = "the study has 1 finished full-rank run at scale tiny (seed 0); the seed baseline compares full-rank runs " \
          "of different seeds, so it needs ≥ 2"
    assert f"**The seed baseline is missing at this scale:** {why}." in markdown
    assert f"full: the seed baseline is missing — {why}." in markdown
    geometry = pd.read_csv(report / "tables" / "geometry_tiny.csv").set_index("method")
    assert geometry.loc["full", "CKA to full-rank (last layer)"] == "baseline missing"
    assert geometry.loc["full", "IMBH to full-rank"] == "baseline missing"
    assert geometry.loc["galore", "CKA to full-rank (last layer)"] not in ("baseline missing", "–")
    distance = pd.read_csv(report / "tables" / "distance_to_full_tiny.csv")
    assert (distance.loc[distance["method"] == "galore", "reading"] == "baseline missing").all()
    assert f"No seed-baseline band: {why}." in markdown  # the similarity and barrier figures say it too


def test_a_seed_pair_analysed_from_both_sides_counts_once(built):
    study, _, _ = built
    loaded = load_study(study)
    before = SeedBaselines(loaded)
    similarity = loaded.tables["similarity"]
    # The same pair from seed 1's side, as `rankscope analyze` gives when both runs are analysed
    # with each other as references: same numbers, reversed roles.
    stored = similarity[(similarity["run"] == "full-tiny-s0") & (similarity["reference_run"] == "full-tiny-s1")]
    mirrored = stored.assign(run="full-tiny-s1", seed=1, reference_run="full-tiny-s0", reference_seed=0)
    loaded.tables["similarity"] = pd.concat([similarity, mirrored], ignore_index=True)
    after = SeedBaselines(loaded)
    # Three seed pairs; relative L2 holds each in both directions.
    for measure, pairs in (("cka_last_layer", 3), ("relative_l2_to_reference", 6)):
        assert after.final_baseline("tiny", measure).n == before.final_baseline("tiny", measure).n == pairs, measure
    assert after.final_baseline("tiny", "cka_last_layer").mean == before.final_baseline("tiny", "cka_last_layer").mean


def test_reading_against_the_range_follows_the_metrics_direction():
    from rankscope.report.baseline import CLOSER, FARTHER, WITHIN, Baseline

    cka = Baseline("cka", higher_is_closer=True, values=np.array([0.6, 0.7]))
    l2 = Baseline("l2", higher_is_closer=False, values=np.array([0.6, 0.7]))
    assert (cka.low, cka.high, cka.mean) == (0.6, 0.7, pytest.approx(0.65))
    assert cka.reading(0.65) == l2.reading(0.65) == WITHIN
    assert cka.reading(0.5) == FARTHER and l2.reading(0.5) == CLOSER
    assert cka.reading(0.8) == CLOSER and l2.reading(0.8) == FARTHER
    # The same pair computed from its two sides differs by rounding: still inside a one-pair range.
    single = Baseline("cka", higher_is_closer=True, values=np.array([0.5]))
    assert single.reading(0.5 + 1e-12) == single.reading(0.5 - 1e-12) == WITHIN
    assert single.reading(0.5 - 1e-3) == FARTHER
    missing = Baseline("cka", higher_is_closer=True, missing="one seed")
    assert missing.reading(0.5) == "baseline missing" and missing.cell() == "baseline missing"


def test_statistics_helpers_against_known_answers():
    mean, std, n = mean_std([1.0, 2.0, 4.0, float("nan")])
    assert (mean, n) == (pytest.approx(7 / 3), 3) and std == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert math.isnan(mean_std([3.0])[1])
    frame = pd.DataFrame({"preset": ["p"] * 6, "method": ["full"] * 3 + ["x"] * 3, "m": [1.0, 1.1, 0.9, 3.0, 3.2, 3.1]})
    row = compare_methods(frame, ["m"], ranking_metrics=()).iloc[0]
    assert row["status"] == "tested" and bool(row["separated"])
    assert row["p_value"] == pytest.approx(stats.ttest_ind([3.0, 3.2, 3.1], [1.0, 1.1, 0.9], equal_var=False).pvalue)
    assert row["p_adjusted"] == row["p_value"]  # a family of one


def test_not_a_study_folder_is_a_user_error(tmp_path):
    with pytest.raises(ReportError, match="not a study folder"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "missing")
    from rankscope.cli import main

    assert main(["report", str(tmp_path / "missing")]) == 2


def test_checkpoint_choice_spreads_five_and_keeps_the_last():
    from rankscope.report.figures import pick_checkpoints

    assert pick_checkpoints(range(100, 1100, 100)) == [100, 300, 500, 800, 1000]
    assert pick_checkpoints([30, 10, 20]) == [10, 20, 30]


def test_intruder_table_reads_each_method_against_the_seed_baseline(built):
    study, _, report = built
    table = pd.read_csv(report / "tables" / "intruders_tiny.csv")
    assert set(table["pairing"]) == {"self", "same-seed", "cross-seed", "init"}
    assert (table["step"] == STEPS[-1]).all()  # the last analysed checkpoint
    html = (report / "report.html").read_text()
    assert "Intruder dimensions" in html
    # 4 matrices: galore 3 per matrix against every full-rank run (capped at k), full rank's other
    # seeds 1 per matrix (its seed baseline: 3 pairs from the lower seed's side), 3 against any init.
    for text in ("seed baseline 4.0 ± 0.0 (n 3)", "12.0 ± 0.0 (n 3)", "12.0 ± 0.0 (n 6)"):
        assert text in html, text


def test_a_saturated_intruder_baseline_is_said(tmp_path):
    """When two full-rank seeds already differ in every top direction, the report says the metric
    cannot separate the methods at this scale."""
    study, _ = make_study(tmp_path, seeds=(0, 1, 2))
    for run_dir in (study / "runs").iterdir():
        path = run_dir / "analysis" / "intruder.csv"
        table = pd.read_csv(path)
        cross = table["pairing"] == "cross-seed"
        table.loc[cross & (table["matrix"] != "total") & (table["metric"] == "intruders"), "value"] = 3
        table.loc[cross & (table["matrix"] == "total"), "value"] = 12
        table.to_csv(path, index=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("rankscope.methods.tuned.tuned_table", lambda: {})
        report = build_report(study)
    html = (report / "report.html").read_text()
    assert "Saturated at this scale" in html and "seed baseline 12.0 of 12 possible" in html
    unsaturated = (tmp_path / "b")
    unsaturated.mkdir()
    study, _ = make_study(unsaturated, seeds=(0, 1, 2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("rankscope.methods.tuned.tuned_table", lambda: {})
        assert "Saturated" not in (build_report(study) / "report.html").read_text()
