#!/usr/bin/env python
"""Generate rankscope's offline zero-shot task set from the embedded corpus's held-out `tasks` split.

    python scripts/make_local_tasks.py            # writes src/rankscope/data/tasks/
    python scripts/make_local_tasks.py --out DIR  # writes elsewhere (the tests compare the two)

Three multiple-choice tasks (4 options each, chance = 0.25), all built from scenes that no model
trains on (the corpus's `tasks` split), all deterministic (a seeded RNG per task, inputs in the
corpus's stable order, JSON written with sorted keys):

- `rs_cloze`: a few lines of a scene; which line comes next? The true next spoken line against
  three spoken lines of similar length taken from other scenes.
- `rs_word`: a few lines and the start of a line; which word comes next? The true word against
  three words of similar corpus frequency (and the same capitalisation).
- `rs_speaker`: a few lines of dialogue ending at a change of speaker; who speaks next? The true
  speaker's name against three other speakers of the same scene.

Each task is `<out>/<task>/<task>.yaml` + `<task>.jsonl` (rows: id, source, context, choices,
label); `<out>/rankscope_local.yaml` groups them. The YAMLs use lm-eval's `dataset_path: json`
with `data_files` relative to the YAML; `custom_dataset` points at
`rankscope.analysis.downstream.load_local_task_dataset`, which resolves that relative path
(lm-eval alone would resolve it against the current directory).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rankscope.data.corpus import embedded_document_keys, embedded_documents

ITEMS_PER_TASK = 300
N_CHOICES = 4
CONTEXT_LINES = 5  # non-blank lines of preceding text shown as context
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "rankscope" / "data" / "tasks"
TASK_SEEDS = {"rs_cloze": 1, "rs_word": 2, "rs_speaker": 3}

# A speaker heading: a short line of capitalised words (small joining words allowed), no
# punctuation, on its own as the first line of a multi-line paragraph, e.g. "KING LEAR",
# "First Witch", "PAGE & SHALLOW & SLENDER".
_SPEAKER = re.compile(r"[A-Z][A-Za-z]*(?: (?:[A-Z][A-Za-z]*|of|the|and|&))*")
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class Line:
    """One line of a scene with what the tasks need to know about it."""

    text: str
    kind: str  # "blank", "speaker" (a speaker heading), "spoken", or "other" (directions, headings)
    speaker: str | None  # who speaks a "spoken" line; the name itself for a "speaker" line


def parse_scene(text: str) -> list[Line]:
    """Classify every line of a cleaned scene (paragraphs are separated by blank lines)."""
    lines: list[Line] = []
    paragraphs = text.split("\n\n")
    speaker: str | None = None
    for p_index, paragraph in enumerate(paragraphs):
        if p_index:
            lines.append(Line("", "blank", None))
        rows = paragraph.split("\n")
        head = rows[0].strip()
        if len(rows) >= 2 and len(head) <= 30 and _SPEAKER.fullmatch(head):
            speaker = head
            lines.append(Line(rows[0], "speaker", head))
            lines += [Line(row, "spoken", speaker) for row in rows[1:]]
        elif len(rows) >= 2 and speaker is not None and not rows[0][:1].isupper():
            # a speech that resumes after a stage direction, lower-case continuation
            lines += [Line(row, "spoken", speaker) for row in rows]
        else:
            lines += [Line(row, "other", None) for row in rows]
    return lines


def context_before(lines: list[Line], index: int, n_lines: int = CONTEXT_LINES) -> str | None:
    """The raw text of the `n_lines` non-blank lines before `index` (blank lines kept), or None."""
    start, seen = index, 0
    while start > 0 and seen < n_lines:
        start -= 1
        if lines[start].kind != "blank":
            seen += 1
    if seen < n_lines:
        return None
    return "\n".join(line.text for line in lines[start:index])


def _sample_indices(rng: random.Random, n_candidates: int) -> list[int]:
    """`ITEMS_PER_TASK` candidate positions (all when fewer), kept in corpus order."""
    return sorted(rng.sample(range(n_candidates), min(ITEMS_PER_TASK, n_candidates)))


def _shuffled_item(rng: random.Random, task: str, number: int, source: str, context: str,
                   answer: str, distractors: list[str]) -> dict:
    choices = [answer] + distractors
    rng.shuffle(choices)
    return {"id": f"{task}-{number:04d}", "source": source, "context": context,
            "choices": choices, "label": choices.index(answer)}


def make_cloze(scenes: list[tuple[str, list[Line]]]) -> list[dict]:
    rng = random.Random(TASK_SEEDS["rs_cloze"])
    pool = [(key, line.text) for key, lines in scenes for line in lines
            if line.kind == "spoken" and 20 <= len(line.text) <= 70]
    candidates = []
    for key, lines in scenes:
        for index, line in enumerate(lines):
            if line.kind == "spoken" and 20 <= len(line.text) <= 70:
                context = context_before(lines, index)
                if context is not None:
                    candidates.append((key, context, line.text))
    items = []
    for number, c_index in enumerate(_sample_indices(rng, len(candidates))):
        key, context, answer = candidates[c_index]
        # lines of similar length (within 25%) from other scenes, so length alone gives nothing away
        similar = [text for other_key, text in pool
                   if other_key != key and abs(len(text) - len(answer)) <= 0.25 * len(answer) and text != answer]
        distractors = rng.sample(sorted(set(similar)), N_CHOICES - 1)
        items.append(_shuffled_item(rng, "rs_cloze", number, key, context + "\n", answer, distractors))
    return items


def make_word(scenes: list[tuple[str, list[Line]]]) -> list[dict]:
    rng = random.Random(TASK_SEEDS["rs_word"])
    counts = Counter(w.lower() for _, lines in scenes for line in lines if line.kind == "spoken"
                     for w in _WORD.findall(line.text))
    by_frequency = sorted(counts, key=lambda w: (-counts[w], w))
    rank = {w: i for i, w in enumerate(by_frequency)}
    candidates = []
    for key, lines in scenes:
        for index, line in enumerate(lines):
            if line.kind != "spoken":
                continue
            context = context_before(lines, index, CONTEXT_LINES - 1)
            if context is None:
                continue
            words = list(_WORD.finditer(line.text))
            for w_index, match in enumerate(words):
                word = match.group()
                # a word at least third in its line, preceded by a plain space, seen twice or more
                if w_index >= 2 and len(word) >= 3 and line.text[match.start() - 1] == " " and counts[word.lower()] >= 2:
                    prefix = line.text[: match.start() - 1]
                    candidates.append((key, context + "\n" + prefix, word))
    items = []
    for number, c_index in enumerate(_sample_indices(rng, len(candidates))):
        key, context, answer = candidates[c_index]
        # words of similar frequency: from the 20 ranks either side in the frequency order
        r = rank[answer.lower()]
        window = [w for w in by_frequency[max(0, r - 20): r + 21] if w != answer.lower() and len(w) >= 3]
        picked = rng.sample(window, N_CHOICES - 1)
        distractors = [w.capitalize() if answer[0].isupper() else w for w in picked]
        items.append(_shuffled_item(rng, "rs_word", number, key, context,
                                    " " + answer, [" " + d for d in distractors]))
    return items


def make_speaker(scenes: list[tuple[str, list[Line]]]) -> list[dict]:
    rng = random.Random(TASK_SEEDS["rs_speaker"])
    candidates = []
    for key, lines in scenes:
        speakers = sorted({line.speaker for line in lines if line.kind == "speaker"})
        if len(speakers) < N_CHOICES:
            continue
        for index, line in enumerate(lines):
            if line.kind == "speaker" and index >= 2:
                context = context_before(lines, index, CONTEXT_LINES + 1)
                if context is not None:
                    others = [s for s in speakers if s != line.speaker]
                    candidates.append((key, context + "\n", line.speaker, others))
    items = []
    for number, c_index in enumerate(_sample_indices(rng, len(candidates))):
        key, context, answer, others = candidates[c_index]
        items.append(_shuffled_item(rng, "rs_speaker", number, key, context, answer,
                                    rng.sample(others, N_CHOICES - 1)))
    return items


TASK_DESCRIPTIONS = {
    "rs_cloze": "next line of a held-out scene vs 3 similar-length lines from other scenes",
    "rs_word": "next word of a held-out line vs 3 words of similar corpus frequency",
    "rs_speaker": "next speaker of a held-out scene vs 3 other speakers of the same scene",
}


def task_yaml(task: str) -> str:
    return (
        f"# Generated by scripts/make_local_tasks.py; do not edit by hand.\n"
        f"# {TASK_DESCRIPTIONS[task]}\n"
        f"task: {task}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n"
        f"  data_files:\n"
        f"    test: {task}.jsonl\n"
        f"custom_dataset: !function rankscope.analysis.downstream.load_local_task_dataset\n"
        f"output_type: multiple_choice\n"
        f"test_split: test\n"
        f"doc_to_text: context\n"
        f"doc_to_choice: choices\n"
        f"doc_to_target: label\n"
        f"target_delimiter: \"\"\n"
        f"metric_list:\n"
        f"  - metric: acc\n"
        f"    aggregation: mean\n"
        f"    higher_is_better: true\n"
        f"  - metric: acc_norm\n"
        f"    aggregation: mean\n"
        f"    higher_is_better: true\n"
        f"metadata:\n"
        f"  version: 1.0\n"
    )


GROUP_YAML = (
    "# Generated by scripts/make_local_tasks.py; do not edit by hand.\n"
    "group: rankscope_local\n"
    "task:\n"
    "  - rs_cloze\n"
    "  - rs_word\n"
    "  - rs_speaker\n"
    "aggregate_metric_list:\n"
    "  - metric: acc\n"
    "    aggregation: mean\n"
    "    weight_by_size: false\n"
    "  - metric: acc_norm\n"
    "    aggregation: mean\n"
    "    weight_by_size: false\n"
    "metadata:\n"
    "  version: 1.0\n"
)


def build_all() -> dict[str, list[dict]]:
    keys = embedded_document_keys("tasks")
    scenes = list(zip(keys, (parse_scene(text) for text in embedded_documents("tasks"))))
    return {"rs_cloze": make_cloze(scenes), "rs_word": make_word(scenes), "rs_speaker": make_speaker(scenes)}


def write_all(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for task, items in build_all().items():
        folder = out / task
        folder.mkdir(exist_ok=True)
        with (folder / f"{task}.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
            for item in items:
                handle.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
        (folder / f"{task}.yaml").write_text(task_yaml(task), encoding="utf-8", newline="\n")
        print(f"{task}: {len(items)} items -> {folder}")
    (out / "rankscope_local.yaml").write_text(GROUP_YAML, encoding="utf-8", newline="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package's data/tasks)")
    write_all(parser.parse_args().out)


if __name__ == "__main__":
    main()
