"""`RankscopeLM`: any rankscope model (factorized layers included, no dense export) behind
lm-eval's `LM` interface."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankscope.errors import DownstreamError, did_you_mean  # noqa: F401 - DownstreamError re-exported

try:  # lm-eval is a declared dependency; keep the import error readable if it is missing
    from lm_eval.api.model import LM as _LMBase
except ImportError:  # pragma: no cover - exercised only in broken installs
    _LMBase = object  # type: ignore[assignment,misc]


log = logging.getLogger("rankscope.analysis.downstream")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the caller's training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


class RankscopeLM(_LMBase):
    """lm-eval `LM` around an in-memory rankscope model and its tokenizer.

    Scoring follows lm-eval's conventions for causal models (as its HF wrapper does):
    a context's trailing whitespace moves to the continuation, context+continuation is encoded
    as one string and split at the context's token count (so merges across the boundary are
    respected), an empty context becomes the EOS token, and inputs longer than `max_length`
    are truncated on the left. The model is moved to `device`; it is put in eval mode only
    while scoring and its training flag is restored afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DownstreamError(f"batch_size must be at least 1 (got {batch_size})")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise DownstreamError("the tokenizer has no eos_token_id; lm-eval needs one as the prefix of empty contexts")
        self._device = torch.device(device)
        self.model = model.to(self._device)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        if max_length is None:
            # Callers that know the training seq_len should pass it: RoPE models score worse
            # beyond the length they were trained on, and max_seq_len may be much larger.
            config = getattr(model, "config", None)
            max_length = getattr(config, "max_seq_len", None) or 2048
        if max_length < 2:
            raise DownstreamError(f"max_length must be at least 2 tokens (got {max_length})")
        self.max_length = int(max_length)
        # Right padding only fills positions after a sequence's last real token; with causal
        # attention they cannot influence the positions we read, so any id works.
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else tokenizer.eos_token_id)

    # lm-eval reads these ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"model_class": type(self.model).__name__, "model_num_parameters": n_params,
                "max_length": self.max_length}

    # tokenization --------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        # rankscope's tokenizers add no BOS/EOS on their own; training data has none inside text
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as lm-eval scores them."""
        if context == "":
            continuation_tokens = self.tok_encode(continuation)
            # An empty context conditions on EOS, the same separator the model saw between documents.
            return [self.eot_token_id], continuation_tokens
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        context_tokens = self.tok_encode(context)
        return context_tokens, whole[len(context_tokens):]

    # scoring -------------------------------------------------------------------------------
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """fp32 log-softmax of the model's logits for right-padded rows, shape (B, T, V)."""
        width = max(len(r) for r in rows)
        batch = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        logits = self.model(batch.to(self._device))
        if isinstance(logits, tuple):  # tolerate models that return (logits, extras)
            logits = logits[0]
        if logits.dim() != 3 or logits.shape[:2] != batch.shape:
            raise DownstreamError(
                f"the model returned logits of shape {tuple(logits.shape)} for input {tuple(batch.shape)}; "
                "rankscope models must return (B, T, V)"
            )
        return F.log_softmax(logits.float(), dim=-1)

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding reproduces it) per pair.

        Each pair is (context tokens, continuation tokens) with a non-empty context. The input is
        `(context + continuation)[-(max_length + 1):][:-1]`; the last `len(continuation)` output
        positions predict the continuation. Requests are batched longest first.
        """
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for context, continuation in pairs:
            if not context:
                raise DownstreamError("score_tokens needs a non-empty context (use the EOS token for an empty one)")
            if len(continuation) > self.max_length:
                raise DownstreamError(
                    f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}; "
                    "raise max_length or shorten the task's answers"
                )
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        with _eval_mode(self.model):
            for start in range(0, len(order), self.batch_size):
                indices = order[start : start + self.batch_size]
                rows = []
                for i in indices:
                    context, continuation = pairs[i]
                    rows.append((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
                log_probs = self._log_probs(rows)
                for row_index, i in enumerate(indices):
                    continuation = pairs[i][1]
                    n_input, n_cont = len(rows[row_index]), len(continuation)
                    if n_cont == 0:
                        results[i] = (0.0, True)
                        continue
                    window = log_probs[row_index, n_input - n_cont : n_input]  # (n_cont, V)
                    target = torch.tensor(continuation, dtype=torch.long, device=window.device)
                    total = window.gather(-1, target[:, None]).sum().item()
                    greedy = bool((window.argmax(dim=-1) == target).all().item())
                    results[i] = (float(total), greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(context, continuation) for context, continuation in (r.args for r in requests)]
        results = self.score_tokens(pairs)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings: disjoint windows of up to `max_length` predictions,
        each token predicted exactly once with as much preceding context as fits."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            (text,) = request.args
            windows = [
                make_disjoint_window(pair)
                for pair in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(score for score, _ in self.score_tokens(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(float(total))
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (no KV cache: small models) until a stop string, EOS or `max_gen_toks`."""
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            max_gen_toks = int(gen_kwargs.get("max_gen_toks", 256))
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0.0:
                log.warning("generate_until decodes greedily; ignoring sampling settings %s", gen_kwargs)
            text = self._greedy_generate(context, list(until), max_gen_toks)
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs

    def _greedy_generate(self, context: str, until: list[str], max_gen_toks: int) -> str:
        tokens = self.tok_encode(context) or [self.eot_token_id]
        generated: list[int] = []
        text = ""
        with _eval_mode(self.model):
            for _ in range(max_gen_toks):
                window = (tokens + generated)[-self.max_length:]
                next_token = int(self._log_probs([window])[0, -1].argmax().item())
                if next_token == self.eot_token_id:
                    break
                generated.append(next_token)
                text = self.tok_decode(generated)
                if any(stop and stop in text for stop in until):
                    break
        cut = min((text.index(stop) for stop in until if stop and stop in text), default=len(text))
        return text[:cut]


