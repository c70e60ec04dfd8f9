"""Zero-shot downstream evaluation of any rankscope model through lm-eval-harness.

`RankscopeLM` adapts an in-memory rankscope model (anything whose `forward(input_ids)` returns
logits `(B, T, V)`, factorized layers included, so no dense export is needed) to lm-eval's
`LM` interface. `evaluate_model` runs `lm_eval.simple_evaluate` on a task list and returns a
compact dict of accuracies.

Two task sets:

- `DEFAULT_TASKS`, the study's zero-shot suite (piqa, copa, mrpc, rte, mnli, arc_easy, blimp,
  sst2). These are lm-eval's built-in tasks and need their Hugging Face data sets: available
  when online or when the data set is in the local HF cache. `available_tasks` says which can
  run here and why the others cannot.
- `LOCAL_TASKS`, the offline set shipped with the package under `rankscope/data/tasks/`
  (group `rankscope_local`), built by `scripts/make_local_tasks.py` from the corpus's held-out
  `tasks` split. Their YAMLs keep lm-eval's `dataset_path: json` + `data_files` form; the files
  are resolved relative to the YAML by `load_local_task_dataset` (lm-eval itself would resolve
  a relative `data_files` against the current directory), so the folder also works as
  `lm_eval --include_path <folder>` from anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.errors import DownstreamError, did_you_mean  # noqa: F401 - DownstreamError re-exported

try:  # lm-eval is a declared dependency; keep the import error readable if it is missing
    from lm_eval.api.model import LM as _LMBase
except ImportError:  # pragma: no cover - exercised only in broken installs
    _LMBase = object  # type: ignore[assignment,misc]

log = logging.getLogger("rankscope.analysis.downstream")

DEFAULT_TASKS: list[str] = ["piqa", "copa", "mrpc", "rte", "mnli", "arc_easy", "blimp", "sst2"]
LOCAL_TASKS: list[str] = ["rs_cloze", "rs_word", "rs_speaker"]
LOCAL_GROUP = "rankscope_local"
LOCAL_TASKS_DIR: Path = Path(__file__).resolve().parent.parent / "data" / "tasks"

# Where the study's built-in tasks live inside lm-eval's own task folder. Indexing only these
# folders takes milliseconds; indexing all of lm-eval's ~15k task YAMLs takes 10+ s, which we
# only pay when a name outside this table is requested.
_BUILTIN_TASK_DIRS: dict[str, str] = {
    "piqa": "piqa",
    "copa": "super_glue/copa",
    "mrpc": "glue/mrpc",
    "rte": "glue/rte",
    "mnli": "glue/mnli",
    "sst2": "glue/sst2",
    "arc_easy": "arc",
    "blimp": "blimp",
}


# --------------------------------------------------------------------------- model wrapper


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the caller's training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


class RankscopeLM(_LMBase):
    """lm-eval `LM` around an in-memory rankscope model and its tokenizer.

    Scoring follows lm-eval's conventions for causal models (as its HF wrapper does):
    a context's trailing whitespace moves to the continuation, context+continuation is encoded
    as one string and split at the context's token count (so merges across the boundary are
    respected), an empty context becomes the EOS token, and inputs longer than `max_length`
    are truncated on the left. The model is moved to `device`; it is put in eval mode only
    while scoring and its training flag is restored afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DownstreamError(f"batch_size must be at least 1 (got {batch_size})")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise DownstreamError("the tokenizer has no eos_token_id; lm-eval needs one as the prefix of empty contexts")
        self._device = torch.device(device)
        self.model = model.to(self._device)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        if max_length is None:
            # Callers that know the training seq_len should pass it: RoPE models score worse
            # beyond the length they were trained on, and max_seq_len may be much larger.
            config = getattr(model, "config", None)
            max_length = getattr(config, "max_seq_len", None) or 2048
        if max_length < 2:
            raise DownstreamError(f"max_length must be at least 2 tokens (got {max_length})")
        self.max_length = int(max_length)
        # Right padding only fills positions after a sequence's last real token; with causal
        # attention they cannot influence the positions we read, so any id works.
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else tokenizer.eos_token_id)

    # lm-eval reads these ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"model_class": type(self.model).__name__, "model_num_parameters": n_params,
                "max_length": self.max_length}

    # tokenization --------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        # rankscope's tokenizers add no BOS/EOS on their own; training data has none inside text
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as lm-eval scores them."""
        if context == "":
            continuation_tokens = self.tok_encode(continuation)
            # An empty context conditions on EOS, the same separator the model saw between documents.
            return [self.eot_token_id], continuation_tokens
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        context_tokens = self.tok_encode(context)
        return context_tokens, whole[len(context_tokens):]

    # scoring -------------------------------------------------------------------------------
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """fp32 log-softmax of the model's logits for right-padded rows, shape (B, T, V)."""
        width = max(len(r) for r in rows)
        batch = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        logits = self.model(batch.to(self._device))
        if isinstance(logits, tuple):  # tolerate models that return (logits, extras)
            logits = logits[0]
        if logits.dim() != 3 or logits.shape[:2] != batch.shape:
            raise DownstreamError(
                f"the model returned logits of shape {tuple(logits.shape)} for input {tuple(batch.shape)}; "
                "rankscope models must return (B, T, V)"
            )
        return F.log_softmax(logits.float(), dim=-1)

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding reproduces it) per pair.

        Each pair is (context tokens, continuation tokens) with a non-empty context. The input is
        `(context + continuation)[-(max_length + 1):][:-1]`; the last `len(continuation)` output
        positions predict the continuation. Requests are batched longest first.
        """
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for context, continuation in pairs:
            if not context:
                raise DownstreamError("score_tokens needs a non-empty context (use the EOS token for an empty one)")
            if len(continuation) > self.max_length:
                raise DownstreamError(
                    f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}; "
                    "raise max_length or shorten the task's answers"
                )
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        with _eval_mode(self.model):
            for start in range(0, len(order), self.batch_size):
                indices = order[start : start + self.batch_size]
                rows = []
                for i in indices:
                    context, continuation = pairs[i]
                    rows.append((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
                log_probs = self._log_probs(rows)
                for row_index, i in enumerate(indices):
                    continuation = pairs[i][1]
                    n_input, n_cont = len(rows[row_index]), len(continuation)
                    if n_cont == 0:
                        results[i] = (0.0, True)
                        continue
                    window = log_probs[row_index, n_input - n_cont : n_input]  # (n_cont, V)
                    target = torch.tensor(continuation, dtype=torch.long, device=window.device)
                    total = window.gather(-1, target[:, None]).sum().item()
                    greedy = bool((window.argmax(dim=-1) == target).all().item())
                    results[i] = (float(total), greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(context, continuation) for context, continuation in (r.args for r in requests)]
        results = self.score_tokens(pairs)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings: disjoint windows of up to `max_length` predictions,
        each token predicted exactly once with as much preceding context as fits."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            (text,) = request.args
            windows = [
                make_disjoint_window(pair)
                for pair in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(score for score, _ in self.score_tokens(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(float(total))
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (no KV cache: small models) until a stop string, EOS or `max_gen_toks`."""
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            max_gen_toks = int(gen_kwargs.get("max_gen_toks", 256))
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0.0:
                log.warning("generate_until decodes greedily; ignoring sampling settings %s", gen_kwargs)
            text = self._greedy_generate(context, list(until), max_gen_toks)
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs

    def _greedy_generate(self, context: str, until: list[str], max_gen_toks: int) -> str:
        tokens = self.tok_encode(context) or [self.eot_token_id]
        generated: list[int] = []
        text = ""
        with _eval_mode(self.model):
            for _ in range(max_gen_toks):
                window = (tokens + generated)[-self.max_length:]
                next_token = int(self._log_probs([window])[0, -1].argmax().item())
                if next_token == self.eot_token_id:
                    break
                generated.append(next_token)
                text = self.tok_decode(generated)
                if any(stop and stop in text for stop in until):
                    break
        cut = min((text.index(stop) for stop in until if stop and stop in text), default=len(text))
        return text[:cut]


# --------------------------------------------------------------------------- local tasks


def load_local_task_dataset(**kwargs: Any):
    """`custom_dataset` of the local task YAMLs: read their `data_files` jsonl into a DatasetDict.

    lm-eval passes the task's metadata (including `config_source`, the YAML's path) and its
    `dataset_kwargs`; relative `data_files` are resolved against the YAML's folder.
    """
    import datasets

    data_files = kwargs.get("data_files")
    if not isinstance(data_files, dict) or not data_files:
        raise DownstreamError("a local task YAML needs dataset_kwargs.data_files: {test: <file.jsonl>}")
    source = kwargs.get("config_source")
    base = Path(source).parent if source and source != "inline" else LOCAL_TASKS_DIR
    splits = {}
    for split, name in data_files.items():
        path = Path(name) if Path(name).is_absolute() else base / name
        if not path.is_file():
            raise DownstreamError(f"local task data {path} is missing; regenerate it with scripts/make_local_tasks.py")
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


# --------------------------------------------------------------------------- task availability


def expand_task_names(tasks: Sequence[str] | str | None) -> list[str]:
    """The requested names with `rankscope_local` expanded, duplicates dropped, order kept.

    An unknown name is a DownstreamError, so callers can check a task list before any work (a
    study does, before training). Names in rankscope's own namespace (`rs_`, `rankscope`) are
    checked at once; others against lm-eval's task index, which reads only the study suite's
    folders for its names and all of lm-eval's tasks (10+ s) for any other.
    """
    if tasks is None:
        tasks = DEFAULT_TASKS
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    names: list[str] = []
    for name in tasks:
        for expanded in (LOCAL_TASKS if name == LOCAL_GROUP else [name]):
            if expanded not in names:
                names.append(expanded)
    if not names:
        raise DownstreamError("no tasks given; use e.g. tasks=['rankscope_local']")
    for name in names:
        if name.startswith(("rs_", "rankscope")) and name not in LOCAL_TASKS:
            raise DownstreamError(f"unknown local task {name!r}{did_you_mean(name, LOCAL_TASKS + [LOCAL_GROUP])}")
    if any(name not in LOCAL_TASKS for name in names):
        index = _manager_for(names).task_index
        unknown = [n for n in names if n not in index]
        if unknown:
            hint = did_you_mean(unknown[0], LOCAL_TASKS + [LOCAL_GROUP] + DEFAULT_TASKS)
            raise DownstreamError(f"unknown lm-eval task {unknown[0]!r}{hint}")
    return names


@functools.lru_cache(maxsize=4)
def _task_manager(include_dirs: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval(True):
        return TaskManager(include_path=list(include_dirs), include_defaults=include_defaults)


def _manager_for(names: Sequence[str]):
    """A TaskManager that knows the local tasks and every requested built-in task."""
    import lm_eval

    builtin = [n for n in names if n not in LOCAL_TASKS]
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    dirs = [str(LOCAL_TASKS_DIR)]
    known = all(n in _BUILTIN_TASK_DIRS and (tasks_root / _BUILTIN_TASK_DIRS[n]).is_dir() for n in builtin)
    if known:
        dirs += sorted({str(tasks_root / _BUILTIN_TASK_DIRS[n]) for n in builtin})
        return _task_manager(tuple(dirs), False)
    return _task_manager(tuple(dirs), True)


def _task_datasets(manager, name: str, seen: set[str] | None = None) -> list[tuple[str, str | None]]:
    """The (dataset_path, dataset_name) pairs a task, group or tag reads."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return []
    kind = entry.kind.name
    if kind == "TAG":
        return [ds for member in sorted(entry.tags) for ds in _task_datasets(manager, member, seen)]
    cfg = entry.cfg or {}
    if kind == "GROUP":
        out = []
        members = cfg.get("task") or []
        for member in members if isinstance(members, list) else [members]:
            if isinstance(member, str):
                out += _task_datasets(manager, member, seen)
            elif isinstance(member, dict):
                if isinstance(member.get("task"), str) and member["task"] in manager.task_index:
                    out += _task_datasets(manager, member["task"], seen)
                if member.get("dataset_path"):
                    out.append((member["dataset_path"], member.get("dataset_name")))
        return out
    if cfg.get("dataset_path"):
        return [(cfg["dataset_path"], cfg.get("dataset_name"))]
    return []


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()


def _dataset_cached(path: str) -> bool:
    """Whether a hub data set (or a local folder) is on disk: hub cache or `datasets` cache."""
    if Path(path).expanduser().is_dir():
        return True
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or _hf_home() / "hub")
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets")
    hub_name = "datasets--" + path.replace("/", "--")
    datasets_name = path.replace("/", "___")
    candidates = [hub_cache / hub_name, datasets_cache / datasets_name, datasets_cache / datasets_name.lower()]
    return any(c.expanduser().is_dir() for c in candidates)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _offline_by_setting() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect within 3 s (asked once per process)."""
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=3):
            return True
    except OSError:
        return False


def _network_available() -> bool:
    return not _offline_by_setting() and _hub_reachable()


def available_tasks(tasks: Sequence[str] | str | None = None) -> tuple[list[str], dict[str, str]]:
    """Split `tasks` (default: `DEFAULT_TASKS`) into those that can run here and the others.

    Local tasks are always available. A built-in task is available when every data set it
    reads is in the local Hugging Face cache, or when the hub is reachable (it will be
    downloaded). Returns `(available, {name: reason})`; an unknown name raises DownstreamError.
    """
    names = expand_task_names(tasks)
    manager = _manager_for(names)
    available: list[str] = []
    unavailable: dict[str, str] = {}
    online: bool | None = None
    for name in names:
        if name in LOCAL_TASKS:
            available.append(name)
            continue
        missing = sorted({path for path, _ in _task_datasets(manager, name) if not _dataset_cached(path)})
        if not missing:
            available.append(name)
            continue
        if online is None:
            online = _network_available()
        if online:
            available.append(name)
        else:
            unavailable[name] = (
                f"data set {missing[0]} not in the local Hugging Face cache and no network: "
                f"run once online or use --tasks {LOCAL_GROUP}"
            )
    return available, unavailable


# --------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def _quiet_lm_eval(quiet: bool) -> Iterator[None]:
    """lm-eval logs every task it builds (INFO) and warns about settings we choose on purpose
    (zero-shot override, custom dataset loader, tags shared across the folders we index);
    keep it to errors unless asked."""
    if not quiet:
        yield
        return
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per task and split, 30 per run of a study
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _hub_offline(active: bool) -> Iterator[None]:
    """Make `datasets` / `huggingface_hub` read their caches without trying the network.

    Without network, a cached data set can still fail to load while the libraries try to reach
    the hub; both read these module constants at call time (set from the environment at import).
    """
    if not active:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    targets = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
               (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [(module, name, getattr(module, name)) for module, name in targets if hasattr(module, name)]
    for module, name, _ in saved:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _metric(values: dict[str, Any], key: str) -> float | None:
    """A metric from lm-eval's `"<metric>,<filter>"` keys; None when absent or not a number."""
    for full_key, value in values.items():
        if full_key.split(",")[0] == key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | str | None = None,
    batch_size: int = 16,
    limit: int | float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    max_length: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on `tasks` (default `DEFAULT_TASKS`; `rankscope_local` for
    the offline set) through `lm_eval.simple_evaluate`.

    Tasks that cannot run here (see `available_tasks`) are skipped and listed with the reason;
    if none can run, DownstreamError. Returns::

        {"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}},  # norm only where the task has it
         "mean_acc": mean of "acc" over the evaluated tasks (NaN if none has acc),
         "evaluated": [names], "unavailable": {name: reason},
         "num_fewshot": 0, "limit": limit, "seed": seed}
    """
    from lm_eval import simple_evaluate

    available, unavailable = available_tasks(tasks)
    for name, reason in unavailable.items():
        log.warning("skipping task %s: %s", name, reason)
    if not available:
        first = next(iter(unavailable.values()))
        raise DownstreamError(f"none of the requested tasks can run here: {first}")
    manager = _manager_for(available)
    lm = RankscopeLM(model, tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    needs_hub = any(name not in LOCAL_TASKS for name in available)
    with _quiet_lm_eval(not verbose), _hub_offline(needs_hub and not _network_available()):
        output = simple_evaluate(
            model=lm,
            tasks=list(available),
            num_fewshot=0,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=100,  # acc/acc_norm stderr is analytic; only non-mean metrics (f1) bootstrap
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if output is None:  # only on non-zero ranks, which a single in-memory model never is
        raise DownstreamError("lm-eval returned no results")
    per_task: dict[str, dict[str, float]] = {}
    for name in available:
        values = output["results"].get(name, {})
        row: dict[str, float] = {}
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            value = _metric(values, metric)
            if value is not None:
                row[metric] = value
        n_samples = output.get("n-samples", {}).get(name, {})
        if isinstance(n_samples, dict) and "effective" in n_samples:
            row["n"] = int(n_samples["effective"])
        per_task[name] = row
    accuracies = [row["acc"] for row in per_task.values() if "acc" in row and not math.isnan(row["acc"])]
    return {
        "tasks": per_task,
        "mean_acc": float(sum(accuracies) / len(accuracies)) if accuracies else float("nan"),
        "evaluated": list(available),
        "unavailable": unavailable,
        "num_fewshot": 0,
        "limit": limit,
        "seed": seed,
    }


__all__ = [
    "expand_task_names",
    "DEFAULT_TASKS",
    "LOCAL_TASKS",
    "LOCAL_GROUP",
    "LOCAL_TASKS_DIR",
    "DownstreamError",
    "RankscopeLM",
    "available_tasks",
    "evaluate_model",
    "load_local_task_dataset",
]
