"""The reference backend's low-latency mode against a brute-force oracle, over gloo with 2 and 4 ranks.

The oracle loops over (source rank, token) pairs per expert and quantizes block by block with its own
transcription of the FP8 formula in deep_ep/fp8.py (scale rounding through log2, not bit tricks).
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import BF16_ULP, assert_low_latency_dispatch_equivalent, bytes_equal, make_inputs

import deep_ep
from deep_ep.backends.fp8 import per_token_cast_back
from deep_ep.backends.reference import low_latency_dispatch
from deep_ep.config import nvl_buffer_size_hint
from deep_ep.handles import LowLatencyHandle

RANK_COUNTS = (2, 4)
SEED = 11
# name: (hidden, topk, num_experts, tokens per rank (cycled), num_max_dispatch_tokens_per_rank, routing)
LL_CASES = {
    "basic": (2048, 4, 16, [13, 7], 16, "uniform"),
    "minus_one_and_empty_rank": (2560, 6, 36, [0, 9, 16, 3], 16, "with_minus_one"),
    "all_to_one_rank": (2048, 8, 24, [5], 8, "all_to_one_rank"),
    "topk9_hidden7168": (7168, 9, 36, [4, 2], 4, "uniform"),
}
MODES = {  # name: (use_fp8, round_scale, use_ue8m0)
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8_round_scale": (True, True, False),
    "fp8_ue8m0": (True, True, True),
}


def case_args(name: str, num_ranks: int) -> tuple:
    hidden, topk, num_experts, tokens, m, routing = LL_CASES[name]
    return hidden, topk, num_experts, [tokens[r % len(tokens)] for r in range(num_ranks)], m, routing


# ---------------------------------------------------------------------------------------------------------
# Brute-force oracle
# ---------------------------------------------------------------------------------------------------------


def brute_quantize(row: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qs, scales = [], []
    for block in row.float().view(-1, 128):
        amax = torch.tensor(max(float(block.abs().max()), 1e-4), dtype=torch.float32)
        scale = amax / 448.0
        if round_scale:
            scale = torch.tensor(2.0 ** math.ceil(math.log2(float(scale))), dtype=torch.float32)
        qs.append((block / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn))
        scales.append(scale)
    return torch.cat(qs), torch.stack(scales)


def brute_ll_rows(inputs, me: int, num_local_experts: int) -> list[list[tuple[int, int]]]:
    """Per local expert of `me`: the (source rank, token) pairs it receives, in rank then token order."""
    rows = []
    for e in range(num_local_experts):
        expert = me * num_local_experts + e
        rows.append(
            [
                (s, t)
                for s, inp in enumerate(inputs)
                for t, ids in enumerate(inp.topk_idx.tolist())
                if expert in ids
            ]
        )
    return rows


def brute_ll_dispatch(inputs, me, num_experts, m, use_fp8, round_scale):
    num_ranks = len(inputs)
    lx, hidden = num_experts // num_ranks, inputs[0].x.size(1)
    rows = brute_ll_rows(inputs, me, lx)
    recv = torch.zeros(lx, num_ranks * m, hidden, dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
    scales = torch.zeros(lx, num_ranks * m, hidden // 128)
    src_info = torch.zeros(lx, num_ranks * m, dtype=torch.int32)
    layout = torch.zeros(lx, num_ranks, dtype=torch.int64)
    for e, pairs in enumerate(rows):
        for i, (s, t) in enumerate(pairs):
            if use_fp8:
                recv[e, i], scales[e, i] = brute_quantize(inputs[s].x[t], round_scale)
            else:
                recv[e, i] = inputs[s].x[t]
            src_info[e, i] = t
        for s in range(num_ranks):
            begin = sum(1 for s2, _ in pairs if s2 < s)
            layout[e, s] = begin * 2**32 + sum(1 for s2, _ in pairs if s2 == s)
    counts = torch.tensor([len(p) for p in rows], dtype=torch.int32)
    return rows, recv, scales, counts, src_info, layout


# Per-expert factors with a 2**20 spread and opposite signs, so that the documented summation order
# (k = 0..K-1) shows in the result instead of being hidden by the final BF16 rounding.
EXPERT_FACTORS = (1.0, 2.0**20, -3.0, -(2.0**20))


def expert_output(received_bf16: torch.Tensor, local_expert: int) -> torch.Tensor:
    """What local expert e 'computes' from its received rows."""
    return (received_bf16.float() * EXPERT_FACTORS[local_expert % len(EXPERT_FACTORS)]).to(torch.bfloat16)


def brute_ll_combine(inputs, me, num_experts, m, use_fp8, round_scale):
    num_ranks = len(inputs)
    lx = num_experts // num_ranks
    rows_of = [brute_ll_rows(inputs, d, lx) for d in range(num_ranks)]
    num_tokens, hidden = inputs[me].x.shape
    out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16)
    for t in range(num_tokens):
        acc = torch.zeros(hidden)
        for k, g in enumerate(inputs[me].topk_idx[t].tolist()):
            if g < 0:
                continue
            assert (me, t) in rows_of[g // lx][g % lx]
            row = inputs[me].x[t]
            if use_fp8:
                q, s = brute_quantize(row, round_scale)
                row = per_token_cast_back(q.view(1, -1), s.view(1, -1))[0]
            y = expert_output(row, g % lx)
            acc = acc + inputs[me].topk_weights[t, k] * y.float()
        out[t] = acc.to(torch.bfloat16)
    return out


# ---------------------------------------------------------------------------------------------------------
# Rank functions and tests
# ---------------------------------------------------------------------------------------------------------


def setup(rank, num_ranks, group, args):
    hidden, topk, num_experts, tokens, m, routing = args
    inputs = make_inputs(SEED, num_ranks, tokens, hidden, num_experts, topk, routing)
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(m, hidden, num_ranks, num_experts)
    nvl = nvl_buffer_size_hint(hidden * 2, num_ranks, num_max_tokens_per_rank=m)
    buffer = deep_ep.Buffer(group, nvl, rdma, low_latency_mode=True, backend="reference")
    return inputs, buffer, num_experts, m


def ll_dispatch(buffer, inp, m, num_experts, mode, **kwargs):
    use_fp8, round_scale, use_ue8m0 = MODES[mode]
    dev = buffer.device
    return buffer.low_latency_dispatch(
        inp.x.to(dev),
        inp.topk_idx.to(dev),
        m,
        num_experts,
        use_fp8=use_fp8,
        round_scale=round_scale,
        use_ue8m0=use_ue8m0,
        **kwargs,
    )


def rank_ll_dispatch(rank, num_ranks, group, args, mode, return_recv_hook):
    inputs, buffer, num_experts, m = setup(rank, num_ranks, group, args)
    use_fp8, round_scale, use_ue8m0 = MODES[mode]
    lx, hidden = num_experts // num_ranks, inputs[0].x.size(1)
    stats = torch.full((lx,), 3, dtype=torch.int32, device=buffer.device)
    wait_stats = torch.zeros(num_ranks, dtype=torch.int64, device=buffer.device)
    recv, count, handle, event, hook = ll_dispatch(
        buffer,
        inputs[rank],
        m,
        num_experts,
        mode,
        cumulative_local_expert_recv_stats=stats,
        dispatch_wait_recv_cost_stats=wait_stats,
        async_finish=True,
        return_recv_hook=return_recv_hook,
    )
    if return_recv_hook:
        hook()
    else:
        assert hook is None
    event.current_stream_wait()
    assert event.extra_tensors is not None, "async_finish keeps the tensors alive"
    _, want_x, want_scales, want_count, want_src, want_layout = brute_ll_dispatch(
        inputs, rank, num_experts, m, use_fp8, round_scale
    )
    assert (
        isinstance(handle, LowLatencyHandle)
        and len(handle) == 5
        and tuple(handle[2:]) == (m, hidden, num_experts)
    )
    assert torch.equal(count.cpu(), want_count), "recv_count"
    assert torch.equal(stats.cpu(), want_count + 3), "cumulative_local_expert_recv_stats accumulates"
    assert not bool(wait_stats.any()), "the reference adds no wait time"
    assert torch.equal(handle.packed_recv_layout_range.cpu(), want_layout), "packed_recv_layout_range"
    assert torch.equal(handle.packed_recv_src_info.cpu(), want_src), "packed_recv_src_info"
    x = recv[0] if use_fp8 else recv
    assert x.shape == (lx, num_ranks * m, hidden) and bytes_equal(x.cpu(), want_x), (
        "recv_x rows (and zero padding)"
    )
    if use_fp8:
        scales = recv[1]
        num_cols = hidden // 512 if use_ue8m0 else hidden // 128
        assert scales.dtype == (torch.int32 if use_ue8m0 else torch.float32)
        assert scales.shape == (lx, num_ranks * m, num_cols)
        assert scales.stride() == (num_cols * num_ranks * m, 1, num_ranks * m), "scales are column-major"
        got = scales.cpu()
        if use_ue8m0:  # V1's unpacking: the int32 viewed as bytes, each byte an exponent
            got = (got.contiguous().view(torch.uint8).to(torch.int32) << 23).view(torch.float32)
        assert torch.equal(got, want_scales), "scales"
    actual = (recv, count, handle.packed_recv_src_info, handle.packed_recv_layout_range)
    expected = (recv, want_count, want_src, want_layout)
    assert_low_latency_dispatch_equivalent(actual, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", LL_CASES)
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_low_latency_dispatch_matches_bruteforce(rank_pool, num_ranks, case, mode):
    rank_pool(num_ranks).run(rank_ll_dispatch, case_args(case, num_ranks), mode, mode == "fp8")


def quarter_weights(weights: torch.Tensor) -> torch.Tensor:
    """Weights in {0.25, 0.5, 0.75, 1}: products with BF16 outputs are exact, so opposite +-2**20 terms
    cancel exactly when their weights match, and what is added before or after them shows."""
    return (weights * 4).ceil().clamp(1, 4) / 4


def rank_ll_combine(rank, num_ranks, group, args, mode, zero_copy, with_out):
    inputs, buffer, num_experts, m = setup(rank, num_ranks, group, args)
    inputs = [inp._replace(topk_weights=quarter_weights(inp.topk_weights)) for inp in inputs]
    use_fp8, round_scale, _ = MODES[mode]
    recv, _, handle, _, _ = ll_dispatch(buffer, inputs[rank], m, num_experts, mode)
    received = per_token_cast_back(*recv) if use_fp8 else recv
    y = torch.stack([expert_output(received[e], e) for e in range(received.size(0))])
    x = y
    if zero_copy:
        buffer.get_next_low_latency_combine_buffer(handle).copy_(y)
        x = torch.zeros_like(y)  # must be ignored: zero_copy reads the buffer
    dev = buffer.device
    out = (
        torch.full(inputs[rank].x.shape, float("nan"), dtype=torch.bfloat16, device=dev) if with_out else None
    )
    combined, event, hook = buffer.low_latency_combine(
        x,
        inputs[rank].topk_idx.to(dev),
        inputs[rank].topk_weights.to(dev),
        handle,
        zero_copy=zero_copy,
        out=out,
    )
    assert hook is None and event.extra_tensors is None
    if with_out:
        assert combined is out, "combine writes into `out`"
    want = brute_ll_combine(inputs, rank, num_experts, m, use_fp8, round_scale)
    assert bytes_equal(combined.cpu(), want), "low-latency combine"


LL_COMBINE_PARAMS = [
    ("basic", "bf16", False, False),
    ("basic", "fp8", False, True),
    ("minus_one_and_empty_rank", "fp8_ue8m0", True, False),
    ("all_to_one_rank", "bf16", True, True),
    ("topk9_hidden7168", "fp8_round_scale", False, True),
]


@pytest.mark.parametrize(("case", "mode", "zero_copy", "with_out"), LL_COMBINE_PARAMS)
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_low_latency_combine_matches_bruteforce(rank_pool, num_ranks, case, mode, zero_copy, with_out):
    rank_pool(num_ranks).run(rank_ll_combine, case_args(case, num_ranks), mode, zero_copy, with_out)


def rank_ll_round_trip(rank, num_ranks, group, args):
    inputs, buffer, num_experts, m = setup(rank, num_ranks, group, args)
    recv, _, handle, _, _ = ll_dispatch(buffer, inputs[rank], m, num_experts, "bf16")
    dev = buffer.device
    combined, _, _ = buffer.low_latency_combine(
        recv, inputs[rank].topk_idx.to(dev), inputs[rank].topk_weights.to(dev), handle
    )
    weight_sum = (
        inputs[rank].topk_weights.masked_fill(inputs[rank].topk_idx < 0, 0).double().sum(1, keepdim=True)
    )
    exact = inputs[rank].x.double() * weight_sum
    # Positive weights, no cancellation: float32 products and sums plus one BF16 rounding stay within an ulp.
    assert bool(((combined.cpu().double() - exact).abs() <= BF16_ULP * exact.abs()).all()), "round trip"


@pytest.mark.parametrize("case", LL_CASES)
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_low_latency_round_trip(rank_pool, num_ranks, case):
    rank_pool(num_ranks).run(rank_ll_round_trip, case_args(case, num_ranks))


def rank_normal_then_low_latency(rank, num_ranks, group, args):
    """V1's compatibility scenario: one low-latency Buffer also runs normal mode, then cleans and goes on."""
    inputs, buffer, num_experts, m = setup(rank, num_ranks, group, args)
    dev = buffer.device
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(
        inputs[rank].topk_idx.to(dev), num_experts
    )
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        inputs[rank].x.to(dev),
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
    )
    buffer.combine(recv_x, handle)
    buffer.clean_low_latency_buffer(m, inputs[0].x.size(1), num_experts)
    _, count, _, _, _ = ll_dispatch(buffer, inputs[rank], m, num_experts, "fp8")
    return int(count.sum())


@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_normal_and_low_latency_share_a_buffer(rank_pool, num_ranks):
    args = case_args("basic", num_ranks)
    totals = rank_pool(num_ranks).run(rank_normal_then_low_latency, args)
    inputs = make_inputs(SEED, num_ranks, args[3], args[0], args[2], args[1], args[5])
    pairs = sum(int((inp.topk_idx >= 0).sum()) for inp in inputs)  # distinct experts per token
    assert sum(totals) == pairs


def test_multiset_comparison_accepts_reordering_and_catches_differences():
    """The helper GPU tests use: kernels may order blocks and rows differently, but not change bytes."""
    num_ranks, num_experts, m = 3, 6, 5
    inputs = make_inputs(3, num_ranks, [5, 4, 5], 256, num_experts, 3)
    ref = low_latency_dispatch(1, [i.x for i in inputs], [i.topk_idx for i in inputs], m, num_experts)
    expected = (
        (ref.recv_x, ref.recv_x_scales),
        ref.recv_count,
        ref.packed_recv_src_info,
        ref.packed_recv_layout_range,
    )
    # Reorder: reverse the source blocks of every expert and the rows inside each block.
    x, scales = ref.recv_x.clone(), ref.recv_x_scales.clone()
    src, layout = ref.packed_recv_src_info.clone(), ref.packed_recv_layout_range.clone()
    for e in range(num_experts // num_ranks):
        row = 0
        for s in reversed(range(num_ranks)):
            begin, count = (
                int(ref.packed_recv_layout_range[e, s]) >> 32,
                int(ref.packed_recv_layout_range[e, s]) & 0xFFFFFFFF,
            )
            rows = torch.arange(begin, begin + count).flip(0)
            x[e, row : row + count], scales[e, row : row + count] = (
                ref.recv_x[e, rows],
                ref.recv_x_scales[e, rows],
            )
            src[e, row : row + count] = ref.packed_recv_src_info[e, rows]
            layout[e, s] = (row << 32) | count
            row += count
    assert not bytes_equal(x, ref.recv_x), "the permutation must actually move rows"
    assert_low_latency_dispatch_equivalent(((x, scales), ref.recv_count, src, layout), expected)
    corrupted = x.clone()
    corrupted.view(torch.uint8)[0, 0, 7] ^= 1
    with pytest.raises(AssertionError, match="rows differ"):
        assert_low_latency_dispatch_equivalent(((corrupted, scales), ref.recv_count, src, layout), expected)
    wrong_src = src.clone()
    wrong_src[0, 0] += 1
    with pytest.raises(AssertionError, match="source tokens"):
        assert_low_latency_dispatch_equivalent(((x, scales), ref.recv_count, wrong_src, layout), expected)
