"""GaLoreAdamW: Adam in a low-rank gradient subspace, same numbers as galore_torch.GaLoreAdamW.

For a group with the key `rank`, every 2-D parameter's gradient G is projected, R = proj(G)
(see `projector.py`); Adam moments live in that projected space; the normalized update
N = m / (sqrt(v) + eps) is projected back and scaled:

    W <- W - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * scale * back(N)
    W <- W - lr * weight_decay * W            (decoupled, after the update, as the reference)

The projector is recomputed from the current gradient's SVD at steps 0, T, 2T, ...
(T = update_proj_gap). Like the reference, the moments are neither reset nor re-projected when
the projector changes; `reproject_moments` carries them into the new basis instead (see
MOMENT_MODES: "both" = True, "first" and "first_transient" are GoLore's two official forms).
Groups without `rank` are stepped as the reference steps them too (galore_torch's AdamW, the
Hugging Face form: eps added to sqrt(v) before the bias correction, decay after the update;
see `_base.py`), not as `torch.optim.AdamW`.

Group keys: rank (int >= 1), update_proj_gap (int >= 1, default 200), scale (float > 0,
default 1.0), proj_type (std | reverse_std | left | right | full, default std),
reproject_moments (none | first | first_transient | both, or a bool: False = none, True = both;
default False), svd (exact | randomized, default exact: the
reference's), svd_oversample (int >= 0, default 8) and svd_niter (int >= 0, default 2) for the
randomized refresh.

How a step is computed (the reference loops over parameters; the numbers are the same to float
rounding, ~1e-7 relative): the matrices of a group are stepped in stacks of one shape, dtype,
device, projection side and step count. A stack is projected with one batched matmul, its
moments advance with multi-tensor (`torch._foreach_*`) operations, and its update is projected
back with one batched matmul; back-projection and update are fused into one GEMM with
accumulation (`addmm_`), with `scale` folded into the step size. Stacks hold up to
`BATCH_BYTES` of gradients on CUDA (fewer, larger kernels); on the CPU a stack is one matrix,
because a CPU batched matmul is a loop of the same GEMMs and stacking would only add a
full-size copy (`batched=` overrides the choice).

Under FSDP (`train.parallel=fsdp`; the same code, shard-aware through rankscope.optim.sharded):
each rank holds a block of rows of W and of its gradient G (m x n). The projection is designed
around that row split, so that only a refresh needs the whole gradient:

- right side (m >= n under "std": q, k, v, o, gate, up): R = G·P_rightᵀ and back(N) = N·P_right are
  row by row, so each rank projects its own rows; P_right (r x n) is whole on every rank, the
  moments (m x r) are split by rows like W. A step communicates nothing beyond FSDP's own
  reduce-scatter of G.
- left side (m < n: down): R = P_leftᵀ·G = Σ_ranks P_left[rows]ᵀ·G[rows], so each rank keeps only
  its rows of P_left (m x r) and the r x n partial sums are all-reduced; the moments (r x n) are
  whole on every rank (each computes the same Adam update) and back(N) = P_left[rows]·N writes
  the rank's own rows. "full" likewise, with an r x r all-reduce.
- refresh (every update_proj_gap steps): the SVD needs the whole G, all-gathered; each matrix's
  SVD runs on one rank, which broadcasts the projectors, and every rank keeps what it needs
  (`_shared_refresh`). Carrying the moments into the
  new basis (reproject_moments) also gathers the old and new P_left (m x r).
- Fira's residual is row by row too; its norm-growth limiter needs ‖S‖_F, one all-reduced scalar
  per matrix.

Communication per rank, fp32, at LLaMA-7B shapes (32 layers, d 4096, ffn 11008, r 1024, T 200):
per step, the left-side all-reduce of R, 32 x 1024 x 11008 = 361M values (1.44 GB; a ring
all-reduce moves about twice that), next to FSDP's own ~54 GB per step (bf16 all-gathers of the
6.7B parameters in forward and backward, fp32 reduce-scatter of the gradients): ~5% more.
`proj_type=right` makes every step communication-free (not the reference's choice for m < n).
Per refresh, the all-gather of every targeted G: 6.48B values (25.9 GB, 130 MB per step amortized
over T = 200) and one whole m x n gradient alive at a time (180 MB for gate/up/down); with moment
carrying, P_left's 134M values (0.54 GB) more. Each matrix's SVD runs on one rank (round robin,
`computed_by_one_rank`), which broadcasts its projectors (r x n or m x r: 1/16 or less of G at
r = d/4): a rank runs 1/world of the refresh's SVDs, with at most two whole gradients alive.

State dtype (`state_dtype`, see `_base.py`): under "param" the projectors are cast to the
gradient's dtype and the moments live in it, as galore_torch 1.0 does (galore_projector.py
`get_orthogonal_matrix` casts U / Vh back to the gradient's dtype; adamw.py creates the moments
with `zeros_like` of the projected gradient): bf16 under bf16 weights. Under "fp32" the whole
projected step runs in fp32 for bf16 weights: the gradient is widened one stack at a time, the
projectors keep the fp32 SVD's vectors (a bf16 projector is orthonormal to ~2^-9 only), the
moments and the update are fp32, and the back-projected update is rounded into the weight once.
The transient cost is an fp32 copy of one stack's gradients plus its fp32 back-projection.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from rankscope.optim._base import (
    RankscopeOptimizer,
    adam_directions,
    apply_decoupled_weight_decay,
    bias_corrected_step_size,
    evaluate_closure,
    new_step_counter,
    require,
    state_dtype_for,
    validate_float,
    validate_int,
)
from rankscope.optim.projector import (
    PROJ_TYPES,
    SVD_KINDS,
    add_projected_back,
    compute_projection,
    project,
    project_back,
    projection_side,
    projector_keys,
    reproject_moments,
)
from rankscope.optim.sharded import (
    computed_by_one_rank,
    full,
    is_sharded,
    local,
    local_rows,
    mesh_group,
    sharded_like,
    sum_over_shards,
)

BATCH_BYTES = 256 * 2**20  # gradient bytes per stack on CUDA: bounds the stacked copy's memory
# How the Adam moments cross a projector refresh:
#   none             kept as they are (GaLore, Fira)
#   first            exp_avg rotated into the new basis (GoLore's ReLoRA-form, GoLore.py merge_and_reinit)
#   first_transient  the refresh step's update uses the rotated exp_avg, but the stored exp_avg is
#                    left as it was before the step (GoLore's optimizer, golore_torch/adamw.py, which
#                    rebinds the rotated tensor to a local name and never writes it back)
#   both             exp_avg rotated, exp_avg_sq carried with the squared change of basis
MOMENT_MODES = ("none", "first", "first_transient", "both")
PROJECTED_DEFAULTS = {"update_proj_gap": 200, "proj_type": "std", "reproject_moments": False,
                      "svd": "exact", "svd_oversample": 8, "svd_niter": 2}


def group_setting(group: Mapping[str, Any], key: str) -> Any:
    """A projected group's setting; groups restored from older checkpoints may lack newer keys."""
    return group.get(key, PROJECTED_DEFAULTS[key])


def moment_mode(group: Mapping[str, Any]) -> str:
    """The group's `reproject_moments` as one of MOMENT_MODES (bools: False = none, True = both)."""
    value = group_setting(group, "reproject_moments")
    if isinstance(value, bool):
        return "both" if value else "none"
    return value


def validate_projected_group(group: dict[str, Any], method: str, proj_types: tuple[str, ...]) -> None:
    """Fill defaults and check the keys shared by GaLore and Fira groups."""
    for key, value in PROJECTED_DEFAULTS.items():
        group.setdefault(key, value)
    validate_int(group, "rank", 1)
    validate_int(group, "update_proj_gap", 1)
    require(group["proj_type"] in proj_types,
            f"invalid proj_type {group['proj_type']!r} for {method}: use one of {', '.join(proj_types)}")
    require(isinstance(group["reproject_moments"], bool) or group["reproject_moments"] in MOMENT_MODES,
            f"invalid reproject_moments {group['reproject_moments']!r}: use one of {', '.join(MOMENT_MODES)} "
            "(or true = both, false = none)")
    require(group["svd"] in SVD_KINDS, f"invalid svd {group['svd']!r} for {method}: use one of {', '.join(SVD_KINDS)}")
    validate_int(group, "svd_oversample", 0)
    validate_int(group, "svd_niter", 0)
    for p in group["params"]:
        require(p.dim() == 2,
                f"{method} projects 2-D weights only, got a parameter of shape {tuple(p.shape)}: "
                "put it in a group without 'rank'")


@dataclass
class MatrixStack:
    """Matrices of one group with one shape, dtype, device, projection side and step count.

    Their tensors are handled as one k x ... stack; a stack of one matrix is that matrix itself
    (2-D, no copy), since a batch-of-one matmul is slower than a plain one on the CPU.
    """

    params: list[torch.Tensor]
    states: list[dict[str, Any]]
    side: str
    step: int  # steps taken before this one: the projector is refreshed when step % T == 0
    work_dtype: torch.dtype  # the state dtype: gradients are projected, and moments kept, in it

    @property
    def single(self) -> bool:
        return len(self.params) == 1

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0] if self.single else torch.stack(tensors)

    def unstack(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        return [stacked] if self.single else list(stacked.unbind(0))

    @property
    def sharded(self) -> bool:
        """Whether the matrices are FSDP row shards (see "Under FSDP" above)."""
        return is_sharded(self.params[0])

    def grads(self) -> torch.Tensor:
        """The gradients (this rank's rows under FSDP) in the work dtype (no copy for one matrix
        whose gradient already has it)."""
        return self.stack([local(p.grad) for p in self.params]).to(self.work_dtype)

    def local_params(self) -> list[torch.Tensor]:
        return [local(p) for p in self.params]

    def projection(self) -> dict[str, torch.Tensor]:
        """The projectors as this rank uses them: P_right whole, P_left's rows (all without FSDP)."""
        return {key: self.stack([local(s[key]) for s in self.states]) for key in projector_keys(self.side)}

    def sum_over_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a per-rank partial result (in place; unchanged without FSDP)."""
        return sum_over_shards(partial, self.params[0])


def add_back_projection_to_params(
    stack: MatrixStack, low: torch.Tensor, projection: Mapping[str, torch.Tensor], alpha: float
) -> None:
    """params += alpha * back(low): one fused GEMM for one matrix, else one batched GEMM + foreach add."""
    if stack.single:
        add_projected_back(stack.local_params()[0], low, projection, stack.side, alpha)
    else:
        torch._foreach_add_(stack.local_params(), stack.unstack(project_back(low, projection, stack.side)), alpha=alpha)


class ProjectedAdamW(RankscopeOptimizer, abc.ABC):
    """What GaLoreAdamW and FiraAdamW share: grouping into stacks, refresh, projected Adam moments.

    Subclasses implement `_apply_update`, which receives a stack, its projected gradients R and
    Adam directions N (both in the projected space) and the step size.
    """

    method_name: ClassVar[str]
    proj_types: ClassVar[tuple[str, ...]] = PROJ_TYPES
    # State whose rows are the weight's rows, split like it under FSDP (rankscope.optim.sharded).
    row_sharded_state: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "proj_left")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        batched: bool | None = None,
        state_dtype: str = "fp32",
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype)
        # (stored exp_avg, its value before this step) for the first_transient refreshes of a step
        self._transient_moments: list[tuple[torch.Tensor, torch.Tensor]] = []
        require(batched is None or isinstance(batched, bool), f"invalid batched {batched!r}: use None, True or False")
        self.batched = batched  # None: stacks of several matrices on CUDA, one matrix on the CPU
        self.refresh_group: dist.ProcessGroup | None = None  # DDP ranks sharing the refresh's SVDs

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if "rank" not in group:
            return False
        validate_projected_group(group, self.method_name, self.proj_types)
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            if "rank" in group:
                self._projected_group_step(group)
            else:
                self._reference_adamw_step(group)
        return loss

    def _stack_size(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> int:
        batched = self.batched if self.batched is not None else device.type == "cuda"
        if not batched:
            return 1
        return max(1, BATCH_BYTES // (shape[0] * shape[1] * dtype.itemsize))

    def _stacks(self, group: dict[str, Any]) -> list[MatrixStack]:
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = new_step_counter()
            side = projection_side(p.shape, group["proj_type"])
            step = int(state["step"])  # CPU counter: no device sync
            buckets.setdefault((tuple(p.shape), p.dtype, p.device, side, step), []).append(p)
        stacks = []
        for (shape, dtype, device, side, step), params in buckets.items():
            work_dtype = state_dtype_for(dtype, self.state_dtype)
            size = self._stack_size(shape, work_dtype, device)
            for start in range(0, len(params), size):
                chunk = params[start:start + size]
                stacks.append(MatrixStack(chunk, [self.state[p] for p in chunk], side, step, work_dtype))
        return stacks

    @staticmethod
    def _due(group: dict[str, Any], stack: MatrixStack) -> list[int]:
        """The matrices of the stack that get new projectors now: every one at steps 0, T, 2T, ...,
        and any without one."""
        first_key = projector_keys(stack.side)[0]
        if stack.step % group["update_proj_gap"] == 0:
            return list(range(len(stack.states)))
        return [i for i, s in enumerate(stack.states) if first_key not in s]

    def _refresh_if_due(self, group: dict[str, Any], stack: MatrixStack, grads: torch.Tensor,
                        shared: Mapping[int, dict[str, torch.Tensor]] | None = None) -> None:
        """New projectors from the SVD of G at steps 0, T, 2T, ... (and wherever one is missing).
        Under FSDP they were computed for the whole group beforehand (`shared`, by parameter id)."""
        due = self._due(group, stack)
        if not due:
            return
        if self._shares_refresh(stack):
            projections = [shared[id(stack.params[index])] for index in due]
        else:
            matrices = grads if stack.single or len(due) == len(stack.states) else grads[due]
            new = self._new_projections(group, stack, matrices, due)
            projections = [{key: (value if matrices.dim() == 2 else value[row].clone()) for key, value in new.items()}
                           for row in range(len(due))]
        for index, projection in zip(due, projections):
            state, param = stack.states[index], stack.params[index]
            self._carry_moments(group, _with_whole_projectors(state) if stack.sharded else state, projection,
                                stack.side)
            if stack.sharded and "proj_left" in projection:  # every rank keeps its rows of P_left
                projection["proj_left"] = sharded_like(local_rows(projection["proj_left"], param).clone(), param)
            state.update(projection)

    def share_work_over(self, process_group: dist.ProcessGroup) -> None:
        """Data parallel (DDP): every rank holds the same weights and, after DDP's all-reduce, the
        same gradients, so a refresh's SVDs are shared out over `process_group` as under FSDP
        (`_shared_refresh`) instead of each rank running all of them."""
        self.refresh_group = process_group

    def _shares_refresh(self, stack: MatrixStack) -> bool:
        return stack.sharded or self.refresh_group is not None

    def _shared_refresh(self, group: dict[str, Any], stacks: list[MatrixStack]) -> dict[int, dict[str, torch.Tensor]]:
        """Under FSDP (or DDP, see `share_work_over`): the new projectors of every matrix of the
        group due for a refresh, keyed by parameter id. Each SVD needs the whole gradient (under
        FSDP an all-gather) and runs on one rank, which broadcasts its projectors
        (`computed_by_one_rank`): a rank runs 1/world of the refresh's SVDs, and the projectors
        equal those every rank would have computed."""
        due = [(stack, index) for stack in stacks if self._shares_refresh(stack) for index in self._due(group, stack)]
        if not due:
            return {}
        # Largest first (stable: the same order on every rank), so a round's SVDs are of one size
        # and no round waits on one large matrix while the others idle.
        due.sort(key=lambda item: -item[0].params[item[1]].numel())

        def gather(i: int) -> torch.Tensor:
            stack, index = due[i]
            return full(stack.params[index].grad).to(stack.work_dtype)

        def compute(i: int, whole: torch.Tensor) -> dict[str, torch.Tensor]:
            stack, index = due[i]
            return self._new_projections(group, stack, whole, [index])

        first = due[0][0].params[0]
        process_group = mesh_group(first) if is_sharded(first) else self.refresh_group
        results = computed_by_one_rank(len(due), gather, compute, process_group)
        return {id(stack.params[index]): result for (stack, index), result in zip(due, results)}

    def _new_projections(self, group: dict[str, Any], stack: MatrixStack, matrices: torch.Tensor,
                         due: list[int]) -> dict[str, torch.Tensor]:
        """Projectors for the `due` matrices of the stack (`matrices`: their gradients)."""
        return compute_projection(
            matrices, group["rank"], stack.side, svd=group_setting(group, "svd"),
            oversample=group_setting(group, "svd_oversample"), niter=group_setting(group, "svd_niter"),
            seed=stack.step,
        )

    def _carry_moments(self, group: dict[str, Any], state: dict[str, Any], projection: Mapping[str, torch.Tensor],
                       side: str) -> None:
        mode = moment_mode(group)
        if mode == "none" or projector_keys(side)[0] not in state or "exp_avg" not in state:
            return
        if mode == "first_transient":
            self._transient_moments.append((state["exp_avg"], state["exp_avg"].clone()))
        reproject_moments(state, projection, side, second=mode == "both")

    def _projected_group_step(self, group: dict[str, Any]) -> None:
        """Project every stack, advance all moments together, then update stack by stack.

        Only projected-space tensors (and one stack's gradients at a time) are alive at once.
        """
        beta1, beta2 = group["betas"]
        stacks = self._stacks(group)
        shared = self._shared_refresh(group, stacks) if any(map(self._shares_refresh, stacks)) else None
        lows = []
        for stack in stacks:
            grads = stack.grads()
            self._refresh_if_due(group, stack, grads, shared)
            low = project(grads, stack.projection(), stack.side)
            del grads  # a widened copy under fp32 state: only one stack's is alive at a time
            if stack.side != "right":
                low = stack.sum_over_ranks(low)  # P_leftᵀ·G: each rank's rows give a partial sum
            for param, state, low_grad in zip(stack.params, stack.states, stack.unstack(low)):
                if "exp_avg" not in state:  # `low` has the work dtype: the moments take it
                    # Right side: rows of the weight's rows (sharded like it); else whole on every rank.
                    state["exp_avg"] = _moment_like(low_grad, param, stack.side)
                    state["exp_avg_sq"] = _moment_like(low_grad, param, stack.side)
            lows.append(low)
        states = [s for stack in stacks for s in stack.states]
        if not states:
            return
        torch._foreach_add_([s["step"] for s in states], 1.0)
        directions = iter(adam_directions([local(s["exp_avg"]) for s in states], [local(s["exp_avg_sq"]) for s in states],
                                          [g for stack, low in zip(stacks, lows) for g in stack.unstack(low)],
                                          beta1, beta2, group["eps"]))
        for stored, before in self._transient_moments:
            stored.copy_(before)
        self._transient_moments.clear()
        for stack, low in zip(stacks, lows):
            stacked_directions = stack.stack([next(directions) for _ in stack.params])
            step_size = bias_corrected_step_size(group["lr"], beta1, beta2, stack.step + 1)
            self._apply_update(group, stack, low, stacked_directions, step_size)
            apply_decoupled_weight_decay(stack.local_params(), group)

    @abc.abstractmethod
    def _apply_update(self, group: dict[str, Any], stack: MatrixStack, low: torch.Tensor,
                      directions: torch.Tensor, step_size: float) -> None:
        """Move the stack's parameters (weight decay follows, applied by the caller)."""


def _moment_like(low_grad: torch.Tensor, param: torch.Tensor, side: str) -> torch.Tensor:
    zeros = torch.zeros_like(low_grad)
    return sharded_like(zeros, param) if side == "right" else zeros


def _with_whole_projectors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A view of a sharded matrix's state for carrying its moments into a new basis: the moments as
    this rank holds them (right side: its rows; left: whole), the projectors whole (P_left gathered:
    m·r values, next to the m·n of the refresh's gradient)."""
    view = {key: local(state[key]) for key in ("exp_avg", "exp_avg_sq") if key in state}
    view.update({key: full(state[key]) for key in ("proj_left", "proj_right") if key in state})
    return view


class GaLoreAdamW(ProjectedAdamW):
    """AdamW with GaLore gradient projection for groups that carry `rank`."""

    method_name = "GaLore"

    def _validate_special_group(self, group: dict[str, Any]) -> bool:
        if "rank" not in group:
            return False
        group.setdefault("scale", 1.0)
        super()._validate_special_group(group)
        validate_float(group, "scale", 0.0, strict=True)
        return True

    def _apply_update(self, group: dict[str, Any], stack: MatrixStack, low: torch.Tensor,
                      directions: torch.Tensor, step_size: float) -> None:
        add_back_projection_to_params(stack, directions, stack.projection(), alpha=-step_size * group["scale"])
