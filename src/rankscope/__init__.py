"""rankscope: low-rank pre-training of language models, analysed beyond perplexity."""

__version__ = "0.1.0"
