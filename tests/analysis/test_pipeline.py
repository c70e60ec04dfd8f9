"""The analysis pipeline end to end on tiny trained runs, checked against known answers:
exact α = 0 losses, CCBH endpoints = checkpoint losses, a run interpolated with itself has no
barrier, similarity of the reference with itself is perfect, mean rows are means, resume skips
finished work and ends with the same tables, and bad input fails before any heavy work."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import TINY_RUN  # tests/ is on sys.path (rootdir conftest, no __init__.py)
from rankscope.analysis import AnalysisError, pipeline
from rankscope.analysis import run as analysis_run
from rankscope.analysis.pipeline import (
    TABLE_COLUMNS,
    ParameterSpace,
    Probe,
    analyze_runs,
    evaluate_profiles,
    measure_point_cost,
    random_direction_set,
)
from rankscope.analysis.settings import AnalysisSettings
from rankscope.analysis.stages import landscape as landscape_stage
from rankscope.analysis.stages import spectral as spectral_stage
from rankscope.config import build_config
from rankscope.errors import RankscopeError
from rankscope.train import evaluate_loss, load_run_model
from rankscope.train.trainer import train

PROBE = 8  # sequences of 64 tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared, loaded machine: one intra-op thread is many times faster than two.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _train(path, method: str, steps: int, checkpoints: str, seed: int = 0):
    cfg = build_config({}, TINY_RUN + [
        f"method.name={method}", f"train.steps={steps}", f"train.checkpoint_steps={checkpoints}",
        "train.batch_size=4", f"train.seed={seed}", "optim.lr=3e-3",
    ])
    train(cfg, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, rankscope_cache):
    root = tmp_path_factory.mktemp("runs")
    full = _train(root / "full", "full", 6, "2,4,6")
    lora = _train(root / "lora", "lora", 4, "2,4")
    return {"full": full, "lora": lora}


def _small_settings(**changes) -> AnalysisSettings:
    base = dict(
        probe_size=PROBE, batch_size=8, device="cpu", directions=4, grid_points=5, singular_k_max=2,
        singular_ks=(1, 2), singular_unweighted=False, trajectory_components=1, interpolation_points=3,
        singular_study_grid=(-0.05, 0.0501, 0.025), landscape2d_points=3, hessian_iterations=3, hessian_samples=2,
    )
    base.update(changes)
    return AnalysisSettings(**base)


def _read(path):
    return pd.read_csv(path)


@pytest.fixture(scope="module")
def analysed(runs):
    outputs = analyze_runs([runs["full"], runs["lora"]], runs["full"], _small_settings(), progress=False)
    return outputs


def _probe_tensor(run_dir):
    from rankscope.data import prepare_data
    from rankscope.train import read_run_config

    return prepare_data(read_run_config(run_dir).data).probe[:PROBE]


# --- end to end -------------------------------------------------------------------------------


def test_every_table_is_written_with_the_documented_columns(analysed):
    assert set(analysed) == {"full", "lora"}
    for run, folder in analysed.items():
        for table, columns in TABLE_COLUMNS.items():
            frame = _read(folder / f"{table}.csv")
            assert list(frame.columns) == columns, (run, table)
            assert len(frame) > 0, (run, table)
            assert set(frame["run"]) == {run} and set(frame["method"]) == {run}
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["probe"]["sequences"] == PROBE and meta["mask_padding"] is True
        assert meta["finished"] and meta["reference_run"] == "full"
        profiles = np.load(folder / "landscape_profiles.npz")
        assert profiles["random/all/step_000004"].shape == (4, 5)
        assert np.allclose(profiles["alphas/random"], np.linspace(-0.003, 0.003, 5), rtol=0, atol=1e-18)


def test_landscape_rows_and_trajectory_applicability(analysed):
    full = _read(analysed["full"] / "landscape.csv")
    lora = _read(analysed["lora"] / "landscape.csv")
    # Full has 3 checkpoints: one trajectory component (needs 3) applies; LoRA has 2: it does not.
    assert {"random", "singular", "trajectory_pca"} == set(full["direction_set"])
    assert "trajectory_pca" not in set(lora["direction_set"])
    reason = json.loads((analysed["lora"] / "meta.json").read_text())["not_applicable"]["landscape:trajectory_pca:all"]
    assert "needs >= 3 checkpoints" in reason
    singular = full[full["direction_set"] == "singular"]
    assert sorted(set(singular["k_max"])) == [1, 2]
    assert full[full["direction_set"] == "random"]["k_max"].isna().all()
    # Direction variance over a single singular direction is 0 by definition.
    k1 = singular[(singular["k_max"] == 1) & (singular["metric"] == "direction_variance")]
    assert (k1["value"] == 0).all()
    # Summaries are those of the stored profiles.
    profiles = np.load(analysed["full"] / "landscape_profiles.npz")
    p = profiles["random/all/step_000006"]
    alphas = profiles["alphas/random"]
    row = full[(full["step"] == 6) & (full["direction_set"] == "random")].set_index("metric")["value"]
    mean = p.mean(0)
    es = np.mean([(mean[2 + m] + mean[2 - m]) / 2 - mean[2] for m in (1, 2)])
    assert row["expected_sharpness"] == pytest.approx(es, rel=1e-12, abs=1e-15)
    assert row["direction_variance"] == pytest.approx(p.var(0).mean(), rel=1e-12, abs=1e-18)
    assert np.all(p[:, 2] == 0) and alphas[2] == 0


def test_ccbh_endpoints_are_the_checkpoint_losses(analysed, runs):
    table = _read(analysed["full"] / "interpolation.csv")
    ccbh = table[table["kind"] == "ccbh"].set_index("step_b")
    assert sorted(ccbh.index) == [4, 6] and (ccbh["space"] == "native").all()
    probe = _probe_tensor(runs["full"])
    losses = {}
    for step in (2, 4, 6):
        loaded = load_run_model(runs["full"], step)
        losses[step] = evaluate_loss(loaded.model, probe, 8, torch.device("cpu"))["loss"]
    for step_b, step_a in ((4, 2), (6, 4)):
        assert ccbh.loc[step_b, "step_a"] == step_a
        assert ccbh.loc[step_b, "loss_a"] == losses[step_a]  # exact: α = 0 writes θ_a itself
        assert ccbh.loc[step_b, "loss_b"] == losses[step_b]
    curves = np.load(analysed["full"] / "interpolation_curves.npz")
    curve = curves["ccbh//step_000006"]
    assert curve.shape == (3,) and curve[0] == losses[4] and curve[-1] == losses[6]
    assert ccbh.loc[6, "barrier"] == pytest.approx(curve[1:-1].max() - (curve[0] + curve[-1]) / 2, abs=1e-12)


def test_imbh_of_a_run_with_itself_is_zero_and_pairs_agree(analysed):
    full = _read(analysed["full"] / "interpolation.csv")
    lora = _read(analysed["lora"] / "interpolation.csv")
    itself = full[(full["kind"] == "imbh") & (full["other_run"] == "full")]
    assert len(itself) == 3 and itself["applicable"].all() and (itself["space"] == "dense").all()
    assert np.allclose(itself["barrier"], 0.0, atol=1e-5)
    # Full vs LoRA (same preset and seed) appears in both runs' tables with the same barrier.
    forward = full[(full["kind"] == "imbh") & (full["other_run"] == "lora")].set_index("step")
    backward = lora[(lora["kind"] == "imbh") & (lora["other_run"] == "full")].set_index("step")
    assert sorted(forward.index) == [2, 4, 6] and sorted(backward.index) == [2, 4]
    for step in (2, 4):
        assert forward.loc[step, "barrier"] == pytest.approx(backward.loc[step, "barrier"], abs=1e-12)
        assert forward.loc[step, "loss_a"] == backward.loc[step, "loss_b"]
    # Full has a checkpoint at 6 that LoRA lacks: reported, not dropped.
    assert not forward.loc[6, "applicable"] and "no checkpoint at step 6" in forward.loc[6, "reason"]


def test_spectral_mean_rows_are_means_of_the_matrix_rows(analysed):
    for run in ("full", "lora"):
        table = _read(analysed[run] / "spectral.csv")
        targets = set(table["target"])
        assert {"W_native", "dW_native", "W", "dW"} <= targets and table["applicable"].all()
        if run == "lora":
            assert {"factor_A", "factor_B"} <= targets
        for (_step, target, _metric), group in table.groupby(["step", "target", "metric"]):
            matrices = group[~group["matrix"].isin(["mean", "pooled"])]
            mean = group[group["matrix"] == "mean"]
            assert len(mean) == 1 and mean["layer"].iloc[0] == -1
            # 7 projections x 2 blocks; LoRA's native matrices are its frozen base, A and B.
            assert len(matrices) == (42 if run == "lora" and target.endswith("_native") else 14), (run, target)
            assert mean["value"].iloc[0] == pytest.approx(np.mean(matrices["value"]), rel=1e-12)
        assert set(table[table["target"] == "dW"]["metric"]) >= {"fro_norm", "relative_fro_norm"}
        assert 2 not in set(table[table["target"] == "dW"]["step"])  # no ΔW at the first checkpoint
        full_native = table[(table["target"] == "W_native") & (table["matrix"] != "mean")]
        if run == "full":  # a dense model's native matrices are its weights
            merged = table[(table["target"] == "W") & (table["matrix"] != "mean")]
            assert sorted(full_native["matrix"].str.rsplit(".", n=1).str[0]) == sorted(merged["matrix"])
            assert np.allclose(np.sort(full_native["value"]), np.sort(merged["value"]), rtol=1e-12)


def test_expensive_families_run_at_the_last_step_and_record_their_cost(analysed):
    for run, last in (("full", 6), ("lora", 4)):
        hessian = _read(analysed[run] / "hessian.csv")
        assert set(hessian["step"]) == {last} and set(hessian["metric"]) == {"max_eigenvalue", "min_eigenvalue", "trace"}
        assert hessian["applicable"].all() and np.isfinite(hessian["value"]).all()
        by_metric = hessian.set_index("metric")
        assert by_metric.loc["min_eigenvalue", "value"] <= by_metric.loc["max_eigenvalue", "value"]
        assert (hessian.loc[hessian["metric"] != "trace", "hvps"] <= 3).all()
        assert (hessian.loc[hessian["metric"] == "trace", "hvps"] == 2).all()
        # 3 HVPs and 2 samples are too few here: every unconverged row says why, a converged one has no reason.
        converged = hessian["converged"].astype(bool)
        assert (hessian.loc[~converged, "reason"].fillna("").str.len() > 0).all()
        assert (hessian.loc[converged, "reason"].fillna("") == "").all()
        surfaces = _read(analysed[run] / "landscape2d.csv")
        assert set(surfaces["step"]) == {last} and set(surfaces["pair"]) == {"random", "singular"}
        arrays = np.load(analysed[run] / "landscape2d_surfaces.npz")
        surface = arrays[f"random/all/step_{last:06d}"]
        assert surface.shape == (3, 3) and surface[1, 1] == 0 and np.isfinite(surface).all()
        assert np.allclose(arrays["axes/random"], [-0.003, 0.0, 0.003])
        meta = json.loads((analysed[run] / "meta.json").read_text())
        assert set(meta["cost_seconds"]) == set(TABLE_COLUMNS) and all(v > 0 for v in meta["cost_seconds"].values())
        assert meta["loss_average"] == "batch_mean" and meta["settings"]["last_hidden"] == "final_norm"
        assert "len // 2" in meta["grid_notes"]["singular"]


def test_similarity_of_the_reference_with_itself_is_perfect(analysed):
    table = _read(analysed["full"] / "similarity.csv")
    assert table["applicable"].all() and set(table["layer"]) == {0, 1, 2}
    by_metric = {m: g["value"].to_numpy() for m, g in table.groupby("metric")}
    assert np.all(by_metric["l2"] == 0) and np.all(by_metric["relative_l2"] == 0)
    assert np.allclose(by_metric["cosine"], 1.0, atol=1e-12)
    assert np.allclose(by_metric["cka"], 1.0, atol=1e-9)
    lora = _read(analysed["lora"] / "similarity.csv")
    assert (lora["value"][lora["metric"] == "cka"] < 1.0).all()


# --- numerics ---------------------------------------------------------------------------------


def test_alpha_zero_loss_is_bit_equal_to_the_plain_eval_after_a_sweep(runs):
    loaded = load_run_model(runs["lora"], 4)
    model = loaded.model
    probe_tokens = _probe_tensor(runs["lora"])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    plain = evaluate_loss(model, probe_tokens, 8, torch.device("cpu"))["loss"]
    probe = Probe(probe_tokens, 8, "cpu")
    space = ParameterSpace(model)
    # LoRA's frozen base is a native parameter too.
    assert any(n.endswith("q_proj.weight") for n in space.names) and any(n.endswith(".A") for n in space.names)
    directions = random_direction_set(space, space.names, 2, seed=0, filter_normalized=False, device=torch.device("cpu"))
    result = evaluate_profiles(space, probe, directions, torch.linspace(-0.5, 0.5, 5, dtype=torch.float64))
    assert result.base_loss == plain and result.center_loss_after == plain
    assert evaluate_loss(model, probe_tokens, 8, torch.device("cpu"))["loss"] == plain
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert np.all(np.abs(result.profiles[:, [0, 1, 3, 4]]) > 0)  # a large step does change the loss


def test_landscape_family_on_a_loaded_model_matches_the_pipeline(analysed, runs):
    loaded = load_run_model(runs["full"], 2)
    probe = Probe(_probe_tensor(runs["full"]), 8, "cpu")
    rows, profiles = pipeline.landscape_family(loaded.model, probe, _small_settings())
    stored = np.load(analysed["full"] / "landscape_profiles.npz")
    assert np.array_equal(profiles["random"], stored["random/all/step_000002"])
    assert np.array_equal(profiles["singular"], stored["singular/all/step_000002"])
    table = _read(analysed["full"] / "landscape.csv")
    table = table[(table["step"] == 2) & table["direction_set"].isin(["random", "singular"])]
    assert sorted(r["value"] for r in rows) == sorted(table["value"])


def test_measure_point_cost_reports_every_figure(runs):
    model = load_run_model(runs["full"], 2).model
    result = measure_point_cost(model, _probe_tensor(runs["full"])[:2], batch_size=2, repeats=1)
    for key in ("forward_s", "landscape_point_s", "interpolation_point_s", "landscape_ratio", "interpolation_ratio"):
        assert result[key] > 0
    assert result["parameters"] == sum(p.numel() for p in model.parameters())


# --- resume -----------------------------------------------------------------------------------


def _copy_run(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("analysis"))
    return target


def test_resume_skips_finished_items_and_ends_with_the_same_tables(runs, tmp_path, monkeypatch):
    settings = dict(probe_size=2, directions=1, grid_points=3, singular_k_max=1, singular_ks=(1,), singular_unweighted=True,
                    interpolation_points=3, steps=(4, 6))
    straight = _copy_run(runs["full"], tmp_path / "a" / "full")
    resumed = _copy_run(runs["full"], tmp_path / "b" / "full")
    analyze_runs([straight], runs["full"], _small_settings(**settings), progress=False)

    calls: list[int] = []
    original = spectral_stage.spectral_rows

    def failing_after_first_checkpoint(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the analysis in the second checkpoint
        return original(model, *args, **kwargs)

    monkeypatch.setattr(spectral_stage, "spectral_rows", failing_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        analyze_runs([resumed], runs["full"], _small_settings(**settings), progress=False)
    items_after_interrupt = sorted(p.name for p in (resumed / "analysis" / "items").rglob("*.json"))
    assert any("step_000004" in str(p) for p in (resumed / "analysis" / "items").rglob("*.json"))

    spy = {"profiles": 0, "spectral": 0}
    original_profiles = landscape_stage.evaluate_profiles

    def counting_profiles(*args, **kwargs):
        spy["profiles"] += 1
        return original_profiles(*args, **kwargs)

    def counting_spectral(*args, **kwargs):
        spy["spectral"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(landscape_stage, "evaluate_profiles", counting_profiles)
    monkeypatch.setattr(spectral_stage, "spectral_rows", counting_spectral)
    analyze_runs([resumed], runs["full"], _small_settings(**settings), progress=False)
    # Step 4 finished every item before the interrupt; only step 6's spectral item (and the items
    # after it) remain: spectral once, and no landscape of step 4 again (step 6's were done).
    assert spy["spectral"] == 1
    assert spy["profiles"] == 0
    assert len(items_after_interrupt) < len(list((resumed / "analysis" / "items").rglob("*.json")))

    for table in TABLE_COLUMNS:
        a = _read(straight / "analysis" / f"{table}.csv")
        b = _read(resumed / "analysis" / f"{table}.csv")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        if table == "landscape":
            assert {"random", "singular", "singular_unweighted", "trajectory_pca"} == set(a["direction_set"])
    for name in ("landscape_profiles.npz", "interpolation_curves.npz"):
        a, b = np.load(straight / "analysis" / name), np.load(resumed / "analysis" / name)
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
    meta_a = json.loads((straight / "analysis" / "meta.json").read_text())
    meta_b = json.loads((resumed / "analysis" / "meta.json").read_text())
    assert meta_a["finished"] == meta_b["finished"]


# --- methods without a dense form ---------------------------------------------------------------


def test_cola_gets_not_applicable_imbh_rows_and_update_spectra_of_its_factors(runs, tmp_path):
    cola = _train(tmp_path / "cola", "cola", 4, "2,4")
    settings = _small_settings(metrics=("interpolation", "spectral"))
    out = analyze_runs([cola], runs["full"], settings, progress=False)["cola"]
    table = _read(out / "interpolation.csv")
    imbh = table[table["kind"] == "imbh"]
    assert len(imbh) == 2 and not imbh["applicable"].any()
    assert imbh["reason"].str.contains("no dense equivalent").all()
    assert imbh["barrier"].isna().all()
    ccbh = table[table["kind"] == "ccbh"]
    assert len(ccbh) == 1 and ccbh["applicable"].all()  # native parameters interpolate fine
    spectral = _read(out / "spectral.csv")
    # CoLA's native matrices are its factors: W and ΔW of A and B as the study reports them
    # (bug: it used to get no ΔW rows at all); its merged W and ΔW are not applicable, with the reason.
    assert {"W_native", "dW_native", "factor_A", "factor_B"} <= set(spectral["target"])
    native = spectral[(spectral["target"] == "dW_native") & (spectral["step"] == 4)]
    matrices = set(native["matrix"]) - {"mean", "pooled"}
    assert len(matrices) == 2 * 7 * 2 and all(m.endswith((".A", ".B")) for m in matrices)  # 2 blocks x 7 projections x (A, B)
    assert native["applicable"].all() and np.isfinite(native["value"]).all()
    pooled = native[(native["matrix"] == "pooled")].set_index("metric")["value"]
    per_matrix = native[(native["metric"] == "fro_norm") & native["matrix"].isin(matrices)]["value"]
    assert pooled["fro_norm"] == pytest.approx(np.sqrt((per_matrix**2).sum()), rel=1e-12)
    merged = spectral[spectral["target"].isin(["W", "dW"])]
    assert len(merged) > 0 and not merged["applicable"].any() and merged["value"].isna().all()
    assert merged["reason"].str.contains("no dense weight").all()
    assert set(merged[merged["target"] == "dW"]["step"]) == {4}  # ΔW rows only where there is a previous checkpoint


# --- bad input --------------------------------------------------------------------------------


def _error(runs_list, reference, **changes) -> str:
    with pytest.raises(RankscopeError) as info:
        analyze_runs(runs_list, reference, _small_settings(**changes), progress=False)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_input_fails_before_any_work(runs, tmp_path, monkeypatch):
    def no_heavy_work(*args, **kwargs):
        raise AssertionError("heavy work started before the inputs were checked")

    monkeypatch.setattr(analysis_run, "_analyze_one", no_heavy_work)

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(runs["full"] / "config.yaml", empty / "config.yaml")
    assert "no complete checkpoint" in _error([empty], runs["full"])
    assert "not a rankscope run" in _error([tmp_path], runs["full"])

    message = _error([runs["full"]], runs["full"], steps=(4, 5))
    assert "[5]" in message and "[2, 4, 6]" in message

    other_shape = _copy_run(runs["full"], tmp_path / "wide")
    for info in (other_shape / "checkpoints").iterdir():
        meta = json.loads((info / "meta.json").read_text())
        meta["model_config"]["num_layers"] = 3
        (info / "meta.json").write_text(json.dumps(meta))
    assert "another model shape" in _error([runs["full"]], other_shape)

    import rankscope.data

    real_prepare = rankscope.data.prepare_data

    def other_probe(cfg):
        prepared = real_prepare(cfg)
        if cfg.text_field == "other":  # stands in for a run trained on other data
            prepared.probe = prepared.probe.flip(0)
        return prepared

    monkeypatch.setattr(rankscope.data, "prepare_data", other_probe)
    other_data = _copy_run(runs["full"], tmp_path / "otherdata")
    config = (other_data / "config.yaml").read_text()
    (other_data / "config.yaml").write_text(config.replace("text_field: text", "text_field: other"))
    assert "different probe sets" in _error([runs["full"]], other_data)

    assert "probe sequences" in _error([runs["full"]], runs["full"], probe_size=10_000)
    with pytest.raises(AnalysisError, match="grid"):
        analyze_runs([runs["full"]], runs["full"], _small_settings(grid_points=4), progress=False)
    with pytest.raises(AnalysisError, match="did you mean"):
        analyze_runs([runs["full"]], runs["full"], _small_settings(metrics=("spectal",)), progress=False)


def test_a_low_rank_reference_is_allowed_with_a_warning(runs, tmp_path, caplog):
    run = _copy_run(runs["full"], tmp_path / "full")
    settings = _small_settings(metrics=("spectral", "similarity"), steps=(6,))
    with caplog.at_level(logging.WARNING, logger="rankscope.analysis"):
        out = analyze_runs([run], runs["lora"], settings, progress=False)["full"]
    assert any("not full-rank" in r.message for r in caplog.records)
    assert (out / "spectral.csv").is_file()
    assert "not full-rank" in json.loads((out / "meta.json").read_text())["warnings"][0]
    # The LoRA reference has no checkpoint at step 6: every similarity row says so.
    similarity = _read(out / "similarity.csv")
    assert len(similarity) == 3 * 6 and not similarity["applicable"].any() and similarity["value"].isna().all()  # 3 layers x 6 metrics
    assert similarity["reason"].str.contains("no checkpoint at step 6").all()


def test_blocks_scope_perturbs_only_the_block_matrices(runs):
    model = load_run_model(runs["lora"], 2).model
    names = pipeline.scope_parameter_names(model, "blocks")
    assert names and all(n.startswith("layers.") and (".self_attn." in n or ".mlp." in n) for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"weight", "A", "B"}
    everything = pipeline.scope_parameter_names(model, "all")
    assert set(names) < set(everything) and "embed_tokens.weight" in everything and "norm.weight" in everything


def test_dense_space_equals_native_space_for_a_full_rank_run(runs, tmp_path):
    # A full-rank model's native parameters are its dense weights (same names, same values), so
    # the two spaces must give the same landscape bit for bit; LoRA's dense space is its merged W.
    settings = dict(metrics=("landscape",), steps=(4,), probe_size=2, directions=1, grid_points=3, singular_k_max=1,
                    singular_ks=(1,), scopes=("blocks",), filter_normalized=True)
    native = analyze_runs([_copy_run(runs["full"], tmp_path / "n" / "full")], runs["full"],
                          _small_settings(space="native", **settings), progress=False)["full"]
    dense = analyze_runs([_copy_run(runs["full"], tmp_path / "d" / "full")], runs["full"],
                         _small_settings(space="dense", **settings), progress=False)["full"]
    a, b = _read(native / "landscape.csv"), _read(dense / "landscape.csv")
    assert "random_filter" in set(a["direction_set"]) and set(a["scope"]) == {"blocks"}
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    notes = json.loads((dense / "meta.json").read_text())["notes"]
    assert {n["space_used"] for n in notes.values()} == {"dense"}


def test_cli_analyze_takes_our_definitions_by_name_and_checks_every_setting(runs, tmp_path, capsys):
    from rankscope.cli import main

    run = _copy_run(runs["full"], tmp_path / "full")
    code = main(["analyze", str(run), "--reference", str(runs["full"]), "--metrics", "spectral,similarity", "--steps", "6",
                 "--probe-size", "4", "--device", "cpu", "--loss-average", "token", "--last-hidden", "block_output",
                 "--zero-matrix-gap", "nan", "--singular-grid", "centered", "--singular-beyond-rank", "zero",
                 "--set", "rank_tol=1e-6", "--set", "hessian_samples=3"])
    assert code == 0
    settings = json.loads((run / "analysis" / "meta.json").read_text())["settings"]
    assert (settings["loss_average"], settings["last_hidden"], settings["zero_matrix_gap"]) == ("token", "block_output", "nan")
    assert (settings["singular_grid"], settings["singular_beyond_rank"]) == ("centered", "zero")
    assert settings["rank_tol"] == 1e-6 and settings["hessian_samples"] == 3
    capsys.readouterr()
    assert main(["analyze", str(run), "--reference", str(runs["full"]), "--set", "hesian_samples=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'analysis.hessian_samples'" in err[0]
    assert main(["analyze", str(run), "--reference", str(runs["full"]), "--set", "landscape2d_points=4"]) == 2
    assert "landscape2d_points must be odd" in capsys.readouterr().err


def test_cli_analyze_prints_one_error_line_for_missing_steps(runs, capsys):
    from rankscope.cli import main

    code = main(["analyze", str(runs["full"]), "--reference", str(runs["full"]), "--steps", "3", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "available steps: [2, 4, 6]" in err[0]


def test_intruder_rows_against_self_seed_reference_and_init(analysed):
    full = _read(analysed["full"] / "intruder.csv")
    totals = full[(full["matrix"] == "total") & (full["metric"] == "intruders")]
    by_pairing = {p: g for p, g in totals.groupby("pairing")}
    assert set(by_pairing) == {"self", "init"}
    assert (by_pairing["self"]["value"] == 0).all()  # a run against itself
    # 14 block matrices (2 layers x 7 projections), k 10: a count between 0 and 140.
    assert ((by_pairing["init"]["value"] >= 0) & (by_pairing["init"]["value"] <= 140)).all()
    per_matrix = full[(full["metric"] == "intruders") & (full["layer"] >= 0) & (full["pairing"] == "init")]
    assert per_matrix.groupby("step").size().unique().tolist() == [14]
    lora = _read(analysed["lora"] / "intruder.csv")
    assert set(lora["pairing"]) == {"same-seed", "init"} and lora["applicable"].all()
    similarities = lora[lora["metric"].str.startswith("similarity_")]["value"]
    assert ((similarities >= 0) & (similarities <= 1 + 1e-9)).all()


def test_singular_k_max_means_the_same_in_a_study_file_and_on_the_command_line(tmp_path):
    """One rule (analysis.settings.trim_default_ks): k_max alone trims the default Ks; explicit Ks
    beyond it are an error, from a study file and from `rankscope analyze` alike."""
    from rankscope.analysis.settings import trim_default_ks
    from rankscope.cli import main
    from rankscope.study.spec import settings_from_mapping

    assert settings_from_mapping({"singular_k_max": 6}).singular_ks == (1, 5)
    assert settings_from_mapping({"singular_k_max": 3}).singular_ks == (1,)
    assert trim_default_ks({"singular_k_max": 6, "singular_ks": (1, 2)})["singular_ks"] == (1, 2)
    with pytest.raises(AnalysisError, match="exceed singular_k_max=2"):
        settings_from_mapping({"singular_k_max": 2, "singular_ks": [1, 5]})
    # The command line refuses the same explicit Ks before touching any run (exit 2: a usage error).
    assert main(["analyze", str(tmp_path), "--reference", str(tmp_path), "--singular-k-max", "2",
                 "--set", "singular_ks=[1,5]"]) == 2
