"""Low-latency dispatch/combine through the public `deep_ep.Buffer(..., backend="cuda")`, against
deep_ep.reference's pure functions.

Every rank regenerates all ranks' inputs from one seed, so the oracle needs no communication. Ranks share
the GPU(s) (rank r on GPU r % num_gpus, MPS): 2 and 4 ranks. Both ways of reaching a rank are covered:
NVLink/same-GPU mapped stores (allow_nvlink_for_low_latency_mode=True) and NVSHMEM put-with-signal (False).
Dispatch rows are compared bit-exactly (FP8 included: the kernel casts with deep_ep.fp8's formula), and
combine bit-exactly too (the kernel reduces in the reference's order, unfused, in float32).

Each rank function builds one Buffer (explicitly_destroy=True) and destroys it at the end. The rank functions
take a `backend` argument: the tests pass "cuda"; "reference" runs the same harness on the CPU over gloo,
which is how the harness itself is checked without a GPU (CUDA-only steps are skipped there).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from oracle import environment, low_latency_compiled

import deep_ep
from deep_ep.backends import reference
from deep_ep.backends.fp8 import per_token_cast_back
from deep_ep.backends.reference import unpack_layout_range
from deep_ep.handles import LowLatencyHandle
from deep_ep.tools.launch import RankPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not low_latency_compiled(), reason="needs a CUDA GPU and deep_ep._C built with NVSHMEM"
    ),
]

TIMEOUT_ENV = "DEEP_EP_TIMEOUT_S"  # read when a Buffer is created
TIMEOUT_S = 60


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def pool(request):
    with RankPool(request.param, timeout_s=600) as p:
        yield p


# --- rank-side helpers (module level: they run in the rank processes) --------------------------------------


def _make_buffer(
    group,
    num_ranks,
    m,
    hidden,
    num_experts,
    backend,
    allow_nvlink=True,
    timeout_s=TIMEOUT_S,
    num_nvl_ranks=None,
):
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(m, hidden, num_ranks, num_experts)
    with environment(TIMEOUT_ENV, str(timeout_s)):
        return deep_ep.Buffer(
            group,
            0,
            size,
            low_latency_mode=True,
            allow_nvlink_for_low_latency_mode=allow_nvlink,
            explicitly_destroy=True,
            backend=backend,
            num_nvl_ranks=num_nvl_ranks,
        )


def _sync(buffer) -> None:
    if buffer.device.type == "cuda":
        torch.cuda.synchronize(buffer.device)


def _inputs(seed, num_ranks, tokens, hidden, num_experts, topk, minus_one, device):
    """Every rank's (x, topk_idx, topk_weights); tokens[r] tokens on rank r; some -1 entries."""
    g = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for r in range(num_ranks):
        t = tokens[r]
        # Rows of different magnitudes so the per-128 scales differ.
        x = torch.randn(t, hidden, generator=g) * torch.rand(t, 1, generator=g).mul(8).exp2()
        idx = torch.rand(t, num_experts, generator=g).topk(topk, dim=1).indices
        if minus_one:
            idx[torch.rand(t, topk, generator=g) < 0.15] = -1
        w = torch.rand(t, topk, generator=g)
        xs.append(x.to(torch.bfloat16).to(device))
        idxs.append(idx.to(device))
        ws.append(w.to(device))
    return xs, idxs, ws


def _expert_outputs(recv_x, recv_scales, use_fp8):
    """A deterministic 'expert': dequantize, scale by (local expert index % 3 + 1) / 2, as bf16."""
    x = per_token_cast_back(recv_x, recv_scales) if use_fp8 else recv_x
    factor = (torch.arange(x.size(0), device=x.device) % 3 + 1).float().div(2).view(-1, 1, 1)
    return (x.float() * factor).to(torch.bfloat16)


def _split(recv, use_fp8):
    """low_latency_dispatch's recv_x: a tensor, or (fp8 rows, scales) with use_fp8."""
    return recv if use_fp8 else (recv, None)


def _assert_dispatch_equal(rank, got, want, use_fp8):
    recv_x, recv_scales, recv_count, src_info, layout_range = got
    assert torch.equal(recv_count, want.recv_count), f"rank {rank}: recv_count"
    assert torch.equal(layout_range, want.packed_recv_layout_range), f"rank {rank}: layout ranges"
    for e in range(recv_count.numel()):
        n = int(want.recv_count[e])
        assert torch.equal(src_info[e, :n], want.packed_recv_src_info[e, :n]), (
            f"rank {rank} expert {e}: src_info"
        )
        assert torch.equal(recv_x[e, :n].view(torch.uint8), want.recv_x[e, :n].view(torch.uint8)), (
            f"rank {rank} expert {e}: rows"
        )
        if use_fp8:
            assert recv_scales.stride(1) == 1, f"rank {rank}: scales are not column-major"
            assert torch.equal(recv_scales[e, :n], want.recv_x_scales[e, :n]), (
                f"rank {rank} expert {e}: scales"
            )


def _reference(rank, xs, idxs, m, num_experts, use_fp8, **fp8_format):
    """This rank's reference dispatch, and every owner's expert outputs for this rank's tokens (one owner's
    full receive tensor at a time: 16 ranks' at hidden 7168 do not fit one GPU beside 16 Buffers)."""

    def dispatch(r):
        return reference.low_latency_dispatch(r, xs, idxs, m, num_experts, use_fp8=use_fp8, **fp8_format)

    mine = dispatch(rank)
    rows = [_rows_from(rank, mine if r == rank else dispatch(r), use_fp8) for r in range(len(xs))]
    return mine, rows


def _expected_combine(rank, rows, idx, weights, num_experts):
    """The reference's combine of this rank's tokens from the owners' expert outputs (`_reference`'s rows)."""
    return reference.low_latency_combine(
        rank,
        [w.expert_out for w in rows],
        idx,
        weights,
        [w.src_info for w in rows],
        [w.layout_range for w in rows],
        num_experts,
    )


class _RowsFrom(NamedTuple):
    expert_out: torch.Tensor
    src_info: torch.Tensor
    layout_range: torch.Tensor


def _rows_from(rank, result, use_fp8):
    """The expert outputs an owner computes from `result` (its reference dispatch), kept only for the rows
    that came from `rank`, moved to row 0 with the layout range to match: all that `rank`'s combine reads,
    1/num_ranks of the owner's receive tensor (16 ranks' full tensors at hidden 7168 do not fit one GPU)."""
    expert_out = _expert_outputs(result.recv_x, result.recv_x_scales, use_fp8)
    num_local_experts, rows, hidden = expert_out.shape
    begin, count = unpack_layout_range(result.packed_recv_layout_range[:, rank])
    width = max(1, int(count.max()) if count.numel() else 1)
    out = torch.zeros(num_local_experts, width, hidden, dtype=expert_out.dtype, device=expert_out.device)
    src_info = torch.zeros(num_local_experts, width, dtype=torch.int32, device=expert_out.device)
    for e in range(num_local_experts):
        b, c = int(begin[e]), int(count[e])
        out[e, :c] = expert_out[e, b : b + c]
        src_info[e, :c] = result.packed_recv_src_info[e, b : b + c]
    layout_range = torch.zeros_like(result.packed_recv_layout_range)
    layout_range[:, rank] = count.to(layout_range.dtype)
    return _RowsFrom(out, src_info, layout_range)


def _round_trip(rank, num_ranks, group, case, backend="cuda"):
    """One dispatch + combine per entry of case["tokens"], each compared with the reference."""
    m, hidden, num_experts, topk = case["m"], case["hidden"], case["experts"], case["topk"]
    use_fp8, round_scale, use_ue8m0 = case["use_fp8"], case["round_scale"], case["use_ue8m0"]
    mode = case["mode"]
    buffer = _make_buffer(
        group,
        num_ranks,
        m,
        hidden,
        num_experts,
        backend,
        case["allow_nvlink"],
        num_nvl_ranks=case.get("num_nvl_ranks"),
    )
    device = buffer.device
    try:
        for step, tokens in enumerate(case["tokens"]):
            xs, idxs, ws = _inputs(
                case["seed"] + step, num_ranks, tokens, hidden, num_experts, topk, True, device
            )
            recv_stats = torch.zeros(num_experts // num_ranks, dtype=torch.int32, device=device)
            dispatch_cost = torch.zeros(num_ranks, dtype=torch.int64, device=device)
            combine_cost = torch.zeros(num_ranks, dtype=torch.int64, device=device)
            recv, recv_count, handle, _, hook = buffer.low_latency_dispatch(
                xs[rank],
                idxs[rank],
                m,
                num_experts,
                cumulative_local_expert_recv_stats=recv_stats,
                dispatch_wait_recv_cost_stats=dispatch_cost,
                use_fp8=use_fp8,
                round_scale=round_scale,
                use_ue8m0=use_ue8m0,
                return_recv_hook=mode == "hook",
            )
            assert (hook is not None) == (mode == "hook"), f"rank {rank}: a hook iff return_recv_hook"
            if hook is not None:
                hook()
            _sync(buffer)
            recv_x, recv_scales = _split(recv, use_fp8)
            want, rows = _reference(
                rank, xs, idxs, m, num_experts, use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0
            )
            assert isinstance(handle, LowLatencyHandle) and tuple(handle[2:]) == (m, hidden, num_experts)
            got = (
                recv_x,
                recv_scales,
                recv_count,
                handle.packed_recv_src_info,
                handle.packed_recv_layout_range,
            )
            _assert_dispatch_equal(rank, got, want, use_fp8)
            assert torch.equal(recv_stats, want.recv_count), (
                f"rank {rank}: cumulative_local_expert_recv_stats"
            )
            assert bool((dispatch_cost >= 0).all()), f"rank {rank}: negative dispatch wait cost"

            expert_out = _expert_outputs(recv_x, recv_scales, use_fp8)
            out = None
            if mode == "zero_copy":
                buffer.get_next_low_latency_combine_buffer(handle).copy_(expert_out)
            elif mode == "out":
                out = torch.full((tokens[rank], hidden), float("nan"), dtype=torch.bfloat16, device=device)
            combined, _, hook = buffer.low_latency_combine(
                expert_out,
                idxs[rank],
                ws[rank],
                handle,
                zero_copy=mode == "zero_copy",
                return_recv_hook=mode == "hook",
                out=out,
                combine_wait_recv_cost_stats=combine_cost,
            )
            if hook is not None:
                hook()
            _sync(buffer)
            if out is not None:
                assert combined.data_ptr() == out.data_ptr(), f"rank {rank}: combine did not write `out`"
            expected = _expected_combine(rank, rows, idxs[rank], ws[rank], num_experts)
            assert torch.equal(combined, expected), (
                f"rank {rank}: combine differs, max abs {(combined.float() - expected.float()).abs().max()}"
            )
            assert bool((combine_cost >= 0).all()), f"rank {rank}: negative combine wait cost {combine_cost}"
    finally:
        buffer.destroy()
    return True


def _case(**overrides):
    case = dict(
        m=128, hidden=7168, experts=288, topk=8, use_fp8=True, round_scale=False, use_ue8m0=False,
        allow_nvlink=True, mode="plain", seed=0, tokens=None,
    )  # fmt: skip
    case.update(overrides)
    return case


def _tokens(num_ranks, m, pattern):
    if pattern == "full":
        return [[m] * num_ranks]
    # fewer tokens than M, one rank with 0 tokens, one with 1
    return [[m - 3 - r for r in range(num_ranks)], [0] + [1] + [m // 2] * (num_ranks - 2)]


FORMATS = {
    "bf16": dict(use_fp8=False),
    "fp8": dict(use_fp8=True),
    "fp8_round": dict(use_fp8=True, round_scale=True),
    "fp8_ue8m0": dict(use_fp8=True, round_scale=True, use_ue8m0=True),
}


@pytest.mark.parametrize("allow_nvlink", [True, False], ids=["mapped", "put"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dispatch_combine_match_reference(pool, fmt, allow_nvlink):
    n = pool.num_ranks
    tokens = _tokens(n, 128, "full") + _tokens(n, 128, "partial")
    case = _case(tokens=tokens, allow_nvlink=allow_nvlink, seed=11, **FORMATS[fmt])
    assert all(pool.run(_round_trip, case))


# 16 ranks share the GPU here: the expected combine keeps only what each rank reads of its peers' expert
# outputs (`_reference`), or 16 processes' reference tensors would not fit beside their Buffers.


@pytest.mark.parametrize(
    ("num_ranks", "num_nvl_ranks", "allow_nvlink"),
    [
        (4, 2, True),
        (16, 4, True),
        (16, None, True),
        (16, None, False),
    ],
    ids=["2x2", "4x4", "16", "16-puts"],
)
def test_virtual_nodes_and_16_ranks(num_ranks, num_nvl_ranks, allow_nvlink):
    """Peers outside this rank's node (a virtual split of the host, or the 16 ranks' default of two nodes of 8)
    are reached by NVSHMEM puts, the node's own ranks over NVLink mappings; results match the reference."""
    tokens = _tokens(num_ranks, 64, "full") + _tokens(num_ranks, 64, "partial")
    case = _case(
        m=64,
        experts=16 * num_ranks,
        tokens=tokens,
        num_nvl_ranks=num_nvl_ranks,
        allow_nvlink=allow_nvlink,
        seed=17,
    )
    with RankPool(num_ranks, timeout_s=600) as pool16:
        assert all(pool16.run(_round_trip, case))


@pytest.mark.parametrize("hidden", [2048, 2560, 4096, 5120, 8192])
def test_other_hidden_sizes(pool, hidden):
    n = pool.num_ranks
    case = _case(hidden=hidden, m=32, experts=16 * n, topk=4, tokens=_tokens(n, 32, "partial"), seed=hidden)
    assert all(pool.run(_round_trip, case))


@pytest.mark.parametrize("allow_nvlink", [True, False], ids=["mapped", "put"])
@pytest.mark.parametrize("mode", ["hook", "zero_copy", "out"])
def test_hook_zero_copy_and_out(pool, mode, allow_nvlink):
    n = pool.num_ranks
    case = _case(mode=mode, allow_nvlink=allow_nvlink, tokens=_tokens(n, 128, "full") * 2, seed=5)
    assert all(pool.run(_round_trip, case))


def _duplicates(rank, num_ranks, group, backend="cuda"):
    m, hidden, num_experts = 8, 2048, 4 * num_ranks
    buffer = _make_buffer(group, num_ranks, m, hidden, num_experts, backend)
    device = buffer.device
    try:
        xs = [
            torch.full((m, hidden), float(r + 1), dtype=torch.bfloat16, device=device)
            for r in range(num_ranks)
        ]
        idxs = [torch.tensor([[0, 0, 1, -1]] * m, device=device) for _ in range(num_ranks)]
        ws = [torch.full((m, 4), 0.5, device=device) for _ in range(num_ranks)]
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            xs[rank], idxs[rank], m, num_experts, use_fp8=False
        )
        _sync(buffer)
        want, rows = _reference(rank, xs, idxs, m, num_experts, use_fp8=False)
        got = (recv_x, None, recv_count, handle.packed_recv_src_info, handle.packed_recv_layout_range)
        _assert_dispatch_equal(rank, got, want, False)
        expert_out = _expert_outputs(recv_x, None, False)
        combined, _, _ = buffer.low_latency_combine(expert_out, idxs[rank], ws[rank], handle)
        _sync(buffer)
        expected = _expected_combine(rank, rows, idxs[rank], ws[rank], num_experts)
        assert torch.equal(combined, expected), f"rank {rank}: combine of duplicate experts"
    finally:
        buffer.destroy()
    return True


def test_duplicate_experts_in_a_token_are_sent_once(pool):
    assert all(pool.run(_duplicates))


# --- CUDA graphs and long runs ------------------------------------------------------------------------------


def _identity_expected(x, idx, w):
    """Combine of identity experts (BF16 dispatch): sum over valid k of float32(w * x), in k order."""
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(idx.size(1)):
        valid = (idx[:, k] >= 0).unsqueeze(1)
        acc = torch.where(valid, acc + w[:, k : k + 1] * x.float(), acc)
    return acc.to(torch.bfloat16)


def _fresh(seed, rank, num_ranks, m, hidden, num_experts, topk, device):
    g = torch.Generator(device=device).manual_seed(seed)
    idx_all = torch.rand(num_ranks, m, num_experts, generator=g, device=device).topk(topk, dim=2).indices
    idx_all[torch.rand(num_ranks, m, topk, generator=g, device=device) < 0.1] = -1
    x = torch.randn(m, hidden, generator=g, device=device).add(rank).to(torch.bfloat16)
    w = torch.rand(m, topk, generator=g, device=device)
    return x, idx_all, w


def _expected_counts(idx_all, rank, num_experts, num_ranks):
    num_local = num_experts // num_ranks
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=idx_all.device)
    flat = idx_all.reshape(-1)
    counts.index_add_(0, torch.where(flat >= 0, flat, num_experts), torch.ones_like(flat, dtype=torch.int32))
    return counts[rank * num_local : (rank + 1) * num_local]


def _graph_and_stress(rank, num_ranks, group, allow_nvlink, iterations, use_graph, backend="cuda"):
    """Fresh data every iteration through the same two buffer halves; identity experts make combine
    return x * (sum of valid weights), so stale rows or reused signals show up as mismatches. Mismatches
    are counted on the device, so the host never waits for the GPU between iterations.

    Graph capture rule: the captured sequence is first run eagerly (warm-up), and the graph holds an even
    number of low-latency ops (here two dispatch + combine pairs), since consecutive ops alternate between
    two buffer halves and the half each captured op uses is fixed at capture."""
    m, hidden, num_experts, topk = 128, 7168, 288, 8
    buffer = _make_buffer(group, num_ranks, m, hidden, num_experts, backend, allow_nvlink)
    device = buffer.device
    static_x = torch.zeros(m, hidden, dtype=torch.bfloat16, device=device)
    static_idx = torch.zeros(m, topk, dtype=torch.int64, device=device)
    static_w = torch.zeros(m, topk, dtype=torch.float32, device=device)
    bad_rows = torch.zeros((), dtype=torch.int64, device=device)
    bad_counts = torch.zeros((), dtype=torch.int64, device=device)

    def step(hook_mode):
        recv_x, recv_count, handle, _, hook = buffer.low_latency_dispatch(
            static_x, static_idx, m, num_experts, use_fp8=False, return_recv_hook=hook_mode
        )
        if hook is not None:
            hook()
        combined, _, hook = buffer.low_latency_combine(
            recv_x, static_idx, static_w, handle, return_recv_hook=hook_mode
        )
        if hook is not None:
            hook()
        return recv_count, combined

    graph = graph_outputs = None
    try:
        if use_graph and device.type == "cuda":
            for hook_mode in (False, True):  # warm up both variants outside the graph
                step(hook_mode)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                first = step(False)
                second = step(True)  # a hook-mode pair in the same graph: the second launch is captured too
            graph_outputs = (first, second)
        for it in range(iterations):
            x, idx_all, w = _fresh(1000 + it, rank, num_ranks, m, hidden, num_experts, topk, device)
            static_x.copy_(x)
            static_idx.copy_(idx_all[rank])
            static_w.copy_(w)
            expected_counts = _expected_counts(idx_all, rank, num_experts, num_ranks)
            expected = _identity_expected(x, idx_all[rank], w)
            if graph is not None:
                graph.replay()
                results = graph_outputs
            elif use_graph:  # the reference backend: the captured sequence, run eagerly
                results = (step(False), step(True))
            else:
                results = (step(it % 2 == 1),)
            for recv_count, combined in results:
                bad_counts += (recv_count != expected_counts).sum()
                bad_rows += (combined != expected).any(dim=1).sum()
    finally:
        _sync(buffer)
        buffer.destroy()
    return int(bad_counts), int(bad_rows)


@pytest.mark.parametrize("allow_nvlink", [True, False], ids=["mapped", "put"])
def test_cuda_graph_replay(pool, allow_nvlink):
    results = pool.run(_graph_and_stress, allow_nvlink, 20, True)
    assert results == [(0, 0)] * pool.num_ranks


@pytest.mark.parametrize("allow_nvlink", [True, False], ids=["mapped", "put"])
def test_1000_back_to_back_iterations(pool, allow_nvlink):
    results = pool.run(_graph_and_stress, allow_nvlink, 1000, False)
    assert results == [(0, 0)] * pool.num_ranks


# --- errors ------------------------------------------------------------------------------------------------


def _too_many_tokens(rank, num_ranks, group, backend="cuda"):
    m, num_experts = 16, 4 * num_ranks
    buffer = _make_buffer(group, num_ranks, m, 2048, num_experts, backend)
    device = buffer.device
    messages = []
    try:
        for x, what in (
            (torch.zeros(m + 1, 2048, dtype=torch.bfloat16, device=device), "exceed"),
            (torch.zeros(4, 1000, dtype=torch.bfloat16, device=device), "hidden"),
        ):
            idx = torch.zeros(x.size(0), 2, dtype=torch.int64, device=device)
            try:
                buffer.low_latency_dispatch(x, idx, m, num_experts)
            except ValueError as e:
                messages.append(what in str(e))
    finally:
        buffer.destroy()
    return messages


def test_clear_errors_for_bad_shapes(pool):
    assert pool.run(_too_many_tokens) == [[True, True]] * pool.num_ranks


def _checked_bf16_round(buffer, rank, seed, shape, after):
    """One BF16 low-latency dispatch + combine of fresh inputs on every rank, both compared with the
    reference; shape: (tokens per rank, m, hidden, num_experts, topk)."""
    tokens, m, hidden, num_experts, topk = shape
    xs, idxs, ws = _inputs(seed, len(tokens), tokens, hidden, num_experts, topk, True, buffer.device)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
        xs[rank], idxs[rank], m, num_experts, use_fp8=False
    )
    expert_out = _expert_outputs(recv_x, None, False)
    combined, _, _ = buffer.low_latency_combine(expert_out, idxs[rank], ws[rank], handle)
    _sync(buffer)
    want, rows = _reference(rank, xs, idxs, m, num_experts, False)
    got = (recv_x, None, recv_count, handle.packed_recv_src_info, handle.packed_recv_layout_range)
    _assert_dispatch_equal(rank, got, want, False)
    assert torch.equal(combined, _expected_combine(rank, rows, idxs[rank], ws[rank], num_experts)), (
        f"rank {rank}: combine {after}"
    )


def _one_bad_rank(rank, num_ranks, group, bad_first_call, backend="cuda"):
    """The last rank passes x as float32 to low_latency_dispatch (a TypeError there), the others valid
    inputs. It still takes part, with no tokens, and its experts return NaN rows, so nobody waits: the
    peers' dispatch and combine complete (NaN exactly for the tokens routed to its experts, the others as
    the reference) and every rank raises naming it: the bad rank in its dispatch, the others at their
    combine (or check()), never earlier, so every rank finishes the round. Then a valid round is correct.
    bad_first_call: the bad call is the Buffer's first (its layout comes from the call's own sizes)."""
    m, hidden, num_experts, topk = 32, 2048, 4 * num_ranks, 4
    bad = num_ranks - 1
    buffer = _make_buffer(group, num_ranks, m, hidden, num_experts, backend)
    device = buffer.device
    tokens = [m - 3 * r for r in range(num_ranks)]

    def valid_round(seed):
        shape = (tokens, m, hidden, num_experts, topk)
        _checked_bf16_round(buffer, rank, seed, shape, "after the rejected round")

    try:
        if not bad_first_call:
            valid_round(50)
        xs, idxs, ws = _inputs(51, num_ranks, tokens, hidden, num_experts, topk, True, device)
        raised, where, combined = None, "dispatch", None
        try:
            x = xs[rank].float() if rank == bad else xs[rank]
            recv_x, _, handle, _, _ = buffer.low_latency_dispatch(
                x, idxs[rank], m, num_experts, use_fp8=False
            )
            where = "combine"
            # The hook form: the combined tensor exists even when the hook raises.
            combined, _, hook = buffer.low_latency_combine(
                _expert_outputs(recv_x, None, False), idxs[rank], ws[rank], handle, return_recv_hook=True
            )
            hook()
            _sync(buffer)
            where = "check"
            buffer.check()
        except (TypeError, ValueError) as e:
            raised = (type(e).__name__, str(e), where)
        _sync(buffer)
        if combined is not None:
            # What the peers' combine must hold: the bad rank sent no tokens, its experts NaN rows.
            xs_seen = [x if r != bad else x[:0] for r, x in enumerate(xs)]
            idxs_seen = [i if r != bad else i[:0] for r, i in enumerate(idxs)]
            _, rows = _reference(rank, xs_seen, idxs_seen, m, num_experts, False)
            expected = _expected_combine(rank, rows, idxs[rank], ws[rank], num_experts)
            owner = torch.where(idxs[rank] >= 0, idxs[rank] // (num_experts // num_ranks), -1)
            routed_to_bad = (owner == bad).any(dim=1)
            nan_rows = torch.isnan(combined.float()).any(dim=1)
            assert torch.equal(nan_rows, routed_to_bad), (
                f"rank {rank}: NaN rows {nan_rows} vs {routed_to_bad}"
            )
            keep = ~routed_to_bad
            assert torch.equal(combined[keep], expected[keep]), f"rank {rank}: rows not routed to rank {bad}"
        valid_round(52)
    finally:
        buffer.destroy()
    return raised


@pytest.mark.parametrize("bad_first_call", [False, True], ids=["after_a_round", "first_call"])
def test_one_bad_rank_makes_every_rank_raise_and_nobody_waits(pool, bad_first_call):
    bad = pool.num_ranks - 1
    results = pool.run(_one_bad_rank, bad_first_call)
    for rank, raised in enumerate(results):
        assert raised is not None, f"rank {rank}: nothing raised"
        kind, message, where = raised
        assert kind == "TypeError" and message.startswith("x:"), f"rank {rank}: {kind} {message}"
        if rank == bad:
            assert where == "dispatch", f"rank {rank} raised at {where}: {message}"
        else:
            assert where in ("combine", "check"), f"rank {rank} raised at {where}: {message}"
            assert f"rank {bad} rejected" in message and "low-latency" in message, f"rank {rank}: {message}"


# What the last rank passes wrong to low_latency_combine (the others valid): (argument, error type).
BAD_COMBINE_ARGUMENTS = {
    "x": ("x", "TypeError"),  # float32 expert outputs
    "topk_weights": ("topk_weights", "TypeError"),  # float64 weights
    "out": ("out", "ValueError"),  # one row too few
}


def _one_bad_rank_in_combine(rank, num_ranks, group, argument, backend="cuda"):
    """Every rank dispatches validly; the last rank then passes `argument` wrong to low_latency_combine. It
    still takes part (NaN rows from its experts, and it waits for its own tokens' rows), so nobody waits:
    the peers' combine completes, NaN exactly for the tokens routed to its experts and as the reference
    for the others, and every peer that had a token routed to it raises naming it (at the combine, its
    check(), or the next call), the bad rank its own error. Then a valid round is correct on every rank."""
    m, hidden, num_experts, topk = 32, 2048, 4 * num_ranks, 4
    bad = num_ranks - 1
    buffer = _make_buffer(group, num_ranks, m, hidden, num_experts, backend)
    device = buffer.device
    tokens = [m - 3 * r for r in range(num_ranks)]

    def dispatched(seed):
        xs, idxs, ws = _inputs(seed, num_ranks, tokens, hidden, num_experts, topk, True, device)
        recv_x, _, handle, _, _ = buffer.low_latency_dispatch(
            xs[rank], idxs[rank], m, num_experts, use_fp8=False
        )
        return xs, idxs, ws, recv_x, handle

    def valid_round(seed):
        shape = (tokens, m, hidden, num_experts, topk)
        _checked_bf16_round(buffer, rank, seed, shape, "after the rejected combine")

    try:
        valid_round(60)
        xs, idxs, ws, recv_x, handle = dispatched(61)
        expert_out = _expert_outputs(recv_x, None, False)
        weights, out = ws[rank], None
        if rank == bad and argument == "x":
            expert_out = expert_out.float()
        if rank == bad and argument == "topk_weights":
            weights = weights.double()
        if rank == bad and argument == "out":
            out = torch.empty(max(0, tokens[rank] - 1), hidden, dtype=torch.bfloat16, device=device)
        raised, where, combined = None, "combine", None
        try:
            combined = buffer.low_latency_combine(expert_out, idxs[rank], weights, handle, out=out)[0]
            _sync(buffer)
            where = "check"
            buffer.check()
        except (TypeError, ValueError) as e:
            raised = (type(e).__name__, str(e), where)
        _sync(buffer)
        owner = torch.where(idxs[rank] >= 0, idxs[rank] // (num_experts // num_ranks), -1)
        routed_to_bad = bool((owner == bad).any()) if rank != bad else False
        if combined is not None:
            _, rows = _reference(rank, xs, idxs, m, num_experts, False)
            expected = _expected_combine(rank, rows, idxs[rank], ws[rank], num_experts)
            routed = (owner == bad).any(dim=1)
            nan_rows = torch.isnan(combined.float()).any(dim=1)
            assert torch.equal(nan_rows, routed), f"rank {rank}: NaN rows {nan_rows} vs {routed}"
            assert torch.equal(combined[~routed], expected[~routed]), f"rank {rank}: rows not routed to {bad}"
        # Every rank makes the same calls: a peer whose GPU reported the rejection after its host left the
        # combine raises at the next one (that round's outputs are fine, but its check is skipped); nobody
        # raises twice.
        late = None
        try:
            valid_round(62)
        except (TypeError, ValueError) as e:
            late = (type(e).__name__, str(e), "next call")
        assert raised is None or late is None, f"rank {rank} raised twice: {raised}, then {late}"
        raised = raised or late
        valid_round(63)
    finally:
        buffer.destroy()
    return raised, routed_to_bad


@pytest.mark.parametrize("argument", sorted(BAD_COMBINE_ARGUMENTS))
def test_one_bad_rank_in_combine_takes_part_and_its_peers_raise(pool, argument):
    bad = pool.num_ranks - 1
    name, kind = BAD_COMBINE_ARGUMENTS[argument]
    results = pool.run(_one_bad_rank_in_combine, argument)
    for rank, (raised, routed_to_bad) in enumerate(results):
        if rank == bad:
            assert raised is not None and raised[2] == "combine", f"rank {rank}: {raised}"
            assert raised[0] == kind and raised[1].startswith(f"{name}:"), f"rank {rank}: {raised}"
        elif routed_to_bad:
            assert raised is not None, f"rank {rank}: its tokens met rank {bad}'s NaN rows, nothing raised"
            kind_seen, message, _ = raised
            assert kind_seen == kind and message.startswith(
                f"{name}: rank {bad} rejected a low_latency_combine"
            ), f"rank {rank}: {raised}"
        else:
            assert raised is None, f"rank {rank} exchanged no rows with rank {bad} but raised {raised}"


def _disagreeing_use_fp8(rank, num_ranks, group, backend="cuda"):
    """The last rank dispatches with use_fp8=True, the others with False (the same buffer layout): every
    rank's receive compares the call signatures its count words carry and every rank raises the same
    ValueError naming use_fp8 and both ranks at the round's combine (or check()); nobody waits, and the
    next round (all BF16) is correct."""
    m, hidden, num_experts, topk = 32, 2048, 4 * num_ranks, 4
    bad = num_ranks - 1
    buffer = _make_buffer(group, num_ranks, m, hidden, num_experts, backend)
    device = buffer.device
    tokens = [m - 2 * r for r in range(num_ranks)]

    try:
        raised = None
        use_fp8 = rank == bad
        xs, idxs, ws = _inputs(70, num_ranks, tokens, hidden, num_experts, topk, True, device)
        try:
            recv, _, handle, _, _ = buffer.low_latency_dispatch(
                xs[rank], idxs[rank], m, num_experts, use_fp8=use_fp8
            )
            recv_x, recv_scales = _split(recv, use_fp8)
            buffer.low_latency_combine(
                _expert_outputs(recv_x, recv_scales, use_fp8), idxs[rank], ws[rank], handle
            )
            _sync(buffer)
            buffer.check()
        except ValueError as e:
            raised = str(e)
        _sync(buffer)
        shape = (tokens, m, hidden, num_experts, topk)
        _checked_bf16_round(buffer, rank, 71, shape, "after the disagreement")
    finally:
        buffer.destroy()
    return raised


def test_ranks_that_disagree_on_use_fp8_raise_on_every_rank(pool):
    bad = pool.num_ranks - 1
    for rank, message in enumerate(pool.run(_disagreeing_use_fp8)):
        assert message is not None, f"rank {rank}: nothing raised"
        assert message.startswith(
            f"use_fp8: ranks disagree on this low-latency dispatch (rank 0: False, rank {bad}: True;"
        ), f"rank {rank}: {message}"


def _timeout(rank, num_ranks, group, op, backend="cuda"):
    """Only rank 0 runs `op` (the others skip it): its kernel times out waiting for them. Its outputs are
    poisoned (receive counts and layout ranges -1, every received or combined value NaN); once
    synchronised, `buffer.check()` raises the RuntimeError naming rank 0, and so does its next call on the
    Buffer (a timed-out Buffer refuses further work)."""
    m, hidden, num_experts = 8, 2048, 2 * num_ranks
    buffer = _make_buffer(group, num_ranks, m, hidden, num_experts, backend, timeout_s=2)
    device = buffer.device
    messages, poisoned = ["", ""], None
    x = torch.ones(m, hidden, dtype=torch.bfloat16, device=device)
    # Every token to the next rank's first expert: rank 0's combine waits for rank 1 for every token.
    idx = torch.full((m, 1), (rank + 1) % num_ranks * 2, dtype=torch.int64, device=device)
    try:
        if op == "combine":
            recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, m, num_experts, use_fp8=False)
            _sync(buffer)
            torch.distributed.barrier(group=group)
        if rank == 0:
            if op == "dispatch":
                recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
                    x, idx, m, num_experts, use_fp8=False
                )
                torch.cuda.synchronize()
                poisoned = bool((recv_count == -1).all()) and bool(recv_x.isnan().all())
                poisoned &= bool((handle.packed_recv_layout_range == -1).all())
            else:
                out, _, _ = buffer.low_latency_combine(recv_x, idx, torch.ones(m, 1, device=device), handle)
                torch.cuda.synchronize()
                poisoned = bool(out.isnan().all())
            for i, call in enumerate(
                (
                    buffer.check,
                    lambda: buffer.low_latency_dispatch(x, idx, m, num_experts, use_fp8=False),
                )
            ):
                try:
                    call()
                except RuntimeError as e:
                    messages[i] = str(e)
    finally:
        buffer.destroy()
    return messages, poisoned


@pytest.mark.parametrize("op", ["dispatch", "combine"])
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_wait_times_out_into_an_exception_naming_the_rank(num_ranks, op):
    # Its own pool: a rank that dies here must not take the shared pool (and later tests) with it.
    with RankPool(num_ranks, timeout_s=120) as own_pool:
        results = own_pool.run(_timeout, op)
    messages, poisoned = results[0]
    for message in messages:  # buffer.check(), then the next call
        assert "rank 0" in message and "timed out" in message, messages
    assert poisoned, f"rank 0's {op} outputs are not poisoned"
    assert all(r == (["", ""], None) for r in results[1:]), results


def _non_finite(rank, num_ranks, group, fmt, backend="cuda"):
    """FP8 dispatch of rows holding NaN, +Inf and -Inf: the kernel's cast equals the reference's
    (deep_ep.backends.fp8, "Non-finite inputs"): scales bit-exact (Inf included), bytes bit-exact except that
    a NaN byte only has to be a NaN (e4m3's sign of NaN is unspecified)."""
    m, hidden, num_experts, topk = 16, 2048, 4 * num_ranks, 2
    buffer = _make_buffer(group, num_ranks, m, hidden, num_experts, backend)
    try:
        xs, idxs, _ = _inputs(71, num_ranks, [m] * num_ranks, hidden, num_experts, topk, False, buffer.device)
        for x in xs:
            x[0, 5] = float("nan")
            x[1, 130] = float("inf")
            x[2, 1000] = -float("inf")
            x[3, :128] = float("nan")  # an all-NaN block
        (recv_x, recv_scales), recv_count, _, _, _ = buffer.low_latency_dispatch(
            xs[rank], idxs[rank], m, num_experts, **FORMATS[fmt]
        )
        _sync(buffer)
        want = reference.low_latency_dispatch(rank, xs, idxs, m, num_experts, **FORMATS[fmt])
        assert torch.equal(recv_count, want.recv_count), f"rank {rank}: recv_count"
        num_nan_bytes = 0
        for e in range(recv_count.numel()):
            n = int(want.recv_count[e])
            assert torch.equal(recv_scales[e, :n], want.recv_x_scales[e, :n]), (
                f"rank {rank} expert {e}: scales"
            )
            got, exp = recv_x[e, :n].view(torch.uint8), want.recv_x[e, :n].view(torch.uint8)
            nan = exp.bitwise_and(0x7F) == 0x7F
            num_nan_bytes += int(nan.sum())
            assert torch.equal(got[~nan], exp[~nan]), f"rank {rank} expert {e}: finite bytes"
            assert bool((got[nan].bitwise_and(0x7F) == 0x7F).all()), f"rank {rank} expert {e}: NaN bytes"
    finally:
        buffer.destroy()
    return num_nan_bytes


@pytest.mark.parametrize("fmt", ["fp8", "fp8_round", "fp8_ue8m0"])
def test_fp8_cast_of_nan_and_inf_matches_reference(pool, fmt):
    # Every rank's tokens 0-3 carry the non-finite values, so some rank receives NaN bytes.
    assert sum(pool.run(_non_finite, fmt)) > 0


# --- the rest of the public surface ------------------------------------------------------------------------


def _through_buffer(rank, num_ranks, group, backend="cuda"):
    """V1 return shapes and events; the zero-copy buffer lies in get_local_buffer_tensor(use_rdma_buffer=True),
    so bytes written through that view are what the peers receive; clean_low_latency_buffer keeps it usable."""
    m, hidden, num_experts, topk = 64, 4096, 8 * num_ranks, 4
    buffer = _make_buffer(group, num_ranks, m, hidden, num_experts, backend)
    device = buffer.device
    try:
        tokens = [m - r for r in range(num_ranks)]
        xs, idxs, ws = _inputs(77, num_ranks, tokens, hidden, num_experts, topk, True, device)
        (recv_x, recv_scales), recv_count, handle, event, hook = buffer.low_latency_dispatch(
            xs[rank], idxs[rank], m, num_experts, async_finish=True
        )
        assert hook is None and len(handle) == 5 and isinstance(event, deep_ep.EventOverlap)
        event.current_stream_wait()
        _sync(buffer)
        want, rows = _reference(rank, xs, idxs, m, num_experts, use_fp8=True)
        got = (recv_x, recv_scales, recv_count, handle[0], handle[1])
        _assert_dispatch_equal(rank, got, want, True)
        expected = _expected_combine(rank, rows, idxs[rank], ws[rank], num_experts)
        expert_out = _expert_outputs(recv_x, recv_scales, True)

        combined, event, hook = buffer.low_latency_combine(expert_out, idxs[rank], ws[rank], handle)
        assert hook is None and isinstance(event, deep_ep.EventOverlap)
        _sync(buffer)
        assert torch.equal(combined, expected), f"rank {rank}: combine"

        # Write the expert outputs through the RDMA buffer view at the zero-copy buffer's place; combine
        # then gets zeros as `x`, so the result can only come from the bytes written through the view.
        staging = buffer.get_next_low_latency_combine_buffer(handle)
        if device.type == "cuda":
            whole = buffer.get_local_buffer_tensor(torch.bfloat16, None, 0, use_rdma_buffer=True)
            offset_bytes = staging.data_ptr() - whole.data_ptr()
            assert 0 <= offset_bytes < whole.numel() * 2 and offset_bytes % 2 == 0, (
                f"rank {rank}: the zero-copy buffer is not inside the RDMA buffer"
            )
            whole.as_strided(
                staging.shape, staging.stride(), whole.storage_offset() + offset_bytes // 2
            ).copy_(expert_out)
            # Bytes, not values: rows past recv_count hold whatever was in memory, NaN patterns included.
            assert torch.equal(staging.view(torch.int16), expert_out.view(torch.int16)), (
                f"rank {rank}: the views do not alias"
            )
        else:  # the reference has no communication buffer: write the zero-copy buffer itself
            staging.copy_(expert_out)
        combined, _, _ = buffer.low_latency_combine(
            torch.zeros_like(expert_out), idxs[rank], ws[rank], handle, zero_copy=True
        )
        _sync(buffer)
        assert torch.equal(combined, expected), f"rank {rank}: zero-copy combine through the RDMA view"

        buffer.clean_low_latency_buffer(m, hidden, num_experts)
        recv, recv_count, handle, _, _ = buffer.low_latency_dispatch(xs[rank], idxs[rank], m, num_experts)
        _sync(buffer)
        got = (recv[0], recv[1], recv_count, handle[0], handle[1])
        _assert_dispatch_equal(rank, got, want, True)
        combined, _, _ = buffer.low_latency_combine(
            _expert_outputs(*recv, True), idxs[rank], ws[rank], handle
        )
        _sync(buffer)
        assert torch.equal(combined, expected), f"rank {rank}: combine after clean_low_latency_buffer"
    finally:
        buffer.destroy()
    return True


def test_through_the_public_buffer_api(pool):
    assert all(pool.run(_through_buffer))
