"""The data pipeline: corpus sources, tokenizer, packed token shards, and the training stream.

`prepare_data(DataConfig) -> PreparedData` is the entry point; `TrainStream` feeds the trainer.
"""

from rankscope.data.corpus import SPLITS, embedded_documents
from rankscope.data.prepare import PreparedData, check_vocab, prepare_data, resolve_cache_dir
from rankscope.data.shards import TokenShards, TrainStream

__all__ = [
    "SPLITS",
    "PreparedData",
    "TokenShards",
    "TrainStream",
    "check_vocab",
    "embedded_documents",
    "prepare_data",
    "resolve_cache_dir",
]
