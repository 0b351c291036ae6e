"""What a call does on the host, through the public `deep_ep.Buffer(..., backend="cuda")`: low-latency
dispatch + combine captured in a CUDA graph and replayed with fresh data; out-of-range expert ids found on
the GPU, carried to every rank by the low-latency dispatch's count exchange and raised on every rank,
without leaving a peer waiting; and no host-GPU synchronisation inside a call.

Every rank regenerates all ranks' inputs from one seed (on the CPU), so the oracle (deep_ep.reference's pure
functions) needs no communication; results are compared bit-exactly. Ranks share the GPU(s) (MPS): 2 and
4 ranks. The rank functions take a `backend` argument: the tests pass "cuda"; "reference" runs the same
harness on the CPU over gloo (graphs, GPU sleeps and the bad ids, which the reference rejects on the host
before its collective, are skipped there), which is how the harness itself is checked without a GPU.

Capturing low-latency ops in a CUDA graph (the rule users must follow):
- run the sequence to be captured eagerly first (warm-up), with the same shapes and flags;
- capture an even number of low-latency ops (dispatch + combine pairs): consecutive low-latency ops
  alternate between two buffer halves and the half each captured op uses is fixed at capture, so a graph
  with an odd count would leave the eager ops after it, and its own next replay, on the wrong half;
- replay after copying fresh data into the captured input tensors; outputs are the tensors the captured
  calls returned (for zero_copy, get_next_low_latency_combine_buffer is called inside the capture).
"""

from __future__ import annotations

import pytest
import torch
from oracle import bytes_equal, environment, low_latency_compiled

import deep_ep
from deep_ep.backends import reference
from deep_ep.backends.fp8 import per_token_cast_back, per_token_cast_to_fp8
from deep_ep.tools.launch import RankPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not low_latency_compiled(), reason="needs a CUDA GPU and deep_ep._C built with NVSHMEM"
    ),
]

TIMEOUT_ENV = "DEEP_EP_TIMEOUT_S"  # read when a Buffer is created
TIMEOUT_S = 60
BAD_ID_TIMEOUT_S = 20  # short: a peer left waiting becomes an error quickly
# Low-latency shapes: small enough that the CPU oracle of 200 replays stays fast.
M, HIDDEN, NUM_EXPERTS, TOPK = 64, 2048, 64, 8
NORMAL_TOKENS = 96  # intra-node: rank r sends NORMAL_TOKENS + 9 r tokens
FORMATS = {  # name: (use_fp8, round_scale, use_ue8m0)
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8_round": (True, True, False),
    "fp8_ue8m0": (True, True, True),
}
MODES = ("plain", "hook", "zero_copy", "out")
LONG_CASE, LONG_REPLAYS, SHORT_REPLAYS = ("fp8", "hook"), 200, 10
# ~100 ms of torch.cuda._sleep at the H200's 1.98 GHz SM clock: far longer than any call's host side.
HOLD_UP_CYCLES = 200_000_000


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def pool(request):
    with RankPool(request.param, timeout_s=600) as p:
        yield p


# --- rank-side helpers (module level: they run in the rank processes) --------------------------------------


def _ll_buffer(group, num_ranks, backend, timeout_s=TIMEOUT_S):
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(M, HIDDEN, num_ranks, NUM_EXPERTS)
    with environment(TIMEOUT_ENV, str(timeout_s)):
        return deep_ep.Buffer(group, 0, size, low_latency_mode=True, explicitly_destroy=True, backend=backend)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(num_ranks):
    return [M - 5 * r for r in range(num_ranks)]


def _inputs(seed, tokens, hidden=HIDDEN):
    """Every rank's (x, topk_idx with ~15% -1, topk_weights), on the CPU; tokens[r] tokens on rank r."""
    g = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for t in tokens:
        # Rows of different magnitudes so the per-128 scales differ.
        x = torch.randn(t, hidden, generator=g) * torch.rand(t, 1, generator=g).mul(8).exp2()
        idx = torch.rand(t, NUM_EXPERTS, generator=g).topk(TOPK, dim=1).indices
        idx[torch.rand(t, TOPK, generator=g) < 0.15] = -1
        xs.append(x.to(torch.bfloat16))
        idxs.append(idx)
        ws.append(torch.rand(t, TOPK, generator=g))
    return xs, idxs, ws


def _expert_outputs(recv_x, recv_scales=None):
    """A deterministic 'expert': dequantize, scale by (local expert index % 3 + 1) / 2, as bf16."""
    x = recv_x if recv_scales is None else per_token_cast_back(recv_x, recv_scales)
    factor = (torch.arange(x.size(0), device=x.device) % 3 + 1).float().div(2).view(-1, 1, 1)
    return (x.float() * factor).to(torch.bfloat16)


def _ll_oracle(rank, fmt, xs, idxs, combine_idx, combine_weights):
    """(the reference's dispatch result of `rank`, its combine of `combine_idx` / `combine_weights`).

    The experts see dequantized rows; dequantizing before a BF16 dispatch gives the same rows as dispatching
    FP8 and dequantizing after (both are per row), so every owner's expert input comes from one cheap BF16
    dispatch per owner instead of an FP8 one that quantizes every rank's tokens again."""
    use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
    want = reference.low_latency_dispatch(
        rank, xs, idxs, M, NUM_EXPERTS, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0
    )
    seen = xs
    if use_fp8:
        seen = [per_token_cast_back(*per_token_cast_to_fp8(x, round_scale=round_scale)) for x in xs]
    owners = [
        reference.low_latency_dispatch(d, seen, idxs, M, NUM_EXPERTS, use_fp8=False) for d in range(len(xs))
    ]
    combined = reference.low_latency_combine(
        rank,
        [_expert_outputs(o.recv_x[:, : int(o.recv_count.max())]) for o in owners],
        combine_idx,
        combine_weights,
        [o.packed_recv_src_info for o in owners],
        [o.packed_recv_layout_range for o in owners],
        NUM_EXPERTS,
    )
    return want, combined


def _assert_dispatch_equal(where, recv, recv_count, handle, want):
    """Valid rows, scales, source indices and counts bit-exactly (rows past recv_count are unspecified)."""
    recv_x, recv_scales = recv if isinstance(recv, tuple) else (recv, None)
    assert torch.equal(recv_count.cpu(), want.recv_count), f"{where}: recv_count"
    assert torch.equal(handle.packed_recv_layout_range.cpu(), want.packed_recv_layout_range), (
        f"{where}: packed_recv_layout_range"
    )
    got_x, got_src = recv_x.cpu(), handle.packed_recv_src_info.cpu()
    if recv_scales is not None:
        assert recv_scales.stride(1) == 1, f"{where}: scales are not column-major"
        got_scales = recv_scales.cpu()
    for e, n in enumerate(want.recv_count.tolist()):
        assert torch.equal(got_src[e, :n], want.packed_recv_src_info[e, :n]), f"{where} expert {e}: src_info"
        assert bytes_equal(got_x[e, :n], want.recv_x[e, :n]), f"{where} expert {e}: rows"
        if recv_scales is not None:
            assert bytes_equal(got_scales[e, :n], want.recv_x_scales[e, :n]), f"{where} expert {e}: scales"


def _assert_combine_equal(where, combined, expected):
    assert bytes_equal(combined.cpu(), expected), (
        f"{where}: combine differs, max abs {(combined.cpu().float() - expected.float()).abs().max()}"
    )


# --- low-latency dispatch + combine captured in a CUDA graph ------------------------------------------------


def _rank_graph_replay(rank, num_ranks, group, fmt, mode, replays, backend="cuda"):
    """dispatch -> expert -> combine captured once, replayed with fresh inputs copied into the captured
    tensors; each replay's receive tensors and combined output are compared with the reference."""
    torch.set_num_threads(2)  # up to 4 rank processes compute the oracle side by side
    use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
    buffer = _ll_buffer(group, num_ranks, backend)
    device = buffer.device
    tokens = _tokens(num_ranks)[rank]
    static_x = torch.zeros(tokens, HIDDEN, dtype=torch.bfloat16, device=device)
    static_idx = torch.full((tokens, TOPK), -1, dtype=torch.int64, device=device)
    static_w = torch.zeros(tokens, TOPK, dtype=torch.float32, device=device)
    out = torch.empty(tokens, HIDDEN, dtype=torch.bfloat16, device=device) if mode == "out" else None

    def load(seed):
        xs, idxs, ws = _inputs(seed, _tokens(num_ranks))
        static_x.copy_(xs[rank])
        static_idx.copy_(idxs[rank])
        static_w.copy_(ws[rank])
        return xs, idxs, ws

    def step():
        recv, recv_count, handle, _, hook = buffer.low_latency_dispatch(
            static_x,
            static_idx,
            M,
            NUM_EXPERTS,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            return_recv_hook=mode == "hook",
        )
        if hook is not None:
            hook()
        expert_out = _expert_outputs(*recv) if use_fp8 else _expert_outputs(recv)
        if mode == "zero_copy":
            buffer.get_next_low_latency_combine_buffer(handle).copy_(expert_out)
        combined, _, hook = buffer.low_latency_combine(
            expert_out,
            static_idx,
            static_w,
            handle,
            zero_copy=mode == "zero_copy",
            return_recv_hook=mode == "hook",
            out=out,
        )
        if hook is not None:
            hook()
        return recv, recv_count, handle, combined

    def check(inputs, outputs, where):
        xs, idxs, ws = inputs
        want, expected = _ll_oracle(rank, fmt, xs, idxs, idxs[rank], ws[rank])  # while the GPU works
        _sync(device)
        recv, recv_count, handle, combined = outputs
        _assert_dispatch_equal(where, recv, recv_count, handle, want)
        if out is not None:
            assert combined.data_ptr() == out.data_ptr(), f"{where}: combine did not write `out`"
        _assert_combine_equal(where, combined, expected)

    graph = None
    try:
        inputs = load(0)
        outputs = step()  # the eager warm-up the capture rule asks for
        check(inputs, outputs, f"rank {rank} {fmt} {mode}, eager warm-up")
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = step()
        for replay in range(replays):
            inputs = load(1 + replay)
            if graph is not None:
                graph.replay()
            else:  # the reference backend: the captured sequence, eagerly
                outputs = step()
            check(inputs, outputs, f"rank {rank} {fmt} {mode}, replay {replay}")
    finally:
        _sync(device)
        buffer.destroy()
    return True


GRAPH_CASES = [
    pytest.param(fmt, mode, LONG_REPLAYS if (fmt, mode) == LONG_CASE else SHORT_REPLAYS, id=f"{fmt}-{mode}")
    for fmt in FORMATS
    for mode in MODES
]


@pytest.mark.parametrize(("fmt", "mode", "replays"), GRAPH_CASES)
def test_low_latency_graph_replays_match_reference(pool, fmt, mode, replays):
    assert all(pool.run(_rank_graph_replay, fmt, mode, replays))


# --- out-of-range expert ids -------------------------------------------------------------------------------

# Bad entries per rank, (token, slot) -> id: rank 0's are one past the top of the range and one below -1
# (the first, in pair order, is the one reported); rank 1 has one only in the "two_ranks" case.
BAD_IDS = {0: {(3, 2): NUM_EXPERTS + 5, (5, 1): -3}, 1: {(2, 0): -7}}
# Where the bad ids are passed -> the call that must raise the ValueError on every rank.
RAISED_BY = {
    "dispatch": "combine",
    "dispatch_two_ranks": "combine",
    "dispatch_hook": "combine",
    "dispatch_and_combine": "next combine",
}
# What every rank raises: the lowest offending rank's first bad id.
BAD_ID_MESSAGE = f"topk_idx: expert ids must be in [-1, {NUM_EXPERTS}), found {NUM_EXPERTS + 5} on rank 0 ("


def _with_bad_ids(idx, rank, inject, where):
    """This rank's ids with its BAD_IDS written in (when `inject`), else with -1 there: what the GPU treats
    them as."""
    idx = idx.clone()
    if rank == 0 or (rank == 1 and where == "dispatch_two_ranks"):
        for (t, k), bad in BAD_IDS[rank].items():
            idx[t, k] = bad if inject else -1
    return idx


class _Calls:
    """Runs calls; those that `may_raise` have the message of a ValueError kept (their result is then None)."""

    def __init__(self) -> None:
        self.raised: dict[str, str] = {}

    def __call__(self, name, fn, *args, may_raise=False, **kwargs):
        if not may_raise:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except ValueError as error:
            self.raised[name] = str(error)
            return None


def _hold_up(device) -> None:
    """Queue a long GPU sleep: a call made now ends before the GPU runs its kernels."""
    if device.type == "cuda":
        torch.cuda._sleep(HOLD_UP_CYCLES)


def _rank_bad_expert_id(rank, num_ranks, group, where, backend="cuda"):
    """Rank 0 (and rank 1 in "dispatch_two_ranks") passes BAD_IDS to the low-latency ops named by `where`.
    They must act as -1 there (the pair is neither sent nor combined), and on every rank the ValueError must
    come from the first combine (or its hook) that ends after the GPU ran the dispatch's receiving kernel,
    after that call's own kernels are queued: every rank completes every call of the round.
    Then a fresh round trip is correct everywhere."""
    torch.set_num_threads(2)
    buffer = _ll_buffer(group, num_ranks, backend, timeout_s=BAD_ID_TIMEOUT_S)
    device = buffer.device
    inject = backend != "reference"  # the reference rejects them on the host, before its collective
    call = _Calls()
    tokens = _tokens(num_ranks)

    def dispatch(name, x, idx, return_recv_hook=False, may_raise=False):
        return call(
            name,
            buffer.low_latency_dispatch,
            x.to(device),
            idx.to(device),
            M,
            NUM_EXPERTS,
            use_fp8=False,
            return_recv_hook=return_recv_hook,
            may_raise=may_raise,
        )

    def combine(name, dispatched, idx, weights, may_raise=False):
        recv, _, handle, _, _ = dispatched
        expert_out = _expert_outputs(recv)
        return call(
            name,
            buffer.low_latency_combine,
            expert_out,
            idx.to(device),
            weights.to(device),
            handle,
            may_raise=may_raise,
        )

    def check_round_trip(seed, label):
        xs, idxs, ws = _inputs(seed, tokens)
        dispatched = dispatch(f"{label} dispatch", xs[rank], idxs[rank])
        combined = combine(f"{label} combine", dispatched, idxs[rank], ws[rank])
        _sync(device)
        want, expected = _ll_oracle(rank, "bf16", xs, idxs, idxs[rank], ws[rank])
        _assert_dispatch_equal(f"rank {rank}, {label}", *dispatched[:3], want)
        _assert_combine_equal(f"rank {rank}, {label}", combined[0], expected)

    try:
        xs, idxs, ws = _inputs(300, tokens)
        effective = [_with_bad_ids(idx, r, False, where) for r, idx in enumerate(idxs)]  # bad ids act as -1
        bad = _with_bad_ids(idxs[rank], rank, inject, where).to(device)
        # On the device before the GPU is held up: a host-to-device copy would wait for the hold-up.
        x, weights = xs[rank].to(device), ws[rank].to(device)
        where_rank = f"rank {rank}, bad ids in {where}"
        if where in ("dispatch", "dispatch_two_ranks", "dispatch_hook"):
            hooked = where == "dispatch_hook"
            _hold_up(device)
            dispatched = dispatch("dispatch", x, bad, hooked)
            _sync(device)
            if hooked:
                # The report comes from the receiving kernel, queued here behind a hold-up: the hook
                # returns before it runs, so the combine is the first call to see it.
                _hold_up(device)
                call("hook", dispatched[4], may_raise=True)
                _sync(device)
            want, expected = _ll_oracle(rank, "bf16", xs, effective, effective[rank], ws[rank])
            _assert_dispatch_equal(where_rank, *dispatched[:3], want)
            result = combine("combine", dispatched, effective[rank], weights, may_raise=True)
            _sync(device)
            if result is not None:
                _assert_combine_equal(where_rank, result[0], expected)
        else:
            # The combine takes the dispatch's topk_idx (as in V1), bad ids included: both calls are queued
            # behind the hold-up, so neither has seen its kernels run when it returns and neither raises.
            _hold_up(device)
            dispatched = dispatch("dispatch", x, bad)
            result = combine("combine", dispatched, bad, weights)
            _sync(device)
            want, expected = _ll_oracle(rank, "bf16", xs, effective, effective[rank], ws[rank])
            _assert_dispatch_equal(where_rank, *dispatched[:3], want)
            _assert_combine_equal(where_rank, result[0], expected)
            # The next combine reports it (a combine reports none of its own: its topk_idx is its
            # dispatch's; a dispatch raises nothing but timeouts, so that every rank completes its round);
            # its kernels still run, so every rank gets every rank's rows.
            xs, idxs, ws = _inputs(301, tokens)
            dispatched = dispatch("next dispatch", xs[rank], idxs[rank])
            _sync(device)
            want, expected = _ll_oracle(rank, "bf16", xs, idxs, idxs[rank], ws[rank])
            _assert_dispatch_equal(where_rank + ", next dispatch", *dispatched[:3], want)
            result = combine("next combine", dispatched, idxs[rank], ws[rank], may_raise=True)
            _sync(device)
            if result is not None:
                _assert_combine_equal(where_rank + ", next combine", result[0], expected)
        check_round_trip(302, "round trip after the error")
    finally:
        _sync(device)
        buffer.destroy()
    return call.raised


@pytest.mark.parametrize("where", list(RAISED_BY))
def test_bad_expert_id_raises_on_every_rank_and_no_peer_hangs(pool, where):
    raised = pool.run(_rank_bad_expert_id, where)
    assert all(list(r) == [RAISED_BY[where]] for r in raised), raised
    messages = {r[RAISED_BY[where]] for r in raised}
    assert len(messages) == 1, raised  # the same words on every rank
    message = messages.pop()
    assert message.startswith(BAD_ID_MESSAGE) and "every rank" in message, message


# --- no host-GPU synchronisation inside a call --------------------------------------------------------------


class _HostWaitProbe:
    """Queues ~100 ms of GPU sleep before each call and records the calls that returned only after the sleep
    had ended, i.e. that waited for the GPU. Every rank sleeps the same way (the ops are collectives)."""

    def __init__(self, device, enabled) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.waited: list[str] = []

    def __call__(self, name, fn, *args, **kwargs):
        if not self.enabled:
            return fn(*args, **kwargs)
        torch.cuda._sleep(HOLD_UP_CYCLES)
        slept = torch.cuda.Event()
        slept.record()
        result = fn(*args, **kwargs)
        if slept.query():
            self.waited.append(name)
        return result


def _combine_input(recv_x, rank):
    """A deterministic stand-in for the experts' outputs: each rank scales its received rows differently."""
    return (recv_x.float() * (0.5 + 0.25 * rank)).to(torch.bfloat16)


def _rank_normal_calls_do_not_wait(rank, num_ranks, group, backend="cuda"):
    """get_dispatch_layout, dispatch with num_worst_tokens, a cached dispatch and combine return while the
    GPU is still busy with earlier work, and are correct. (A fresh dispatch without num_worst_tokens waits
    for the receive counts by design.) Round 0 runs unprobed: first launches load kernels lazily, which
    may synchronise."""
    torch.set_num_threads(2)
    tokens = [NORMAL_TOKENS + 9 * r for r in range(num_ranks)]
    worst = sum(tokens)
    size = deep_ep.Config(24, 8, 256).get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks)
    with environment(TIMEOUT_ENV, str(TIMEOUT_S)):
        buffer = deep_ep.Buffer(group, size, 0, explicitly_destroy=True, backend=backend)
    device = buffer.device
    # The same input tensors every round, as a model loop would reuse them.
    x = torch.empty(tokens[rank], HIDDEN, dtype=torch.bfloat16, device=device)
    cached_x = torch.empty_like(x)
    idx = torch.empty(tokens[rank], TOPK, dtype=torch.int64, device=device)
    weights = torch.empty(tokens[rank], TOPK, dtype=torch.float32, device=device)
    waited = []
    try:
        for round_index in range(2):
            xs, idxs, ws = _inputs(400 + round_index, tokens)
            cached_xs = [(t.float() * -1.5).to(torch.bfloat16) for t in xs]
            for dst, src in ((x, xs), (cached_x, cached_xs), (idx, idxs), (weights, ws)):
                dst.copy_(src[rank])
            probe = _HostWaitProbe(device, round_index == 1)
            per_rank, _, per_expert, in_rank, _ = probe(
                "get_dispatch_layout", buffer.get_dispatch_layout, idx, NUM_EXPERTS
            )
            recv_x, recv_idx, recv_weights, _, handle, _ = probe(
                "dispatch(num_worst_tokens=...)",
                buffer.dispatch,
                x,
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=idx,
                topk_weights=weights,
                num_worst_tokens=worst,
            )
            cached_recv_x = probe("dispatch(handle=...)", buffer.dispatch, cached_x, handle=handle)[0]
            combine_x = _combine_input(recv_x, rank)
            combined, combined_weights, _ = probe(
                "combine", buffer.combine, combine_x, handle, topk_weights=recv_weights
            )
            waited += probe.waited
            _sync(device)

            where = f"rank {rank}, round {round_index}"
            layouts = [reference.dispatch_layout(i, NUM_EXPERTS, num_ranks) for i in idxs]
            in_ranks = [lay[2] for lay in layouts]
            assert torch.equal(per_rank.cpu(), layouts[rank][0]), f"{where}: num_tokens_per_rank"
            assert torch.equal(per_expert.cpu(), layouts[rank][1]), f"{where}: num_tokens_per_expert"
            assert torch.equal(in_rank.cpu(), in_ranks[rank]), f"{where}: is_token_in_rank"
            expected = [
                reference.intranode_dispatch(
                    d,
                    xs,
                    in_ranks,
                    topk_idx=idxs,
                    topk_weights=ws,
                    num_tokens_per_expert=[lay[1] for lay in layouts],
                    num_experts=NUM_EXPERTS,
                    num_worst_tokens=worst,
                )
                for d in range(num_ranks)
            ]
            want = expected[rank]
            assert bytes_equal(recv_x.cpu(), want.recv_x), f"{where}: recv_x"
            assert torch.equal(recv_idx.cpu(), want.recv_topk_idx), f"{where}: recv_topk_idx"
            assert bytes_equal(recv_weights.cpu(), want.recv_topk_weights), f"{where}: recv_topk_weights"
            assert torch.equal(handle.recv_src_idx.cpu(), want.handle.recv_src_idx), f"{where}: recv_src_idx"
            want_cached = reference.intranode_dispatch(rank, cached_xs, in_ranks, num_recv_rows=worst)
            assert bytes_equal(cached_recv_x.cpu(), want_cached.recv_x), f"{where}: cached recv_x"
            want_combined, want_weights = reference.intranode_combine(
                rank,
                [_combine_input(e.recv_x, d) for d, e in enumerate(expected)],
                [e.handle.recv_src_idx for e in expected],
                [e.handle.rank_prefix_matrix for e in expected],
                tokens[rank],
                topk_weights=[e.recv_topk_weights for e in expected],
            )
            assert bytes_equal(combined.cpu(), want_combined), f"{where}: combined_x"
            assert bytes_equal(combined_weights.cpu(), want_weights), f"{where}: combined_topk_weights"
    finally:
        _sync(device)
        buffer.destroy()
    return waited


def _rank_low_latency_calls_do_not_wait(rank, num_ranks, group, backend="cuda"):
    """low_latency_dispatch (with and without return_recv_hook), the hooks, and low_latency_combine (with
    the statistics tensors given) return while the GPU is still busy with earlier work, and are correct.
    Round 0 runs unprobed (lazy kernel loading may synchronise)."""
    torch.set_num_threads(2)
    buffer = _ll_buffer(group, num_ranks, backend)
    device = buffer.device
    tokens = _tokens(num_ranks)
    recv_stats = torch.zeros(NUM_EXPERTS // num_ranks, dtype=torch.int32, device=device)
    dispatch_cost = torch.zeros(num_ranks, dtype=torch.int64, device=device)
    combine_cost = torch.zeros(num_ranks, dtype=torch.int64, device=device)
    waited = []
    try:
        for round_index in range(2):
            probe = _HostWaitProbe(device, round_index == 1)
            pairs = []
            for hooked in (False, True):
                inputs = _inputs(500 + 2 * round_index + hooked, tokens)
                x, idx, w = (t[rank].to(device) for t in inputs)
                suffix = "(return_recv_hook=True)" if hooked else ""
                recv, recv_count, handle, _, hook = probe(
                    "low_latency_dispatch" + suffix,
                    buffer.low_latency_dispatch,
                    x,
                    idx,
                    M,
                    NUM_EXPERTS,
                    cumulative_local_expert_recv_stats=recv_stats,
                    dispatch_wait_recv_cost_stats=dispatch_cost,
                    return_recv_hook=hooked,
                )
                if hooked:
                    probe("the dispatch's hook", hook)
                expert_out = _expert_outputs(*recv)
                combined, _, hook = probe(
                    "low_latency_combine" + suffix,
                    buffer.low_latency_combine,
                    expert_out,
                    idx,
                    w,
                    handle,
                    return_recv_hook=hooked,
                    combine_wait_recv_cost_stats=combine_cost,
                )
                if hooked:
                    probe("the combine's hook", hook)
                pairs.append((inputs, recv, recv_count, handle, combined))
            waited += probe.waited
            _sync(device)
            for hooked, (inputs, recv, recv_count, handle, combined) in enumerate(pairs):
                xs, idxs, ws = inputs
                where = f"rank {rank}, round {round_index}, hook {bool(hooked)}"
                want, expected = _ll_oracle(rank, "fp8", xs, idxs, idxs[rank], ws[rank])
                _assert_dispatch_equal(where, recv, recv_count, handle, want)
                _assert_combine_equal(where, combined, expected)
        assert bool((dispatch_cost >= 0).all() and (combine_cost >= 0).all()), f"rank {rank}: wait costs"
    finally:
        _sync(device)
        buffer.destroy()
    return waited


@pytest.mark.parametrize("path", ["intranode", "low_latency"])
def test_calls_return_before_the_gpu_runs_them(pool, path):
    fn = _rank_normal_calls_do_not_wait if path == "intranode" else _rank_low_latency_calls_do_not_wait
    waited = pool.run(fn)
    assert waited == [[]] * pool.num_ranks, f"calls that waited for the GPU, per rank: {waited}"
