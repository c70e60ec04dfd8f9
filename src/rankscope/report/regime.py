"""The regime a study trained in, which the report states before any result: per method the steps,
tokens, tokens per parameter, seeds and the learning rate with where it came from (and whether it
was tuned, on what budget); the validation split's unigram perplexity next to the runs'
perplexities; each downstream task's chance level.

Where each number comes from:
- steps, tokens, params: each run's summary.json; the (block) lr and its provenance: the study's
  regime.json (`rankscope.study.regime_record`: set by the run, chosen by the study's tune stage, a
  shipped tuned default, or the literature's) and, for runs without one, the run's config.yaml
  `optim.lr` when it set it, else its method's default for the preset
  (`rankscope.methods.tuned.optim_defaults_for`).
- the embeddings / LM head / norms lrs (`optim.embed_lr`, `head_lr`, `norm_lr`) and their
  provenance: regime.json's `roles` and `role_sources` per run; for a run without them (an older
  study, or run folders reported without one) its config.yaml, else the method's own lr, which
  is what an unset role follows. The tuning protocol (`tune_protocol`, `shared_dense`) decides
  whether the methods shared those lrs, and the report says which.
- unigram perplexity: `rankscope.data.unigram` on the run's own data config (the cached token
  shards the run trained on).
- chance level: 1 / number of choices, averaged over the task's examples — read from the data
  file of the offline tasks shipped under `rankscope/data/tasks/`, and from the choice count fixed
  by the task definition for lm-eval's built-in tasks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import yaml

from rankscope.errors import RankscopeError
from rankscope.optim.roles import ROLES
from rankscope.report.collect import REFERENCE_METHOD, Study, finite, is_control, method_label, sorted_methods
from rankscope.report.stats import format_number

LITERATURE, SET_BY_RUN, UNKNOWN = "literature default", "set by the run", "unknown"
TUNED_IN_STUDY = "tuned in this study"
# Hoffmann et al. 2022 (Chinchilla): compute-optimal training uses about 20 tokens per parameter.
COMPUTE_OPTIMAL_TOKENS_PER_PARAM = 20
# regime.json's lr_source (rankscope.study.regime_record) in the report's words.
RECORDED_SOURCES = {"literature": LITERATURE, "run": SET_BY_RUN}

# Choices per example in lm-eval's built-in tasks of the study's suite (their task YAMLs:
# piqa sol1/sol2; copa choice1/choice2; mrpc, rte, sst2 two labels; mnli three labels; blimp
# a good/bad sentence pair).
BUILTIN_CHOICES: dict[str, int] = {"piqa": 2, "copa": 2, "mrpc": 2, "rte": 2, "sst2": 2, "mnli": 3, "blimp": 2}

# The per-role lrs the regime table shows next to the block lr: role -> its column.
ROLE_COLUMNS = {"embed": "embed_lr", "head": "head_lr", "norm": "norm_lr"}
ROLE_HEADERS = {"embed": "embeddings lr", "head": "head lr", "norm": "norms lr"}
# regime.json's role_sources in the report's words; "method lr": the role is unset and follows
# the method's own lr (as every official harness trains it).
FOLLOWS_METHOD_LR = "= method lr"
SHARED_DENSE = "shared-dense"


@dataclass
class LrChoice:
    """A run's learning rate and where it came from. `budget` describes the tuning that chose it
    (None when it was not tuned); two methods were tuned on the same budget when both have one and
    they are equal."""

    lr: float
    source: str
    budget: str | None = None

    @property
    def tuned(self) -> bool:
        return self.budget is not None


@dataclass
class Regime:
    table: pd.DataFrame                                   # one row per (preset, method)
    unigram_ppl: dict[str, float] = field(default_factory=dict)  # preset -> val unigram perplexity
    chance: pd.DataFrame = field(default_factory=pd.DataFrame)  # task, chance, examples, how
    notes: list[str] = field(default_factory=list)        # what could not be determined, and why
    choices: dict[str, LrChoice] = field(default_factory=dict)   # run -> its lr and provenance
    protocol: str | None = None                           # regime.json tune_protocol (None: no tune stage)
    shared_dense: dict[str, dict[str, float]] = field(default_factory=dict)  # preset -> stage 1's dense lrs

    def methods(self, preset: str) -> list[str]:
        """The methods with at least one trained run at this scale (full rank first)."""
        rows = self.table[(self.table["preset"] == str(preset)) & (self.table["seeds"] > 0)]
        return list(rows["method"])

    def lr_choices(self, preset: str, method: str) -> list[LrChoice]:
        rows = self.table[(self.table["preset"] == str(preset)) & (self.table["method"] == method)]
        return [] if rows.empty else list(rows.iloc[0]["lr_choices"])

    def same_budget(self, preset: str, method: str, reference: str = REFERENCE_METHOD) -> bool:
        """Whether every run of `method` and of `reference` at this scale had its lr tuned on one
        and the same budget: the condition for calling a difference between them 'better'."""
        ours, theirs = self.lr_choices(preset, method), self.lr_choices(preset, reference)
        budgets = {c.budget for c in ours + theirs}
        return bool(ours) and bool(theirs) and len(budgets) == 1 and None not in budgets


def _run_config(study: Study, run: str) -> dict:
    path = study.run_dir(run) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}  # collect.read_runs has already noted an unreadable config


def lr_choice(config: dict, method: str, preset: str, recorded: dict | None = None) -> LrChoice:
    """The lr a run trained with and its provenance: from the study's regime.json entry of the run
    when there is one (it knows whether the tune stage chose the lr), else from its config.yaml and
    the method's defaults (literature, or rankscope's shipped tuned defaults for tiny / 20m)."""
    from rankscope import methods
    from rankscope.methods.tuned import TUNED_HERE, default_kinds, optim_defaults_for
    from rankscope.study.regime_record import OTHER_REGIME, shipped_budget

    own = (config.get("optim") or {}).get("lr")
    if recorded and recorded.get("lr") is not None and (own is None or float(own) == float(recorded["lr"])):
        source = RECORDED_SOURCES.get(recorded.get("lr_source"), str(recorded.get("lr_source")))
        return LrChoice(float(recorded["lr"]), source, recorded.get("lr_budget"))
    if own is not None:
        return LrChoice(float(own), SET_BY_RUN)
    try:
        method_cls = methods.get(method)
    except RankscopeError:
        return LrChoice(math.nan, UNKNOWN)  # a method this installation does not know
    lr = float(optim_defaults_for(method_cls, preset).lr)
    if default_kinds(method_cls, preset)["lr"] == TUNED_HERE:
        budget = shipped_budget(preset, config)
        return LrChoice(lr, TUNED_HERE if budget else OTHER_REGIME, budget)
    return LrChoice(lr, LITERATURE)


def _format_lr(choices: list[LrChoice]) -> tuple[str, str]:
    lrs = sorted({c.lr for c in choices if np.isfinite(c.lr)})
    sources = sorted({c.source + (f" ({c.budget})" if c.budget else "") for c in choices})
    lr_text = ", ".join(f"{lr:g}" for lr in lrs) or "–"
    if len(lrs) > 1:
        lr_text += " (differs between seeds)"
    return lr_text, "; ".join(sources)


def _unigram_ppl(study: Study, configs: dict[str, dict], notes: list[str]) -> dict[str, float]:
    """Validation unigram perplexity per preset, from the data config of the preset's first run."""
    from rankscope.config import DataConfig, dataclass_from_dict
    from rankscope.data import prepare_data
    from rankscope.data.unigram import val_unigram_perplexity

    values: dict[str, float] = {}
    computed: dict[str, float] = {}  # data config (as JSON) -> value: presets sharing data compute once
    for preset in study.presets():
        runs = study.runs[study.runs["preset"].astype(str) == preset]["run"]
        data = next((configs[r]["data"] for r in runs if (configs.get(r) or {}).get("data")), None)
        if data is None:
            notes.append(f"unigram perplexity ({preset}): no run has a config.yaml with a data section")
            continue
        key = json.dumps(data, sort_keys=True)
        if key not in computed:
            try:
                computed[key] = val_unigram_perplexity(prepare_data(dataclass_from_dict(DataConfig, data, "data")))
            except (RankscopeError, OSError) as exc:
                notes.append(f"unigram perplexity ({preset}): not computed — {exc}")
                continue
        values[preset] = computed[key]
    return values


def _local_task_chance(task: str) -> tuple[float, int, str] | None:
    """(mean 1/choices, examples, how) of an offline task shipped with rankscope, from its data."""
    from rankscope.analysis.downstream import LOCAL_TASKS_DIR

    spec_path = LOCAL_TASKS_DIR / task / f"{task}.yaml"
    if not spec_path.is_file():
        return None
    # The task YAMLs carry an lm-eval `!function` tag; only the plain keys are needed here.
    spec_text = "\n".join(line for line in spec_path.read_text().splitlines() if "!function" not in line)
    spec = yaml.safe_load(spec_text) or {}
    data_file = ((spec.get("dataset_kwargs") or {}).get("data_files") or {}).get(spec.get("test_split", "test"))
    field_name = spec.get("doc_to_choice")
    if not data_file or not isinstance(field_name, str):
        return None
    rows = [json.loads(line) for line in (spec_path.parent / data_file).read_text().splitlines() if line.strip()]
    counts = [len(row[field_name]) for row in rows if row.get(field_name)]
    if not counts:
        return None
    how = f"{counts[0]} choices" if len(set(counts)) == 1 else f"{min(counts)}–{max(counts)} choices"
    return float(np.mean([1.0 / n for n in counts])), len(counts), how


def chance_levels(tasks: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per task: its chance accuracy (NaN where unknown) and how it was found."""
    rows, notes = [], []
    for task in tasks:
        local = _local_task_chance(task)
        if local is not None:
            chance, examples, how = local
            rows.append({"task": task, "chance": chance, "how": f"{how}, {examples} examples (task data)"})
        elif task.split("_")[0] in BUILTIN_CHOICES or task in BUILTIN_CHOICES:
            n = BUILTIN_CHOICES.get(task, BUILTIN_CHOICES.get(task.split("_")[0]))
            rows.append({"task": task, "chance": 1.0 / n, "how": f"{n} choices (lm-eval task definition)"})
        else:
            rows.append({"task": task, "chance": math.nan, "how": "unknown"})
            notes.append(f"chance level of task {task}: unknown (not a rankscope task; choice count not on record)")
    return pd.DataFrame(rows, columns=["task", "chance", "how"]), notes


def _regime_file(study: Study) -> dict:
    """The study's regime.json ({} for run folders reported without a study, or unreadable)."""
    from rankscope.study.regime_record import REGIME_FILE

    path = study.study_dir / REGIME_FILE
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def role_lr_text(role: str, config: dict, recorded: dict | None, shared: dict[str, float] | None) -> str:
    """One run's lr for a role (embed, head, norm) and where it came from, as a table cell: from
    regime.json's `roles` / `role_sources` when the study recorded them, else from the run's
    config.yaml; a role nobody set follows the method's lr. `shared`: the dense lrs stage 1 of the
    shared-dense protocol chose at the run's preset (None when the protocol did not share any)."""
    recorded = recorded or {}
    source = (recorded.get("role_sources") or {}).get(role)
    lr = ((recorded.get("roles") or {}).get(role) or {}).get("lr")
    if source is None or lr is None:  # not recorded: what the run's own config says
        own = (config.get("optim") or {}).get(f"{role}_lr")
        return FOLLOWS_METHOD_LR if own is None else f"{float(own):g} ({SET_BY_RUN})"
    if source == "method lr":
        return FOLLOWS_METHOD_LR
    words = RECORDED_SOURCES.get(source, source)
    # Stage 1's choice, given to every method alike (a value the study set itself is the run's).
    picked = (shared or {}).get(f"optim.{role}_lr")
    if source == TUNED_IN_STUDY and picked is not None and math.isclose(float(picked), float(lr)):
        words = f"shared, {words}"
    return f"{float(lr):g} ({words})"


def study_regime(study: Study) -> Regime:
    notes: list[str] = []
    configs = {str(run): _run_config(study, str(run)) for run in study.runs["run"]}
    regime_file = _regime_file(study)
    recorded = dict(regime_file.get("runs") or {}) if isinstance(regime_file.get("runs"), dict) else {}
    protocol = regime_file.get("tune_protocol")
    shared_dense = regime_file.get("shared_dense") if isinstance(regime_file.get("shared_dense"), dict) else {}
    choices = {run: lr_choice(configs[run], str(method), str(preset), recorded.get(run))
               for run, method, preset in zip(study.runs["run"], study.runs["method"], study.runs["preset"])}
    rows = []
    for preset in study.presets():
        in_preset = study.runs[study.runs["preset"].astype(str) == preset]
        for method in sorted_methods(in_preset["method"].dropna().unique()):
            group = in_preset[in_preset["method"] == method]
            trained = group[finite(group["val_loss"])]
            run_choices = [choices[str(r)] for r in group["run"]]
            lr_text, source_text = _format_lr(run_choices)
            tokens = trained["tokens"].astype(float) if "tokens" in trained else pd.Series(dtype=float)
            params = trained["params"].astype(float)
            shared = shared_dense.get(preset) if protocol == SHARED_DENSE else None
            roles = {ROLE_COLUMNS[role]: _joined(role_lr_text(role, configs[str(r)], recorded.get(str(r)), shared)
                                                 for r in group["run"])
                     for role in ROLES}
            rows.append({
                "preset": preset, "method": method, "control": is_control(method), "seeds": len(trained),
                "steps": _single(trained["steps"]), "tokens": _single(tokens), "params": _single(params),
                "tokens_per_param": _single(tokens / params),
                "lr": lr_text, "lr_source": source_text, **roles, "lr_choices": run_choices,
                "val_ppl_mean": float(trained["val_ppl"].astype(float).mean()) if len(trained) else math.nan,
            })
    table = pd.DataFrame(rows, columns=["preset", "method", "control", "seeds", "steps", "tokens", "params",
                                        "tokens_per_param", "lr", "lr_source", *ROLE_COLUMNS.values(), "lr_choices",
                                        "val_ppl_mean"])
    tasks = sorted(set(study.downstream["task"].astype(str))) if len(study.downstream) else []
    chance, chance_notes = chance_levels(tasks)
    unigram = _unigram_ppl(study, configs, notes) if len(study.runs) else {}
    return Regime(table, unigram, chance, notes + chance_notes, choices, protocol=protocol,
                  shared_dense={str(k): v for k, v in shared_dense.items() if isinstance(v, dict)})


def _joined(texts) -> str:
    """The distinct cells of a method's seeds, in first-seen order ('; '-joined when they differ)."""
    return "; ".join(dict.fromkeys(texts)) or "–"


def _single(values: pd.Series) -> float:
    """The value all seeds share (steps, tokens, params are fixed by the config); their mean if not."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.mean()) if len(values) else math.nan




# --- what the report shows -------------------------------------------------------------------------


def regime_display(regime: Regime, preset: str) -> pd.DataFrame:
    """The regime table of one scale, formatted."""
    rows = regime.table[regime.table["preset"] == str(preset)]
    shown = pd.DataFrame({
        "method": [method_label(m) for m in rows["method"]],
        "seeds": rows["seeds"].to_numpy(),
        "steps": [_integer(v) for v in rows["steps"]],
        "tokens": [_integer(v) for v in rows["tokens"]],
        "params [M]": [format_number(v / 1e6) for v in rows["params"]],
        "tokens / param": [format_number(v, 3) for v in rows["tokens_per_param"]],
        # A control keeps its block matrices at init: its own lr drives none of them.
        "block lr": ["– (frozen)" if is_control(m) else lr for m, lr in zip(rows["method"], rows["lr"])],
        "block lr from": ["no block matrix trains" if is_control(m) else source
                          for m, source in zip(rows["method"], rows["lr_source"])],
    })
    for role, column in ROLE_COLUMNS.items():
        if column in rows.columns:
            shown[ROLE_HEADERS[role]] = rows[column].to_numpy()
    return shown


def _integer(value: float) -> str:
    return f"{int(round(value)):,}" if np.isfinite(value) else "–"


def chance_of_mean(regime: Regime) -> float:
    """Chance level of the mean accuracy over tasks (the mean of the tasks' chance levels)."""
    values = regime.chance["chance"].astype(float) if len(regime.chance) else pd.Series(dtype=float)
    return float(values.mean()) if len(values) and np.isfinite(values).all() else math.nan


def regime_lines(regime: Regime, preset: str, study: Study) -> list[str]:
    """What a reader needs to judge this scale's numbers: the unigram and chance baselines next to
    the runs' values, and the learning rates' provenance."""
    lines = []
    rows = regime.table[(regime.table["preset"] == str(preset)) & np.isfinite(regime.table["val_ppl_mean"].astype(float))]
    unigram = regime.unigram_ppl.get(str(preset), math.nan)
    if np.isfinite(unigram):
        text = (f"Unigram perplexity of the validation split: **{format_number(unigram)}** (a model that knows only the "
                "training split's token frequencies, add-one smoothed, scored on the validation tokens the runs' "
                "perplexity is scored on).")
        methods_only = rows[~rows["method"].map(is_control)]
        if len(methods_only):
            # The range only, without naming methods: which one is lowest is a ranking, and ranking
            # is left to the corrected tests. Controls are no method: their place is the verdict below.
            text += (f" The methods' mean val ppl lie between {format_number(methods_only['val_ppl_mean'].min())} and "
                     f"{format_number(methods_only['val_ppl_mean'].max())}.")
        if len(rows):
            above = [method_label(m) for m in rows[rows["val_ppl_mean"] >= unigram]["method"]]
            if above:
                text += (f" Not below the unigram perplexity: {', '.join(above)} — these runs predict the validation "
                         "tokens no better than token frequencies alone.")
        lines.append(text)
    else:
        lines.append("Unigram perplexity of the validation split: not available (see Missing data).")
    if len(regime.chance):
        chance = "; ".join(f"{r.task} {format_number(100 * r.chance, 3)}% ({r.how})" if np.isfinite(r.chance)
                           else f"{r.task}: unknown" for r in regime.chance.itertuples())
        text = f"Chance level of each downstream task: {chance}; of the mean over tasks: {format_number(100 * chance_of_mean(regime), 3)}%."
        in_preset = study.downstream[study.downstream["preset"].astype(str) == str(preset)]
        examples = pd.to_numeric(in_preset["n"], errors="coerce").dropna()
        if len(examples):
            text += f" Each run is scored on {count_range(examples)} examples per task."
        stderr = pd.to_numeric(in_preset["acc_stderr"], errors="coerce").dropna()
        if len(stderr):
            text += (f" One task's accuracy has a standard error of about {format_number(100 * stderr.mean(), 2)} points "
                     "(mean of lm-eval's acc_stderr over runs and tasks).")
        lines.append(text)
    sources = {c.source for m in rows["method"] for c in regime.lr_choices(preset, m)} if len(rows) else set()
    if sources and not any(c.tuned for m in rows["method"] for c in regime.lr_choices(preset, m)):
        lines.append(f"Learning rates: {', '.join(sorted(sources))} — none was tuned for this regime.")
    dense = dense_lr_line(regime, preset)
    if dense:
        lines.append(dense)
    per_param = (pd.to_numeric(rows["tokens_per_param"], errors="coerce").dropna()
                 if len(rows) and "tokens_per_param" in rows else pd.Series(dtype=float))
    if len(per_param) and per_param.max() < COMPUTE_OPTIMAL_TOKENS_PER_PARAM:
        lines.append(f"Training length: {format_number(per_param.max(), 2)} tokens per parameter at most, against about "
                     f"{COMPUTE_OPTIMAL_TOKENS_PER_PARAM} for compute-optimal training (Hoffmann et al. 2022). These runs "
                     "are far from converged: an ordering of methods here need not hold for longer training or larger "
                     "models.")
    return lines


def _dense_values_text(values: dict[str, float]) -> str:
    """Stage 1's dense lrs: one number when the keys are tied to one value (they are by design)."""
    numbers = {float(v) for v in values.values()}
    if len(numbers) == 1:
        return f"{numbers.pop():g}"
    return ", ".join(f"{key.rsplit('.', 1)[-1]} {float(value):g}" for key, value in sorted(values.items()))


def dense_lr_line(regime: Regime, preset: str) -> str | None:
    """How the embeddings, head and norms were trained across methods, and hence what a difference
    between methods can mean: the tuning protocol's sentence, or (without one) what the runs' role
    lrs show. None where the table has no role columns (a regime built by hand)."""
    rows = regime.table[(regime.table["preset"] == str(preset)) & (regime.table["seeds"] > 0)]
    if any(column not in rows.columns for column in ROLE_COLUMNS.values()) or rows.empty:
        return None
    if regime.protocol == SHARED_DENSE:
        values = regime.shared_dense.get(str(preset))
        if values:
            controls = " and the control" if rows["method"].map(is_control).any() else ""
            return (f"Tuning protocol {SHARED_DENSE}: stage 1 tuned full rank's block lr jointly with one lr for the "
                    f"embeddings, head and norms (chosen: {_dense_values_text(values)}); stage 2 kept that lr for every "
                    f"method{controls} and tuned only each method's own lr, so the methods differ only in what they do "
                    "to the block matrices.")
        return (f"Tuning protocol {SHARED_DENSE}, but stage 1 chose no dense lr at this scale (see the tuning "
                "section): " + _role_lrs_reading(rows))
    head = f"Tuning protocol {regime.protocol}: each method's lr was tuned on its own; " if regime.protocol else ""
    reading = _role_lrs_reading(rows)
    return head + reading if head else reading[0].upper() + reading[1:]


def _role_lrs_reading(rows: pd.DataFrame) -> str:
    cells = rows[list(ROLE_COLUMNS.values())].astype(str)
    if (cells == FOLLOWS_METHOD_LR).all(axis=None):
        return ("each method's single lr also drives its embeddings, head and norms (as in the official harnesses), "
                "so a difference between methods mixes what the method does to the block matrices with the lr its "
                "embeddings, head and norms got.")
    if len(cells.drop_duplicates()) == 1 and not (cells == FOLLOWS_METHOD_LR).any(axis=None):
        shared = ", ".join(f"{ROLE_HEADERS[role]} {cells.iloc[0][column]}" for role, column in ROLE_COLUMNS.items())
        return (f"every run trains its embeddings, head and norms at the same lrs ({shared}), so the methods differ "
                "only in what they do to the block matrices.")
    return ("the embeddings, head and norms lrs differ between methods (table), so a difference between methods "
            "mixes what the method does to the block matrices with those lrs.")


def regime_summary(regime: Regime, preset: str) -> str:
    """The regime of one scale in one line (for the terminal)."""
    rows = regime.table[(regime.table["preset"] == str(preset)) & (regime.table["seeds"] > 0)]
    if rows.empty:
        return f"regime ({preset}): no trained run"
    reference = rows.iloc[0]  # full rank when present (the table's first row)
    lrs = "; ".join(f"{r.method} {'– (frozen)' if r.control else r.lr}" for r in rows.itertuples())
    methods = rows[~rows["control"].astype(bool)]
    sources = sorted({s for text in methods["lr_source"] for s in text.split("; ")})
    dense = rows[list(ROLE_COLUMNS.values())].astype(str).drop_duplicates()
    roles = ("" if len(dense) != 1 or (dense == FOLLOWS_METHOD_LR).any(axis=None) else
             "; for every run " + ", ".join(f"{ROLE_HEADERS[role]} {dense.iloc[0][column]}"
                                            for role, column in ROLE_COLUMNS.items()))
    return (f"regime ({preset}): {_integer(reference['steps'])} steps, {_integer(reference['tokens'])} tokens = "
            f"{format_number(reference['tokens_per_param'], 3)} tokens/param ({reference['method']}); "
            f"seeds {count_range(rows['seeds'])}; block lr ({', '.join(sources)}): {lrs}{roles}")


def regime_glance(regime: Regime, preset: str) -> str:
    """One scale's regime in one sentence for the report's first screen (the table is in the scale's section)."""
    rows = regime.table[(regime.table["preset"] == str(preset)) & (regime.table["seeds"] > 0)]
    if rows.empty:
        return f"**Scale {preset}**: no trained run."
    controls = rows[rows["control"].astype(bool)]
    methods = rows[~rows["control"].astype(bool)]
    who = f"{len(methods)} method{'s' if len(methods) != 1 else ''}" + (
        f" and the {', '.join(controls['method'])} control" if len(controls) else "")
    per_param = pd.to_numeric(rows["tokens_per_param"], errors="coerce").dropna()
    length = (f"{_integer(rows['steps'].iloc[0])} steps, {_integer(rows['tokens'].iloc[0])} tokens = "
              f"{format_number(per_param.min(), 2)}–{format_number(per_param.max(), 2)} tokens/param"
              if len(per_param) else f"{_integer(rows['steps'].iloc[0])} steps")
    if len(per_param) and per_param.max() < COMPUTE_OPTIMAL_TOKENS_PER_PARAM:
        length += f" (compute-optimal ≈ {COMPUTE_OPTIMAL_TOKENS_PER_PARAM}: far from converged)"
    sources = sorted({s for text in methods["lr_source"] for s in str(text).split("; ")})
    tuned = all(c.tuned for m in methods["method"] for c in regime.lr_choices(preset, m)) and len(methods)
    lrs = "block lrs tuned per method" if tuned else "block lrs " + ", ".join(sources)
    shared = ""
    if all(column in rows.columns for column in ROLE_COLUMNS.values()):
        reading = _role_lrs_reading(rows)
        shared = ("; embeddings, head and norms at one lr shared by every run" if reading.startswith("every run") else
                  "; each method's lr also drives its embeddings, head and norms" if reading.startswith("each method")
                  else "; the embeddings, head and norms lrs differ between methods")
    return (f"**Scale {preset}**: {who}, {count_range(rows['seeds'])} seeds each, {length}; {lrs}{shared}.")


def count_range(counts) -> str:
    counts = sorted({int(c) for c in counts})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def baseline_row(regime: Regime, preset: str) -> dict[str, str]:
    """The unigram and chance baselines as one extra row of the results table."""
    unigram = regime.unigram_ppl.get(str(preset), math.nan)
    return {"method": "baseline: unigram / chance", "val loss": format_number(math.log(unigram)) if np.isfinite(unigram) else "–",
            "val ppl": format_number(unigram), "downstream acc [%]": format_number(100 * chance_of_mean(regime), 3)}


__all__ = ["BUILTIN_CHOICES", "FOLLOWS_METHOD_LR", "LITERATURE", "ROLE_COLUMNS", "SET_BY_RUN", "UNKNOWN", "LrChoice",
           "Regime", "baseline_row", "chance_levels", "chance_of_mean", "dense_lr_line", "lr_choice", "regime_display",
           "regime_glance", "regime_lines", "regime_summary", "role_lr_text", "study_regime"]
