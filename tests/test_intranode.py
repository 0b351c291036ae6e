"""Intra-node layout, dispatch and combine on the GPU (CUDA backend) against deep_ep.reference's pure functions.

Ranks share the GPU(s) (rank r on GPU r % num_gpus, MPS): 2, 4 and 8 ranks. Every rank regenerates all ranks'
inputs from one seed (tests/oracle.py), so the oracle needs no communication.

What is compared, and how:
- layout, dispatch rows (BF16, FP8 + scales), top-k ids and weights, receive counts per expert, every handle
  field: bit-exactly (bytes only move).
- combine: bit-exactly too. The kernel sums in float32 in the reference's documented order (destination rank
  0..R-1, then bias_0, then bias_1) and rounds once to bf16, so there is no reordering slack to allow for;
  the same holds for the summed top-k weights.
- Both ways of reading peers' rows (csrc/kernels/api_intranode.cuh): direct reads of the peers' input tensors
  (the default) and staging copies; a test checks that the direct path really ran.
- Outputs are allocated from memory just filled with 0xFF (a freed block the caching allocator hands out
  again), and every output row is compared, so a row the kernels forget to write fails.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

try:
    from deep_ep import _C
except ImportError:
    _C = None

if _C is None or not torch.cuda.is_available() or not hasattr(_C, "intranode_dispatch"):
    pytest.skip("needs a CUDA GPU and deep_ep._C with the intra-node kernels", allow_module_level=True)

from oracle import bytes_equal, make_inputs  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.backends import reference  # noqa: E402
from deep_ep.config import Config, nvl_buffer_size_hint  # noqa: E402

NUM_EXPERTS = 256
TOPK = 8
MAX_TOKENS_PER_RANK = 1024
MAX_HIDDEN = 7168

# --- rank side (module level: runs in the rank processes) ----------------------------------------------------

_buffers: dict = {}


def _buffer(group, num_ranks: int, conservative: bool) -> deep_ep.Buffer:
    """One Buffer per process and load kind, big enough for every case below (creating one maps IPC memory)."""
    key = (num_ranks, conservative)
    if key not in _buffers:
        size = nvl_buffer_size_hint(MAX_HIDDEN * 2, num_ranks, num_max_tokens_per_rank=MAX_TOKENS_PER_RANK)
        _buffers[key] = deep_ep.Buffer(
            group, num_nvl_bytes=size, backend="cuda", conservative_loads=conservative
        )
    return _buffers[key]


def _poison_allocator(device) -> None:
    """Fill a large freed block with 0xFF: the next allocations of the caching allocator reuse it."""
    junk = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    junk.fill_(0xFF)
    del junk


def _cpu(t):
    return None if t is None else t.cpu()


def _expected_dispatches(inputs, spec, num_ranks):
    """The oracle's dispatch result for every rank (all are needed to build every rank's combine input)."""
    layouts = [reference.dispatch_layout(i.topk_idx, NUM_EXPERTS, num_ranks) for i in inputs]
    in_rank = [lay[2] for lay in layouts]
    per_expert = [lay[1] for lay in layouts]
    fp8 = spec.get("fp8", False)
    xs = [i.x_fp8[0] if fp8 else i.x for i in inputs]
    scales = [i.x_fp8[1] for i in inputs] if fp8 else None
    results = [
        reference.intranode_dispatch(
            d,
            xs,
            in_rank,
            x_scales=scales,
            topk_idx=[i.topk_idx for i in inputs],
            topk_weights=[i.topk_weights for i in inputs],
            num_tokens_per_expert=per_expert,
            num_experts=NUM_EXPERTS,
            expert_alignment=spec.get("alignment", 1),
            num_worst_tokens=spec.get("worst", 0),
        )
        for d in range(num_ranks)
    ]
    return layouts, results


def _combine_input(recv_x_bf16: torch.Tensor, rank: int) -> torch.Tensor:
    """A deterministic stand-in for expert outputs: each rank scales its received rows differently."""
    return (recv_x_bf16.float() * (0.5 + 0.25 * rank)).to(torch.bfloat16)


def _biases(seed: int, num_tokens_per_rank, hidden: int, count: int, rank: int):
    g = torch.Generator().manual_seed(seed + 1000)
    per_rank = []
    for t in num_tokens_per_rank:
        per_rank.append([torch.randn(t, hidden, generator=g).to(torch.bfloat16) for _ in range(count)])
    return per_rank[rank]


def _check_one_round(rank, num_ranks, group, spec, buffer, seed):
    device = torch.device("cuda", torch.cuda.current_device())
    tokens = spec["tokens"]
    hidden = spec.get("hidden", MAX_HIDDEN)
    fp8 = spec.get("fp8", False)
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    inputs = make_inputs(
        seed, num_ranks, tokens, hidden, NUM_EXPERTS, TOPK, spec.get("routing", "uniform"), dtype
    )
    layouts, expected = _expected_dispatches(inputs, spec, num_ranks)
    mine = inputs[rank]
    where = f"rank {rank}, seed {seed}"
    config = Config(spec.get("num_sms", 24), 8, 256)

    # Layout.
    topk_idx = mine.topk_idx.to(device)
    _poison_allocator(device)
    per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    assert per_rdma_rank is None
    want_per_rank, want_per_expert, want_in_rank = layouts[rank]
    assert torch.equal(per_rank.cpu(), want_per_rank), f"{where}: num_tokens_per_rank"
    assert torch.equal(per_expert.cpu(), want_per_expert), f"{where}: num_tokens_per_expert"
    assert torch.equal(in_rank.cpu(), want_in_rank), f"{where}: is_token_in_rank"

    # Dispatch.
    x = (mine.x_fp8[0].to(device), mine.x_fp8[1].to(device)) if fp8 else mine.x.to(device)
    weights = mine.topk_weights.to(device)
    async_mode = spec.get("async", False)
    previous = deep_ep.Buffer.capture() if async_mode else None
    _poison_allocator(device)
    recv_x, recv_idx, recv_weights, recv_list, handle, event = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=weights,
        expert_alignment=spec.get("alignment", 1),
        num_worst_tokens=spec.get("worst", 0),
        config=config,
        previous_event=previous,
        async_finish=async_mode,
        allocate_on_comm_stream=async_mode,
    )
    event.current_stream_wait()
    want = expected[rank]
    got_x, got_scales = recv_x if fp8 else (recv_x, None)
    assert bytes_equal(got_x.cpu(), want.recv_x), f"{where}: recv_x"
    if fp8:
        assert bytes_equal(got_scales.cpu(), want.recv_x_scales), f"{where}: recv_x scales"
    assert torch.equal(recv_idx.cpu(), want.recv_topk_idx), f"{where}: recv_topk_idx"
    assert bytes_equal(recv_weights.cpu(), want.recv_topk_weights), f"{where}: recv_topk_weights"
    assert recv_list == want.num_recv_tokens_per_expert_list, f"{where}: num_recv_tokens_per_expert_list"
    for name in want.handle._fields:
        assert torch.equal(getattr(handle, name).cpu(), getattr(want.handle, name)), f"{where}: handle.{name}"

    # Cached dispatch of fresh data through the handle (BF16 rows of the same routing).
    fresh = [(i.x.float() * -1.5).to(torch.bfloat16) for i in inputs]
    _poison_allocator(device)
    cached_x, none_idx, _, _, _, event = buffer.dispatch(
        fresh[rank].to(device), handle=handle, config=config, async_finish=async_mode
    )
    event.current_stream_wait()
    assert none_idx is None
    want_cached = reference.intranode_dispatch(
        rank, fresh, [lay[2] for lay in layouts], num_recv_rows=want.handle.recv_src_idx.size(0)
    )
    assert bytes_equal(cached_x.cpu(), want_cached.recv_x), f"{where}: cached recv_x"

    # Combine: every rank's input derived from what it received (BF16 rows of the same routing).
    bf16_recv = [
        reference.intranode_dispatch(d, [i.x for i in inputs], [lay[2] for lay in layouts]).recv_x
        for d in range(num_ranks)
    ]
    bf16_recv = [
        torch.cat([r, torch.zeros(e.handle.recv_src_idx.size(0) - r.size(0), hidden, dtype=r.dtype)])
        for r, e in zip(bf16_recv, expected)
    ]
    combine_x = [_combine_input(r, d) for d, r in enumerate(bf16_recv)]
    bias = _biases(seed, tokens, hidden, spec.get("bias", 0), rank)
    _poison_allocator(device)
    combined, combined_weights, event = buffer.combine(
        combine_x[rank].to(device),
        handle,
        topk_weights=recv_weights,
        bias=None
        if not bias
        else (bias[0].to(device) if len(bias) == 1 else tuple(b.to(device) for b in bias)),
        config=config,
        previous_event=deep_ep.Buffer.capture() if async_mode else None,
        async_finish=async_mode,
    )
    event.current_stream_wait()
    want_combined, want_weights = reference.intranode_combine(
        rank,
        combine_x,
        [e.handle.recv_src_idx for e in expected],
        [e.handle.rank_prefix_matrix for e in expected],
        tokens[rank],
        topk_weights=[e.recv_topk_weights for e in expected],
        bias_0=bias[0] if len(bias) > 0 else None,
        bias_1=bias[1] if len(bias) > 1 else None,
    )
    assert bytes_equal(combined.cpu(), want_combined), f"{where}: combined_x"
    assert bytes_equal(combined_weights.cpu(), want_weights), f"{where}: combined_topk_weights"


def _rank_check(rank, num_ranks, group, spec):
    torch.set_num_threads(2)  # up to 8 rank processes compute the oracle side by side on the host
    buffer = _buffer(group, num_ranks, spec.get("conservative", False))
    # "mixed": rank 0 alone turns direct reads off, so every rank must fall back to staging together.
    direct = spec.get("direct", True)
    buffer._backend.direct_reads = (rank != 0) if direct == "mixed" else direct
    direct_ops_before = buffer._backend.runtime.num_direct_ops
    try:
        for i in range(spec.get("iterations", 1)):
            _check_one_round(rank, num_ranks, group, spec, buffer, spec.get("seed", 0) * 1000 + i)
        torch.cuda.synchronize()
    finally:
        buffer._backend.direct_reads = True
    return buffer._backend.runtime.num_direct_ops - direct_ops_before


def _run(rank_pool, num_ranks, **spec):
    """Returns, per rank, how many of its ops read the peers' tensors directly."""
    tokens = spec.setdefault("tokens", [97 + 31 * r for r in range(num_ranks)])
    assert len(tokens) == num_ranks and max(tokens) <= MAX_TOKENS_PER_RANK
    return rank_pool(num_ranks).run(_rank_check, spec)


# --- tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("conservative", [False, True], ids=["aggressive", "conservative"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "staged"])
def test_dispatch_combine(rank_pool, num_ranks, fp8, conservative, direct):
    _run(
        rank_pool,
        num_ranks,
        fp8=fp8,
        conservative=conservative,
        direct=direct,
        seed=num_ranks,
        bias=num_ranks % 3,
    )


def test_direct_reads_run_and_mixed_settings_fall_back_together(rank_pool):
    # Each round is a dispatch, a cached dispatch and a combine: all three read directly by default...
    assert _run(rank_pool, 2, tokens=[900, 1000], hidden=4096, seed=50, iterations=2) == [6, 6]
    # ...none when turned off, and none on any rank when only rank 0 turns them off (results stay exact).
    assert _run(rank_pool, 2, tokens=[900, 1000], hidden=4096, seed=51, direct=False) == [0, 0]
    assert _run(rank_pool, 4, tokens=[90, 100, 0, 7], seed=52, direct="mixed") == [0, 0, 0, 0]


@pytest.mark.parametrize("hidden", [2048, 4096, 7168])
def test_hidden_sizes(rank_pool, hidden):
    _run(rank_pool, 2, hidden=hidden, routing="with_minus_one", seed=hidden, bias=2)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_zero_and_one_token(rank_pool, num_ranks):
    tokens = [0, 1] + [200] * (num_ranks - 2)
    _run(rank_pool, num_ranks, tokens=tokens, seed=7)
    _run(rank_pool, num_ranks, tokens=[0] * num_ranks, seed=8)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_all_tokens_to_one_rank(rank_pool, num_ranks):
    _run(rank_pool, num_ranks, routing="all_to_one_rank", seed=num_ranks + 1, bias=1)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_worst_tokens_and_alignment(rank_pool, num_ranks):
    tokens = [150 + 10 * r for r in range(num_ranks)]
    _run(rank_pool, num_ranks, tokens=tokens, worst=sum(tokens), seed=11)
    _run(rank_pool, num_ranks, tokens=tokens, alignment=64, seed=12, routing="with_minus_one")


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_async_previous_event(rank_pool, fp8):
    _run(rank_pool, 2, fp8=fp8, seed=13, bias=1, **{"async": True})


@pytest.mark.parametrize("num_sms", [8, 16, 24])
def test_sm_budgets(rank_pool, num_sms):
    _run(rank_pool, 4, num_sms=num_sms, seed=20 + num_sms, tokens=[400, 300, 350, 512])


def test_back_to_back_iterations(rank_pool):
    """100 rounds with fresh data: catches barrier epochs and buffer reuse races between ops."""
    _run(
        rank_pool, 4, iterations=100, hidden=2048, tokens=[64, 48, 80, 33], seed=30, routing="with_minus_one"
    )


def test_single_rank(rank_pool):
    """One rank: every row goes to itself; the barriers and the count exchange run with one participant."""
    _run(rank_pool, 1, tokens=[300], seed=40, bias=1)


def _rank_bad_expert_id(rank, num_ranks, group):
    """Rank 0 dispatches one expert id out of range: it gets a ValueError once the dispatch is queued (the
    ids are checked on the GPU), rank 1 finishes normally, and both Buffers keep working."""
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, False)
    topk_idx = torch.randint(0, NUM_EXPERTS, (64, TOPK), device=device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    bad = topk_idx.clone()
    if rank == 0:
        bad[3, 2] = NUM_EXPERTS + 5
    x = torch.randn(64, 2048, device=device).to(torch.bfloat16)
    raised = None
    try:
        buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=bad,
            topk_weights=torch.rand(64, TOPK, device=device),
        )
    except ValueError as error:
        raised = str(error)
    _check_one_round(rank, num_ranks, group, {"tokens": [50, 70], "hidden": 2048}, buffer, seed=60)
    torch.cuda.synchronize()
    return raised


def test_out_of_range_expert_id_raises_and_buffers_stay_usable(rank_pool):
    raised = rank_pool(2).run(_rank_bad_expert_id)
    assert raised[1] is None
    assert raised[0] is not None and f"found {NUM_EXPERTS + 5}" in raised[0] and "topk_idx" in raised[0], (
        raised
    )


def _rank_too_few_worst_tokens(rank, num_ranks, group, bad):
    """Rank `bad` passes a num_worst_tokens below what it receives, rank 0 none (its host waits for the
    counts), the others enough. Returns (message, where: 'call' or 'check' after synchronising) or None, and
    whether the outputs came back NaN; then a valid round on the same Buffer."""
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, False)
    topk_idx = torch.randint(0, NUM_EXPERTS, (64, TOPK), device=device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    x = torch.randn(64, 2048, device=device).to(torch.bfloat16)
    worst = 0 if rank == 0 else 1 if rank == bad else 64 * num_ranks
    raised, out = None, None
    try:
        out = buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=torch.rand(64, TOPK, device=device),
            num_worst_tokens=worst,
        )[0]
        torch.cuda.synchronize()
        buffer.check()
    except ValueError as error:
        raised = (str(error), "call" if out is None else "check")
    poisoned = out is not None and bool(torch.isnan(out.float()).all())
    tokens = [50 + 10 * r for r in range(num_ranks)]
    _check_one_round(
        rank, num_ranks, group, {"tokens": tokens, "hidden": 2048, "worst": sum(tokens)}, buffer, 61
    )
    torch.cuda.synchronize()
    return raised, poisoned


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_too_few_worst_tokens_on_one_rank_raise_on_every_rank(rank_pool, num_ranks):
    """Every rank's notify checks every rank's num_worst_tokens against its receive count: all reject the
    dispatch alike (no rank reads a row, all poison their outputs) and raise naming the rank; rank 0, whose
    host waited for its counts, inside the call. The next round is correct."""
    bad = num_ranks - 1
    for rank, (raised, poisoned) in enumerate(rank_pool(num_ranks).run(_rank_too_few_worst_tokens, bad)):
        assert raised is not None, f"rank {rank}: nothing raised"
        message, where = raised
        assert message.startswith(f"num_worst_tokens: rank {bad} would receive"), f"rank {rank}: {message}"
        assert "num_worst_tokens=1 " in message, f"rank {rank}: {message}"
        if rank == 0:
            assert where == "call", f"rank 0 waited for its counts, yet raised at {where}"
        else:  # raised by the call itself when the GPU was that quick (then it returned nothing)
            assert where == "call" or poisoned, (
                f"rank {rank}: the rejected dispatch returned outputs that are not NaN"
            )


def _rank_host_expert_id_check(rank, num_ranks, group):
    """With DEEP_EP_HOST_EXPERT_ID_CHECK=1 a bad expert id raises in validation, before any kernel runs: every
    rank passes one (so no peer waits in a collective), and the GPU-side check never sees it (a later good
    call on the same Buffer does not raise)."""
    device = torch.device("cuda", torch.cuda.current_device())
    os.environ["DEEP_EP_HOST_EXPERT_ID_CHECK"] = "1"
    try:
        size = nvl_buffer_size_hint(2048 * 2, num_ranks, num_max_tokens_per_rank=MAX_TOKENS_PER_RANK)
        buffer = deep_ep.Buffer(group, num_nvl_bytes=size, backend="cuda", explicitly_destroy=True)
    finally:
        del os.environ["DEEP_EP_HOST_EXPERT_ID_CHECK"]
    topk_idx = torch.randint(0, NUM_EXPERTS, (64, TOPK), device=device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    bad = topk_idx.clone()
    bad[5, 1] = NUM_EXPERTS + 7
    messages = []
    for call in (
        lambda: buffer.get_dispatch_layout(bad, NUM_EXPERTS),
        lambda: buffer.dispatch(
            torch.zeros(64, 2048, dtype=torch.bfloat16, device=device),
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=bad,
            topk_weights=torch.rand(64, TOPK, device=device),
        ),
    ):
        with pytest.raises(ValueError) as raised:
            call()
        messages.append(str(raised.value))
    torch.cuda.synchronize()
    buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)  # would raise here had a kernel seen the bad id
    torch.cuda.synchronize()
    _check_one_round(rank, num_ranks, group, {"tokens": [50, 70], "hidden": 2048}, buffer, seed=61)
    torch.cuda.synchronize()
    buffer.destroy()
    return messages


def test_host_expert_id_check_raises_before_any_kernel(rank_pool):
    for messages in rank_pool(2).run(_rank_host_expert_id_check):
        assert len(messages) == 2
        for message in messages:
            assert f"found {NUM_EXPERTS + 7}" in message and "topk_idx" in message, message
            assert "checked on the GPU" not in message, message


def _rank_graph_replay(rank, num_ranks, group):
    """Layout, a num_worst_tokens dispatch and a combine captured once in a CUDA graph, replayed with fresh
    data: barrier epochs are counted on the GPU, so each replay synchronises anew (a host-side epoch
    baked into the graph would let every replay after the first pass its barriers at once)."""
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, False)
    tokens, hidden = [150 + 10 * r for r in range(num_ranks)], 2048
    worst = sum(tokens)
    static_x = torch.empty(tokens[rank], hidden, dtype=torch.bfloat16, device=device)
    static_idx = torch.empty(tokens[rank], TOPK, dtype=torch.int64, device=device)
    static_weights = torch.empty(tokens[rank], TOPK, dtype=torch.float32, device=device)

    def step():
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(static_idx, NUM_EXPERTS)
        recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(
            static_x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=static_idx,
            topk_weights=static_weights,
            num_worst_tokens=worst,
        )
        combined, _, _ = buffer.combine(
            (recv_x.float() * (0.5 + 0.25 * rank)).to(torch.bfloat16), handle, topk_weights=recv_weights
        )
        return recv_x, combined

    def load(seed):
        inputs = make_inputs(seed, num_ranks, tokens, hidden, NUM_EXPERTS, TOPK, "uniform", torch.bfloat16)
        static_x.copy_(inputs[rank].x)
        static_idx.copy_(inputs[rank].topk_idx)
        static_weights.copy_(inputs[rank].topk_weights)
        return inputs

    load(70)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, combined = step()
    for seed in (71, 72, 73):
        inputs = load(seed)
        graph.replay()
        torch.cuda.synchronize()
        _, expected = _expected_dispatches(inputs, {"worst": worst}, num_ranks)
        where = f"rank {rank}, replay with seed {seed}"
        assert bytes_equal(recv_x.cpu(), expected[rank].recv_x), f"{where}: recv_x"
        combine_x = [_combine_input(e.recv_x, d) for d, e in enumerate(expected)]
        want, _ = reference.intranode_combine(
            rank,
            combine_x,
            [e.handle.recv_src_idx for e in expected],
            [e.handle.rank_prefix_matrix for e in expected],
            tokens[rank],
        )
        assert bytes_equal(combined.cpu(), want), f"{where}: combined_x"
    return True


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_cuda_graph_replay_of_layout_dispatch_and_combine(rank_pool, num_ranks):
    assert all(rank_pool(num_ranks).run(_rank_graph_replay))


# ~1 ms on an H100: long enough that an op not ordered after (or before) it would visibly race with it.
_HOLD_UP_CYCLES = 2_000_000


def _rank_stream_order(rank, num_ranks, group, use_events):
    """No host synchronisation anywhere: each op must wait for the caller's pending writes to its inputs
    (or for `previous_event`), and the caller's stream must see the outputs even while the communication
    stream is held up (or once it waits for the returned event)."""
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, False)
    tokens, hidden = [120 + 7 * r for r in range(num_ranks)], 2048
    inputs = make_inputs(80, num_ranks, tokens, hidden, NUM_EXPERTS, TOPK, "uniform", torch.bfloat16)
    layouts, expected = _expected_dispatches(inputs, {}, num_ranks)
    topk_idx = inputs[rank].topk_idx.to(device)
    weights = inputs[rank].topk_weights.to(device)
    source = inputs[rank].x.to(device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    torch.cuda.synchronize()

    def write_late(values):
        """A tensor the caller's stream fills only after a hold-up; NaN until then."""
        late = torch.full_like(values, float("nan"))
        torch.cuda._sleep(_HOLD_UP_CYCLES)
        late.copy_(values)
        return late

    def hold_up_comm_stream():
        with torch.cuda.stream(buffer.get_comm_stream()):
            torch.cuda._sleep(_HOLD_UP_CYCLES)

    def order_kwargs():
        if not use_events:
            return {}
        return {"previous_event": deep_ep.Buffer.capture(), "async_finish": True}

    def caller_view(tensor, event):
        if use_events:
            event.current_stream_wait()
        return tensor.clone()  # on the caller's stream, right away

    x = write_late(source)
    recv_x, _, recv_weights, _, handle, event = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=weights,
        **order_kwargs(),
    )
    got_recv_x = caller_view(recv_x, event)

    cached_source = (source.float() * -1.5).to(torch.bfloat16)
    cached_x = write_late(cached_source)
    kwargs = order_kwargs()
    hold_up_comm_stream()
    cached_recv_x, _, _, _, _, event = buffer.dispatch(cached_x, handle=handle, **kwargs)
    got_cached = caller_view(cached_recv_x, event)

    combine_x = write_late(_combine_input(recv_x, rank))
    kwargs = order_kwargs()
    hold_up_comm_stream()
    combined, _, event = buffer.combine(combine_x, handle, **kwargs)
    got_combined = caller_view(combined, event)

    torch.cuda.synchronize()
    where = f"rank {rank}, events {use_events}"
    assert bytes_equal(got_recv_x.cpu(), expected[rank].recv_x), f"{where}: recv_x"
    want_cached = reference.intranode_dispatch(
        rank, [(i.x.float() * -1.5).to(torch.bfloat16) for i in inputs], [lay[2] for lay in layouts]
    )
    assert bytes_equal(got_cached.cpu(), want_cached.recv_x), f"{where}: cached recv_x"
    want_combined, _ = reference.intranode_combine(
        rank,
        [_combine_input(e.recv_x, d) for d, e in enumerate(expected)],
        [e.handle.recv_src_idx for e in expected],
        [e.handle.rank_prefix_matrix for e in expected],
        tokens[rank],
    )
    assert bytes_equal(got_combined.cpu(), want_combined), f"{where}: combined_x"
    return True


@pytest.mark.parametrize("use_events", [False, True], ids=["caller_stream", "previous_event_async"])
def test_ops_are_ordered_with_the_caller_stream(rank_pool, use_events):
    assert all(rank_pool(2).run(_rank_stream_order, use_events))
