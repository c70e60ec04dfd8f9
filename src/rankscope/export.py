"""Export a trained model as a Hugging Face `LlamaForCausalLM` folder (config.json + safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rankscope.errors import ConfigError
from rankscope.models.dense import dense_state_dict, unwrap_model
from rankscope.models.llama import LlamaConfig


def hf_config(config: LlamaConfig, tokenizer: Any = None, dtype: torch.dtype = torch.float32) -> Any:
    """The `transformers.LlamaConfig` describing the same network as our config."""
    import transformers  # heavy import, only needed on export

    special_ids = {
        f"{which}_token_id": getattr(tokenizer, f"{which}_token_id", None) if tokenizer is not None else None
        for which in ("bos", "eos", "pad")
    }
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,  # plain multi-head attention, no GQA
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
        **special_ids,
    )


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our dense state dict under HF's names: everything but lm_head lives under `model.`."""
    tensors = {}
    for key, tensor in dense_state_dict(model).items():
        hf_key = key if key.startswith("lm_head.") else f"model.{key}"
        # safetensors needs contiguous, unshared CPU tensors.
        tensors[hf_key] = tensor.detach().to("cpu").contiguous()
    return tensors


def save_hf(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write `out_dir` so `AutoModelForCausalLM.from_pretrained(out_dir)` gives a
    `LlamaForCausalLM` with the same logits; the tokenizer is saved beside it when given.

    Raises NotDenseError when a parameterized layer has no dense form (e.g. CoLA).
    """
    config = getattr(unwrap_model(model), "config", None)
    if not isinstance(config, LlamaConfig):
        raise ConfigError("save_hf needs a rankscope LlamaModel (with .config); load it with load_run_model first")
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
            "export with the tokenizer the model was trained with"
        )
    tensors = hf_state_dict(model)
    dtypes = {tensor.dtype for tensor in tensors.values()}
    if len(dtypes) != 1:
        raise ConfigError(f"model mixes parameter dtypes {sorted(map(str, dtypes))}; cast it to one dtype before export")

    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    hf_config(config, tokenizer, dtype=dtypes.pop()).save_pretrained(out_path)
    save_file(tensors, str(out_path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_path)
    return out_path
