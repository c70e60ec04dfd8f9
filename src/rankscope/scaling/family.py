"""The size family of scaling studies: presets scaled together in width and depth, from models a
CPU trains in minutes up to the literature's presets.

The shapes live with every other preset in `rankscope.models.presets` (so `rankscope train
--preset w64l2` works too); the small members follow the literature presets' rules (ffn = 8/3 of
the width rounded up to a multiple of 16, head dimension 32 below width 256 and 64 above, depth
growing with width). This module only orders them and counts their parameters.
"""

from __future__ import annotations

import dataclasses

from rankscope.models import LlamaConfig, get_preset

FAMILY: tuple[str, ...] = (
    "w32l2", "w48l2", "w64l2", "w96l3", "tiny", "w192l4", "20m", "w384l6", "60m", "130m", "350m", "1b",
)


def non_embedding_params(config: LlamaConfig) -> int:
    """Parameters of the plain model outside the token embedding and the output head (Kaplan et
    al. 2020's N: at small sizes the vocabulary would otherwise dominate the count)."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    return config.num_layers * (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) + hidden


def family_table(vocab_size: int | None = None) -> list[dict]:
    """Shape and dense parameter counts of every member, smallest first."""
    rows = []
    for name in FAMILY:
        config = get_preset(name)
        if vocab_size:
            config = dataclasses.replace(config, vocab_size=vocab_size)
        rows.append({"preset": name, "hidden": config.hidden_size, "ffn": config.intermediate_size,
                     "heads": config.num_heads, "layers": config.num_layers,
                     "non_embedding_params": non_embedding_params(config),
                     "total_params": non_embedding_params(config) + 2 * config.vocab_size * config.hidden_size})
    return rows
