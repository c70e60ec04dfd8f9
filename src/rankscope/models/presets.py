"""Named model sizes. The 20m .. 7b shapes follow the LLaMA family used in low-rank
pre-training papers (GaLore, ReLoRA, SLTrain, CoLA); `tiny` is for tests and CPU demos."""

from __future__ import annotations

import dataclasses

from rankscope.errors import ConfigError, did_you_mean
from rankscope.models.llama import LlamaConfig


def _preset(hidden: int, ffn: int, heads: int, layers: int, vocab: int = 32000, seq: int = 1024) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_heads=heads,
        num_layers=layers,
        max_seq_len=seq,
    )


PRESETS: dict[str, LlamaConfig] = {
    # The small end of the scaling family (rankscope.scaling.family): width and depth grow
    # together, ffn = 8/3·width rounded up to a multiple of 16 as in the presets above; sizes a
    # CPU trains in minutes.
    "w32l2": _preset(32, 96, 1, 2, vocab=8192),
    "w48l2": _preset(48, 128, 2, 2, vocab=8192),
    "w64l2": _preset(64, 176, 2, 2, vocab=8192),
    "w96l3": _preset(96, 256, 3, 3, vocab=8192),
    "tiny": _preset(128, 352, 4, 4, vocab=8192),
    "w192l4": _preset(192, 512, 6, 4, vocab=8192),
    "20m": _preset(256, 688, 4, 4),
    "w384l6": _preset(384, 1024, 6, 6),
    "60m": _preset(512, 1376, 8, 8),
    "130m": _preset(768, 2048, 12, 12),
    "350m": _preset(1024, 2736, 16, 24),
    "1b": _preset(2048, 5461, 32, 24, seq=2048),
    "7b": _preset(4096, 11008, 32, 32, seq=2048),
}


def get_preset(name: str) -> LlamaConfig:
    """A fresh copy of the named preset (callers may edit it freely)."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}" + did_you_mean(key, PRESETS))
    return dataclasses.replace(PRESETS[key])
