"""The full-rank seed baseline on constructed runs whose answer is known.

Runs are trained once and relabelled by copying their folders (a run folder's method and seed
are what its config.yaml and summary.json say), so that two "seeds" can hold the same weights:
- two full-rank seeds with identical weights: baseline CKA 1, L2 0, barrier 0;
- a low-rank-labelled run that holds another seed's full-rank model: its comparison with the
  full-rank run of its own seed is that seed pair again, inside the baseline, and with the seed
  whose model it holds it is identical (closer than the baseline);
- every comparison carries its pairing (same-seed | cross-seed | self), and a seed pair of
  full-rank runs is analysed once, from its lower seed's run, when each seed's group is
  analysed on its own as a study does.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import TINY_RUN
from rankscope.analysis.pipeline import analyze_runs
from rankscope.analysis.settings import AnalysisSettings
from rankscope.config import build_config
from rankscope.errors import RankscopeError
from rankscope.report import load_study
from rankscope.report.baseline import CLOSER, WITHIN, SeedBaselines
from rankscope.train.trainer import train

PROBE = 4


def _train(path, seed: int):
    cfg = build_config({}, TINY_RUN + ["method.name=full", "train.steps=4", "train.checkpoint_steps=2,4",
                                       "train.batch_size=4", f"train.seed={seed}", "optim.lr=3e-3"])
    train(cfg, path)
    return path


def _relabel(source, target, method: str, seed: int):
    """A copy of a trained run that says it is ``method`` with ``seed`` (its weights unchanged)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("analysis"))
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["method"]["name"], config["train"]["seed"] = method, seed
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    summary = json.loads((target / "summary.json").read_text())
    summary.update(method=method, seed=seed)
    (target / "summary.json").write_text(json.dumps(summary))
    return target


@pytest.fixture(scope="module")
def trained(tmp_path_factory, rankscope_cache):
    root = tmp_path_factory.mktemp("trained")
    return {"s0": _train(root / "full-s0", 0), "s1": _train(root / "full-s1", 1)}


def _settings(**changes) -> AnalysisSettings:
    base = dict(probe_size=PROBE, batch_size=4, device="cpu", metrics=("interpolation", "similarity"),
                interpolation_points=5, imbh_every_checkpoint=False)
    base.update(changes)
    return AnalysisSettings(**base)


def _read(run_dir, table: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / "analysis" / f"{table}.csv")


def _study(tmp_path, runs: dict[str, tuple]) -> dict:
    """A study folder with the given runs ({name: (source, method, seed)})."""
    (tmp_path / "runs").mkdir()
    return {name: _relabel(source, tmp_path / "runs" / name, method, seed) for name, (source, method, seed) in runs.items()}


def test_two_identical_full_rank_seeds_give_baseline_cka_one_and_no_barrier(trained, tmp_path):
    runs = _study(tmp_path, {"full-tiny-s0": (trained["s0"], "full", 0), "full-tiny-s1": (trained["s0"], "full", 1)})
    analyze_runs([runs["full-tiny-s0"]], runs["full-tiny-s0"], _settings(), baseline_references=[runs["full-tiny-s1"]],
                 progress=False)
    similarity = _read(runs["full-tiny-s0"], "similarity")
    pair = similarity[similarity["reference_run"] == "full-tiny-s1"]
    assert set(pair["pairing"]) == {"cross-seed"} and set(pair["reference_seed"]) == {1}
    assert set(pair["step"]) == {2, 4}  # every checkpoint, like the comparison with the reference
    by_metric = {m: g["value"].to_numpy() for m, g in pair.groupby("metric")}
    assert np.allclose(by_metric["cka"], 1.0, atol=1e-9) and np.all(by_metric["l2"] == 0)
    imbh = _read(runs["full-tiny-s0"], "interpolation").query("kind == 'imbh' and other_run == 'full-tiny-s1'")
    assert len(imbh) == 1 and imbh["pairing"].iloc[0] == "cross-seed" and imbh["other_seed"].iloc[0] == 1
    assert abs(imbh["barrier"].iloc[0]) < 1e-5

    baselines = SeedBaselines(load_study(tmp_path))
    cka = baselines.final_baseline("tiny", "cka_last_layer")
    assert cka.n == 1 and cka.pairs == ["full-tiny-s0 / full-tiny-s1"] and cka.mean == pytest.approx(1.0, abs=1e-9)
    barrier = baselines.final_baseline("tiny", "imbh_to_full")
    assert barrier.n == 1 and abs(barrier.mean) < 1e-5 and baselines.missing("tiny") == ""


def test_a_run_holding_another_seeds_full_rank_model_lies_inside_the_baseline(trained, tmp_path):
    runs = _study(tmp_path, {
        "full-tiny-s0": (trained["s0"], "full", 0), "full-tiny-s1": (trained["s1"], "full", 1),
        # GaLore's model is a plain LLaMA, so a full-rank checkpoint loads as one.
        "galore-tiny-s0": (trained["s1"], "galore", 0), "galore-tiny-s1": (trained["s1"], "galore", 1),
    })
    # As a study does: each seed's group on its own, against its full-rank run and the other seed's.
    for seed, other in ((0, 1), (1, 0)):
        analyze_runs([runs[f"full-tiny-s{seed}"], runs[f"galore-tiny-s{seed}"]], runs[f"full-tiny-s{seed}"], _settings(),
                     baseline_references=[runs[f"full-tiny-s{other}"]], progress=False)

    # Labels: same seed, other seed, and the reference with itself.
    galore = _read(runs["galore-tiny-s0"], "similarity")
    assert dict(zip(galore["reference_run"], galore["pairing"])) == {"full-tiny-s0": "same-seed", "full-tiny-s1": "cross-seed"}
    full = _read(runs["full-tiny-s0"], "similarity")
    assert dict(zip(full["reference_run"], full["pairing"])) == {"full-tiny-s0": "self", "full-tiny-s1": "cross-seed"}
    imbh = _read(runs["galore-tiny-s0"], "interpolation").query("kind == 'imbh'")
    assert dict(zip(imbh["other_run"], imbh["pairing"])) == {"full-tiny-s0": "same-seed", "full-tiny-s1": "cross-seed"}
    # The seed pair is analysed once, from seed 0's run; seed 1's run points there.
    full_s1 = _read(runs["full-tiny-s1"], "similarity")
    assert set(full_s1["reference_run"]) == {"full-tiny-s1"}
    assert "full-tiny-s0" not in set(_read(runs["full-tiny-s1"], "interpolation")["other_run"].dropna())
    meta = json.loads((runs["full-tiny-s1"] / "analysis" / "meta.json").read_text())
    assert meta["seed_pairs_analysed_elsewhere"] == ["full-tiny-s0"] and meta["baseline_references"] == ["full-tiny-s0"]

    baselines = SeedBaselines(load_study(tmp_path))
    final = baselines.final
    for measure in ("cka_last_layer", "cka_to_reference", "cosine_to_reference", "relative_l2_to_reference", "imbh_to_full"):
        baseline = baselines.final_baseline("tiny", measure)
        assert baseline.n >= 1 and np.isfinite(baseline.mean), measure
        mine = final[(final["run"] == "galore-tiny-s0") & (final["measure"] == measure)].set_index("pairing")["value"]
        # Same seed: galore-s0 holds full-s1's model, so this is the seed pair (s0, s1) itself.
        assert baseline.reading(mine["same-seed"]) == WITHIN, (measure, mine["same-seed"], baseline.values)
        # Other seed: it is full-s1's model, closer to full-s1 than any other seed is.
        assert baseline.reading(mine["cross-seed"]) == CLOSER, (measure, mine["cross-seed"], baseline.values)
    cka = final[(final["run"] == "galore-tiny-s0") & (final["measure"] == "cka_last_layer")].set_index("pairing")["value"]
    assert cka["cross-seed"] == pytest.approx(1.0, abs=1e-9) and cka["same-seed"] < 0.999
    # galore-s1 also holds full-s1's model: its same-seed comparison is with itself, its other-seed one the pair.
    s1 = final[(final["run"] == "galore-tiny-s1") & (final["measure"] == "imbh_to_full")].set_index("pairing")["value"]
    assert abs(s1["same-seed"]) < 1e-5
    assert baselines.final_baseline("tiny", "imbh_to_full").reading(s1["cross-seed"]) == WITHIN

    # Per method: other seed = galore-s0 with full-s1 (identical, CKA 1) and galore-s1 with full-s0 (the pair).
    table = baselines.final_table("tiny")
    row = table[(table["metric"] == "cka_last_layer") & (table["method"] == "galore")].set_index("pairing")
    pair = baselines.final_baseline("tiny", "cka_last_layer").mean
    assert row.loc["same-seed", "n"] == 2 and row.loc["cross-seed", "n"] == 2
    assert row.loc["cross-seed", "mean"] == pytest.approx((1.0 + pair) / 2, abs=1e-9)
    assert row.loc["cross-seed", "difference_to_baseline"] == pytest.approx((1.0 - pair) / 2, abs=1e-9)
    assert row.loc["cross-seed", "outside_baseline"] == 1 and row.loc["same-seed", "outside_baseline"] == 1


def test_bad_baseline_references_fail_before_any_work(trained, tmp_path):
    def error(baselines) -> str:
        with pytest.raises(RankscopeError) as info:
            analyze_runs([trained["s0"]], trained["s0"], _settings(), baseline_references=baselines, progress=False)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "is the reference itself" in error([trained["s0"]])
    assert "given twice" in error([trained["s1"], trained["s1"]])
    same_seed = _relabel(trained["s1"], tmp_path / "full-s0-again", "full", 0)
    assert "the seed of the reference" in error([same_seed])
    assert not (trained["s0"] / "analysis").exists()
