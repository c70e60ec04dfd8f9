"""prepare_data on the embedded corpus: packing, caching, verification, tokenizers, errors."""

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from rankscope.config import DataConfig
from rankscope.data import corpus, prepare_data
from rankscope.data import tokenizer as tokenizer_module
from rankscope.data.prepare import check_vocab, resolve_cache_dir
from rankscope.errors import DataError


def _packed(tokenizer, docs, n_tokens):
    """The first n_tokens of docs packed by hand: each document's ids then EOS."""
    out = []
    for doc in docs:
        out += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(out) >= n_tokens:
            break
    return torch.tensor(out[:n_tokens])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("rankscope-cache")


@pytest.fixture(scope="module")
def prepared(cache):
    # Prepared once for the whole file: BPE 8192 on the embedded train split, then packed.
    return prepare_data(DataConfig(cache_dir=str(cache)))


def test_shapes_dtype_and_tokenizer(prepared):
    assert prepared.vocab_size == len(prepared.tokenizer) == 8192
    assert prepared.tokenizer.convert_ids_to_tokens(prepared.eos_id) == "</s>"
    assert prepared.tokenizer.pad_token_id == prepared.eos_id
    assert prepared.val.shape == (128, 128) and prepared.val.dtype == torch.long
    assert prepared.probe.shape == (64, 128) and prepared.probe.dtype == torch.long
    assert prepared.train.seq_len == 128 and prepared.train.array.dtype == np.uint16
    assert len(prepared.train) > 5000  # ~1.3M training tokens
    assert int(prepared.val.max()) < prepared.vocab_size
    assert len(prepared.fingerprint) == 64
    meta = json.loads((prepared.shard_dir / "meta.json").read_text())
    assert meta["files"]["train"]["n_sequences"] == len(prepared.train)


def test_val_probe_and_train_are_their_splits_packed_with_eos(prepared):
    tok = prepared.tokenizer
    n_val = prepared.val.numel()
    assert torch.equal(prepared.val.flatten(), _packed(tok, corpus.embedded_documents("val"), n_val))
    n_probe = prepared.probe.numel()
    assert torch.equal(prepared.probe.flatten(), _packed(tok, corpus.embedded_documents("probe"), n_probe))
    first_rows = prepared.train[:20].flatten()
    assert torch.equal(first_rows, _packed(tok, corpus.embedded_documents("train"), first_rows.numel()))
    # Every train document ends with EOS: the stream holds one EOS per document (minus the
    # dropped remainder, at most one partial document).
    n_train_docs = len(corpus.embedded_documents("train"))
    n_eos = int((torch.from_numpy(np.array(prepared.train.array)) == prepared.eos_id).sum())
    assert n_train_docs - 1 <= n_eos <= n_train_docs


def test_held_out_sequences_never_occur_in_train(prepared):
    def digests(rows):
        return {hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in rows}

    train = digests(torch.from_numpy(np.asarray(prepared.train.array, dtype=np.int64)))
    assert not digests(prepared.val) & train
    assert not digests(prepared.probe) & train
    assert not digests(prepared.val) & digests(prepared.probe)


def test_cache_hit_skips_training_and_tokenization(prepared, cache, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tokenizer_module, "train_bpe", forbidden)
    monkeypatch.setattr(tokenizer_module, "encode_documents", forbidden)
    again = prepare_data(DataConfig(cache_dir=str(cache)))
    assert again.fingerprint == prepared.fingerprint
    assert torch.equal(again.val, prepared.val) and torch.equal(again.probe, prepared.probe)
    assert np.array_equal(again.train.array, prepared.train.array)


def test_fresh_cache_rebuilds_identical_data(prepared, tmp_path):
    # A new cache: the BPE is retrained and the text retokenized, and every token comes out the
    # same (BPE training is deterministic). A train bound keeps the test quick.
    fresh = prepare_data(DataConfig(cache_dir=str(tmp_path), max_train_tokens=8192))
    assert fresh.tokenizer.backend_tokenizer.to_str() == prepared.tokenizer.backend_tokenizer.to_str()
    assert torch.equal(fresh.val, prepared.val) and torch.equal(fresh.probe, prepared.probe)
    assert torch.equal(fresh.train[:], prepared.train[: 8192 // 128])


def test_local_tokenizer_folder_loads_through_auto_tokenizer(prepared, cache, tmp_path):
    folder = tmp_path / "my-tokenizer"
    prepared.tokenizer.save_pretrained(folder)
    cfg = DataConfig(cache_dir=str(cache), tokenizer=str(folder), val_sequences=8, probe_sequences=4, max_train_tokens=4096)
    other = prepare_data(cfg)
    assert other.vocab_size == 8192 and other.eos_id == prepared.eos_id
    assert torch.equal(other.val, prepared.val[:8])
    assert torch.equal(other.probe, prepared.probe[:4])
    assert len(other.train) == 4096 // 128


def test_seq_len_too_large_says_how_many_sequences_exist(prepared, cache):
    with pytest.raises(DataError, match=r"the val text gives only \d+ sequences at seq_len 4096.*lower data.seq_len or data.val_sequences"):
        prepare_data(DataConfig(cache_dir=str(cache), seq_len=4096))


def test_embedded_val_split_holds_a_few_hundred_sequences_at_128(prepared, cache):
    with pytest.raises(DataError, match=r"only (\d+) sequences") as info:
        prepare_data(DataConfig(cache_dir=str(cache), val_sequences=5000))
    available = int(info.value.args[0].split("only ")[1].split(" ")[0])
    assert 200 <= available <= 1000


def test_check_vocab(prepared):
    check_vocab(prepared, 8192)
    check_vocab(prepared, 8256)
    with pytest.raises(DataError, match=r"8192 token ids but the model's vocab_size is 4096.*model.overrides.vocab_size"):
        check_vocab(prepared, 4096)


def test_interrupted_preparation_is_redone(prepared, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(prepared.shard_dir.parent.parent / "tokenizers", cache / "tokenizers")
    cfg = DataConfig(cache_dir=str(cache), val_sequences=4, probe_sequences=4, max_train_tokens=2048)
    first = prepare_data(cfg)
    first_train = np.array(first.train.array)  # a copy: the file below is overwritten in place
    (first.shard_dir / "meta.json").unlink()  # as if the process died before finishing
    (first.shard_dir / "train.bin").write_bytes(b"partial")
    calls = []
    real = tokenizer_module.encode_documents

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    tokenizer_module.encode_documents, saved = spy, tokenizer_module.encode_documents
    try:
        again = prepare_data(cfg)
    finally:
        tokenizer_module.encode_documents = saved
    assert calls and again.fingerprint == first.fingerprint
    assert np.array_equal(again.train.array, first_train)


def test_corrupt_or_truncated_shards_are_refused_until_deleted(prepared, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(prepared.shard_dir.parent.parent / "tokenizers", cache / "tokenizers")
    cfg = DataConfig(cache_dir=str(cache), max_train_tokens=64 * 128)
    first = prepare_data(cfg)
    folder = first.shard_dir
    train_bin = folder / "train.bin"
    good = train_bin.read_bytes()

    train_bin.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=rf"token shard .*train.bin is corrupt/truncated .*delete {folder} to rebuild"):
        prepare_data(cfg)

    damaged = bytearray(good)
    damaged[1000] ^= 0x01
    train_bin.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="checksum differs"):
        prepare_data(cfg)

    train_bin.write_bytes(good)
    (folder / "val.bin").unlink()
    with pytest.raises(DataError, match="val.bin is corrupt/truncated"):
        prepare_data(cfg)

    shutil.rmtree(folder)  # what the message says to do
    rebuilt = prepare_data(cfg)
    assert rebuilt.fingerprint == first.fingerprint
    assert torch.equal(rebuilt.train[:], prepared.train[:64])


def test_tokenizer_errors(tmp_path, cache):
    with pytest.raises(DataError, match=r"tokenizer '/no/such/tokenizer' cannot be loaded.*data.tokenizer=bpe"):
        prepare_data(DataConfig(cache_dir=str(cache), tokenizer="/no/such/tokenizer"))

    from transformers import PreTrainedTokenizerFast

    no_eos = tokenizer_module.train_bpe(["a small text without much in it"] * 4, 300)
    bare = PreTrainedTokenizerFast(tokenizer_object=no_eos.backend_tokenizer)
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(DataError, match="has no EOS token"):
        prepare_data(DataConfig(cache_dir=str(cache), tokenizer=str(tmp_path / "bare")))


def test_missing_source_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "c4-train.00000-of-01024.json.gz"
    with pytest.raises(DataError, match=f"data source '{missing}' does not exist"):
        prepare_data(DataConfig(cache_dir=str(tmp_path), source=str(missing)))


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(DataConfig()) == tmp_path / "env"
    assert resolve_cache_dir(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("RANKSCOPE_CACHE")
    assert str(resolve_cache_dir(DataConfig())).endswith(".cache/rankscope")


def test_config_fields_change_the_fingerprint(prepared, cache):
    smaller = prepare_data(dataclasses.replace(DataConfig(cache_dir=str(cache)), val_sequences=64, max_train_tokens=4096))
    assert smaller.fingerprint != prepared.fingerprint
    assert torch.equal(smaller.val, prepared.val[:64])
