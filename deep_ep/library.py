"""`torch.library` custom ops for dispatch and combine: torch.compile graphs can hold them, and autograd
flows through them with the rules of deep_ep.autograd.

    buffer = deep_ep.Buffer(group, num_nvl_bytes)
    @torch.compile
    def layer(x, topk_idx, topk_weights):
        recv = deep_ep.library.dispatch(buffer, x, topk_idx, topk_weights, num_experts, num_worst_tokens=n)
        out = experts(recv.recv_x, recv.recv_topk_idx, recv.recv_topk_weights)
        return deep_ep.library.combine(buffer, out, recv.handle)[0]

The ops live in the `deep_ep` namespace (torch.ops.deep_ep.*). A Buffer cannot be an op argument, so each
op takes the Buffer's `op_key` (`buffer_key(buffer)`; deep_ep.buffer keeps weak references to live
Buffers by it) and handles cross as their tensors. Every op has a fake implementation that gives its
output shapes without communicating:
- `get_dispatch_layout`: [R], [E], [T, R];
- `dispatch`: N rows = `num_worst_tokens` when given (no host synchronisation, the graph has static
  shapes), else a data-dependent size (the fresh dispatch waits for the receive counts, as in eager);
  `internode_dispatch`, its twin for an inter-node Buffer (the wrappers pick it from the Buffer's key),
  returns the 10-element inter-node handle's tensors, the forward map's rows data-dependent;
- `cached_dispatch`: as many rows as the handle's dispatch received; `combine`: the handle's T tokens
  (both take either handle: 6 tensors intra-node, 10 inter-node);
- `low_latency_dispatch` / `low_latency_combine`: [L, R*M, H] and [T, H], from num_max_dispatch_tokens_per_rank,
  num_experts and the Buffer's rank count.
Gradients: dispatch <-> combine, cached_dispatch <-> combine, low_latency_dispatch <-> low_latency_combine.
Ops take BF16 x; low-latency ops are BF16 (use_fp8=False).

The Python functions below (`dispatch`, `combine`, `low_latency_dispatch`, `low_latency_combine`) call the
ops and rebuild the handles; they take the Buffer or its key.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .autograd import combine_grads, dispatch_grads, low_latency_combine_grads, low_latency_dispatch_grads
from .buffer import INTERNODE_KEY_SUFFIX, buffer_by_op_key
from .handles import InternodeHandle, IntranodeHandle, LowLatencyHandle

# Both backends keep one column in the handle's channel prefix matrices (deep_ep/handles.py); the fake
# implementation of dispatch says so, and the GPU opcheck test compares it with the kernels' handle.
HANDLE_CHANNEL_COLUMNS = 1

# ---------------------------------------------------------------------------------------------------------
# Buffers cross the ops as their op_key (deep_ep.buffer: a process-unique string)
# ---------------------------------------------------------------------------------------------------------


def buffer_key(buffer) -> str:
    """The string that stands for `buffer` in the ops (`buffer.op_key`). A string passes through. A string,
    not an int: torch.compile turns an int argument that changes between calls (another Buffer) into a
    symbolic one, which could not name a Buffer; a string stays a constant of each graph."""
    return buffer if isinstance(buffer, str) else buffer.op_key


def buffer_of(key: str):
    """The live Buffer whose op_key is `key`."""
    return buffer_by_op_key(key)


def is_internode(buffer) -> bool:
    """Whether `buffer` (a Buffer or its key) is inter-node: read from the key, a constant under
    torch.compile, so the wrappers pick the dispatch op while tracing."""
    return buffer_key(buffer).endswith(INTERNODE_KEY_SUFFIX)


def _num_ranks(key: str) -> int:
    return buffer_of(key).group_size


def _as_handle(handle) -> Union[IntranodeHandle, InternodeHandle]:
    """A normal-mode handle's tensors as their NamedTuple: 6 intra-node ones, 10 inter-node ones."""
    return (
        InternodeHandle(*handle) if len(handle) == len(InternodeHandle._fields) else IntranodeHandle(*handle)
    )


def _received_rows(handle) -> int:
    h = _as_handle(handle)
    return (h.recv_src_meta if isinstance(h, InternodeHandle) else h.recv_src_idx).size(0)


# ---------------------------------------------------------------------------------------------------------
# Normal mode
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("deep_ep::get_dispatch_layout", mutates_args=())
def _get_dispatch_layout(
    buffer: str, topk_idx: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R])."""
    per_rank, _, per_expert, in_rank, _ = buffer_of(buffer).get_dispatch_layout(topk_idx, num_experts)
    # The CUDA backend carves the three from one allocation, but an op's outputs must not alias each other
    # and must start where the fake ones do (storage offset 0).
    return per_rank.clone(), per_expert.clone(), in_rank.clone()


@_get_dispatch_layout.register_fake
def _(buffer, topk_idx, num_experts):
    r = _num_ranks(buffer)
    return (
        topk_idx.new_empty(r, dtype=torch.int32),
        topk_idx.new_empty(num_experts, dtype=torch.int32),
        topk_idx.new_empty(topk_idx.size(0), r, dtype=torch.bool),
    )


# The dispatch op returns the handle's tensors after recv_x, recv_topk_idx, recv_topk_weights, except
# is_token_in_rank, which is an input (an op output must not alias an input): the wrappers rebuild it.
_HANDLE_OUTPUTS = (
    "rank_prefix_matrix",
    "channel_prefix_matrix",
    "recv_channel_prefix_matrix",
    "recv_src_idx",
    "send_head",
)


# The inter-node dispatch op likewise returns InternodeHandle's elements but the first, is_token_in_rank.
_INTERNODE_HANDLE_OUTPUTS = InternodeHandle._fields[1:]


def _handle_from_outputs(outputs, is_token_in_rank: torch.Tensor) -> Union[IntranodeHandle, InternodeHandle]:
    if len(outputs) == len(_INTERNODE_HANDLE_OUTPUTS):
        return InternodeHandle(is_token_in_rank, *outputs)
    return IntranodeHandle(is_token_in_rank=is_token_in_rank, **dict(zip(_HANDLE_OUTPUTS, outputs)))


def _dispatch_outputs(
    buffer,
    x,
    topk_idx,
    topk_weights,
    num_tokens_per_rank,
    is_token_in_rank,
    num_tokens_per_expert,
    expert_alignment,
    num_worst_tokens,
    handle_type,
    handle_fields,
) -> tuple:
    """The body of both dispatch ops: the Buffer's dispatch, returned as (recv_x, recv_topk_idx,
    recv_topk_weights, then the handle's `handle_fields`)."""  # fmt: skip
    recv_x, recv_topk_idx, recv_topk_weights, _, handle, _ = buffer_of(buffer).dispatch(
        x,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        expert_alignment=expert_alignment,
        num_worst_tokens=num_worst_tokens,
    )
    # The CUDA backend carves a call's outputs out of one allocation (csrc/runtime/output_tensors.hpp), but
    # the outputs of an op must not alias each other: recv_x keeps the allocation, the small ones are copied.
    handle = handle_type(*handle)
    small = (recv_topk_idx, recv_topk_weights, *(getattr(handle, f) for f in handle_fields))
    return (recv_x, *(t.clone() for t in small))


@torch.library.custom_op("deep_ep::dispatch", mutates_args=())
def _dispatch(
    buffer: str,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_tokens_per_rank: torch.Tensor,
    is_token_in_rank: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    expert_alignment: int,
    num_worst_tokens: int,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """(recv_x, recv_topk_idx, recv_topk_weights, then the handle's rank_prefix_matrix, channel_prefix_matrix,
    recv_channel_prefix_matrix, recv_src_idx, send_head)."""
    return _dispatch_outputs(
        buffer, x, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
        expert_alignment, num_worst_tokens, IntranodeHandle, _HANDLE_OUTPUTS,
    )  # fmt: skip


@_dispatch.register_fake
def _(
    buffer,
    x,
    topk_idx,
    topk_weights,
    num_tokens_per_rank,
    is_token_in_rank,
    num_tokens_per_expert,
    expert_alignment,
    num_worst_tokens,
):
    r, (num_tokens, hidden), num_topk = _num_ranks(buffer), x.shape, topk_idx.size(1)
    n = num_worst_tokens if num_worst_tokens > 0 else torch.library.get_ctx().new_dynamic_size()
    int32 = torch.int32
    return (
        x.new_empty(n, hidden),
        topk_idx.new_empty(n, num_topk, dtype=torch.int64),
        topk_weights.new_empty(n, num_topk),
        x.new_empty(r, r, dtype=int32),
        x.new_empty(r, HANDLE_CHANNEL_COLUMNS, dtype=int32),
        x.new_empty(r, HANDLE_CHANNEL_COLUMNS, dtype=int32),
        x.new_empty(n, dtype=int32),
        x.new_empty(num_tokens, r, dtype=int32),
    )


def _setup_dispatch(ctx, inputs, output):
    ctx.buffer = inputs[0]
    ctx.save_for_backward(inputs[5], output[1], *output[3:])  # is_token_in_rank, recv_topk_idx, handle


def _backward_dispatch(ctx, grad_recv_x, _grad_recv_topk_idx, grad_recv_topk_weights, *_grad_handle):
    is_token_in_rank, recv_topk_idx, *handle_outputs = ctx.saved_tensors
    handle = list(_handle_from_outputs(handle_outputs, is_token_in_rank))

    def combine_fn(x, topk_weights):
        return torch.ops.deep_ep.combine(ctx.buffer, x, handle, topk_weights)

    weights_grad = grad_recv_topk_weights if ctx.needs_input_grad[3] else None
    grad_x, grad_topk_weights = dispatch_grads(combine_fn, grad_recv_x, weights_grad, recv_topk_idx)
    return (
        None,
        grad_x,
        None,
        grad_topk_weights if weights_grad is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


_dispatch.register_autograd(_backward_dispatch, setup_context=_setup_dispatch)


@torch.library.custom_op("deep_ep::internode_dispatch", mutates_args=())
def _internode_dispatch(
    buffer: str,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_tokens_per_rank: torch.Tensor,
    is_token_in_rank: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    expert_alignment: int,
    num_worst_tokens: int,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """`dispatch` on an inter-node Buffer: (recv_x, recv_topk_idx, recv_topk_weights, then InternodeHandle's
    elements after is_token_in_rank). num_tokens_per_rdma_rank is counted by the op itself."""
    return _dispatch_outputs(
        buffer, x, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
        expert_alignment, num_worst_tokens, InternodeHandle, _INTERNODE_HANDLE_OUTPUTS,
    )  # fmt: skip


@_internode_dispatch.register_fake
def _(
    buffer,
    x,
    topk_idx,
    topk_weights,
    num_tokens_per_rank,
    is_token_in_rank,
    num_tokens_per_expert,
    expert_alignment,
    num_worst_tokens,
):
    r, (num_tokens, hidden), num_topk = _num_ranks(buffer), x.shape, topk_idx.size(1)
    num_nvl_ranks = buffer_of(buffer).num_nvl_ranks
    num_nodes = r // num_nvl_ranks
    ctx = torch.library.get_ctx()
    n = num_worst_tokens if num_worst_tokens > 0 else ctx.new_dynamic_size()
    forwarded = ctx.new_dynamic_size()  # the rows this rank lands for its node: known after the exchange
    int32 = torch.int32
    return (
        x.new_empty(n, hidden),
        topk_idx.new_empty(n, num_topk, dtype=torch.int64),
        topk_weights.new_empty(n, num_topk),
        x.new_empty(r, num_nodes, dtype=int32),
        x.new_empty(r, r, dtype=int32),
        x.new_empty(num_nodes + 1, dtype=int32),
        x.new_empty(forwarded, num_nvl_ranks, dtype=int32),
        x.new_empty(r, dtype=int32),
        x.new_empty(r, dtype=int32),
        x.new_empty(n, dtype=int32),
        x.new_empty(num_tokens, num_nodes, dtype=int32),
        x.new_empty(num_tokens, r, dtype=int32),
    )


# Same inputs, and the handle after the same three outputs: the intra-node op's autograd rule serves.
_internode_dispatch.register_autograd(_backward_dispatch, setup_context=_setup_dispatch)


@torch.library.custom_op("deep_ep::cached_dispatch", mutates_args=())
def _cached_dispatch(buffer: str, x: torch.Tensor, handle: list[torch.Tensor]) -> torch.Tensor:
    """recv_x of a dispatch with `handle=` (the handle's tensors in IntranodeHandle or InternodeHandle order)."""
    return buffer_of(buffer).dispatch(x, handle=tuple(handle))[0]


@_cached_dispatch.register_fake
def _(buffer, x, handle):
    return x.new_empty(_received_rows(handle), x.size(1))


def _setup_cached_dispatch(ctx, inputs, output):
    ctx.buffer = inputs[0]
    ctx.save_for_backward(*inputs[2])


def _backward_cached_dispatch(ctx, grad_recv_x):
    handle = list(ctx.saved_tensors)
    grad_x, _ = dispatch_grads(
        lambda x, _: torch.ops.deep_ep.combine(ctx.buffer, x, handle, None), grad_recv_x, None, None
    )
    return None, grad_x, [None] * len(handle)


_cached_dispatch.register_autograd(_backward_cached_dispatch, setup_context=_setup_cached_dispatch)


@torch.library.custom_op("deep_ep::combine", mutates_args=())
def _combine(
    buffer: str, x: torch.Tensor, handle: list[torch.Tensor], topk_weights: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(combined_x, combined_topk_weights); without topk_weights the second is an empty [T, 0] float32."""
    combined_x, combined_topk_weights, _ = buffer_of(buffer).combine(
        x, tuple(handle), topk_weights=topk_weights
    )
    if combined_topk_weights is None:
        return combined_x, x.new_empty(combined_x.size(0), 0, dtype=torch.float32)
    return combined_x, combined_topk_weights.clone()  # one allocation with combined_x (see dispatch)


@_combine.register_fake
def _(buffer, x, handle, topk_weights):
    num_tokens = _as_handle(handle).is_token_in_rank.size(0)
    num_topk = 0 if topk_weights is None else topk_weights.size(1)
    return x.new_empty(num_tokens, x.size(1)), x.new_empty(num_tokens, num_topk, dtype=torch.float32)


def _setup_combine(ctx, inputs, output):
    ctx.buffer = inputs[0]
    ctx.save_for_backward(*inputs[2])


def _backward_combine(ctx, grad_combined_x, grad_combined_topk_weights):
    handle = list(ctx.saved_tensors)

    def cached_dispatch_fn(x):
        return torch.ops.deep_ep.cached_dispatch(ctx.buffer, x, handle)

    weights_grad = grad_combined_topk_weights if ctx.needs_input_grad[3] else None
    grad_x, grad_topk_weights = combine_grads(cached_dispatch_fn, grad_combined_x, weights_grad)
    return None, grad_x, [None] * len(handle), grad_topk_weights


_combine.register_autograd(_backward_combine, setup_context=_setup_combine)


class DispatchOutput(NamedTuple):
    """What `dispatch` returns (no num_recv_tokens_per_expert_list: count recv_topk_idx instead)."""

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    handle: Union[IntranodeHandle, InternodeHandle]


def get_dispatch_layout(
    buffer, topk_idx: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank) through the op."""
    return torch.ops.deep_ep.get_dispatch_layout(buffer_key(buffer), topk_idx, num_experts)


def dispatch(
    buffer,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    *,
    num_worst_tokens: int = 0,
    expert_alignment: int = 1,
    layout: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> DispatchOutput:
    """Differentiable dispatch through the ops (layout computed by the layout op unless `layout` =
    get_dispatch_layout's triple is given). With `num_worst_tokens` the receive tensors have exactly that
    many rows (padding rows: x 0, topk_idx -1, weights 0) and nothing waits for the receive counts."""
    key = buffer_key(buffer)
    if layout is None:
        layout = torch.ops.deep_ep.get_dispatch_layout(key, topk_idx, num_experts)
    num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank = layout
    op = torch.ops.deep_ep.internode_dispatch if is_internode(key) else torch.ops.deep_ep.dispatch
    outputs = op(
        key,
        x,
        topk_idx,
        topk_weights,
        num_tokens_per_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        expert_alignment,
        num_worst_tokens,
    )
    return DispatchOutput(*outputs[:3], _handle_from_outputs(outputs[3:], is_token_in_rank))


def cached_dispatch(buffer, x: torch.Tensor, handle: Union[IntranodeHandle, InternodeHandle]) -> torch.Tensor:
    """Differentiable dispatch of x along an existing handle (its gradient: combine)."""
    return torch.ops.deep_ep.cached_dispatch(buffer_key(buffer), x, list(handle))


def combine(
    buffer,
    x: torch.Tensor,
    handle: Union[IntranodeHandle, InternodeHandle],
    topk_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Differentiable combine through the op: (combined_x, combined_topk_weights or None)."""
    combined_x, combined_topk_weights = torch.ops.deep_ep.combine(
        buffer_key(buffer), x, list(handle), topk_weights
    )
    return combined_x, None if topk_weights is None else combined_topk_weights


# ---------------------------------------------------------------------------------------------------------
# Low-latency mode (BF16)
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("deep_ep::low_latency_dispatch", mutates_args=())
def _low_latency_dispatch(
    buffer: str,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(recv_x [L, R*M, H] bf16, recv_count [L] int32, packed_recv_src_info, packed_recv_layout_range)."""
    recv_x, recv_count, handle, _, _ = buffer_of(buffer).low_latency_dispatch(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=False
    )
    return recv_x, recv_count.clone(), handle[0].clone(), handle[1].clone()  # one allocation (see dispatch)


@_low_latency_dispatch.register_fake
def _(buffer, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts):
    r = _num_ranks(buffer)
    num_local_experts, rows = num_experts // r, r * num_max_dispatch_tokens_per_rank
    return (
        x.new_empty(num_local_experts, rows, x.size(1)),
        x.new_empty(num_local_experts, dtype=torch.int32),
        x.new_empty(num_local_experts, rows, dtype=torch.int32),
        x.new_empty(num_local_experts, r, dtype=torch.int64),
    )


def _setup_low_latency_dispatch(ctx, inputs, output):
    ctx.buffer, ctx.m, ctx.num_experts = inputs[0], inputs[3], inputs[4]
    ctx.save_for_backward(inputs[2], output[2], output[3])


def _backward_low_latency_dispatch(ctx, grad_recv_x, *_unused):
    topk_idx, src_info, layout_range = ctx.saved_tensors

    def combine_fn(x, idx, weights):
        return torch.ops.deep_ep.low_latency_combine(
            ctx.buffer, x, idx, weights, src_info, layout_range, ctx.m, ctx.num_experts
        )

    return None, low_latency_dispatch_grads(combine_fn, grad_recv_x, topk_idx), None, None, None


_low_latency_dispatch.register_autograd(
    _backward_low_latency_dispatch, setup_context=_setup_low_latency_dispatch
)


@torch.library.custom_op("deep_ep::low_latency_combine", mutates_args=())
def _low_latency_combine(
    buffer: str,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    packed_recv_src_info: torch.Tensor,
    packed_recv_layout_range: torch.Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
) -> torch.Tensor:
    """combined_x [T, H] bf16."""
    handle = LowLatencyHandle(
        packed_recv_src_info,
        packed_recv_layout_range,
        num_max_dispatch_tokens_per_rank,
        x.size(2),
        num_experts,
    )
    return buffer_of(buffer).low_latency_combine(x, topk_idx, topk_weights, handle)[0]


@_low_latency_combine.register_fake
def _(buffer, x, topk_idx, topk_weights, packed_recv_src_info, packed_recv_layout_range, m, num_experts):
    return x.new_empty(topk_idx.size(0), x.size(2))


def _setup_low_latency_combine(ctx, inputs, output):
    ctx.buffer, ctx.m, ctx.num_experts = inputs[0], inputs[6], inputs[7]
    ctx.save_for_backward(*inputs[1:6])


def _backward_low_latency_combine(ctx, grad_combined_x):
    x, topk_idx, topk_weights, src_info, layout_range = ctx.saved_tensors
    handle = LowLatencyHandle(src_info, layout_range, ctx.m, x.size(2), ctx.num_experts)
    buffer = buffer_of(ctx.buffer)

    def dispatch_fn(rows):
        recv_x, _, recv_src_info, recv_layout_range = torch.ops.deep_ep.low_latency_dispatch(
            ctx.buffer, rows, topk_idx, ctx.m, ctx.num_experts
        )
        return recv_x, LowLatencyHandle(
            recv_src_info, recv_layout_range, ctx.m, rows.size(1), ctx.num_experts
        )

    def combine_fn(rows, idx, weights):
        return torch.ops.deep_ep.low_latency_combine(
            ctx.buffer, rows, idx, weights, src_info, layout_range, ctx.m, ctx.num_experts
        )

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
        ctx.needs_input_grad[3],
    )
    return None, grad_x, None, grad_topk_weights, None, None, None, None


_low_latency_combine.register_autograd(
    _backward_low_latency_combine, setup_context=_setup_low_latency_combine
)


def low_latency_dispatch(
    buffer, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, LowLatencyHandle]:
    """Differentiable BF16 low-latency dispatch through the op: (recv_x, recv_count, handle)."""
    recv_x, recv_count, src_info, layout_range = torch.ops.deep_ep.low_latency_dispatch(
        buffer_key(buffer), x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts
    )
    handle = LowLatencyHandle(
        src_info, layout_range, num_max_dispatch_tokens_per_rank, x.size(1), num_experts
    )
    return recv_x, recv_count, handle


def low_latency_combine(
    buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: LowLatencyHandle
) -> torch.Tensor:
    """Differentiable low-latency combine through the op: combined_x [T, H] bf16."""
    handle = LowLatencyHandle(*handle)
    return torch.ops.deep_ep.low_latency_combine(
        buffer_key(buffer),
        x,
        topk_idx,
        topk_weights,
        handle.packed_recv_src_info,
        handle.packed_recv_layout_range,
        handle.num_max_dispatch_tokens_per_rank,
        handle.num_experts,
    )


__all__ = [
    "DispatchOutput",
    "buffer_key",
    "buffer_of",
    "get_dispatch_layout",
    "dispatch",
    "cached_dispatch",
    "combine",
    "low_latency_dispatch",
    "low_latency_combine",
]
