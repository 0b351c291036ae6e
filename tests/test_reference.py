"""The reference backend's normal mode against a brute-force oracle, over gloo with 2 and 4 ranks.

The oracle below is deliberately naive and independent of deep_ep.reference: plain Python loops over
(source rank, token) pairs, routing read from topk_idx. Bytes that are only moved are compared bit-exactly;
reductions too, because the oracle adds in the documented order (destination ranks 0..R-1, then biases),
except the round trip, which is compared with the exact sum (BF16 rounding: half an ulp).
"""

from __future__ import annotations

import pytest
import torch
from oracle import BF16_HALF_ULP, bytes_equal, make_inputs

import deep_ep
from deep_ep.backends.fp8 import per_token_cast_back, per_token_cast_to_fp8
from deep_ep.config import nvl_buffer_size_hint
from deep_ep.handles import IntranodeHandle

RANK_COUNTS = (2, 4)
SEED = 7


class Case:
    """One input configuration; `tokens(R)` gives the per-rank token counts for R ranks."""

    def __init__(self, name, hidden, topk, num_experts, tokens, routing="uniform"):
        self.name, self.hidden, self.topk, self.num_experts = name, hidden, topk, num_experts
        self._tokens, self.routing = tokens, routing

    def args(self, num_ranks: int) -> tuple:
        tokens = [self._tokens[r % len(self._tokens)] for r in range(num_ranks)]
        return (self.hidden, self.topk, self.num_experts, tokens, self.routing)


CASES = [
    Case("basic", 256, 4, 16, [37, 41]),
    Case("zero_tokens_on_a_rank", 128, 2, 24, [0, 5, 9, 0]),
    Case("one_token", 128, 8, 36, [1]),
    Case("minus_one", 2048, 6, 36, [23, 17, 0, 31], "with_minus_one"),
    Case("all_to_one_rank", 256, 3, 24, [20], "all_to_one_rank"),
    Case("top1", 512, 1, 24, [40, 3]),
    Case("hidden_7168", 7168, 8, 24, [6, 4]),
]
CASE_IDS = [c.name for c in CASES]


# ---------------------------------------------------------------------------------------------------------
# Brute-force oracle
# ---------------------------------------------------------------------------------------------------------


def brute_rows(inputs, dest: int, num_local_experts: int) -> list[tuple[int, int]]:
    """(source rank, token) pairs that `dest` receives, in receive order."""
    rows = []
    for s, inp in enumerate(inputs):
        for t, experts in enumerate(inp.topk_idx.tolist()):
            if any(e >= 0 and e // num_local_experts == dest for e in experts):
                rows.append((s, t))
    return rows


def brute_dispatch(inputs, me: int, num_experts: int, alignment: int = 1) -> dict:
    num_ranks = len(inputs)
    lx = num_experts // num_ranks
    rows_of = [brute_rows(inputs, d, lx) for d in range(num_ranks)]
    rows = rows_of[me]
    hidden = inputs[0].x.size(1)
    recv_topk_idx, recv_topk_weights = [], []
    for s, t in rows:
        ids = inputs[s].topk_idx[t].tolist()
        local = [e - me * lx if e >= 0 and e // lx == me else -1 for e in ids]
        recv_topk_idx.append(local)
        recv_topk_weights.append(
            [float(w) if lid >= 0 else 0.0 for w, lid in zip(inputs[s].topk_weights[t], local)]
        )
    per_expert = []
    for e in range(lx):
        count = sum(row.count(me * lx + e) for inp in inputs for row in inp.topk_idx.tolist())
        per_expert.append(-(-count // alignment) * alignment)
    prefix = [[sum(1 for s, _ in rows_of[j] if s <= i) for j in range(num_ranks)] for i in range(num_ranks)]
    num_my_tokens = inputs[me].x.size(0)
    send_head = [
        [rows_of[j].index((me, t)) if (me, t) in rows_of[j] else -1 for j in range(num_ranks)]
        for t in range(num_my_tokens)
    ]
    k = inputs[0].topk_idx.size(1)
    return {
        "rows": rows,
        "rows_of": rows_of,
        "recv_x": torch.stack([inputs[s].x[t] for s, t in rows])
        if rows
        else torch.empty(0, hidden, dtype=torch.bfloat16),
        "recv_topk_idx": torch.tensor(recv_topk_idx, dtype=torch.int64).view(-1, k),
        "recv_topk_weights": torch.tensor(recv_topk_weights, dtype=torch.float32).view(-1, k),
        "per_expert": per_expert,
        "rank_prefix_matrix": torch.tensor(prefix, dtype=torch.int32),
        "recv_src_idx": torch.tensor([t for _, t in rows], dtype=torch.int32),
        "send_head": torch.tensor(send_head, dtype=torch.int32).view(num_my_tokens, num_ranks),
    }


# Per-rank factors with a 2**20 spread: a float32 sum of a few BF16 values of similar magnitude is exact, so
# only terms this far apart make the documented reduction order visible in the result.
COMBINE_FACTORS = (1.0, 2.0**20, -3.0, -(2.0**20))


def combine_input(recv_x: torch.Tensor, holder: int) -> torch.Tensor:
    """What 'the experts' of rank `holder` return for its received rows."""
    return (recv_x.float() * COMBINE_FACTORS[holder % len(COMBINE_FACTORS)]).to(torch.bfloat16)


def brute_combine(inputs, me: int, num_experts: int, biases=()) -> tuple[torch.Tensor, torch.Tensor]:
    num_ranks = len(inputs)
    rows_of = [brute_rows(inputs, d, num_experts // num_ranks) for d in range(num_ranks)]
    weights_of = [brute_dispatch(inputs, d, num_experts)["recv_topk_weights"] for d in range(num_ranks)]
    num_tokens, hidden = inputs[me].x.shape
    out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16)
    out_weights = torch.zeros(num_tokens, inputs[me].topk_idx.size(1))
    for t in range(num_tokens):
        acc = torch.zeros(hidden)
        for d in range(num_ranks):
            if (me, t) in rows_of[d]:
                row = rows_of[d].index((me, t))
                acc = acc + combine_input(inputs[me].x[t : t + 1], d)[0].float()
                out_weights[t] += weights_of[d][row]
        for bias in biases:
            acc = acc + bias[t].float()
        out[t] = acc.to(torch.bfloat16)
    return out, out_weights


# ---------------------------------------------------------------------------------------------------------
# Rank-side helpers (run inside the pool's processes)
# ---------------------------------------------------------------------------------------------------------


def make_buffer(group, num_ranks, hidden, tokens):
    num_nvl_bytes = nvl_buffer_size_hint(hidden * 2, num_ranks, num_max_tokens_per_rank=max(tokens))
    return deep_ep.Buffer(group, num_nvl_bytes, backend="reference")


def fresh_dispatch(buffer, inp, num_experts, with_topk=True, **kwargs):
    dev = buffer.device
    topk_idx = inp.topk_idx.to(dev)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    extra = {"topk_idx": topk_idx, "topk_weights": inp.topk_weights.to(dev)} if with_topk else {}
    x = inp.x.to(dev) if "x" not in kwargs else kwargs.pop("x")
    return buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        **extra,
        **kwargs,
    )


def setup(rank, num_ranks, group, case_args, dtype=torch.bfloat16):
    hidden, topk, num_experts, tokens, routing = case_args
    inputs = make_inputs(SEED, num_ranks, tokens, hidden, num_experts, topk, routing, dtype)
    return inputs, make_buffer(group, num_ranks, hidden, tokens), num_experts


def cpu(t):
    return None if t is None else t.cpu()


# ---------------------------------------------------------------------------------------------------------
# Rank functions and tests
# ---------------------------------------------------------------------------------------------------------


def rank_layout(rank, num_ranks, group, case_args):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args)
    per_rank, per_rdma_rank, per_expert, in_rank, event = buffer.get_dispatch_layout(
        inputs[rank].topk_idx.to(buffer.device), num_experts
    )
    lx = num_experts // num_ranks
    ids = inputs[rank].topk_idx.tolist()
    want_in_rank = [[any(e >= 0 and e // lx == r for e in row) for r in range(num_ranks)] for row in ids]
    want_in_rank = torch.tensor(want_in_rank, dtype=torch.bool).view(-1, num_ranks)
    assert per_rdma_rank is None and isinstance(event, deep_ep.EventOverlap)
    assert torch.equal(cpu(in_rank), want_in_rank), "is_token_in_rank"
    assert torch.equal(cpu(per_rank), want_in_rank.sum(0).int()), "num_tokens_per_rank"
    want_per_expert = [sum(row.count(e) for row in ids) for e in range(num_experts)]
    assert cpu(per_expert).tolist() == want_per_expert and per_expert.dtype == torch.int32, (
        "num_tokens_per_expert"
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_layout_matches_bruteforce(rank_pool, num_ranks, case):
    rank_pool(num_ranks).run(rank_layout, case.args(num_ranks))


def rank_dispatch_bf16(rank, num_ranks, group, case_args):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args)
    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = fresh_dispatch(
        buffer, inputs[rank], num_experts
    )
    want = brute_dispatch(inputs, rank, num_experts)
    assert bytes_equal(cpu(recv_x), want["recv_x"]), "recv_x"
    assert torch.equal(cpu(recv_topk_idx), want["recv_topk_idx"]), "recv_topk_idx"
    assert torch.equal(cpu(recv_topk_weights), want["recv_topk_weights"]), "recv_topk_weights"
    assert per_expert == want["per_expert"], f"per-expert counts {per_expert} != {want['per_expert']}"
    assert isinstance(handle, IntranodeHandle) and isinstance(handle, tuple) and len(handle) == 6
    assert torch.equal(cpu(handle.rank_prefix_matrix), want["rank_prefix_matrix"]), "rank_prefix_matrix"
    assert torch.equal(cpu(handle.recv_src_idx), want["recv_src_idx"]), "recv_src_idx"
    assert torch.equal(cpu(handle.send_head), want["send_head"]), "send_head"
    assert torch.equal(cpu(handle[4]), cpu(handle.is_token_in_rank)) and handle[4].dtype == torch.bool
    # The reference's channel matrices: tokens sent to each rank, and the first row from each source.
    sent = [sum(1 for s, _ in want["rows_of"][j] if s == rank) for j in range(num_ranks)]
    assert cpu(handle.channel_prefix_matrix).flatten().tolist() == sent, "channel_prefix_matrix"
    firsts = [sum(1 for s, _ in want["rows"] if s < i) for i in range(num_ranks)]
    assert cpu(handle.recv_channel_prefix_matrix).flatten().tolist() == firsts, "recv_channel_prefix_matrix"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_dispatch_bf16_matches_bruteforce(rank_pool, num_ranks, case):
    rank_pool(num_ranks).run(rank_dispatch_bf16, case.args(num_ranks))


def rank_dispatch_without_topk(rank, num_ranks, group, case_args):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args)
    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = fresh_dispatch(
        buffer, inputs[rank], num_experts, with_topk=False
    )
    want = brute_dispatch(inputs, rank, num_experts)
    assert recv_topk_idx is None and recv_topk_weights is None
    assert bytes_equal(cpu(recv_x), want["recv_x"]), "recv_x"
    assert per_expert == want["per_expert"], "per-expert counts come from num_tokens_per_expert"
    assert torch.equal(cpu(handle.recv_src_idx), want["recv_src_idx"])


@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_layout_only_dispatch_without_topk(rank_pool, num_ranks):
    rank_pool(num_ranks).run(rank_dispatch_without_topk, CASES[3].args(num_ranks))


def rank_cached_dispatch(rank, num_ranks, group, case_args, fp8):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args)
    first = fresh_dispatch(buffer, inputs[rank], num_experts)
    handle = first[4]
    # Same routing, new data: rows must land exactly where the first dispatch put them.
    new_inputs = [inp._replace(x=(inp.x.float() * -2 + 1).to(torch.bfloat16)) for inp in inputs]
    new_x = new_inputs[rank].x.to(buffer.device)
    if fp8:
        new_x = per_token_cast_to_fp8(new_x)
    result = buffer.dispatch(new_x, handle=handle)
    assert len(result) == 6 and result[1:5] == (None, None, None, None), "cached dispatch returns V1's tuple"
    want = brute_dispatch(new_inputs, rank, num_experts)
    if fp8:
        want_q, want_s = per_token_cast_to_fp8(want["recv_x"])
        assert bytes_equal(cpu(result[0][0]), want_q) and bytes_equal(cpu(result[0][1]), want_s)
    else:
        assert bytes_equal(cpu(result[0]), want["recv_x"]), "cached recv_x"


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_cached_dispatch_moves_new_data_to_same_rows(rank_pool, num_ranks, fp8):
    rank_pool(num_ranks).run(rank_cached_dispatch, CASES[0].args(num_ranks), fp8)


def rank_fp8_dispatch(rank, num_ranks, group, case_args, column_major_scales):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args, torch.float8_e4m3fn)
    q, scales = (t.to(buffer.device) for t in inputs[rank].x_fp8)
    if column_major_scales:
        scales = scales.t().contiguous().t()  # DeepGEMM-style layout, same values
    recv, _, _, _, handle, _ = fresh_dispatch(buffer, inputs[rank], num_experts, x=(q, scales))
    rows = brute_dispatch(inputs, rank, num_experts)["rows"]
    want_q = (
        torch.stack([inputs[s].x_fp8[0][t] for s, t in rows]) if rows else q.new_empty(0, q.size(1)).cpu()
    )
    want_s = (
        torch.stack([inputs[s].x_fp8[1][t] for s, t in rows])
        if rows
        else scales.new_empty(0, scales.size(1)).cpu()
    )
    assert isinstance(recv, tuple) and recv[0].dtype == torch.float8_e4m3fn
    assert bytes_equal(cpu(recv[0]), want_q) and bytes_equal(cpu(recv[1]), want_s), "FP8 rows and scales"
    # Quantize -> dispatch -> dequantize == dequantize of the source rows, bit for bit.
    assert bytes_equal(per_token_cast_back(*map(cpu, recv)), per_token_cast_back(want_q, want_s))


@pytest.mark.parametrize("column_major_scales", [False, True], ids=["row_major", "column_major"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6]], ids=[CASE_IDS[0], CASE_IDS[3], CASE_IDS[6]])
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_fp8_dispatch_round_trip(rank_pool, num_ranks, case, column_major_scales):
    rank_pool(num_ranks).run(rank_fp8_dispatch, case.args(num_ranks), column_major_scales)


def rank_expert_alignment(rank, num_ranks, group, case_args, alignment):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args)
    per_expert = fresh_dispatch(buffer, inputs[rank], num_experts, expert_alignment=alignment)[3]
    want = brute_dispatch(inputs, rank, num_experts, alignment)["per_expert"]
    assert per_expert == want and all(c % alignment == 0 for c in per_expert), f"{per_expert} != {want}"


@pytest.mark.parametrize("alignment", [1, 4, 128])
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_expert_alignment_rounds_counts_up(rank_pool, num_ranks, alignment):
    rank_pool(num_ranks).run(rank_expert_alignment, CASES[0].args(num_ranks), alignment)


def rank_num_worst_tokens(rank, num_ranks, group, case_args):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args)
    want = brute_dispatch(inputs, rank, num_experts)
    num_rows = want["recv_x"].size(0)
    worst = max(brute_dispatch(inputs, r, num_experts)["recv_x"].size(0) for r in range(num_ranks)) + 5
    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = fresh_dispatch(
        buffer, inputs[rank], num_experts, num_worst_tokens=worst
    )
    assert per_expert == [], "V1 returns an empty list with num_worst_tokens"
    assert recv_x.size(0) == recv_topk_idx.size(0) == handle.recv_src_idx.size(0) == worst
    assert bytes_equal(cpu(recv_x[:num_rows]), want["recv_x"]) and not bool(recv_x[num_rows:].any())
    assert torch.equal(cpu(recv_topk_idx[:num_rows]), want["recv_topk_idx"])
    assert bool((recv_topk_idx[num_rows:] == -1).all()) and not bool(recv_topk_weights[num_rows:].any())
    assert bool((handle.recv_src_idx[num_rows:] == -1).all())
    # The padded handle still combines correctly: padding rows belong to no token.
    combined, _, _ = buffer.combine(combine_input(recv_x, rank), handle)
    assert bytes_equal(cpu(combined), brute_combine(inputs, rank, num_experts)[0]), (
        "combine through padded handle"
    )
    # And it serves a cached dispatch (same padded row count).
    assert buffer.dispatch(inputs[rank].x.to(buffer.device), handle=handle)[0].size(0) == worst
    # Too small: the ranks that receive more rows than allowed refuse.
    try:
        fresh_dispatch(buffer, inputs[rank], num_experts, num_worst_tokens=max(1, num_rows - 1))
        raised = False
    except ValueError as e:
        raised = "num_worst_tokens" in str(e)
    assert raised == (num_rows > max(1, num_rows - 1)), "num_worst_tokens below the received count must raise"


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[3]])
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_num_worst_tokens_pads_outputs(rank_pool, num_ranks, case):
    rank_pool(num_ranks).run(rank_num_worst_tokens, case.args(num_ranks))


def rank_combine(rank, num_ranks, group, case_args, num_biases):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args)
    recv_x, _, recv_topk_weights, _, handle, _ = fresh_dispatch(buffer, inputs[rank], num_experts)
    gen = torch.Generator().manual_seed(1000 + rank)
    biases = [torch.randn(inputs[rank].x.shape, generator=gen).to(torch.bfloat16) for _ in range(num_biases)]
    if num_biases == 0:
        bias = None
    elif num_biases == 1:
        bias = biases[0].to(buffer.device)
    else:
        bias = tuple(b.to(buffer.device) for b in biases)
    combined, combined_weights, event = buffer.combine(
        combine_input(recv_x, rank), handle, topk_weights=recv_topk_weights, bias=bias
    )
    want_x, want_weights = brute_combine(inputs, rank, num_experts, biases)
    assert combined.dtype == torch.bfloat16 and bytes_equal(cpu(combined), want_x), "combined_x"
    assert torch.equal(cpu(combined_weights), want_weights), "combined_topk_weights"
    assert isinstance(event, deep_ep.EventOverlap)


COMBINE_PARAMS = [(c, 0) for c in CASES] + [(CASES[0], 1), (CASES[0], 2), (CASES[3], 2)]


@pytest.mark.parametrize(
    ("case", "num_biases"), COMBINE_PARAMS, ids=[f"{c.name}-bias{n}" for c, n in COMBINE_PARAMS]
)
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_combine_matches_bruteforce(rank_pool, num_ranks, case, num_biases):
    rank_pool(num_ranks).run(rank_combine, case.args(num_ranks), num_biases)


def rank_round_trip(rank, num_ranks, group, case_args):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args)
    recv_x, _, recv_topk_weights, _, handle, _ = fresh_dispatch(buffer, inputs[rank], num_experts)
    combined, combined_weights, _ = buffer.combine(recv_x, handle, topk_weights=recv_topk_weights)
    # Each token comes back once per rank it visited: exact value count * x, then one BF16 rounding.
    copies = handle.is_token_in_rank.sum(1, keepdim=True).cpu().double()
    exact = inputs[rank].x.double() * copies
    assert bool(((cpu(combined).double() - exact).abs() <= BF16_HALF_ULP * exact.abs()).all()), "round trip"
    # Every weight is local on exactly one rank (zero elsewhere), -1 slots on none.
    want_weights = inputs[rank].topk_weights.masked_fill(inputs[rank].topk_idx < 0, 0)
    assert torch.equal(cpu(combined_weights), want_weights), "weights round trip"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_dispatch_combine_round_trip(rank_pool, num_ranks, case):
    rank_pool(num_ranks).run(rank_round_trip, case.args(num_ranks))


def rank_events(rank, num_ranks, group, case_args):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args)
    previous = deep_ep.Buffer.capture()
    out = fresh_dispatch(buffer, inputs[rank], num_experts, previous_event=previous, async_finish=True)
    event = out[5]
    with event:
        pass  # waiting happens on exit; on CPU there is nothing to wait for
    event.current_stream_wait()
    assert (event.event is None) == (buffer.device.type == "cpu")
    combined, _, event = buffer.combine(out[0], out[4], async_finish=True, allocate_on_comm_stream=True)
    event.current_stream_wait()
    assert combined.size(0) == inputs[rank].x.size(0)


@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_async_finish_and_previous_event(rank_pool, num_ranks):
    rank_pool(num_ranks).run(rank_events, CASES[0].args(num_ranks))


def rank_inconsistent_counts(rank, num_ranks, group, case_args):
    inputs, buffer, num_experts = setup(rank, num_ranks, group, case_args)
    topk_idx = inputs[rank].topk_idx.to(buffer.device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    if rank == num_ranks - 1:
        per_rank = per_rank + 1  # one rank lies about its counts
    try:
        buffer.dispatch(
            inputs[rank].x.to(buffer.device),
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
        )
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_inconsistent_counts_raise_on_every_rank(rank_pool, num_ranks):
    messages = rank_pool(num_ranks).run(rank_inconsistent_counts, CASES[0].args(num_ranks))
    assert all(m is not None and m.startswith("num_tokens_per_rank:") for m in messages), messages
