"""Dense state dicts and Hugging Face export: logits of the reloaded LlamaForCausalLM match ours."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from rankscope.errors import RankscopeError
from rankscope.export import save_hf
from rankscope.models import LlamaConfig, NotDenseError, build_model, dense_state_dict

LINES = [
    "Now is the winter of our discontent",
    "Made glorious summer by this sun of York;",
    "And all the clouds that lour'd upon our house",
    "In the deep bosom of the ocean buried.",
]


def small_tokenizer():
    """A byte-level BPE trained on a few lines, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(LINES, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


def export_config(vocab_size: int) -> LlamaConfig:
    # Tiny-preset widths, two layers, and non-default theta/eps so a mis-mapped field shows;
    # a large init makes attention peaked so a RoPE or mask mismatch would move the logits.
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_heads=4, num_layers=2,
        max_seq_len=256, rms_norm_eps=1e-5, rope_theta=500.0, init_std=0.1,
    )


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / ours.norm()).item()


def hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        return hf_model(ids).logits


def test_hf_export_gives_the_same_logits_and_tokenizer(tmp_path):
    tokenizer = small_tokenizer()
    torch.manual_seed(0)
    model = build_model(export_config(vocab_size=len(tokenizer))).eval()
    ids = torch.tensor([tokenizer("Now is the winter of our discontent, made glorious summer")["input_ids"]])
    assert ids.shape[1] > 8

    save_hf(model, tokenizer, tmp_path / "hf")

    with torch.no_grad():
        ours = model(ids)
    theirs = hf_logits(tmp_path / "hf", ids)
    assert ours.shape == theirs.shape
    assert relative_error(ours, theirs) < 1e-4

    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert hf_config.eos_token_id == tokenizer.eos_token_id
    assert hf_config.rms_norm_eps == 1e-5 and hf_config.tie_word_embeddings is False
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert reloaded("summer of York")["input_ids"] == tokenizer("summer of York")["input_ids"]


class FactorizedLinear(nn.Module):
    """W = B A (+ a frozen base, as LoRA): a stand-in for the parameterized layers of rankscope.nn."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base  # nested module: its weight must not leak into the dense state dict
        self.B = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)
        self.A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T) @ self.B.T

    def effective_weight(self) -> torch.Tensor:
        return self.base.weight + self.B @ self.A


class NoDenseLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.inner = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.inner(x))

    def effective_weight(self) -> None:
        return None


def test_dense_state_dict_merges_factorized_layers_and_exports_them(tmp_path):
    torch.manual_seed(1)
    cfg = export_config(vocab_size=300)
    model = build_model(cfg).eval()
    attn = model.layers[1].self_attn
    attn.q_proj = FactorizedLinear(attn.q_proj, rank=8)
    ids = torch.randint(0, 300, (2, 24))

    state = dense_state_dict(model)
    assert list(state) == list(build_model(cfg).state_dict())
    torch.testing.assert_close(state["layers.1.self_attn.q_proj.weight"], attn.q_proj.effective_weight())
    assert not any(t.requires_grad for t in state.values())

    plain = build_model(cfg).eval()
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(plain(ids), ours, rtol=1e-5, atol=1e-5)

    save_hf(model, None, tmp_path / "hf")
    assert relative_error(ours, hf_logits(tmp_path / "hf", ids)) < 1e-4


def test_layer_without_dense_form_raises_not_dense_error(tmp_path):
    model = build_model(export_config(vocab_size=300))
    model.layers[0].mlp.up_proj = NoDenseLinear(128, 352)
    with pytest.raises(NotDenseError, match=r"layers\.0\.mlp\.up_proj.*no dense equivalent"):
        dense_state_dict(model)
    with pytest.raises(RankscopeError):
        save_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path):
    tokenizer = small_tokenizer()
    model = build_model(export_config(vocab_size=len(tokenizer) - 1))
    with pytest.raises(RankscopeError, match="vocab_size"):
        save_hf(model, tokenizer, tmp_path / "hf")


def test_the_exported_model_keeps_training_its_eos_embedding(tmp_path):
    """Our tokenizers pad with EOS; a pad_token_id would become HF's padding_idx and freeze that row."""
    tokenizer = small_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as rankscope's BPE tokenizers are built
    torch.manual_seed(0)
    save_hf(build_model(export_config(vocab_size=len(tokenizer))), tokenizer, tmp_path / "hf")

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert hf_model.config.pad_token_id is None and hf_model.model.embed_tokens.padding_idx is None
    eos = tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("Made glorious summer")["input_ids"] + [eos] + tokenizer("by this sun")["input_ids"]])
    hf_model(ids, labels=ids).loss.backward()
    grad = hf_model.model.embed_tokens.weight.grad
    assert grad[eos].abs().sum() > 0
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert reloaded.pad_token == tokenizer.eos_token  # batching still pads (attention masks it)


def test_export_never_writes_over_existing_files(tmp_path):
    model = build_model(export_config(vocab_size=300))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "model.safetensors").write_bytes(b"an earlier export")
    with pytest.raises(RankscopeError, match="already holds files"):
        save_hf(model, None, earlier)
    assert (earlier / "model.safetensors").read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]  # no temporary folder left

    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf(model, None, empty)  # an empty folder is fine
    assert (empty / "model.safetensors").is_file() and (empty / "config.json").is_file()
