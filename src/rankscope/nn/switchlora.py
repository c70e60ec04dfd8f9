"""SwitchLoRA's layer: LoRA whose vectors are switched, a few at a time, with candidate vectors.

asfsdsf/SwitchLoRA @f9a174e, switchlora/switch_lora.py (`SwitchLoraLayer`, `_init_candidates`,
`switch`, `_select_indices` and `_switch_chosen_indices` in continuous mode, `zero_lora_states`,
`correct_switched_lora`) and switchlora/lora_utils.py (`layer2lora`, `get_init_lora_bound`).

y = W0·x + s·B·A·x with s = α/r (the official α is 1), W0 frozen. Each side has K = min(m, n)
candidate vectors (rows of A: C_A, K x n; columns of B: C_B, K x m), drawn U(±bound) with the
official bounds; A's rows start as the last r candidates, B's columns as the same r rotated by r/2,
and W0 = W_init − s·B·A, so the layer starts at the dense init. A switch of n vectors (`switch`):

- A rows i = c_A .. c_A + n − 1 (mod r) take the candidates after the one row c_A − 1 holds
  (j = sel_A[c_A − 1] + 1 + o, mod K); W0 += s·B[:, i]·(A[i] − C_A[j]) keeps the function; the old
  row goes back to its own candidate slot; B's column i is frozen for `warm` updates;
- then B's columns at c_B the same way (with the new A), freezing A's rows;
- `reset_counterpart_state`: the optimizer state (m, v and the per-row step) of every vector
  frozen at this switch is zeroed; `hold_frozen`: the gradient of every frozen vector is zeroed
  and its counter decremented.

All bookkeeping lives in buffers (candidates, selected indices, cursors, freeze counters), so a
checkpoint holds it and a resumed run continues exactly. With `offload` (the official default)
the candidates stay in host memory whatever device the layer moves to (they outnumber the model's
own weights: K·(m + n) per layer); a switch moves only the vectors it swaps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lora import LoRALinear

CANDIDATE_BUFFERS = ("candidates_A", "candidates_B")


def init_bounds(in_features: int, out_features: int, rank: int) -> tuple[float, float]:
    """The official uniform bounds of A and B (lora_utils.py `get_init_lora_bound`, type switchlora)."""
    m, n, r = out_features, in_features, rank
    gain = math.sqrt(2.0 / (1 + 5))  # nn.init.calculate_gain("leaky_relu", sqrt(5))
    std_a = ((m**0.5 * r) / n**1.5) ** 0.25 * gain**0.5
    std_b = (r / (m * n) ** 0.5) ** 0.25 * gain**0.5
    return math.sqrt(3.0) * std_a, math.sqrt(3.0) * std_b


class SwitchLoRALinear(LoRALinear):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = 1.0, *, offload: bool = True,
                 name: str = "", generator: torch.Generator | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, rank, alpha, name=name, generator=generator, device=device,
                         dtype=dtype)
        self.offload = offload
        count = min(in_features, out_features)
        bound_a, bound_b = init_bounds(in_features, out_features, rank)
        home = "cpu" if offload and torch.device(device or "cpu").type != "meta" else device
        candidates_a = torch.empty(count, in_features, device=home, dtype=dtype)
        candidates_b = torch.empty(count, out_features, device=home, dtype=dtype)
        if candidates_a.device.type != "meta":
            candidates_a.uniform_(-bound_a, bound_a, generator=generator)
            candidates_b.uniform_(-bound_b, bound_b, generator=generator)
        self.register_buffer("candidates_A", candidates_a)
        self.register_buffer("candidates_B", candidates_b)
        last = torch.arange(count - rank, count, device=device)
        self.register_buffer("selected_A", last.clone())
        self.register_buffer("selected_B", torch.roll(last, rank // 2))  # the official rotation by r // 2
        self.register_buffer("cursors", torch.tensor([0, rank // 2], device=device))  # c_A, c_B
        self.register_buffer("frozen_A", torch.zeros(rank, dtype=torch.long, device=device))
        self.register_buffer("frozen_B", torch.zeros(rank, dtype=torch.long, device=device))
        with torch.no_grad():
            self.A.copy_(self.candidates_A[self.selected_A.to(candidates_a.device)].to(self.A.device))
            self.B.copy_(self.candidates_B[self.selected_B.to(candidates_b.device)].T.to(self.B.device))

    def _apply(self, fn, recurse=True):
        """With `offload`, moves and casts reach every tensor but the candidates, which stay in host
        memory and follow A's dtype. A layer built on the meta device keeps them there until it is
        materialised (`to_empty`, for a checkpoint to fill), when they get host memory as well."""
        if not self.offload:
            return super()._apply(fn, recurse)
        kept = {name: self._buffers.pop(name) for name in CANDIDATE_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in kept.items():
                if tensor.is_meta and not self.A.is_meta:
                    self._buffers[name] = torch.empty(tensor.shape, dtype=self.A.dtype, device="cpu")
                else:
                    self._buffers[name] = tensor.to(dtype=self.A.dtype)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float = 1.0, *, offload: bool = True, name: str = "",
                    generator: torch.Generator | None = None) -> SwitchLoRALinear:
        """Wrap `linear`: W0 = W − s·B·A, so the layer computes `linear` at the start."""
        layer = cls(linear.in_features, linear.out_features, rank, alpha, offload=offload, name=name,
                    generator=generator, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight - layer.scale * (layer.B @ layer.A))
        return layer

    @property
    def candidate_count(self) -> int:
        return self.candidates_A.shape[0]

    def available(self) -> int:
        """How many vectors a switch may replace: the official bound that keeps the A and B cursors,
        net of the frozen vectors, from overtaking each other."""
        r = self.rank
        c_a, c_b = (int(v) for v in self.cursors)
        frozen_a, frozen_b = int((self.frozen_A > 0).sum()), int((self.frozen_B > 0).sum())
        return min((c_a - frozen_a - c_b) % r, (c_b - frozen_b - c_a) % r)

    @torch.no_grad()
    def switch(self, count: int, warm: int) -> None:
        """Replace `count` rows of A, then `count` columns of B, with their next candidates."""
        r, k = self.rank, self.candidate_count
        if count <= 0 or k - r <= 0:
            return
        c_a, c_b = (int(v) for v in self.cursors)
        rows_a = [(c_a + o) % r for o in range(count)]
        rows_b = [(c_b + o) % r for o in range(count)]
        self.cursors[0], self.cursors[1] = (c_a + count) % r, (c_b + count) % r
        # A's rows i (B's columns as the rows of Bᵀ); W0 moves by s·B[:, i]·(old − new) for A and
        # s·(old − new)·A[i] for B, so W0 + s·B·A is unchanged.
        self._switch_side(self.A, self.candidates_A, self.selected_A, rows_a, self.frozen_B, warm,
                          lambda i, delta: self.weight.add_(self.scale * torch.outer(self.B[:, i], delta)))
        b_rows = self.B.T  # a view: writing its rows writes B's columns
        self._switch_side(b_rows, self.candidates_B, self.selected_B, rows_b, self.frozen_A, warm,
                          lambda i, delta: self.weight.add_(self.scale * torch.outer(delta, self.A[i])))

    def _switch_side(self, vectors, candidates, selected, rows, frozen_other, warm, move_w0) -> None:
        k = candidates.shape[0]
        first = int(selected[rows[0] - 1]) + 1  # Python's -1: the last row, as the reference indexes
        targets = [(first + o) % k for o in range(len(rows))]
        # Read before the old vectors go back (the reference's continuous path).
        incoming = candidates[targets].to(vectors.device, copy=True)
        for i, new in zip(rows, incoming):
            move_w0(i, vectors[i] - new)
        for i in rows:
            candidates[int(selected[i])] = vectors[i].to(candidates.device)
        for i, new, j in zip(rows, incoming, targets):
            vectors[i] = new
            selected[i] = j
            frozen_other[i] = warm

    @torch.no_grad()
    def reset_counterpart_state(self, optimizer: torch.optim.Optimizer, warm: int) -> None:
        """Zero m, v and the step count of every vector frozen by this switch (counter == warm)."""
        for param, frozen, axis in ((self.A, self.frozen_A, 0), (self.B, self.frozen_B, 1)):
            state = optimizer.state.get(param, {})
            if "exp_avg" not in state:
                continue
            index = ((frozen == warm) | (frozen < 0)).nonzero().flatten()
            if index.numel() == 0:
                continue
            for key in ("exp_avg", "exp_avg_sq", "step"):
                state[key].index_fill_(axis, index.to(state[key].device), 0)

    @torch.no_grad()
    def hold_frozen(self) -> None:
        """Zero the gradient of every frozen vector and count its freeze down."""
        for param, frozen, axis in ((self.A, self.frozen_A, 0), (self.B, self.frozen_B, 1)):
            index = (frozen > 0).nonzero().flatten()
            if param.grad is not None and index.numel():
                param.grad.index_fill_(axis, index, 0)
            frozen.sub_((frozen > 0).long()).clamp_(min=0)
