"""Export a trained model as a Hugging Face `LlamaForCausalLM` folder (config.json + safetensors).

The export goes to a new (or empty) folder only, never into a run's checkpoints/: it is written
to a temporary sibling folder and renamed into place, so nothing existing is overwritten and an
interrupted export leaves nothing that looks finished.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rankscope.errors import ConfigError
from rankscope.models.dense import dense_state_dict, unwrap_model
from rankscope.models.llama import LlamaConfig
from rankscope.paths import check_output_folder


def hf_config(config: LlamaConfig, tokenizer: Any = None, dtype: torch.dtype = torch.float32) -> Any:
    """The `transformers.LlamaConfig` describing the same network as our config."""
    import transformers  # heavy import, only needed on export

    special_ids = {
        f"{which}_token_id": getattr(tokenizer, f"{which}_token_id", None) if tokenizer is not None else None
        for which in ("bos", "eos")
    }
    # No pad id: HF Llama builds its embedding with padding_idx = pad_token_id, whose row then never
    # gets a gradient. Our tokenizers pad with EOS (a real token the model was trained on), so a
    # pad id would freeze EOS if the exported model were trained further. Without one HF's
    # attention masks still handle padding, and generate() falls back to the EOS id for it.
    special_ids["pad_token_id"] = None
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

    out_path = check_export_target(out_dir)
    tmp = out_path.parent / f".{out_path.name}.export-tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    try:
        hf_config(config, tokenizer, dtype=dtypes.pop()).save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_path)  # POSIX rename also replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path


def _inside_a_checkpoint_folder(path: Path) -> Path | None:
    """The run checkpoint folder (RUN/checkpoints or one step in it) that `path` lies in, if any."""
    from rankscope.train.checkpoint import CHECKPOINT_DIR, META_FILE
    from rankscope.train.run_dir import is_run_dir

    for folder in (path, *path.parents):
        if folder.name == CHECKPOINT_DIR and (is_run_dir(folder.parent) or (folder.parent / "config.yaml").is_file()):
            return folder
        if folder.name.startswith("step_") and (folder / META_FILE).is_file():
            return folder
    return None


def check_export_target(out_dir: str | Path) -> Path:
    """ConfigError unless `out_dir` is a new or empty folder we can write, outside every run's checkpoints."""
    path = Path(out_dir).expanduser().resolve()
    inside = _inside_a_checkpoint_folder(path)
    if inside is not None:
        raise ConfigError(f"export --out {out_dir} lies inside the checkpoint folder {inside}; export to a folder outside it")
    check_output_folder(path, "export --out")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"export --out {out_dir} already holds files; export to a new or empty folder")
    return path
