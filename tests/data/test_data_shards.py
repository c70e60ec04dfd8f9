"""Packing, shard verification and the training stream, on small arrays with known answers."""

import numpy as np
import pytest
import torch

from rankscope.data import shards
from rankscope.data.shards import TokenShards, TrainStream, pack_to_file, token_dtype
from rankscope.data.tokenizer import train_bpe
from rankscope.errors import ConfigError, DataError


def test_pack_concatenates_cuts_rows_and_drops_the_remainder(tmp_path):
    chunks = [np.arange(0, 7), np.arange(7, 12), np.arange(12, 23)]  # 23 tokens
    result = pack_to_file(iter(chunks), tmp_path / "t.bin", seq_len=5, dtype=np.dtype(np.uint16))
    assert result.n_sequences == 4 and result.n_tokens_read == 23
    rows = np.fromfile(tmp_path / "t.bin", dtype=np.uint16).reshape(-1, 5)
    np.testing.assert_array_equal(rows, np.arange(20).reshape(4, 5))
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary file was renamed into place


def test_pack_limits_by_sequences_and_by_tokens(tmp_path):
    chunks = [np.arange(0, 10), np.arange(10, 40)]
    by_rows = pack_to_file(iter(chunks), tmp_path / "a.bin", 4, np.dtype(np.uint32), max_sequences=3)
    assert by_rows.n_sequences == 3
    np.testing.assert_array_equal(np.fromfile(tmp_path / "a.bin", dtype=np.uint32), np.arange(12))
    by_tokens = pack_to_file(iter(chunks), tmp_path / "b.bin", 4, np.dtype(np.uint32), max_tokens=14)
    assert by_tokens.n_sequences == 3 and by_tokens.n_tokens_read == 14
    np.testing.assert_array_equal(np.fromfile(tmp_path / "b.bin", dtype=np.uint32), np.arange(12))


def test_a_failed_pack_leaves_no_file_behind(tmp_path):
    def chunks():
        yield np.arange(10)
        raise DataError("the source broke mid-way")

    with pytest.raises(DataError, match="mid-way"):
        pack_to_file(chunks(), tmp_path / "t.bin", 4, np.dtype(np.uint16))
    with pytest.raises(DataError, match="id 70000, which does not fit uint16"):
        pack_to_file(iter([np.array([1, 70000])]), tmp_path / "t.bin", 1, np.dtype(np.uint16))
    assert list(tmp_path.iterdir()) == []


def test_token_dtype_switches_at_16_bits():
    assert token_dtype(8192) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_token_stream_puts_eos_after_every_document():
    docs = ["To be, or not to be: that is the question.", "Whether 'tis nobler in the mind", "to suffer."]
    tokenizer = train_bpe(docs * 20, vocab_size=300)
    eos = tokenizer.eos_token_id
    stream = np.concatenate(list(shards.token_stream(docs, tokenizer, eos)))
    assert stream[-1] == eos and (stream == eos).sum() == len(docs)
    pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]
    assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == docs


def _write_shard(tmp_path, n, seq_len, name="train.bin"):
    rows = np.arange(n * seq_len, dtype=np.uint16).reshape(n, seq_len)
    path = tmp_path / name
    path.write_bytes(rows.tobytes())
    return TokenShards(path, n, seq_len, np.uint16), rows


def test_token_shards_index_to_long_tensors(tmp_path):
    data, rows = _write_shard(tmp_path, 6, 3)
    assert len(data) == 6 and data.shape == (6, 3)
    batch = data[np.array([4, 1])]
    assert batch.dtype == torch.long
    assert torch.equal(batch, torch.from_numpy(rows[[4, 1]].astype(np.int64)))


def test_verified_open_rejects_truncated_and_altered_files(tmp_path):
    data, _ = _write_shard(tmp_path, 6, 3)
    entry = shards.describe_file(data.path, 6, 3, np.dtype(np.uint16))
    assert len(TokenShards.open_verified(tmp_path, entry)) == 6

    raw = bytearray(data.path.read_bytes())
    raw[5] ^= 0xFF
    data.path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"corrupt/truncated \(checksum.*delete .* to rebuild"):
        TokenShards.open_verified(tmp_path, entry)

    data.path.write_bytes(bytes(raw[:-2]))
    with pytest.raises(DataError, match=r"corrupt/truncated \(34 bytes on disk, meta.json says 36\)"):
        TokenShards.open_verified(tmp_path, entry)

    data.path.unlink()
    with pytest.raises(DataError, match="file missing"):
        TokenShards.open_verified(tmp_path, entry)


def test_meta_is_written_atomically_and_read_back(tmp_path):
    assert shards.read_meta(tmp_path) is None
    shards.write_meta(tmp_path, {"version": shards.META_VERSION, "files": {}})
    assert shards.read_meta(tmp_path)["files"] == {}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="delete"):
        shards.read_meta(tmp_path)


# ---------------------------------------------------------------------------------------------
# TrainStream


def _row_ids(batch, seq_len):
    return (batch[:, 0] // seq_len).tolist()


def test_stream_follows_the_seeded_permutation_and_wraps_epochs(tmp_path):
    data, _ = _write_shard(tmp_path, 10, 3)
    stream = TrainStream(data, seed=7, batch_size=4)
    got = [_row_ids(stream.next_batch(), 3) for _ in range(5)]
    perm0 = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    perm1 = torch.randperm(10, generator=torch.Generator().manual_seed(8)).tolist()
    perm2 = torch.randperm(10, generator=torch.Generator().manual_seed(9)).tolist()
    # Two full batches per epoch; the 2 left-over rows of each epoch are skipped.
    assert got == [perm0[0:4], perm0[4:8], perm1[0:4], perm1[4:8], perm2[0:4]]
    assert stream.state_dict()["epoch"] == 2
    assert all(b.shape == (4, 3) for b in [stream.next_batch()])


def test_stream_is_deterministic_and_depends_on_the_seed(tmp_path):
    data, _ = _write_shard(tmp_path, 32, 2)
    a, b, c = (TrainStream(data, seed=s, batch_size=4) for s in (1, 1, 2))
    batches_a = [a.next_batch() for _ in range(12)]
    assert all(torch.equal(x, b.next_batch()) for x in batches_a)
    assert not all(torch.equal(x, c.next_batch()) for x in batches_a)


def test_state_round_trip_resumes_with_identical_batches(tmp_path):
    data, _ = _write_shard(tmp_path, 11, 2)
    stream = TrainStream(data, seed=3, batch_size=4)
    for _ in range(3):
        stream.next_batch()
    state = stream.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = [stream.next_batch() for _ in range(6)]
    resumed = TrainStream(data, seed=3, batch_size=4)
    resumed.load_state_dict(dict(state))
    assert all(torch.equal(x, resumed.next_batch()) for x in expected)


def test_ranks_concatenate_to_the_single_process_batch(tmp_path):
    data, _ = _write_shard(tmp_path, 20, 3)
    single = TrainStream(data, seed=0, batch_size=6)
    ranks = [TrainStream(data, seed=0, batch_size=6, rank=r, world_size=2) for r in range(2)]
    for _ in range(8):  # crosses two epoch boundaries
        parts = [r.next_batch() for r in ranks]
        assert parts[0].shape == (3, 3)
        assert torch.equal(torch.cat(parts), single.next_batch())


def test_stream_errors(tmp_path):
    data, _ = _write_shard(tmp_path, 5, 3)
    with pytest.raises(DataError, match="only 5 sequences at seq_len 3, fewer than one batch of 8"):
        TrainStream(data, seed=0, batch_size=8)
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        TrainStream(data, seed=0, batch_size=3, rank=0, world_size=2)
    stream = TrainStream(data, seed=0, batch_size=2)
    with pytest.raises(DataError, match="saved data stream covered 9"):
        stream.load_state_dict({"epoch": 0, "position": 2, "n_sequences": 9})
