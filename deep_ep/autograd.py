"""Autograd through dispatch and combine: `loss.backward()` works across expert parallelism.

    recv = deep_ep.autograd.dispatch(buffer, x, topk_idx, topk_weights, num_experts)
    expert_out = experts(recv.recv_x, recv.recv_topk_idx, recv.recv_topk_weights)   # any differentiable code
    combined_x, _ = deep_ep.autograd.combine(buffer, expert_out, recv.handle)
    loss(combined_x).backward()      # every rank calls backward: the backward passes communicate too

Dispatch only moves rows and combine sums them back, so each is the other's transpose (DESIGN section 3):

- x through a dispatch: every received copy's gradient is summed back into its source token, which is a
  combine of recv_x's gradient with the dispatch's handle.
- topk_weights through a dispatch: a receiving rank holds `topk_weights[t, k]` where slot k's expert is one of
  its own and 0 in the other slots, so each (t, k) is held by exactly one rank, the owner of the expert. Its
  gradient is the combine (which sums weights over every rank that received t) of recv_topk_weights'
  gradient with the other ranks' slots zeroed (`recv_topk_idx < 0`).
- x through a combine: each row received the gradient of the token it was added into, which is a cached
  dispatch (`handle=`) of combined_x's gradient. combine also sums the `topk_weights` it is given, so their
  gradient is dispatched the same way, its float32 bits riding in extra BF16 columns of the same dispatch.
- low_latency_dispatch (BF16): the gradient of x sums the gradient rows of the token's distinct experts,
  a low_latency_combine with weight 1 on each distinct expert.
- low_latency_combine: see `low_latency_combine`.

The gradient rules are plain functions of the communication calls (`dispatch_grads`, `combine_grads`, ...),
so deep_ep.library's custom ops (torch.compile) apply the same rules through its ops.

Every rank must run the same forward calls and the same backward: each backward call is a collective. The
functions take BF16 x (the kernels' type); a gradient arriving in another dtype is cast to BF16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch

from .handles import IntranodeHandle, LowLatencyHandle, unpack_layout_range

# ---------------------------------------------------------------------------------------------------------
# Gradient rules (shared with deep_ep.library)
# ---------------------------------------------------------------------------------------------------------


def float32_as_bf16_columns(t: torch.Tensor) -> torch.Tensor:
    """[T, K] float32 -> [T, 2 * K4] bfloat16 holding the same bytes (K padded to K4, a multiple of 4, so the
    row is a multiple of 16 bytes as the kernels require). Dispatch copies bytes, so they arrive intact."""
    num_topk = t.size(1)
    padded = (num_topk + 3) // 4 * 4
    if padded != num_topk:
        t = torch.cat([t, t.new_zeros(t.size(0), padded - num_topk)], 1)
    return t.contiguous().view(torch.bfloat16)


def bf16_columns_as_float32(t: torch.Tensor, num_topk: int) -> torch.Tensor:
    """Inverse of float32_as_bf16_columns for rows that went through a dispatch."""
    return t.contiguous().view(torch.float32)[:, :num_topk].contiguous()


def dispatch_grads(
    combine_fn: Callable[[torch.Tensor, Optional[torch.Tensor]], tuple],
    grad_recv_x: torch.Tensor,
    grad_recv_topk_weights: Optional[torch.Tensor],
    recv_topk_idx: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(grad of x, grad of topk_weights or None) of a normal dispatch; `combine_fn(x, topk_weights)` is a
    combine with the dispatch's handle returning (combined_x, combined_topk_weights)."""
    local_grad_weights = None
    if grad_recv_topk_weights is not None:
        # Slots of experts on other ranks hold 0 here, not the weight: their gradient comes from the owner.
        local_grad_weights = torch.where(recv_topk_idx >= 0, grad_recv_topk_weights.float(), 0.0).contiguous()
    grad_x, grad_topk_weights = combine_fn(grad_recv_x.to(torch.bfloat16).contiguous(), local_grad_weights)
    return grad_x, grad_topk_weights


def combine_grads(
    cached_dispatch_fn: Callable[[torch.Tensor], torch.Tensor],
    grad_combined_x: torch.Tensor,
    grad_combined_topk_weights: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(grad of x, grad of topk_weights or None) of a normal combine; `cached_dispatch_fn(x)` is a dispatch
    with the combine's handle (BF16 [T, H'] -> [N, H']). Pass grad_combined_topk_weights only when the
    combine's topk_weights need a gradient: they then travel in the same dispatch as extra columns."""
    grad = grad_combined_x.to(torch.bfloat16).contiguous()
    if grad_combined_topk_weights is None:
        return cached_dispatch_fn(grad), None
    hidden, num_topk = grad.size(1), grad_combined_topk_weights.size(1)
    packed = torch.cat([grad, float32_as_bf16_columns(grad_combined_topk_weights.float())], 1)
    received = cached_dispatch_fn(packed)
    return received[:, :hidden].contiguous(), bf16_columns_as_float32(received[:, hidden:], num_topk)


def distinct_experts(topk_idx: torch.Tensor) -> torch.Tensor:
    """topk_idx with repeated experts of a token set to -1 (the first occurrence stays): low-latency
    dispatch sends a token once to each distinct expert."""
    idx = topk_idx.long()
    same = idx.unsqueeze(2) == idx.unsqueeze(1)  # [T, k, j]
    earlier = torch.ones(idx.size(1), idx.size(1), dtype=torch.bool, device=idx.device).tril(-1)
    repeated = (same & earlier).any(dim=2)
    return torch.where(repeated, -1, idx)


def low_latency_dispatch_grads(
    combine_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    grad_recv_x: torch.Tensor,
    topk_idx: torch.Tensor,
) -> torch.Tensor:
    """Grad of x of a BF16 low_latency_dispatch; `combine_fn(x, topk_idx, topk_weights)` is a
    low_latency_combine with the dispatch's handle. Rows past recv_count are never read."""
    idx = distinct_experts(topk_idx)
    weights = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
    return combine_fn(grad_recv_x.to(torch.bfloat16).contiguous(), idx, weights)


# Low-latency combine's backward carries per-row scalars through low-latency ops, whose rows are BF16 of a
# fixed hidden size. Dispatch copies bytes, so float32/int64 values ride bit for bit in BF16 columns; combine
# does arithmetic (a float32 sum of weight * row, rounded to BF16), so a float32 value v goes back as three
# BF16 pieces hi + mid + lo (each the BF16 rounding of what the previous ones left), each added once with
# weight 1: exact in the float32 sum and in its BF16 rounding, and their sum recovers v to float32 precision.
_PIECES = 3


def _split_float32(v: torch.Tensor) -> torch.Tensor:
    """[..., K] float32 -> [..., K, 3] bfloat16 pieces with hi + mid + lo = v to float32 precision."""
    pieces, rest = [], v.float()
    for _ in range(_PIECES):
        piece = rest.to(torch.bfloat16)
        pieces.append(piece)
        rest = rest - piece.float()
    return torch.stack(pieces, dim=-1)


def _join_float32(pieces: torch.Tensor) -> torch.Tensor:
    """[..., K, 3] bfloat16 -> [..., K] float32, adding the smallest piece first."""
    p = pieces.float()
    return p[..., 0] + (p[..., 1] + p[..., 2])


def _low_latency_row_keys(handle: LowLatencyHandle, num_ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key [L, R*M] int64, valid [L, R*M] bool): the key of a received row is source_rank * M + token,
    unique within an expert; rows outside every source's range are not valid."""
    m = handle.num_max_dispatch_tokens_per_rank
    begin, count = unpack_layout_range(handle.packed_recv_layout_range)  # [L, R]
    rows = torch.arange(num_ranks * m, device=begin.device).view(1, -1, 1)
    in_range = (rows >= begin.unsqueeze(1)) & (rows < (begin + count).unsqueeze(1))  # [L, R*M, R]
    valid = in_range.any(dim=2)
    source = in_range.int().argmax(dim=2)
    key = source * m + handle.packed_recv_src_info.long()
    return torch.where(valid, key, num_ranks * m), valid


def _to_layout(
    rows: torch.Tensor, handle: LowLatencyHandle, keys: torch.Tensor, num_ranks: int
) -> torch.Tensor:
    """Rows [L, R*M, H'] received with `handle`, reordered to the row layout whose keys are `keys` (a
    kernel may order an expert's rows differently from one dispatch to the next)."""
    own_keys, _ = _low_latency_row_keys(handle, num_ranks)
    num_local_experts, num_rows = own_keys.shape
    row_of_key = torch.zeros(num_local_experts, num_rows + 1, dtype=torch.int64, device=rows.device)
    positions = torch.arange(num_rows, device=rows.device).expand(num_local_experts, -1)
    row_of_key.scatter_(1, own_keys, positions)  # invalid rows all land in the spare last column
    source_rows = row_of_key.gather(1, keys)
    return rows.gather(1, source_rows.unsqueeze(2).expand(-1, -1, rows.size(2)))


def low_latency_combine_grads(
    dispatch_fn: Callable[[torch.Tensor], tuple[torch.Tensor, LowLatencyHandle]],
    combine_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    grad_combined_x: torch.Tensor,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: LowLatencyHandle,
    rank: int,
    num_ranks: int,
    weights_need_grad: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(grad of x, grad of topk_weights or None) of a low_latency_combine.

    combined[t] = sum_k w[t, k] * x[e_k][row of t], so the row of (t, e) gets w_e(t) * grad[t], where w_e(t)
    sums t's weights of expert e, and w[t, k] gets <grad[t], x[e_k][row of t]>. The expert's rank has x, the
    token's rank has grad and w: `dispatch_fn(rows)` (a BF16 low_latency_dispatch with topk_idx, returning
    (recv_x, handle)) carries grad[t] and, in a second call, t's weights and expert ids to the experts; for
    the weights' gradient `combine_fn(x, topk_idx, topk_weights)` (a low_latency_combine with `handle`)
    brings the products back. topk_idx must be the one the handle's dispatch used.
    """
    hidden, num_topk = x.size(2), topk_idx.size(1)
    num_local_experts = x.size(0)
    keys, valid = _low_latency_row_keys(handle, num_ranks)
    grad_rows, grad_handle = dispatch_fn(grad_combined_x.to(torch.bfloat16).contiguous())
    grad_rows = _to_layout(grad_rows, grad_handle, keys, num_ranks).float()

    # Each token's weights (float32) and expert ids (int64), bit for bit in the first BF16 columns.
    routing = torch.cat(
        [
            topk_weights.float().contiguous().view(torch.bfloat16),
            topk_idx.long().contiguous().view(torch.bfloat16),
        ],
        1,
    )
    routing_rows = torch.zeros(topk_idx.size(0), hidden, dtype=torch.bfloat16, device=x.device)
    routing_rows[:, : routing.size(1)] = routing
    routing_rows, routing_handle = dispatch_fn(routing_rows)
    routing_rows = _to_layout(routing_rows, routing_handle, keys, num_ranks)[:, :, : routing.size(1)]
    row_weights = routing_rows[:, :, : 2 * num_topk].contiguous().view(torch.float32)  # [L, R*M, k]
    row_experts = routing_rows[:, :, 2 * num_topk :].contiguous().view(torch.int64)
    my_experts = rank * num_local_experts + torch.arange(num_local_experts, device=x.device).view(-1, 1, 1)
    is_mine = (row_experts == my_experts) & valid.unsqueeze(2)  # [L, R*M, k]: slots of this row's expert

    row_weight = torch.where(is_mine, row_weights, 0.0).sum(dim=2, keepdim=True)
    # Rows outside every range hold whatever the receive tensors held (the kernels leave them unwritten).
    grad_x = torch.where(valid.unsqueeze(2), row_weight * grad_rows, 0.0).to(torch.bfloat16)
    if not weights_need_grad:
        return grad_x, None
    products = (grad_rows * x.float()).sum(dim=2, keepdim=True)  # [L, R*M, 1]
    per_slot = torch.where(is_mine, products, 0.0)  # [L, R*M, k]
    back = torch.zeros(num_local_experts, x.size(1), hidden, dtype=torch.bfloat16, device=x.device)
    back[:, :, : _PIECES * num_topk] = _split_float32(per_slot).flatten(2)
    # Each slot's column gets one non-zero term (from its expert): count each distinct expert once.
    idx = distinct_experts(topk_idx)
    combined = combine_fn(back, idx, torch.ones(idx.shape, dtype=torch.float32, device=x.device))
    pieces = combined[:, : _PIECES * num_topk].reshape(combined.size(0), num_topk, _PIECES)
    grad_weights = _join_float32(pieces)
    return grad_x, grad_weights


# ---------------------------------------------------------------------------------------------------------
# Autograd functions over a Buffer (eager)
# ---------------------------------------------------------------------------------------------------------


class DispatchOutput(NamedTuple):
    """What `dispatch` returns: Buffer.dispatch's tuple without the event."""

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert_list: list
    handle: IntranodeHandle


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx, layout, expert_alignment, num_worst_tokens, config):
        num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert = layout
        recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = buffer.dispatch(
            x,
            num_tokens_per_rank=num_tokens_per_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            config=config,
        )
        ctx.buffer, ctx.handle, ctx.config = buffer, handle, config
        ctx.save_for_backward(recv_topk_idx)
        ctx.mark_non_differentiable(recv_topk_idx)
        return recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_recv_x, _grad_recv_topk_idx, grad_recv_topk_weights, *_unused):
        (recv_topk_idx,) = ctx.saved_tensors
        buffer, handle, config = ctx.buffer, ctx.handle, ctx.config

        def combine_fn(x, topk_weights):
            combined_x, combined_topk_weights, _ = buffer.combine(
                x, handle, topk_weights=topk_weights, config=config
            )
            return combined_x, combined_topk_weights

        weights_grad = grad_recv_topk_weights if ctx.needs_input_grad[1] else None
        grad_x, grad_topk_weights = dispatch_grads(combine_fn, grad_recv_x, weights_grad, recv_topk_idx)
        return grad_x, grad_topk_weights, None, None, None, None, None, None


def dispatch(
    buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    *,
    num_tokens_per_rank: Optional[torch.Tensor] = None,
    is_token_in_rank: Optional[torch.Tensor] = None,
    num_tokens_per_expert: Optional[torch.Tensor] = None,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    config=None,
) -> DispatchOutput:
    """Differentiable `buffer.dispatch` of BF16 x [T, H] with top-k routing (float32 topk_weights [T, k]).

    Gradients flow to x and topk_weights (see the module docstring). The layout (`num_tokens_per_rank`,
    `is_token_in_rank`, `num_tokens_per_expert`, as `buffer.get_dispatch_layout` returns them) is computed
    when not given. Returns DispatchOutput(recv_x, recv_topk_idx, recv_topk_weights,
    num_recv_tokens_per_expert_list, handle): the handle is what `combine` takes.
    """
    layout = (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
    if any(t is None for t in layout):
        if any(t is not None for t in layout):
            raise ValueError(
                "num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: give all three or none"
            )
        num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
            topk_idx, num_experts
        )
        layout = (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
    return DispatchOutput(
        *_Dispatch.apply(
            x, topk_weights, buffer, topk_idx, layout, expert_alignment, num_worst_tokens, config
        )
    )


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, buffer, handle, config):
        combined_x, combined_topk_weights, _ = buffer.combine(
            x, handle, topk_weights=topk_weights, config=config
        )
        ctx.buffer, ctx.handle, ctx.config = buffer, handle, config
        return combined_x, combined_topk_weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_combined_x, grad_combined_topk_weights):
        buffer, handle, config = ctx.buffer, ctx.handle, ctx.config

        def cached_dispatch_fn(x):
            return buffer.dispatch(x, handle=handle, config=config)[0]

        weights_grad = grad_combined_topk_weights if ctx.needs_input_grad[1] else None
        grad_x, grad_topk_weights = combine_grads(cached_dispatch_fn, grad_combined_x, weights_grad)
        return grad_x, grad_topk_weights, None, None, None


def combine(
    buffer,
    x: torch.Tensor,
    handle: IntranodeHandle,
    topk_weights: Optional[torch.Tensor] = None,
    *,
    config=None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Differentiable `buffer.combine` of BF16 rows x [N, H] received by the dispatch that made `handle`.

    Returns (combined_x [T, H] bf16, combined_topk_weights [T, k] float32, or None without topk_weights);
    gradients flow to x and topk_weights.
    """
    combined_x, combined_topk_weights = _Combine.apply(x, topk_weights, buffer, handle, config)
    return combined_x, combined_topk_weights


class _LowLatencyDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, topk_idx, num_max_dispatch_tokens_per_rank, num_experts):
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=False
        )
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(topk_idx)
        ctx.mark_non_differentiable(recv_count)
        return recv_x, recv_count, handle

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_recv_x, *_unused):
        (topk_idx,) = ctx.saved_tensors
        buffer, handle = ctx.buffer, ctx.handle

        def combine_fn(x, idx, weights):
            return buffer.low_latency_combine(x, idx, weights, handle)[0]

        return low_latency_dispatch_grads(combine_fn, grad_recv_x, topk_idx), None, None, None, None


def low_latency_dispatch(
    buffer, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, LowLatencyHandle]:
    """Differentiable BF16 `buffer.low_latency_dispatch` (use_fp8=False). Returns (recv_x [L, R*M, H] bf16,
    recv_count [L] int32, handle); the gradient of x sums the gradients of the rows its token landed in."""
    recv_x, recv_count, handle = _LowLatencyDispatch.apply(
        x, buffer, topk_idx, num_max_dispatch_tokens_per_rank, num_experts
    )
    return recv_x, recv_count, handle


class _LowLatencyCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx, handle):
        combined_x, _, _ = buffer.low_latency_combine(x, topk_idx, topk_weights, handle)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(x, topk_idx, topk_weights)
        return combined_x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_combined_x):
        x, topk_idx, topk_weights = ctx.saved_tensors
        buffer, handle = ctx.buffer, LowLatencyHandle(*ctx.handle)
        m, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.num_experts

        def dispatch_fn(rows):
            recv_x, _, recv_handle, _, _ = buffer.low_latency_dispatch(
                rows, topk_idx, m, num_experts, use_fp8=False
            )
            return recv_x, recv_handle

        def combine_fn(rows, idx, weights):
            return buffer.low_latency_combine(rows, idx, weights, handle)[0]

        grad_x, grad_topk_weights = low_latency_combine_grads(
            dispatch_fn,
            combine_fn,
            grad_combined_x,
            x,
            topk_idx,
            topk_weights,
            handle,
            buffer.rank,
            buffer.group_size,
            ctx.needs_input_grad[1],
        )
        return grad_x, grad_topk_weights, None, None, None


def low_latency_combine(
    buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: LowLatencyHandle
) -> torch.Tensor:
    """Differentiable `buffer.low_latency_combine` (BF16 rows x [L, R*M, H], float32 topk_weights [T, k]):
    returns combined_x [T, H] bf16. `topk_idx` must be the one the handle's dispatch used.

    Its backward makes two BF16 low-latency dispatches with topk_idx (the output's gradient; each token's
    weights and expert ids) and, when topk_weights need a gradient, one low-latency combine.
    """
    return _LowLatencyCombine.apply(x, topk_weights, buffer, topk_idx, handle)


__all__ = [
    "DispatchOutput",
    "dispatch",
    "combine",
    "low_latency_dispatch",
    "low_latency_combine",
    "dispatch_grads",
    "combine_grads",
    "low_latency_dispatch_grads",
    "low_latency_combine_grads",
]
