"""Local files, folders and saved Hugging Face data sets as sources, end to end through prepare_data."""

import gzip
import json

import pytest
import torch

from rankscope.config import DataConfig
from rankscope.data import corpus, prepare_data
from rankscope.data.sources import file_documents, open_source, parse_hf_spec
from rankscope.errors import DataError

SEQ_LEN = 32


@pytest.fixture(scope="module")
def docs():
    # Real text: 200 scenes (enough for every hash bucket), cut short to keep the test quick.
    return [d[:600].strip() for d in corpus.embedded_documents("train")[:200]]


@pytest.fixture(scope="module")
def valid_docs():
    return [d[:1500].strip() for d in corpus.embedded_documents("val")[:8]]


def _cfg(tmp_path, source, **fields):
    base = dict(source=str(source), cache_dir=str(tmp_path / "cache"), vocab_size=400, seq_len=SEQ_LEN,
                val_sequences=4, probe_sequences=3)
    base.update(fields)
    return DataConfig(**base)


def _packed_rows(tokenizer, documents, n_rows):
    out = []
    for doc in documents:
        out += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_rows = min(n_rows, len(out) // SEQ_LEN) if n_rows else len(out) // SEQ_LEN
    return torch.tensor(out[: n_rows * SEQ_LEN]).view(n_rows, SEQ_LEN)


def _hash_roles(keys_and_docs):
    roles = {"train": [], "val": [], "probe": []}
    for key, doc in keys_and_docs:
        split = corpus.split_of(key)
        roles[split if split in ("val", "probe") else "train"].append(doc)
    return roles


def _check_hash_holdout(prepared, roles):
    tok = prepared.tokenizer
    assert torch.equal(prepared.val, _packed_rows(tok, roles["val"], 4))
    assert torch.equal(prepared.probe, _packed_rows(tok, roles["probe"], 3))
    assert torch.equal(prepared.train[:], _packed_rows(tok, roles["train"], 0))


def _write_jsonl(path, documents, field="text", gz=False):
    lines = "".join(json.dumps({field: d, "url": f"doc{i}"}) + "\n" for i, d in enumerate(documents))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(lines)
    else:
        path.write_text(lines)


def test_txt_documents_are_separated_by_two_or_more_empty_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n\nsame document\n\n\nsecond doc\n \n\t\n\n\nthird doc\n")
    assert list(file_documents(path, "text")) == ["first line\nsecond line\n\nsame document", "second doc", "third doc"]


def test_txt_file_with_hash_holdout(tmp_path, docs):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n\n".join(docs))
    prepared = prepare_data(_cfg(tmp_path, path))
    _check_hash_holdout(prepared, _hash_roles((f"corpus.txt#{i}", d) for i, d in enumerate(docs)))


def test_jsonl_with_custom_text_field(tmp_path, docs):
    path = tmp_path / "corpus.jsonl"
    _write_jsonl(path, docs, field="content")
    prepared = prepare_data(_cfg(tmp_path, path, text_field="content"))
    _check_hash_holdout(prepared, _hash_roles((f"corpus.jsonl#{i}", d) for i, d in enumerate(docs)))
    with pytest.raises(DataError, match=r"line 1 has no 'text' field \(it has: content, url\); set data.text_field"):
        prepare_data(_cfg(tmp_path, path))


def test_c4_style_json_gz_uses_the_validation_file_beside_it(tmp_path, docs, valid_docs):
    train = tmp_path / "c4-train.00000-of-01024.json.gz"
    _write_jsonl(train, docs, gz=True)
    _write_jsonl(tmp_path / "c4-validation.00000-of-00008.json.gz", valid_docs, gz=True)
    prepared = prepare_data(_cfg(tmp_path, train))
    tok = prepared.tokenizer
    held_out = _packed_rows(tok, valid_docs, 7)
    assert torch.equal(prepared.val, held_out[:4])  # val first, then probe, from the validation file
    assert torch.equal(prepared.probe, held_out[4:7])
    assert torch.equal(prepared.train[:], _packed_rows(tok, docs, 0))  # every train document is used


def test_folder_of_mixed_files_with_a_validation_file_inside(tmp_path, docs, valid_docs):
    folder = tmp_path / "data"
    (folder / "part").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n\n".join(docs[:60]))
    _write_jsonl(folder / "b.jsonl", docs[60:130])
    _write_jsonl(folder / "part" / "c.json.gz", docs[130:], gz=True)
    (folder / "notes.md").write_text("ignored: not a supported file type")
    _write_jsonl(folder / "validation.jsonl", valid_docs)
    prepared = prepare_data(_cfg(tmp_path, folder))
    tok = prepared.tokenizer
    assert torch.equal(prepared.train[:], _packed_rows(tok, docs, 0))  # sorted order: a, b, part/c
    held_out = _packed_rows(tok, valid_docs, 7)
    assert torch.equal(prepared.val, held_out[:4]) and torch.equal(prepared.probe, held_out[4:])


def test_folder_without_validation_holds_out_by_hash(tmp_path, docs):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n\n".join(docs[:100]))
    _write_jsonl(folder / "b.jsonl", docs[100:])
    prepared = prepare_data(_cfg(tmp_path, folder))
    keyed = [(f"a.txt#{i}", d) for i, d in enumerate(docs[:100])] + [(f"b.jsonl#{i}", d) for i, d in enumerate(docs[100:])]
    _check_hash_holdout(prepared, _hash_roles(keyed))


def test_max_train_tokens_bounds_the_training_shard(tmp_path, docs):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n\n".join(docs))
    prepared = prepare_data(_cfg(tmp_path, path, max_train_tokens=10 * SEQ_LEN + 5))
    assert len(prepared.train) == 10


def test_editing_a_source_file_invalidates_the_cache(tmp_path, docs):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n\n".join(docs))
    before = prepare_data(_cfg(tmp_path, path))
    path.write_text("\n\n\n".join(docs[:-5]))
    after = prepare_data(_cfg(tmp_path, path))
    assert after.fingerprint != before.fingerprint and len(after.train) < len(before.train)


def test_saved_hf_dataset_without_validation_split(tmp_path, docs):
    import datasets

    datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}).save_to_disk(tmp_path / "ds")
    prepared = prepare_data(_cfg(tmp_path, tmp_path / "ds"))
    _check_hash_holdout(prepared, _hash_roles((f"row#{i}", d) for i, d in enumerate(docs)))


def test_saved_hf_dataset_dict_with_validation_split_and_streaming(tmp_path, docs, valid_docs):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": docs}),
        "validation": datasets.Dataset.from_dict({"body": valid_docs}),
    })
    dd.save_to_disk(tmp_path / "dd")
    prepared = prepare_data(_cfg(tmp_path, tmp_path / "dd", text_field="body"))
    tok = prepared.tokenizer
    held_out = _packed_rows(tok, valid_docs, 7)
    assert torch.equal(prepared.val, held_out[:4]) and torch.equal(prepared.probe, held_out[4:])
    assert torch.equal(prepared.train[:], _packed_rows(tok, docs, 0))

    streamed = prepare_data(_cfg(tmp_path, tmp_path / "dd", text_field="body", streaming=True, max_train_tokens=5 * SEQ_LEN))
    assert torch.equal(streamed.val, prepared.val)
    assert torch.equal(streamed.train[:], prepared.train[:5])

    with pytest.raises(DataError, match=r"no split 'training' \(it has: train, validation\)"):
        prepare_data(_cfg(tmp_path, tmp_path / "dd", text_field="body", hf_split="training"))
    with pytest.raises(DataError, match=r"has no 'text' column \(it has: body\)"):
        prepare_data(_cfg(tmp_path, tmp_path / "dd"))


def test_too_little_held_out_text_is_reported(tmp_path, docs, valid_docs):
    train = tmp_path / "train.jsonl"
    _write_jsonl(train, docs)
    _write_jsonl(tmp_path / "valid.jsonl", valid_docs[:1])
    with pytest.raises(DataError, match=r"validation text gives only \d+ sequences at seq_len 32.*asks? for 400 \+ 3"):
        prepare_data(_cfg(tmp_path, train, val_sequences=400))


def test_source_spec_errors(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported type"):
        open_source(_cfg(tmp_path, tmp_path / "table.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        open_source(_cfg(tmp_path, tmp_path / "empty"))
    assert parse_hf_spec("allenai/c4:en") == ("allenai/c4", "en")
    assert parse_hf_spec("wikitext") == ("wikitext", None)
    with pytest.raises(DataError, match="needs a data set name"):
        parse_hf_spec(":en")


def test_hf_load_dataset_path_with_and_without_validation_split(tmp_path, docs, valid_docs):
    # `hf:` goes through datasets.load_dataset; a local folder of split-named files exercises it
    # offline. Streaming keeps the test from writing Arrow files to the HF cache.
    with_valid = tmp_path / "with_valid"
    with_valid.mkdir()
    _write_jsonl(with_valid / "train.jsonl", docs)
    _write_jsonl(with_valid / "validation.jsonl", valid_docs)
    prepared = prepare_data(_cfg(tmp_path, f"hf:{with_valid}", streaming=True))
    tok = prepared.tokenizer
    held_out = _packed_rows(tok, valid_docs, 7)
    assert torch.equal(prepared.val, held_out[:4]) and torch.equal(prepared.probe, held_out[4:])
    assert torch.equal(prepared.train[:], _packed_rows(tok, docs, 0))

    train_only = tmp_path / "train_only"
    train_only.mkdir()
    _write_jsonl(train_only / "train.jsonl", docs)
    prepared = prepare_data(_cfg(tmp_path, f"hf:{train_only}", streaming=True))
    _check_hash_holdout(prepared, _hash_roles((f"row#{i}", d) for i, d in enumerate(docs)))
