#!/usr/bin/env python
"""Ship the choices of rankscope's tuning studies as the per-method defaults of their presets.

    rankscope study studies/tune-tiny.yaml --stage tune --out tune-tiny   # (and tune-20m the same way)
    python scripts/ship_tuned_defaults.py tune-tiny tune-20m --commit <commit of the measurement>

Reads each study folder's tune/chosen.json and tune/results.csv, writes the chosen values of every
(method, preset) into src/rankscope/methods/tuned_defaults.yaml (replacing the presets the given
studies tuned, keeping the others) (only lr-like optimizer fields; a
preset from 60m up is refused: there the literature's values are the defaults), and prints the
Markdown tables of docs/tuning.md: per method the grid's values with their val losses (the grid
seed), and the choice with its mean over all its seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
TUNED_FILE = ROOT / "src" / "rankscope" / "methods" / "tuned_defaults.yaml"
SMALL_PRESETS = ("tiny", "20m")
FIELDS = {f"optim.{name}": name for name in ("lr", "weight_decay", "eps", "grad_clip", "embed_lr", "head_lr", "norm_lr",
                                             "embed_weight_decay", "head_weight_decay", "norm_weight_decay")}
HEADER = """# Optimizer defaults that rankscope's own tuning study chose for the presets no paper trained
# (read by rankscope/methods/tuned.py; the regime, the grid, the results and the commit of the
# measurement are in docs/tuning.md). From 60m up every method keeps its literature values.
# Written by scripts/ship_tuned_defaults.py from the studies' tune/chosen.json; do not edit by hand.
"""


def _table(frame: pd.DataFrame, chosen: dict, preset: str) -> str:
    from rankscope import methods

    cells = [c for c in chosen["cells"] if str(c["preset"]) == preset]
    seeds = chosen["seeds"]
    lines = [f"| method | literature lr | {chosen['metric']} at each point tried (seed {', '.join(map(str, seeds))}) "
             "| chosen | mean over seeds (n) | on an edge |", "| --- | --- | --- | --- | --- | --- |"]
    for cell in cells:
        # Stage 1 of shared-dense searches full rank's lr jointly with the dense lr: "dense/lr".
        joint = cell.get("stage") == 1
        rows = frame[(frame["method"] == cell["method"]) & (frame["preset"].astype(str) == preset)
                     & frame["seed"].isin(seeds)].sort_values(["optim.embed_lr", "optim.lr"] if joint else "optim.lr")

        def point(row, joint=joint) -> str:
            return f"{row['optim.embed_lr']:.3g}/{row['optim.lr']:.3g}" if joint else f"{row['optim.lr']:.3g}"

        tried = ", ".join(f"{point(r)}: " + ("diverged" if r["state"] == "diverged" else
                                             f"{r['score']:.3f}" if r["state"] == "done" else r["state"])
                          for _, r in rows.iterrows())
        values = cell.get("values") or {}
        score = cell.get("score")
        mean = "–" if score is None else f"{score:.3f}" + (f" ± {cell['score_std']:.3f}" if cell.get("score_std") else "")
        edge = "; ".join(f"{k.rsplit('.', 1)[-1]} {v['side']} ({v['reason']})" for k, v in (cell.get("at_edge") or {}).items())
        literature = methods.get(cell["method"]).optim_defaults(preset).lr
        choice = (f"dense {values.get('optim.embed_lr', float('nan')):.3g}, lr {values.get('optim.lr', float('nan')):.3g}"
                  if joint else f"{values.get('optim.lr', float('nan')):.3g}")
        lines.append(f"| {cell['method']} | {literature:.3g} | {tried} | {choice} | {mean} ({len(cell['seeds'])}) | "
                     f"{edge or 'no'} |")
    return "\n".join(lines)


def _tuning_regime(frame: pd.DataFrame, folder: Path, preset: str) -> dict:
    """The regime the preset's runs were tuned in (one for all of them, or the script refuses)."""
    from rankscope.study.regime_record import regime_of

    regimes = []
    for run in frame.loc[frame["preset"].astype(str) == preset, "run"]:
        config = yaml.safe_load((folder / "tune" / "runs" / run / "config.yaml").read_text())
        if regime_of(config) not in regimes:
            regimes.append(regime_of(config))
    if len(regimes) != 1:
        sys.exit(f"{folder}: the {preset} tuning runs differ in their regime ({regimes}); ship one regime per preset")
    return regimes[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dirs", nargs="+", help="study folders whose tune stage finished")
    parser.add_argument("--commit", required=True, help="the commit the tuning runs were measured at")
    args = parser.parse_args()
    current = yaml.safe_load(TUNED_FILE.read_text()) or {}
    presets: dict[str, dict[str, dict[str, float]]] = dict(current.get("presets") or {})
    sources: dict[str, dict] = dict(current.get("source") or {})
    studies = []
    for folder in map(Path, args.study_dirs):
        chosen = json.loads((folder / "tune" / "chosen.json").read_text())
        frame = pd.read_csv(folder / "tune" / "results.csv")
        for preset in {str(cell["preset"]) for cell in chosen["cells"]}:
            presets[preset] = {}  # a preset is shipped whole from one study
            sources[preset] = {"study": f"studies/{chosen.get('study', folder.name)}.yaml", "commit": args.commit,
                               "document": "docs/tuning.md", "protocol": chosen.get("protocol", "independent"),
                               "regime": _tuning_regime(frame, folder, preset)}
            verdict = (chosen.get("informativeness") or {}).get(preset)
            if verdict:  # whether the tuning regime itself could separate the methods (its control)
                sources[preset]["informativeness"] = verdict
            shared = (chosen.get("shared_dense") or {}).get(preset)
            if shared:
                # Stage 1's dense lrs are every method's and control's default, tuned in stage 2 or not.
                sources[preset]["shared_dense"] = shared
                for member in chosen.get("members") or []:
                    presets[preset][member] = {FIELDS[k]: float(v) for k, v in shared.items()}
        for cell in chosen["cells"]:
            preset = str(cell["preset"])
            if preset not in SMALL_PRESETS:
                sys.exit(f"{folder}: tuned preset {preset}; the shipped defaults cover {', '.join(SMALL_PRESETS)} only")
            if not cell.get("values"):
                sys.exit(f"{folder}: {cell['method']}/{preset} chose nothing ({cell.get('note')}); nothing to ship")
            others = sorted(set(cell["values"]) - set(FIELDS))
            if others:
                sys.exit(f"{folder}: {cell['method']}/{preset} also tuned {others}; only {sorted(FIELDS)} can be "
                         "shipped, and an lr tuned jointly with another key would ship without it")
            shipped = {FIELDS[k]: float(v) for k, v in cell["values"].items()}
            presets.setdefault(preset, {}).setdefault(cell["method"], {}).update(shipped)
        studies.append((folder, chosen, frame))
    TUNED_FILE.write_text(HEADER + yaml.safe_dump({"source": sources, "presets": presets}, sort_keys=False))
    print(f"wrote {TUNED_FILE}")
    for folder, chosen, frame in studies:
        for preset in sorted({str(c["preset"]) for c in chosen["cells"]}):
            print(f"\n### {preset} ({folder.name})\n")
            print(_table(frame, chosen, preset))
            for control in (c for c in chosen.get("controls") or [] if str(c["preset"]) == preset):
                std = f" ± {control['score_std']:.3f}" if control.get("score_std") else ""
                print(f"\ncontrol {control['method']} at the shared dense lr: "
                      + (f"{control['score']:.3f}{std} ({len(control['seeds'])})" if control.get("score") is not None
                         else control.get("note") or "no score"))
            verdict = (chosen.get("informativeness") or {}).get(preset)
            if verdict:
                print(f"tuning regime: {verdict['verdict']} (control {verdict['gap']:.3f} nats behind the best, "
                      f"{verdict['best_method']}; margin {verdict['margin']:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
