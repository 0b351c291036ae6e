"""deep_ep driven the way torchtitan drives DeepEP V1 (its torchtitan/distributed/deepep package), checked
against a dense single-process computation of the same MoE layer.

What torchtitan does, as read from its public source (the code below is ours, written from this description):
- One Buffer per process, `Buffer(group, num_nvl_bytes, num_rdma_bytes)`, sized by the larger of
  `Buffer.get_dispatch_config(n)` and `Buffer.get_combine_config(n)`'s `get_nvl_buffer_size_hint` /
  `get_rdma_buffer_size_hint` for `hidden * max(element_size, 2)` bytes, and made again when the group changes
  or it is too small (it reads `buffer.group`, `buffer.num_nvl_bytes`, `buffer.num_rdma_bytes`).
- `get_dispatch_layout(topk_idx=, num_experts=)` before the dispatch, hidden from activation checkpointing's
  dispatch mode (`_disable_current_modes`).
- Dispatch and combine are custom ops (`torch.library.Library(ns, "DEF")`, a schema, a device impl, and
  `torch.library.register_autograd`). Dispatch calls `buffer.dispatch(x=, topk_idx=, topk_weights=float32,
  the layout tensors, previous_event=EventOverlap(EventHandle()), async_finish=True,
  allocate_on_comm_stream=True)` and waits on its event; it returns the received rows, local expert ids and
  scores, the per-expert counts as a CPU int32 tensor, and a CPU int64 `handle_id`: the handle itself waits
  in a process-wide cache. Combine (`buffer.combine(x=, handle=, previous_event=..., async_finish=True,
  allocate_on_comm_stream=True)`) leaves its event pending: `sync_combine()` (`torch.compiler.disable`d) waits
  on it after the shared experts ran. The autograd setup contexts take the handle from the cache (combine's
  removes it; under `torch.inference_mode` combine removes it itself); dispatch's backward is
  `combine(topk_weights=grad.float())`, combine's a dispatch with `handle=` and every layout argument None.
- The MoE forward: slots whose score is 0 are routed nowhere (-1), received (row, local expert) pairs are
  expanded in expert order for the grouped experts, scores are applied before or after the experts, the
  expert rows are summed back per received row, combined, and added to the shared experts' output.
- Selective activation checkpointing saves the two ops' outputs (MUST_SAVE), so recomputation communicates
  nothing; torch.compile wraps the dense parts (the experts with a dynamic row count, the shared experts;
  fullgraph) while dispatch and combine stay eager.

Each rank checks its output and the gradients of its x, scores, local experts and shared expert against
float64 autograd of the dense layer. Inputs are small integers and halves, so every value on the way is exact
in BF16: results are compared exactly. CPU (CI): the reference backend over gloo, 2 and 4 ranks; the same rank
functions run on the CUDA backend in the variants marked `gpu`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from deep_ep import Buffer
from deep_ep.utils import EventHandle, EventOverlap

HIDDEN = 64
TOPK = 3
EXPERTS_PER_RANK = 4
TOKENS = {2: [13, 6], 4: [9, 12, 0, 5]}

# ---------------------------------------------------------------------------------------------------------
# The framework side: one Buffer, a handle cache and two custom ops (module level: runs in the rank processes)
# ---------------------------------------------------------------------------------------------------------


class _Comm:
    """Process-wide state, as torchtitan keeps it in module globals."""

    buffer: Optional[Buffer] = None
    backend: Optional[str] = None
    handles: dict = {}
    last_handle_id = 0
    pending_combine: Optional[EventOverlap] = None


def _hidden_bytes(x: torch.Tensor) -> int:
    return x.size(1) * max(x.element_size(), 2)


def get_buffer(group, hidden_bytes: int, backend: str) -> Buffer:
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    buffer = _Comm.buffer
    if (
        buffer is None
        or _Comm.backend != backend  # ours: the rank processes run both backends' tests
        or buffer.group != group
        or buffer.num_nvl_bytes < num_nvl_bytes
        or buffer.num_rdma_bytes < num_rdma_bytes
    ):
        # `backend=` is our keyword (the default, "auto", picks CUDA where it runs): the CPU tests name it.
        _Comm.buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes, backend=backend)
        _Comm.backend = backend
    return _Comm.buffer


def _fresh_event() -> EventOverlap:
    return EventOverlap(EventHandle())


_LIB = torch.library.Library("titan_deepep", "DEF")
_LIB.define(
    "dispatch(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor num_tokens_per_rank, "
    "Tensor? num_tokens_per_rdma_rank, Tensor is_token_in_rank, Tensor num_tokens_per_expert) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define("combine(Tensor x, Tensor handle_id) -> Tensor")


def _dispatch_impl(
    x,
    topk_idx,
    topk_weights,
    num_tokens_per_rank,
    num_tokens_per_rdma_rank,
    is_token_in_rank,
    num_tokens_per_expert,
):
    recv_x, recv_topk_idx, recv_scores, num_recv_tokens_per_expert, handle, after = _Comm.buffer.dispatch(
        x=x,
        topk_idx=topk_idx,
        topk_weights=topk_weights.to(torch.float32),
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        previous_event=_fresh_event(),
        async_finish=True,
        allocate_on_comm_stream=True,
    )
    after.current_stream_wait()
    _Comm.last_handle_id += 1
    handle_id = torch.tensor([_Comm.last_handle_id], dtype=torch.int64)  # on the CPU: no device sync
    _Comm.handles[_Comm.last_handle_id] = handle
    counts = torch.tensor(num_recv_tokens_per_expert, dtype=torch.int32)
    return recv_x, recv_topk_idx, recv_scores, counts, handle_id


def _dispatch_setup_context(ctx, inputs, output):
    ctx.x_dtype = inputs[0].dtype
    ctx.handle = _Comm.handles.get(int(output[4].item()))


def _dispatch_backward(ctx, grad_recv_x, _grad_idx, grad_recv_scores, _grad_counts, _grad_handle_id):
    if grad_recv_x is None:
        return (None,) * 7
    grad_x, grad_scores, after = _Comm.buffer.combine(
        x=grad_recv_x,
        handle=ctx.handle,
        topk_weights=None if grad_recv_scores is None else grad_recv_scores.float(),
        previous_event=_fresh_event(),
        async_finish=True,
        allocate_on_comm_stream=True,
    )
    after.current_stream_wait()
    grad_scores = None if grad_scores is None else grad_scores.to(ctx.x_dtype)
    return grad_x.to(ctx.x_dtype), None, grad_scores, None, None, None, None


def _combine_impl(x, handle_id):
    key = int(handle_id.item())
    # Without autograd (inference mode) no setup context runs to take the handle: combine takes it.
    handle = _Comm.handles.pop(key) if torch.is_inference_mode_enabled() else _Comm.handles[key]
    combined, _, after = _Comm.buffer.combine(
        x=x, handle=handle, previous_event=_fresh_event(), async_finish=True, allocate_on_comm_stream=True
    )
    _Comm.pending_combine = after  # waited on by sync_combine(), after the shared experts
    return combined


def _combine_setup_context(ctx, inputs, output):
    ctx.handle = _Comm.handles.pop(int(inputs[1].item()), None)


def _combine_backward(ctx, grad_combined):
    grad_x, _, _, _, _, after = _Comm.buffer.dispatch(
        x=grad_combined,
        topk_idx=None,
        topk_weights=None,
        num_tokens_per_rank=None,
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=None,
        num_tokens_per_expert=None,
        handle=ctx.handle,
        previous_event=_fresh_event(),
        async_finish=True,
        allocate_on_comm_stream=True,
    )
    after.current_stream_wait()
    return grad_x, None


for _device_key in ("CPU", "CUDA"):  # torchtitan registers CUDA only; the reference backend runs on the CPU
    _LIB.impl("dispatch", _dispatch_impl, _device_key)
    _LIB.impl("combine", _combine_impl, _device_key)
torch.library.register_autograd(
    "titan_deepep::dispatch", _dispatch_backward, setup_context=_dispatch_setup_context
)
torch.library.register_autograd(
    "titan_deepep::combine", _combine_backward, setup_context=_combine_setup_context
)
COMM_OPS = (torch.ops.titan_deepep.dispatch.default, torch.ops.titan_deepep.combine.default)


@torch.compiler.disable()
def sync_combine() -> None:
    if _Comm.pending_combine is not None:
        _Comm.pending_combine.current_stream_wait()
        _Comm.pending_combine = None


# ---------------------------------------------------------------------------------------------------------
# The MoE layer around the ops
# ---------------------------------------------------------------------------------------------------------


class DispatchState(NamedTuple):
    handle_id: torch.Tensor
    rows: torch.Tensor  # received row of each expanded (row, local expert) pair, in expert order
    num_recv_rows: int
    scores: Optional[torch.Tensor]  # the pairs' scores when applied after the experts


def dispatch_tokens(x, selected_experts, top_scores, num_experts, group, score_before_experts, backend):
    """-> (expert-major rows for the grouped experts, rows per local expert, state for combine_tokens)."""
    selected_experts = selected_experts.contiguous().masked_fill(top_scores == 0, -1)
    top_scores = top_scores.contiguous().float()
    with _disable_current_modes():  # set-up and layout stay out of activation checkpointing's bookkeeping
        buffer = get_buffer(group, _hidden_bytes(x), backend)
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = (
            buffer.get_dispatch_layout(topk_idx=selected_experts, num_experts=num_experts)
        )
    recv_x, recv_local_experts, recv_scores, tokens_per_expert, handle_id = torch.ops.titan_deepep.dispatch(
        x,
        selected_experts,
        top_scores,
        num_tokens_per_rank,
        num_tokens_per_rdma_rank,
        is_token_in_rank,
        num_tokens_per_expert,
    )
    rows, slots = (recv_local_experts >= 0).nonzero(as_tuple=True)
    order = torch.sort(recv_local_experts[rows, slots], stable=True).indices
    rows, slots = rows[order], slots[order]
    expert_rows = recv_x.index_select(0, rows)
    scores = recv_scores[rows, slots]
    if score_before_experts:
        expert_rows = expert_rows * scores.to(expert_rows.dtype).unsqueeze(1)
        scores = None
    state = DispatchState(handle_id, rows, recv_x.size(0), scores)
    return expert_rows, tokens_per_expert.to(x.device), state


def combine_tokens(expert_out, state: DispatchState):
    if state.scores is not None:
        expert_out = expert_out * state.scores.to(expert_out.dtype).unsqueeze(1)
    summed = expert_out.new_zeros(state.num_recv_rows, expert_out.size(1)).index_add(
        0, state.rows, expert_out
    )
    return torch.ops.titan_deepep.combine(summed, state.handle_id)


def run_experts(expert_weights, rows, tokens_per_expert):
    """The grouped experts: rows [N, H] in expert order, tokens_per_expert [L] of them per local expert."""
    experts = torch.arange(expert_weights.size(0), device=rows.device)
    expert_of_row = torch.repeat_interleave(experts, tokens_per_expert.long(), output_size=rows.size(0))
    return torch.bmm(rows.float().unsqueeze(1), expert_weights[expert_of_row]).squeeze(1).to(rows.dtype)


def shared_expert(x, weight):
    return (x.float() @ weight).to(x.dtype)


def moe_layer(x, top_scores, selected_experts, expert_weights, shared_weight, options):
    routed_in, tokens_per_expert, state = dispatch_tokens(
        x,
        selected_experts,
        top_scores,
        options.num_experts,
        options.group,
        options.score_before_experts,
        options.backend,
    )
    routed = combine_tokens(options.experts_fn(expert_weights, routed_in, tokens_per_expert), state)
    shared = options.shared_fn(x, shared_weight)  # runs while the combine may still be in flight
    sync_combine()
    return shared + routed


class LayerOptions(NamedTuple):
    group: object
    num_experts: int
    score_before_experts: bool
    backend: str
    experts_fn: object = run_experts
    shared_fn: object = shared_expert


# ---------------------------------------------------------------------------------------------------------
# Inputs and the dense layer (every rank computes all of it from the seed)
# ---------------------------------------------------------------------------------------------------------


def _signed_permutations(gen, count, size) -> torch.Tensor:
    """`count` sums of two signed permutation matrices [size, size]: at most 2 non-zero entries (of -2..2) a
    row and a column, so every sum on the way through the layer is a small multiple of 1/2: exact in BF16."""
    out = torch.zeros(count, size, size)
    for e in range(count):
        for _ in range(2):
            perm = torch.randperm(size, generator=gen)
            signs = torch.randint(0, 2, (size,), generator=gen).float() * 2 - 1
            out[e, torch.arange(size), perm] += signs
    return out


def make_problem(num_ranks, tokens, seed):
    """All ranks' (x, selected experts, scores, loss gradient), the experts and each rank's shared expert."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = EXPERTS_PER_RANK * num_ranks
    ranks = []
    for t in tokens:
        x = torch.randint(-1, 2, (t, HIDDEN), generator=gen).to(torch.bfloat16)
        selected = torch.rand(t, num_experts, generator=gen).topk(TOPK, dim=1).indices
        scores = torch.randint(1, 3, (t, TOPK), generator=gen).float() / 2  # halves: 0.5 or 1
        scores[torch.rand(t, TOPK, generator=gen) < 0.15] = 0.0  # routed nowhere (torchtitan masks score 0)
        grad = torch.randint(-1, 2, (t, HIDDEN), generator=gen).to(torch.bfloat16)
        ranks.append((x, selected, scores, grad))
    experts = _signed_permutations(gen, num_experts, HIDDEN)
    shared = _signed_permutations(gen, num_ranks, HIDDEN)
    return ranks, experts, shared


def dense_layer(ranks, experts, shared):
    """Per rank (output, grad x, grad scores, grad shared weight) and grad of all experts, in float64."""
    w = experts.double().requires_grad_()
    per_rank, loss = [], 0.0
    for r, (x, selected, scores, grad) in enumerate(ranks):
        xd, sd = x.detach().double().requires_grad_(), scores.detach().double().requires_grad_()
        shared_w = shared[r].double().requires_grad_()
        routed = (selected >= 0) & (scores != 0)
        per_slot = torch.einsum("th,tkhg->tkg", xd, w[selected])  # x @ W[expert] for every slot
        out = xd @ shared_w + (torch.where(routed, sd, 0.0).unsqueeze(2) * per_slot).sum(1)
        loss = loss + (out * grad.double()).sum()
        per_rank.append((out, xd, sd, shared_w))
    loss.backward()
    return [(out.detach(), xd.grad, sd.grad, sw.grad) for out, xd, sd, sw in per_rank], w.grad


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _check_exact(rank, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got is not None, f"rank {rank}: no {what}"
    assert got.shape == want.shape, f"rank {rank}: {what} shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = got.detach().cpu().double() != want
    assert not bool(bad.any()), f"rank {rank}: {what}: {int(bad.sum())} of {bad.numel()} values differ"


def _count_comm_calls(buffer: Buffer) -> dict:
    """Counts the Buffer's dispatch and combine calls (instance attributes shadow the methods)."""
    counts = {"dispatch": 0, "combine": 0}
    for name in counts:
        method = getattr(type(buffer), name).__get__(buffer)

        def counted(*args, _method=method, _name=name, **kwargs):
            counts[_name] += 1
            return _method(*args, **kwargs)

        setattr(buffer, name, counted)
    return counts


def _uncount_comm_calls(buffer: Buffer) -> None:
    for name in ("dispatch", "combine"):
        buffer.__dict__.pop(name, None)


# ---------------------------------------------------------------------------------------------------------
# Rank functions
# ---------------------------------------------------------------------------------------------------------


def _compiled_dense_parts(compile_backend: str):
    """torchtitan's apply_compile for MoE blocks: the experts' grouped matmul compiled with a dynamic row
    count, the shared experts compiled as a module of their own; dispatch and combine are not compiled."""
    compiled_experts = torch.compile(run_experts, backend=compile_backend, fullgraph=True)

    def experts_with_dynamic_rows(expert_weights, rows, tokens_per_expert):
        torch._dynamo.mark_dynamic(rows, 0)
        return compiled_experts(expert_weights, rows, tokens_per_expert)

    return experts_with_dynamic_rows, torch.compile(shared_expert, backend=compile_backend, fullgraph=True)


def rank_titan_moe(
    rank, num_ranks, group, backend, mode, score_before_experts, seed, compile_backend="aot_eager"
):
    """One MoE layer, forward and backward (or forward only, in inference mode), checked against the dense
    layer; returns the Buffer's dispatch/combine call counts."""
    device = _device()
    tokens = TOKENS[num_ranks]
    ranks, experts, shared = make_problem(num_ranks, tokens, seed)
    x, selected, scores, grad = (t.to(device, copy=True) for t in ranks[rank])
    local = slice(rank * EXPERTS_PER_RANK, (rank + 1) * EXPERTS_PER_RANK)
    x = x.requires_grad_()
    scores = scores.requires_grad_()
    expert_weights = experts[local].to(device).requires_grad_()
    shared_weight = shared[rank].to(device).requires_grad_()
    options = LayerOptions(group, EXPERTS_PER_RANK * num_ranks, score_before_experts, backend)
    if mode == "compiled":
        experts_fn, shared_fn = _compiled_dense_parts(compile_backend)
        options = options._replace(experts_fn=experts_fn, shared_fn=shared_fn)
    buffer = get_buffer(group, _hidden_bytes(x), backend)
    counts = _count_comm_calls(buffer)
    try:
        args = (x, scores, selected, expert_weights, shared_weight, options)
        if mode == "inference":
            with torch.inference_mode():
                out = moe_layer(*args)
        elif mode == "checkpointed":

            def policy(ctx, op, *op_args, **op_kwargs):
                return CheckpointPolicy.MUST_SAVE if op in COMM_OPS else CheckpointPolicy.PREFER_RECOMPUTE

            context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
            out = checkpoint(moe_layer, *args, use_reentrant=False, context_fn=context_fn)
            (out.float() * grad.float()).sum().backward()
        else:
            # torchtitan sets capture_scalar_outputs for token-choice MoE; patched here to stay local.
            with torch._dynamo.config.patch(capture_scalar_outputs=mode == "compiled"):
                out = moe_layer(*args)
                (out.float() * grad.float()).sum().backward()
    finally:
        _uncount_comm_calls(buffer)
    assert not _Comm.handles, f"rank {rank}: handles left in the cache: {sorted(_Comm.handles)}"
    assert _Comm.pending_combine is None, f"rank {rank}: a combine event was never waited on"

    dense, dense_expert_grads = dense_layer(ranks, experts, shared)
    want_out, want_grad_x, want_grad_scores, want_grad_shared = dense[rank]
    assert out.dtype == torch.bfloat16, f"rank {rank}: output dtype {out.dtype}"
    _check_exact(rank, out, want_out, "output")
    if mode != "inference":
        _check_exact(rank, x.grad, want_grad_x, "grad of x")
        _check_exact(rank, scores.grad, want_grad_scores, "grad of the scores")
        _check_exact(rank, expert_weights.grad, dense_expert_grads[local], "grad of the local experts")
        _check_exact(rank, shared_weight.grad, want_grad_shared, "grad of the shared expert")
    return counts


# Buffer calls per layer: forward dispatch + combine, backward a combine (of dispatch) and a cached dispatch
# (of combine); recomputation under selective checkpointing adds none.
TRAINING_CALLS = {"dispatch": 2, "combine": 2}
INFERENCE_CALLS = {"dispatch": 1, "combine": 1}

CASES = {  # name: (num_ranks, mode, score_before_experts)
    "2ranks_scores_before": (2, "eager", True),
    "2ranks_scores_after": (2, "eager", False),
    "4ranks_scores_before": (4, "eager", True),
    "2ranks_selective_checkpointing": (2, "checkpointed", True),
    "4ranks_selective_checkpointing": (4, "checkpointed", False),
    "2ranks_compiled_dense_parts": (2, "compiled", True),
    "2ranks_inference_mode": (2, "inference", True),
    "4ranks_inference_mode": (4, "inference", False),
}


def _run_case(rank_pool, backend, case, compile_backend="aot_eager"):
    num_ranks, mode, score_before = CASES[case]
    counts = rank_pool(num_ranks).run(
        rank_titan_moe, backend, mode, score_before, len(case), compile_backend=compile_backend
    )
    expected = INFERENCE_CALLS if mode == "inference" else TRAINING_CALLS
    assert all(c == expected for c in counts), f"Buffer calls per rank: {counts}, expected {expected}"


@pytest.mark.parametrize("case", list(CASES))
def test_torchtitan_style_moe_layer(rank_pool, case):
    _run_case(rank_pool, "reference", case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_torchtitan_style_moe_layer(rank_pool, case):
    _run_case(rank_pool, "cuda", case, compile_backend="inductor")
