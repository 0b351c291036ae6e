"""Gradients through dispatch and combine (deep_ep.autograd, and deep_ep.library's custom ops eagerly and
under torch.compile) against a dense single-process computation, over gloo with 2 and 4 ranks.

The layer: expert e scales its rows by s[e], a received row's output is sum over its local slots of
recv_topk_weights * s[expert] * recv_x, combine sums the rows back; the loss is
sum(combined_x * G) + sum(combined_topk_weights * G_w). Densely: out[t] = sum_k w[t, k] s[idx[t, k]] x[t].
Inputs are small integers (x, s, G) and quarters (weights), so every value, BF16 included, and every sum is
exact in any order: gradients are compared exactly, on the CPU and on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from oracle import low_latency_compiled

import deep_ep
import deep_ep.autograd
import deep_ep.library
from deep_ep.config import nvl_buffer_size_hint

RANK_COUNTS = (2, 4)
SEED = 17
HIDDEN = 64
LOW_LATENCY_HIDDEN = 2048  # the smallest hidden size low-latency mode supports
MODULES = {"autograd": deep_ep.autograd, "library": deep_ep.library}


# ---------------------------------------------------------------------------------------------------------
# Inputs and the dense computation (every rank computes all of it from the seed)
# ---------------------------------------------------------------------------------------------------------


def make_problem(num_ranks, tokens, hidden, num_experts, topk, seed=SEED):
    """All ranks' (x, topk_idx, topk_weights, G, G_w) and the expert scales s; some slots -1, some tokens
    routed nowhere, one repeated expert (low-latency dispatch sends those once)."""
    g = torch.Generator().manual_seed(seed)
    ranks = []
    for t in tokens:
        x = torch.randint(-2, 3, (t, hidden), generator=g).to(torch.bfloat16)
        idx = torch.rand(t, num_experts, generator=g).topk(topk, dim=1).indices
        idx[torch.rand(t, topk, generator=g) < 0.2] = -1
        if t > 1:
            idx[0, 1] = idx[0, 0]
            idx[1] = -1
        weights = torch.randint(1, 5, (t, topk), generator=g).float() / 4
        grad = torch.randint(-2, 3, (t, hidden), generator=g).float()
        grad_weights = torch.randint(-2, 3, (t, topk), generator=g).float()
        ranks.append((x, idx, weights, grad, grad_weights))
    scales = torch.randint(-2, 3, (num_experts,), generator=g).float()
    return ranks, scales


def dense_grads(ranks, scales, with_weights_loss=True):
    """Per rank (grad x, grad topk_weights) and grad s of the whole layer, in float64."""
    s = scales.double().requires_grad_()
    leaves, loss = [], 0.0
    for x, idx, weights, grad, grad_weights in ranks:
        xd, wd = x.double().requires_grad_(), weights.double().requires_grad_()
        valid = idx >= 0
        factor = torch.where(valid, wd * s[idx.clamp_min(0)], 0.0).sum(1, keepdim=True)
        loss = loss + (factor * xd * grad.double()).sum()
        if with_weights_loss:
            loss = loss + torch.where(valid, wd * grad_weights.double(), 0.0).sum()
        leaves.append((xd, wd))
    loss.backward()
    return [(xd.grad, wd.grad) for xd, wd in leaves], s.grad


def _buffer(group, num_ranks, tokens, backend, num_nvl_ranks=None):
    max_tokens = max(max(tokens), 1)
    if num_nvl_ranks is not None and num_nvl_ranks < num_ranks:  # inter-node: the RDMA buffer only
        num_rdma_bytes = deep_ep.Config().get_rdma_buffer_size_hint(
            HIDDEN * 2, num_ranks, num_nvl_ranks=num_nvl_ranks, num_max_tokens_per_rank=max_tokens
        )
        return deep_ep.Buffer(group, 0, num_rdma_bytes, backend=backend, num_nvl_ranks=num_nvl_ranks)
    num_nvl_bytes = nvl_buffer_size_hint(HIDDEN * 2, num_ranks, num_max_tokens_per_rank=max_tokens)
    return deep_ep.Buffer(group, num_nvl_bytes, backend=backend)


def _leaves(rank, ranks, scales, num_ranks, device):
    x, idx, weights, grad, grad_weights = (t.to(device, copy=True) for t in ranks[rank])
    num_local = scales.numel() // num_ranks
    local_scales = scales[rank * num_local : (rank + 1) * num_local].to(device)
    return (
        x.requires_grad_(),
        idx,
        weights.requires_grad_(),
        grad,
        grad_weights,
        local_scales.requires_grad_(),
    )


def _check(rank, dense, x, weights, local_scales):
    (want_x, want_weights), want_scales = dense[0][rank], dense[1]
    num_local = local_scales.numel()
    got = {"x": x.grad, "topk_weights": weights.grad, "s": local_scales.grad}
    want = {
        "x": want_x,
        "topk_weights": want_weights,
        "s": want_scales[rank * num_local : (rank + 1) * num_local],
    }
    for name, value in got.items():
        assert value is not None, f"rank {rank}: no gradient for {name}"
        assert torch.equal(value.cpu().double(), want[name]), f"rank {rank}: gradient of {name} differs"


# ---------------------------------------------------------------------------------------------------------
# Normal mode
# ---------------------------------------------------------------------------------------------------------


def layer_loss(module, buffer, x, idx, weights, grad, grad_weights, local_scales, num_experts, worst):
    """The test layer through `module` (deep_ep.autograd or deep_ep.library)."""
    recv = module.dispatch(buffer, x, idx, weights, num_experts, num_worst_tokens=worst)
    local = recv.recv_topk_idx
    factor = torch.where(local >= 0, recv.recv_topk_weights * local_scales[local.clamp_min(0)], 0.0).sum(1)
    rows = (recv.recv_x.float() * factor.unsqueeze(1)).to(torch.bfloat16)
    combined_x, combined_weights = module.combine(buffer, rows, recv.handle, recv.recv_topk_weights)
    return (combined_x.float() * grad).sum() + (combined_weights * grad_weights).sum()


def rank_normal_grads(rank, num_ranks, group, module_name, tokens, worst, backend, num_nvl_ranks=None):
    num_experts, topk = 4 * num_ranks, 3
    ranks, scales = make_problem(num_ranks, tokens, HIDDEN, num_experts, topk)
    buffer = _buffer(group, num_ranks, tokens, backend, num_nvl_ranks)
    x, idx, weights, grad, grad_weights, local_scales = _leaves(rank, ranks, scales, num_ranks, buffer.device)
    worst = sum(tokens) if worst else 0
    loss = layer_loss(
        MODULES[module_name], buffer, x, idx, weights, grad, grad_weights, local_scales, num_experts, worst
    )
    loss.backward()
    _check(rank, dense_grads(ranks, scales), x, weights, local_scales)


NORMAL_TOKENS = {2: [11, 0], 4: [9, 12, 0, 5]}


@pytest.mark.parametrize("worst", [False, True], ids=["exact", "num_worst_tokens"])
@pytest.mark.parametrize("module_name", list(MODULES))
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_normal_grads_match_dense(rank_pool, num_ranks, module_name, worst):
    rank_pool(num_ranks).run(rank_normal_grads, module_name, NORMAL_TOKENS[num_ranks], worst, "reference")


@pytest.mark.parametrize("worst", [False, True], ids=["exact", "num_worst_tokens"])
@pytest.mark.parametrize("module_name", list(MODULES))
def test_internode_grads_match_dense(rank_pool, module_name, worst):
    # 4 ranks as 2 nodes x 2: the handles are inter-node ones (deep_ep.library: its inter-node dispatch op).
    rank_pool(4).run(rank_normal_grads, module_name, NORMAL_TOKENS[4], worst, "reference", 2)


def rank_compiled_matches_eager(
    rank, num_ranks, group, tokens, worst, backend, compile_backend, num_nvl_ranks=None
):
    num_experts, topk = 4 * num_ranks, 3
    ranks, scales = make_problem(num_ranks, tokens, HIDDEN, num_experts, topk, seed=SEED + 1)
    buffer = _buffer(group, num_ranks, tokens, backend, num_nvl_ranks)
    worst = sum(tokens) if worst else 0

    def step(fn):
        x, idx, weights, grad, grad_weights, local_scales = _leaves(
            rank, ranks, scales, num_ranks, buffer.device
        )
        loss = fn(
            deep_ep.library, buffer, x, idx, weights, grad, grad_weights, local_scales, num_experts, worst
        )
        loss.backward()
        return [loss.detach(), x.grad, weights.grad, local_scales.grad]

    compiled = torch.compile(layer_loss, backend=compile_backend, fullgraph=True)
    for got, want in zip(step(compiled), step(layer_loss)):
        assert torch.equal(got, want), f"rank {rank}: compiled and eager differ"


@pytest.mark.parametrize("worst", [False, True], ids=["exact", "num_worst_tokens"])
def test_compiled_matches_eager(rank_pool, worst):
    rank_pool(2).run(rank_compiled_matches_eager, [7, 10], worst, "reference", "aot_eager")


def test_compiled_matches_eager_internode(rank_pool):
    rank_pool(4).run(rank_compiled_matches_eager, [7, 10, 0, 5], False, "reference", "aot_eager", 2)


# opcheck's test_aot_dispatch_dynamic compiles each op (seconds on the CPU): the GPU variants run it.
QUICK_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")
FULL_OPCHECK = (*QUICK_OPCHECK, "test_aot_dispatch_dynamic")


def rank_opcheck(rank, num_ranks, group, backend, test_utils, num_nvl_ranks=None):
    """torch.library.opcheck of the normal-mode ops: schema, autograd registration, and that the fake
    implementations give the real outputs' shapes, dtypes and strides."""
    num_experts, topk, tokens = 4 * num_ranks, 3, [6, 9, 0, 4][:num_ranks]
    ranks, _ = make_problem(num_ranks, tokens, HIDDEN, num_experts, topk)
    buffer = _buffer(group, num_ranks, tokens, backend, num_nvl_ranks)
    key = deep_ep.library.buffer_key(buffer)
    x, idx, weights = (t.to(buffer.device) for t in ranks[rank][:3])
    x.requires_grad_()
    weights.requires_grad_()
    ops = torch.ops.deep_ep
    layout = ops.get_dispatch_layout(key, idx, num_experts)
    torch.library.opcheck(ops.get_dispatch_layout, (key, idx, num_experts), test_utils=test_utils)
    dispatch_op = ops.internode_dispatch if deep_ep.library.is_internode(buffer) else ops.dispatch
    for worst in (0, sum(tokens)):
        torch.library.opcheck(
            dispatch_op,
            (key, x, idx, weights, layout[0], layout[2], layout[1], 1, worst),
            test_utils=test_utils,
        )
    recv = deep_ep.library.dispatch(
        buffer, x.detach(), idx, weights.detach(), num_experts, num_worst_tokens=20
    )
    handle = list(recv.handle)
    rows = recv.recv_x.detach().requires_grad_()
    recv_weights = recv.recv_topk_weights.detach().requires_grad_()
    torch.library.opcheck(ops.combine, (key, rows, handle, recv_weights), test_utils=test_utils)
    torch.library.opcheck(ops.combine, (key, rows, handle, None), test_utils=test_utils)
    torch.library.opcheck(ops.cached_dispatch, (key, x, handle), test_utils=test_utils)


def test_opcheck(rank_pool):
    rank_pool(2).run(rank_opcheck, "reference", QUICK_OPCHECK)


def test_opcheck_internode(rank_pool):
    rank_pool(4).run(rank_opcheck, "reference", QUICK_OPCHECK, 2)


def rank_low_latency_opcheck(rank, num_ranks, group, backend, test_utils):
    """opcheck of the low-latency ops (their fake outputs come from M, the expert and rank counts)."""
    num_experts, topk, tokens, m = 2 * num_ranks, 3, [5, 3], 8
    ranks, _ = make_problem(num_ranks, tokens, LOW_LATENCY_HIDDEN, num_experts, topk)
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(m, LOW_LATENCY_HIDDEN, num_ranks, num_experts)
    buffer = deep_ep.Buffer(group, 0, size, low_latency_mode=True, explicitly_destroy=True, backend=backend)
    try:
        key = deep_ep.library.buffer_key(buffer)
        x, idx, weights = (t.to(buffer.device) for t in ranks[rank][:3])
        ops = torch.ops.deep_ep
        torch.library.opcheck(
            ops.low_latency_dispatch, (key, x.requires_grad_(), idx, m, num_experts), test_utils=test_utils
        )
        recv_x, _, handle = deep_ep.library.low_latency_dispatch(buffer, x.detach(), idx, m, num_experts)
        args = (
            key,
            recv_x.requires_grad_(),
            idx,
            weights.requires_grad_(),
            handle[0],
            handle[1],
            m,
            num_experts,
        )
        torch.library.opcheck(ops.low_latency_combine, args, test_utils=test_utils)
    finally:
        buffer.destroy()


def test_low_latency_opcheck(rank_pool):
    rank_pool(2).run(rank_low_latency_opcheck, "reference", QUICK_OPCHECK)


# ---------------------------------------------------------------------------------------------------------
# Low-latency mode
# ---------------------------------------------------------------------------------------------------------


def low_latency_loss(module, buffer, x, idx, weights, grad, local_scales, m, num_experts):
    recv_x, recv_count, handle = module.low_latency_dispatch(buffer, x, idx, m, num_experts)
    # Rows past recv_count hold no token (garbage on the GPU): keep them out of the scale's gradient.
    valid = torch.arange(recv_x.size(1), device=x.device).unsqueeze(0) < recv_count.unsqueeze(1)
    rows = torch.where(valid.unsqueeze(2), recv_x.float(), 0.0) * local_scales.view(-1, 1, 1)
    combined_x = module.low_latency_combine(buffer, rows.to(torch.bfloat16), idx, weights, handle)
    return (combined_x.float() * grad).sum()


def _poison_unused_rows(buffer) -> None:
    """The kernels leave receive rows past recv_count unwritten (whatever the allocator gave, NaN included);
    the reference zeroes them. Fill them with NaN, so the CPU test sees what the GPU may hand out."""
    dispatch = buffer.low_latency_dispatch

    def poisoned(*args, **kwargs):
        recv_x, recv_count, *rest = dispatch(*args, **kwargs)
        unused = torch.arange(recv_x.size(1), device=recv_x.device).unsqueeze(0) >= recv_count.unsqueeze(1)
        return (recv_x.masked_fill(unused.unsqueeze(2), float("nan")), recv_count, *rest)

    buffer.low_latency_dispatch = poisoned


def rank_low_latency_grads(rank, num_ranks, group, module_name, tokens, backend, compile_backend=None):
    num_experts, topk, m = 2 * num_ranks, 3, max(tokens)
    ranks, scales = make_problem(num_ranks, tokens, LOW_LATENCY_HIDDEN, num_experts, topk, seed=SEED + 2)
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(m, LOW_LATENCY_HIDDEN, num_ranks, num_experts)
    buffer = deep_ep.Buffer(group, 0, size, low_latency_mode=True, explicitly_destroy=True, backend=backend)
    if backend == "reference":
        _poison_unused_rows(buffer)
    try:
        x, idx, weights, grad, _, local_scales = _leaves(rank, ranks, scales, num_ranks, buffer.device)
        fn = low_latency_loss
        if compile_backend is not None:
            fn = torch.compile(fn, backend=compile_backend, fullgraph=True)
        fn(MODULES[module_name], buffer, x, idx, weights, grad, local_scales, m, num_experts).backward()
        _check(rank, dense_grads(ranks, scales, with_weights_loss=False), x, weights, local_scales)
    finally:
        buffer.destroy()


LOW_LATENCY_TOKENS = [5, 3]


@pytest.mark.parametrize("module_name", list(MODULES))
def test_low_latency_grads_match_dense(rank_pool, module_name):
    rank_pool(2).run(rank_low_latency_grads, module_name, LOW_LATENCY_TOKENS, "reference")


def test_low_latency_compiled_grads_match_dense(rank_pool):
    # rank 1 has no tokens: it only serves its experts
    rank_pool(2).run(rank_low_latency_grads, "library", [4, 0], "reference", "aot_eager")


# ---------------------------------------------------------------------------------------------------------
# GPU variants: the same checks through the CUDA kernels (ranks share the GPUs under MPS)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("worst", [False, True], ids=["exact", "num_worst_tokens"])
@pytest.mark.parametrize("module_name", list(MODULES))
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_gpu_normal_grads_match_dense(rank_pool, num_ranks, module_name, worst):
    rank_pool(num_ranks).run(rank_normal_grads, module_name, NORMAL_TOKENS[num_ranks], worst, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("module_name", list(MODULES))
def test_gpu_internode_grads_match_dense(rank_pool, module_name):
    rank_pool(4).run(rank_normal_grads, module_name, NORMAL_TOKENS[4], False, "cuda", 2)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_gpu_compiled_matches_eager(rank_pool, compile_backend):
    rank_pool(2).run(rank_compiled_matches_eager, [70, 100], True, "cuda", compile_backend)


@pytest.mark.gpu
def test_gpu_opcheck(rank_pool):
    rank_pool(2).run(rank_opcheck, "cuda", FULL_OPCHECK)


@pytest.mark.gpu
@pytest.mark.skipif(not low_latency_compiled(), reason="needs deep_ep._C built with NVSHMEM")
def test_gpu_low_latency_opcheck(rank_pool):
    # Not test_aot_dispatch_dynamic: it compares two calls' outputs bit for bit, and the GPU places each
    # expert's received rows in arrival order, which differs from call to call (the reference is ordered).
    rank_pool(2).run(rank_low_latency_opcheck, "cuda", QUICK_OPCHECK)


@pytest.mark.gpu
@pytest.mark.skipif(not low_latency_compiled(), reason="needs deep_ep._C built with NVSHMEM")
@pytest.mark.parametrize("module_name", list(MODULES))
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_gpu_low_latency_grads_match_dense(rank_pool, num_ranks, module_name):
    rank_pool(num_ranks).run(rank_low_latency_grads, module_name, [5, 3, 8, 0][:num_ranks], "cuda")
