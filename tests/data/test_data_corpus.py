"""The embedded corpus: scenes as documents, hash-fixed splits that are disjoint and complete."""

import hashlib
import re

import pytest

from rankscope.data import corpus
from rankscope.errors import DataError


def _expected_split(key: str) -> str:
    # The rule of docs/internals.md, written out independently of the implementation.
    bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
    return "val" if bucket <= 3 else "probe" if bucket <= 6 else "tasks" if bucket <= 9 else "train"


def test_every_scene_is_in_exactly_one_split_given_by_the_hash_rule():
    root = corpus.plays_dir()
    plays = sorted(root.rglob("*.md"))
    assert len(plays) == 38
    all_keys = []
    for path in plays:
        relpath = path.relative_to(root).as_posix()
        n_scenes = len(re.findall(r"^### SCENE\b", path.read_text(encoding="utf-8"), flags=re.MULTILINE))
        all_keys += [f"{relpath}#{i}" for i in range(n_scenes)]

    by_split = {split: corpus.embedded_document_keys(split) for split in corpus.SPLITS}
    seen = [key for keys in by_split.values() for key in keys]
    assert len(seen) == len(set(seen))  # disjoint
    assert set(seen) == set(all_keys)  # complete
    for split, keys in by_split.items():
        assert all(_expected_split(key) == split for key in keys)
        assert len(corpus.embedded_documents(split)) == len(keys)
    # Roughly 4% / 3% / 3% / 90% of ~760 scenes.
    n = len(all_keys)
    assert 0.02 * n < len(by_split["val"]) < 0.07 * n
    assert 0.01 * n < len(by_split["probe"]) < 0.06 * n
    assert 0.01 * n < len(by_split["tasks"]) < 0.06 * n


def test_documents_are_deterministic_and_in_stable_order():
    first = corpus.embedded_documents("val")
    corpus._all_documents.cache_clear()
    again = corpus.embedded_documents("val")
    assert first == again
    keys = corpus.embedded_document_keys("train")
    as_tuples = [(k.split("#")[0], int(k.split("#")[1])) for k in keys]
    assert as_tuples == sorted(as_tuples)


def test_documents_are_clean_text_without_markdown():
    for split in corpus.SPLITS:
        for doc in corpus.embedded_documents(split):
            assert doc.startswith("SCENE")
            assert not re.search(r"[#*_\\]", doc)
            assert not re.search(r" +\n", doc)
            assert "\n\n\n" not in doc


def test_play_scenes_drops_the_preamble_and_cleans_markup():
    markdown = (
        "# A Play\n\n## ACT I\n\nPreamble that is dropped.\n\n"
        "### SCENE I. A room.\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not\\--to be.  \nThat is it.\n\n"
        "## ACT II\n\n"
        "### SCENE II. Another room.\n\n*Exit.*\n"
    )
    scenes = corpus.play_scenes(markdown)
    assert scenes == [
        "SCENE I. A room.\n\nEnter HAMLET\n\nHAMLET\nTo be, or not--to be.\nThat is it.\n\nACT II",
        "SCENE II. Another room.\n\nExit.",
    ]


def test_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match="unknown split 'valid'"):
        corpus.embedded_documents("valid")
