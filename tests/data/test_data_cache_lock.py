"""The token cache's lock where the file system has no flock (Lustre without -o flock, some NFS and
FUSE mounts): preparation falls back to an exclusive lock file instead of failing."""

import errno
import fcntl

from rankscope.config import DataConfig
from rankscope.data import prepare_data


def _unsupported(*args):
    raise OSError(errno.ENOSYS, "Function not implemented")


def _corpus(path):
    words = ["river", "stone", "light", "moves", "under", "quiet", "the", "green", "hill", "falls", "wind", "water"]
    docs = [" ".join(words[(d * 5 + i * i) % len(words)] for i in range(40 + d % 11)) + "." for d in range(150)]
    path.write_text("\n\n\n".join(docs) + "\n")
    return path


def test_the_token_cache_is_prepared_and_reused_where_flock_is_not_supported(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _unsupported)
    cfg = DataConfig(source=str(_corpus(tmp_path / "corpus.txt")), vocab_size=300, seq_len=16, val_sequences=4,
                     probe_sequences=2, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg)  # trains the BPE and packs the shards, each under its lock
    assert (first.shard_dir / "meta.json").is_file()
    assert not list((tmp_path / "cache").rglob("*.lock"))  # each lock file was released
    again = prepare_data(cfg)
    assert again.fingerprint == first.fingerprint and again.shard_dir == first.shard_dir
