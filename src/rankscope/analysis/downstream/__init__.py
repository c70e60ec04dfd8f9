"""Zero-shot downstream evaluation of any rankscope model through lm-eval-harness.

`RankscopeLM` adapts an in-memory rankscope model (anything whose `forward(input_ids)` returns
logits `(B, T, V)`, factorized layers included, so no dense export is needed) to lm-eval's
`LM` interface. `evaluate_model` runs `lm_eval.simple_evaluate` on a task list and returns a
compact dict of accuracies.

Two task sets, each requested as a whole by its group name:

- `HUB_TASKS` (group `rankscope_hub`), the study's zero-shot suite (piqa, copa, mrpc, rte, mnli,
  arc_easy, blimp, sst2). These are lm-eval's built-in tasks and need their Hugging Face data
  sets: available when online or when the data set is in the local HF cache. `available_tasks`
  says which can run here and why the others cannot.
- `LOCAL_TASKS` (group `rankscope_local`, also `DEFAULT_TASKS`: what `rankscope eval` and a
  study's eval stage run when given no tasks), the offline set shipped with the package under
  `rankscope/data/tasks/`, built by `scripts/make_local_tasks.py` from the corpus's held-out
  `tasks` split. Their YAMLs keep lm-eval's `dataset_path: json` + `data_files` form; the files
  are resolved relative to the YAML by `load_local_task_dataset` (lm-eval itself would resolve
  a relative `data_files` against the current directory), so the folder also works as
  `lm_eval --include_path <folder>` from anywhere.
"""

from rankscope.analysis.downstream.evaluate import evaluate_model
from rankscope.analysis.downstream.lm import RankscopeLM
from rankscope.analysis.downstream.offline import available_tasks, settle_hub_mode
from rankscope.analysis.downstream.tasks import (
    DEFAULT_TASKS,
    HUB_GROUP,
    HUB_TASKS,
    LOCAL_GROUP,
    LOCAL_TASKS,
    LOCAL_TASKS_DIR,
    expand_task_names,
    load_local_task_dataset,
)
from rankscope.errors import DownstreamError

__all__ = [
    "expand_task_names",
    "DEFAULT_TASKS",
    "HUB_GROUP",
    "HUB_TASKS",
    "LOCAL_TASKS",
    "LOCAL_GROUP",
    "LOCAL_TASKS_DIR",
    "DownstreamError",
    "RankscopeLM",
    "available_tasks",
    "settle_hub_mode",
    "evaluate_model",
    "load_local_task_dataset",
]
