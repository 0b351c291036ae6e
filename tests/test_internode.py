"""Inter-node layout, dispatch and combine on the GPU (CUDA backend), with the group split into virtual nodes.

Ranks share the GPU(s) under MPS; `num_nvl_ranks=L` cuts the R ranks into R / L nodes whose traffic takes the
inter-node path (NVSHMEM puts between nodes, NVLink-mapped reads inside one). Checked against the intra-node
reference on the same inputs, since the semantics are the same:
- layout, dispatch rows (BF16, FP8 + scales), top-k, receive counts, cached dispatch: bit-exactly; the
  handle's V1-indexed fields (recv_gbl_rank_prefix_sum at -4, rank_prefix_matrix, recv_src_meta,
  send_nvl_head) equal the reference's;
- combine: bit-exactly against the reference's rows summed in the kernels' documented order (this node's
  ranks in float32, then one BF16-rounded partial sum per other node, then the biases);
- deduplication: the rows that crossed a node boundary (a device counter) equal, over all tokens of all
  ranks, the number of distinct destination nodes other than the token's own.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.gpu

try:
    from deep_ep import _C
except ImportError:
    _C = None

if _C is None or not torch.cuda.is_available() or not getattr(_C, "internode_compiled", False):
    pytest.skip("needs a CUDA GPU and deep_ep._C with the inter-node kernels", allow_module_level=True)

from oracle import bytes_equal, environment, make_inputs  # noqa: E402
from test_call_path import _HostWaitProbe  # noqa: E402
from test_intranode import (  # noqa: E402
    NUM_EXPERTS,
    TOPK,
    _biases,
    _combine_input,
    _expected_dispatches,
    _poison_allocator,
)

import deep_ep  # noqa: E402
from deep_ep.backends import reference  # noqa: E402
from deep_ep.config import Config  # noqa: E402
from deep_ep.tools.launch import RankPool  # noqa: E402

MAX_TOKENS_PER_RANK = 512
MAX_HIDDEN = 7168

_buffers: dict = {}


def _buffer(
    group,
    num_ranks: int,
    num_nvl_ranks: int,
    conservative: bool,
    direct_reads: bool = True,
    num_rdma_bytes: int | None = None,
) -> deep_ep.Buffer:
    """A cached Buffer; `direct_reads=False` makes its combine stage its inputs (as under graph capture).
    num_rdma_bytes: the hint for MAX_TOKENS_PER_RANK tokens unless given."""
    key = (num_ranks, num_nvl_ranks, conservative, direct_reads, num_rdma_bytes)
    if key not in _buffers:
        size = num_rdma_bytes or Config().get_rdma_buffer_size_hint(
            MAX_HIDDEN * 2,
            num_ranks,
            num_nvl_ranks=num_nvl_ranks,
            num_max_tokens_per_rank=MAX_TOKENS_PER_RANK,
        )
        with environment("DEEP_EP_DIRECT_READS", "1" if direct_reads else "0"):
            _buffers[key] = deep_ep.Buffer(
                group, 0, size, backend="cuda", conservative_loads=conservative, num_nvl_ranks=num_nvl_ranks
            )
    return _buffers[key]


def _cross_node_rows(in_rank: list[torch.Tensor], num_nvl_ranks: int) -> int:
    """Per token of every rank: the destination nodes other than its own (what deduplication sends)."""
    total = 0
    for g, membership in enumerate(in_rank):
        per_node = membership.view(membership.size(0), len(in_rank) // num_nvl_ranks, num_nvl_ranks).any(
            dim=2
        )
        per_node[:, g // num_nvl_ranks] = False
        total += int(per_node.sum())
    return total


def _hierarchical_combine(rank, num_nvl_ranks, combine_x, weights, send_head, bias):
    """The combine the kernels compute, in their order: float32 sum of this node's ranks' rows (local rank
    order), plus per other node (node order) its ranks' rows summed in float32 and rounded to BF16 (the
    weights' partial sums stay float32), plus the biases; rounded once to BF16."""
    num_tokens, num_ranks = send_head.shape
    hidden = combine_x[0].size(1)
    own_node = rank // num_nvl_ranks
    acc = torch.zeros(num_tokens, hidden)
    acc_w = None if weights is None else torch.zeros(num_tokens, weights[0].size(1))

    def rows_of(dst):
        head = send_head[:, dst]
        sent = head >= 0
        if combine_x[dst].size(0) == 0:  # nothing went to dst
            return torch.zeros(num_tokens, hidden), None if weights is None else torch.zeros_like(acc_w)
        index = head.clamp(min=0).long()
        x = torch.where(sent[:, None], combine_x[dst][index].float(), torch.zeros(()))
        w = None if weights is None else torch.where(sent[:, None], weights[dst][index], torch.zeros(()))
        return x, w

    nodes = [own_node] + [n for n in range(num_ranks // num_nvl_ranks) if n != own_node]
    for node in nodes:
        part = torch.zeros(num_tokens, hidden)
        part_w = None if weights is None else torch.zeros_like(acc_w)
        for j in range(num_nvl_ranks):
            x, w = rows_of(node * num_nvl_ranks + j)
            part = part + x
            if w is not None:
                part_w = part_w + w
        if node != own_node:
            part = part.to(torch.bfloat16).float()
        acc = acc + part if node != own_node else part
        if acc_w is not None:
            acc_w = acc_w + part_w if node != own_node else part_w
    for b in bias:
        acc = acc + b.float()
    return acc.to(torch.bfloat16), acc_w


def _check_one_round(rank, num_ranks, group, spec, buffer, seed):
    device = torch.device("cuda", torch.cuda.current_device())
    num_nvl_ranks = spec["num_nvl_ranks"]
    tokens = spec["tokens"]
    hidden = spec.get("hidden", MAX_HIDDEN)
    fp8 = spec.get("fp8", False)
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    inputs = make_inputs(
        seed, num_ranks, tokens, hidden, NUM_EXPERTS, TOPK, spec.get("routing", "uniform"), dtype
    )
    layouts, expected = _expected_dispatches(inputs, spec, num_ranks)
    mine = inputs[rank]
    where = f"rank {rank} of {num_ranks} ({num_nvl_ranks} a node), seed {seed}"
    config = Config(spec.get("num_sms", 24), 8, 256)

    topk_idx = mine.topk_idx.to(device)
    _poison_allocator(device)
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    want_per_rank, want_per_expert, want_in_rank = layouts[rank]
    assert torch.equal(per_rank.cpu(), want_per_rank), f"{where}: num_tokens_per_rank"
    assert torch.equal(per_expert.cpu(), want_per_expert), f"{where}: num_tokens_per_expert"
    assert torch.equal(in_rank.cpu(), want_in_rank), f"{where}: is_token_in_rank"
    num_nodes = num_ranks // num_nvl_ranks
    want_per_node = (
        want_in_rank.view(want_in_rank.size(0), num_nodes, num_nvl_ranks).any(dim=2).sum(dim=0).int()
    )
    assert torch.equal(per_node.cpu(), want_per_node), f"{where}: num_tokens_per_rdma_rank"

    x = (mine.x_fp8[0].to(device), mine.x_fp8[1].to(device)) if fp8 else mine.x.to(device)
    weights = mine.topk_weights.to(device)
    async_mode = spec.get("async", False)
    rows_sent_before = buffer.runtime.runtime.num_internode_rows_sent
    _poison_allocator(device)
    recv_x, recv_idx, recv_weights, recv_list, handle, event = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        # Optional here (unlike V1): the count exchange derives it from is_token_in_rank.
        num_tokens_per_rdma_rank=None if spec.get("no_rdma_counts") else per_node,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=weights,
        expert_alignment=spec.get("alignment", 1),
        num_worst_tokens=spec.get("worst", 0),
        config=config,
        previous_event=deep_ep.Buffer.capture() if async_mode else None,
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
    assert len(handle) == 10
    assert torch.equal(handle.gbl_channel_prefix_matrix.cpu(), want.handle.rank_prefix_matrix), (
        f"{where}: rank_prefix"
    )
    received = want.handle.rank_prefix_matrix[:, rank]
    assert torch.equal(handle[-4].cpu(), received), f"{where}: recv_gbl_rank_prefix_sum"
    assert torch.equal(handle.recv_src_meta.cpu(), want.handle.recv_src_idx), f"{where}: recv_src_meta"
    assert torch.equal(handle.send_nvl_head.cpu(), want.handle.send_head), f"{where}: send_nvl_head"

    # Deduplication: every rank's count of rows sent across nodes, summed, against the routing.
    torch.cuda.synchronize()
    sent = [None] * num_ranks
    dist.all_gather_object(
        sent, buffer.runtime.runtime.num_internode_rows_sent - rows_sent_before, group=group
    )
    assert sum(sent) == _cross_node_rows([lay[2] for lay in layouts], num_nvl_ranks), (
        f"{where}: rows sent {sent}"
    )

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
    direct_ops_before = buffer.runtime.runtime.num_direct_ops
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
    read_in_place = buffer.runtime.runtime.num_direct_ops > direct_ops_before
    assert read_in_place == spec.get("direct_reads", True), f"{where}: combine read in place: {read_in_place}"
    want_combined, want_weights = _hierarchical_combine(
        rank,
        num_nvl_ranks,
        combine_x,
        [e.recv_topk_weights for e in expected],
        want.handle.send_head,
        bias,
    )
    assert torch.equal(combined.cpu(), want_combined), f"{where}: combined_x"
    assert torch.equal(combined_weights.cpu(), want_weights), f"{where}: combined_topk_weights"


def _rank_check(rank, num_ranks, group, spec):
    torch.set_num_threads(1)
    buffer = _buffer(
        group,
        num_ranks,
        spec["num_nvl_ranks"],
        spec.get("conservative", False),
        spec.get("direct_reads", True),
        spec.get("num_rdma_bytes"),
    )
    for i in range(spec.get("iterations", 1)):
        _check_one_round(rank, num_ranks, group, spec, buffer, spec.get("seed", 0) * 1000 + i)
    torch.cuda.synchronize()
    return True


def _run(rank_pool, num_ranks, num_nvl_ranks, **spec):
    spec.setdefault("tokens", [97 + 25 * r for r in range(num_ranks)])
    assert len(spec["tokens"]) == num_ranks and max(spec["tokens"]) <= MAX_TOKENS_PER_RANK
    return rank_pool(num_ranks).run(_rank_check, dict(spec, num_nvl_ranks=num_nvl_ranks))


TOPOLOGIES = [(4, 2), (8, 4), (8, 2), (16, 8)]


@pytest.mark.parametrize("num_ranks,num_nvl_ranks", TOPOLOGIES, ids=[f"{r // n}x{n}" for r, n in TOPOLOGIES])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_dispatch_combine(rank_pool, num_ranks, num_nvl_ranks, fp8):
    _run(
        rank_pool,
        num_ranks,
        num_nvl_ranks,
        fp8=fp8,
        seed=num_ranks + num_nvl_ranks,
        bias=num_ranks % 3,
        iterations=2,
    )


@pytest.mark.parametrize("conservative", [False, True], ids=["aggressive", "conservative"])
def test_load_kinds(rank_pool, conservative):
    _run(rank_pool, 4, 2, conservative=conservative, seed=31, bias=1)


@pytest.mark.parametrize("hidden", [2048, 4096])
def test_hidden_sizes(rank_pool, hidden):
    _run(rank_pool, 4, 2, hidden=hidden, routing="with_minus_one", seed=hidden, bias=2)


def test_zero_and_one_token(rank_pool):
    _run(rank_pool, 4, 2, tokens=[0, 1, 200, 0], seed=7)
    _run(rank_pool, 4, 2, tokens=[0, 0, 0, 0], seed=8)


@pytest.mark.parametrize("seed", [5, 6])
def test_all_tokens_to_one_node(rank_pool, seed):
    # all_to_one_rank sends every token to rank seed % 4: one node gets everything, the other nothing.
    _run(rank_pool, 4, 2, routing="all_to_one_rank", seed=seed, bias=1)


def test_minus_one_experts_and_no_rdma_counts(rank_pool):
    _run(rank_pool, 8, 2, routing="with_minus_one", no_rdma_counts=True, seed=41, bias=1)


@pytest.mark.parametrize("num_ranks,num_nvl_ranks", [(4, 2), (8, 4)], ids=["2x2", "2x4"])
def test_combine_from_staged_inputs(rank_pool, num_ranks, num_nvl_ranks):
    """The combine's other way of reading the node's inputs (what graph capture uses): a staged copy."""
    _run(rank_pool, num_ranks, num_nvl_ranks, direct_reads=False, seed=40, bias=2, iterations=2)


def _dispatch_kwargs(buffer, mine, device) -> dict:
    """The layout and top-k arguments of a fresh dispatch of `mine` (an oracle input) on `buffer`."""
    topk_idx = mine.topk_idx.to(device)
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    return dict(
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=mine.topk_weights.to(device),
    )


def _below_hint_bytes(num_ranks: int, num_nvl_ranks: int, tokens: int) -> int:
    """What a BF16 dispatch of `tokens` tokens a rank and its combine with direct reads use at most (every
    token of the other nodes' counterparts forwarded), rounded up to 2 MiB: no room for staged rows."""
    num_other_nodes = num_ranks // num_nvl_ranks - 1
    dispatch = deep_ep.config.internode_dispatch_bytes(
        MAX_HIDDEN * 2, 0, TOPK, num_ranks, num_nvl_ranks, tokens
    )
    combine = deep_ep.config.internode_combine_call_bytes(
        MAX_HIDDEN, TOPK, num_ranks, num_nvl_ranks, 0, num_other_nodes * tokens, tokens
    )
    return -(-max(dispatch, combine) // (2 << 20)) * (2 << 20)


def _rank_staged_combine_too_large(rank, num_ranks, group, num_rdma_bytes, seed):
    """With direct reads off, a combine whose staged rows overflow the buffer raises; then, direct reads on
    again, the same Buffer runs a round correctly."""
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, 2, False, num_rdma_bytes=num_rdma_bytes)
    mine = make_inputs(seed, num_ranks, [MAX_TOKENS_PER_RANK] * num_ranks, MAX_HIDDEN, NUM_EXPERTS, TOPK)[
        rank
    ]
    recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(
        mine.x.to(device), **_dispatch_kwargs(buffer, mine, device)
    )
    buffer.runtime.direct_reads = False
    try:
        buffer.combine(recv_x, handle, topk_weights=recv_weights)
        message = None
    except ValueError as error:
        message = str(error)
    finally:
        buffer.runtime.direct_reads = True
    spec = {"num_nvl_ranks": 2, "tokens": [MAX_TOKENS_PER_RANK] * num_ranks, "bias": 1}
    _check_one_round(rank, num_ranks, group, spec, buffer, seed + 1)
    torch.cuda.synchronize()
    return message, recv_x.size(0)


def test_a_buffer_below_the_hint_runs_what_fits(rank_pool):
    """The hint covers the combine's worst case with staged rows; DeepEP V1's scripts pass a fixed byte count
    instead (int(1e9)). Outside graph capture the combine reads its node's inputs in place and needs room
    only for the rows it forwards and a partial sum per token and other node: such a Buffer, far below the
    hint, runs every routing; staging (direct reads off) raises a capacity error on every rank, and the
    Buffer stays usable."""
    num_ranks, num_nvl_ranks, tokens = 4, 2, MAX_TOKENS_PER_RANK
    size = _below_hint_bytes(num_ranks, num_nvl_ranks, tokens)
    hint = Config().get_rdma_buffer_size_hint(
        MAX_HIDDEN * 2, num_ranks, num_nvl_ranks=num_nvl_ranks, num_max_tokens_per_rank=tokens
    )
    assert size * 2 <= hint, (size, hint)
    for routing, seed in (("uniform", 50), ("all_to_one_rank", 51), ("with_minus_one", 52)):
        _run(
            rank_pool,
            num_ranks,
            num_nvl_ranks,
            tokens=[tokens] * num_ranks,
            routing=routing,
            seed=seed,
            bias=1,
            num_rdma_bytes=size,
        )
    results = rank_pool(num_ranks).run(_rank_staged_combine_too_large, size, 53)
    # Uniform top-8 of 256 over 4 ranks: each rank receives ~90% of all 4 x 512 tokens, more rows than the
    # buffer has room for once the forwarded rows and partial sums are placed.
    for rank, (message, num_rows) in enumerate(results):
        assert num_rows > num_ranks * tokens // 2, (rank, num_rows)
        assert message is not None and message.startswith("x:") and "num_rdma_bytes" in message, (
            rank,
            message,
        )


def test_back_to_back_iterations(rank_pool):
    """Many rounds with fresh data: catches epoch and buffer-reuse races between ops."""
    _run(
        rank_pool,
        4,
        2,
        iterations=30,
        hidden=2048,
        tokens=[64, 48, 80, 33],
        seed=30,
        routing="with_minus_one",
    )


def _rank_wrong_handle(rank, num_ranks, group):
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, 2, False)
    mine = make_inputs(90, num_ranks, [64] * num_ranks, 2048, NUM_EXPERTS, TOPK)[rank]
    topk_idx = mine.topk_idx.to(device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    x = mine.x.to(device)
    handle = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert
    )[4]
    try:
        buffer.dispatch(x, handle=tuple(handle)[:6])
    except ValueError as error:
        return str(error)
    return None


def test_an_intranode_shaped_handle_is_rejected(rank_pool):
    messages = rank_pool(4).run(_rank_wrong_handle)
    assert all(m is not None and m.startswith("handle:") for m in messages), messages


def test_worst_tokens_alignment_async(rank_pool):
    tokens = [150, 160, 170, 180]
    _run(rank_pool, 4, 2, tokens=tokens, worst=sum(tokens), seed=11)
    _run(rank_pool, 4, 2, tokens=tokens, alignment=64, seed=12, routing="with_minus_one")
    _run(rank_pool, 4, 2, seed=13, bias=1, **{"async": True})


@pytest.mark.parametrize("num_sms", [4, 16])
def test_sm_budgets(rank_pool, num_sms):
    _run(rank_pool, 8, 4, num_sms=num_sms, seed=20 + num_sms, tokens=[400, 300, 350, 512, 0, 1, 77, 256])


# --- one rank's bad argument -------------------------------------------------------------------------------


def _rank_one_bad_rank(rank, num_ranks, group, op, bad, argument):
    """Rank `bad` passes one bad argument to `op`, the others valid ones. Returns (exception type, message,
    where it was raised: 'call' or 'check' after synchronising) or None, and whether the call's output came
    back all NaN. Then every rank runs a valid round on the same Buffer, checked against the reference.
    argument "config" is checked in Python (a TypeError), the others in C++."""
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, 2, False)
    mine = make_inputs(92, num_ranks, [64] * num_ranks, 2048, NUM_EXPERTS, TOPK)[rank]
    x, kwargs = mine.x.to(device), _dispatch_kwargs(buffer, mine, device)
    recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(x, **kwargs)
    torch.cuda.synchronize()
    dist.barrier(group=group)
    wrong = rank == bad
    raised, where, out = None, "call", None
    config = "24" if wrong and argument == "config" else None
    wrong = wrong and argument != "config"
    try:
        if op == "dispatch":
            out = buffer.dispatch(x, **kwargs, expert_alignment=0 if wrong else 1, config=config)[0]
        elif op == "cached_dispatch":
            out = buffer.dispatch(x[:-1] if wrong else x, handle=handle, config=config)[0]
        else:
            rows = recv_x.size(0) - 1 if wrong else recv_x.size(0)
            out = buffer.combine(recv_x[:rows], handle, topk_weights=recv_weights[:rows], config=config)[0]
        torch.cuda.synchronize()
        where = "check"
        buffer.check()
    except (ValueError, TypeError) as error:
        raised = (type(error).__name__, str(error), where)
    poisoned = out is not None and bool(torch.isnan(out.float()).all())
    torch.cuda.synchronize()
    spec = {"num_nvl_ranks": 2, "tokens": [97 + 25 * r for r in range(num_ranks)], "bias": 1}
    _check_one_round(rank, num_ranks, group, spec, buffer, 93)
    torch.cuda.synchronize()
    return raised, poisoned


def _raised_by(buffer, call):
    """(message, where: 'call' or 'check' after synchronising) of the ValueError that `call()` or then
    `buffer.check()` raises, or None; and the call's first output (None if the call raised)."""
    out = None
    try:
        out = call()
        torch.cuda.synchronize()
        buffer.check()
    except ValueError as error:
        return (str(error), "check" if out is not None else "call"), out
    return None, out


def _rank_too_few_worst_tokens(rank, num_ranks, group, bad):
    """Rank `bad` passes a num_worst_tokens below what it receives, the others enough. Returns what was
    raised and whether the outputs came back NaN; then a valid round on the same Buffer."""
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, 2, False)
    mine = make_inputs(94, num_ranks, [64] * num_ranks, 2048, NUM_EXPERTS, TOPK)[rank]
    x, kwargs = mine.x.to(device), _dispatch_kwargs(buffer, mine, device)
    worst = 1 if rank == bad else 64 * num_ranks
    raised, out = _raised_by(buffer, lambda: buffer.dispatch(x, **kwargs, num_worst_tokens=worst)[0])
    poisoned = out is not None and bool(torch.isnan(out.float()).all())
    spec = {"num_nvl_ranks": 2, "tokens": [64] * num_ranks, "worst": 64 * num_ranks}
    _check_one_round(rank, num_ranks, group, spec, buffer, 95)
    torch.cuda.synchronize()
    return raised, poisoned


def test_too_few_worst_tokens_on_one_rank_raise_on_every_rank(rank_pool):
    """With num_worst_tokens the host does not wait for the counts: every rank's exchange checks every rank's
    num_worst_tokens against its receive count, so all reject the dispatch alike before any row moves, and
    all raise (at the call's end or check()) naming the rank; the outputs are NaN, the next round correct."""
    bad = 2
    for rank, (raised, poisoned) in enumerate(rank_pool(4).run(_rank_too_few_worst_tokens, bad)):
        assert raised is not None, f"rank {rank}: nothing raised"
        message, where = raised
        assert message.startswith(f"num_worst_tokens: rank {bad} would receive"), f"rank {rank}: {message}"
        assert "num_worst_tokens=1 " in message, f"rank {rank}: {message}"
        # Raised by the call itself when the GPU was that quick (then it returned nothing).
        assert where == "call" or poisoned, (
            f"rank {rank}: the rejected dispatch returned outputs that are not NaN"
        )


def _rank_forwarded_rows_beyond_the_buffer(rank, num_ranks, group, num_rdma_bytes, tokens):
    """An FP8 dispatch fills a small buffer; its combine moves BF16 rows (twice the bytes), and the rows each
    rank forwards for its node (known on the GPU only) no longer fit beside the other nodes' partial sums.
    Returns what was raised, whether the combine's output came back NaN, and the rows this rank received;
    then a smaller round on the same Buffer."""
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, 2, False, num_rdma_bytes=num_rdma_bytes)
    inputs = make_inputs(
        96, num_ranks, [tokens] * num_ranks, MAX_HIDDEN, NUM_EXPERTS, TOPK, "uniform", torch.float8_e4m3fn
    )
    mine = inputs[rank]
    x = (mine.x_fp8[0].to(device), mine.x_fp8[1].to(device))
    recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(x, **_dispatch_kwargs(buffer, mine, device))
    combine_x = torch.randn(recv_x[0].shape, device=device).to(torch.bfloat16)
    raised, out = _raised_by(buffer, lambda: buffer.combine(combine_x, handle, topk_weights=recv_weights)[0])
    poisoned = out is not None and bool(torch.isnan(out.float()).all())
    spec = {"num_nvl_ranks": 2, "tokens": [64] * num_ranks, "fp8": True, "bias": 1}
    _check_one_round(rank, num_ranks, group, spec, buffer, 97)
    torch.cuda.synchronize()
    return raised, poisoned


def test_forwarded_rows_beyond_the_buffer_raise_on_every_rank(rank_pool):
    num_ranks, num_nvl_ranks, tokens = 4, 2, MAX_TOKENS_PER_RANK
    size = deep_ep.config.internode_dispatch_bytes(
        MAX_HIDDEN, MAX_HIDDEN // 128, TOPK, num_ranks, num_nvl_ranks, tokens
    )
    size = -(-size // (2 << 20)) * (2 << 20)
    # Without the forwarded rows the combine fits (a partial sum per token from the other node); with the
    # ~tokens rows each rank forwards (uniform top-8 of 256: nearly every token reaches both nodes) it does not.
    assert (
        deep_ep.config.internode_combine_call_bytes(MAX_HIDDEN, TOPK, num_ranks, num_nvl_ranks, 0, 0, tokens)
        <= size
    )
    assert (
        deep_ep.config.internode_combine_call_bytes(
            MAX_HIDDEN, TOPK, num_ranks, num_nvl_ranks, 0, tokens * 9 // 10, tokens
        )
        > size
    )
    results = rank_pool(num_ranks).run(_rank_forwarded_rows_beyond_the_buffer, size, tokens)
    for rank, (raised, poisoned) in enumerate(results):
        assert raised is not None, f"rank {rank}: nothing raised"
        message, where = raised
        assert message.startswith("x: combining inter-node, rank ") and "num_rdma_bytes" in message, (
            f"rank {rank}: {message}"
        )
        assert where == "call" or poisoned, (
            f"rank {rank}: the rejected combine returned outputs that are not NaN"
        )


def _rank_calls_do_not_wait(rank, num_ranks, group):
    """A fresh dispatch with num_worst_tokens, a cached dispatch and a combine return while the GPU is still
    busy with earlier work, and are correct. Returns the calls that waited. Round 0 runs unprobed (first
    launches load kernels lazily, which may synchronise)."""
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, 2, False)
    tokens = [97 + 25 * r for r in range(num_ranks)]
    worst = sum(tokens)
    spec = {"num_nvl_ranks": 2, "tokens": tokens, "worst": worst}
    waited = []
    for round_index in range(2):
        inputs = make_inputs(60 + round_index, num_ranks, tokens, 2048, NUM_EXPERTS, TOPK)
        layouts, expected = _expected_dispatches(inputs, spec, num_ranks)
        in_ranks = [lay[2] for lay in layouts]
        mine = inputs[rank]
        kwargs = _dispatch_kwargs(buffer, mine, device)
        x = mine.x.to(device)
        fresh = [(i.x.float() * -1.5).to(torch.bfloat16) for i in inputs]
        fresh_x = fresh[rank].to(device)
        torch.cuda.synchronize()
        probe = _HostWaitProbe(device, round_index == 1)
        recv_x, _, recv_weights, _, handle, _ = probe(
            "dispatch(num_worst_tokens=...)", buffer.dispatch, x, num_worst_tokens=worst, **kwargs
        )
        cached_x = probe("dispatch(handle=...)", buffer.dispatch, fresh_x, handle=handle)[0]
        combine_x = _combine_input(recv_x, rank)
        combined, combined_weights, _ = probe(
            "combine", buffer.combine, combine_x, handle, topk_weights=recv_weights
        )
        waited += probe.waited
        torch.cuda.synchronize()
        buffer.check()
        where = f"rank {rank}, round {round_index}"
        want = expected[rank]
        assert bytes_equal(recv_x.cpu(), want.recv_x), f"{where}: recv_x"
        assert torch.equal(handle.recv_src_meta.cpu(), want.handle.recv_src_idx), f"{where}: recv_src_meta"
        want_cached = reference.intranode_dispatch(rank, fresh, in_ranks, num_recv_rows=worst)
        assert bytes_equal(cached_x.cpu(), want_cached.recv_x), f"{where}: cached recv_x"
        want_combined, want_weights = _hierarchical_combine(
            rank,
            2,
            [_combine_input(e.recv_x, d) for d, e in enumerate(expected)],
            [e.recv_topk_weights for e in expected],
            want.handle.send_head,
            [],
        )
        assert torch.equal(combined.cpu(), want_combined), f"{where}: combined_x"
        assert torch.equal(combined_weights.cpu(), want_weights), f"{where}: combined_topk_weights"
    return waited


def test_calls_with_num_worst_tokens_do_not_wait(rank_pool):
    """DESIGN section 4: no host-GPU synchronisation in a call; a fresh inter-node dispatch too, when
    num_worst_tokens fixes its output size."""
    waited = rank_pool(4).run(_rank_calls_do_not_wait)
    assert waited == [[]] * 4, f"calls that waited for the GPU, per rank: {waited}"


ONE_BAD_RANK_CASES = [
    ("dispatch", 3, "expert_alignment"),
    ("cached_dispatch", 1, "x"),
    ("combine", 2, "x"),
    ("dispatch", 0, "config"),
    ("cached_dispatch", 2, "config"),
    ("combine", 1, "config"),
]


@pytest.mark.parametrize(
    "op,bad,argument", ONE_BAD_RANK_CASES, ids=[f"{op}-{argument}" for op, _, argument in ONE_BAD_RANK_CASES]
)
def test_one_bad_rank_makes_every_rank_of_every_node_raise(rank_pool, op, bad, argument):
    """The rank whose checks fail (in C++, or in Python: config) opens the op anyway with a verdict naming the
    argument: no rank of either node waits for it, all skip the op, and every rank raises naming the rank and
    the argument (the bad rank its own error; the others inside a fresh dispatch, which waits for the counts,
    else at the call's end or check(), their outputs NaN; a combine's node peers through the host exchange).
    The next round is correct."""
    results = rank_pool(4).run(_rank_one_bad_rank, op, bad, argument)
    want_kind = "TypeError" if argument == "config" else "ValueError"
    for rank, (raised, poisoned) in enumerate(results):
        assert raised is not None, f"rank {rank}: nothing raised"
        kind, message, where = raised
        assert kind == want_kind and message.startswith(f"{argument}:"), f"rank {rank}: {kind} {message}"
        if rank == bad:
            assert where == "call", f"rank {rank}: {message}"
            continue
        assert f"rank {bad}" in message, f"rank {rank}: {message}"
        same_node = rank // 2 == bad // 2
        if op == "dispatch" or (op == "combine" and same_node):
            assert where == "call", f"rank {rank} raised at {where}: {message}"
        else:
            # Reported by the GPU: at check(), or already at the call's end if the exchange was that quick.
            assert "rejected" in message, f"rank {rank} raised at {where}: {message}"
            assert where == "call" or poisoned, (
                f"rank {rank}: the skipped {op} returned outputs that are not NaN"
            )


def _rank_disagreeing_call(rank, num_ranks, group, case, odd):
    """Rank `odd` makes a call that differs from the others' in one signature field (`case`); every other
    argument is valid on every rank. Returns (message, where) of the ValueError raised and whether the call's
    output came back NaN; then a valid round on the same Buffer (fresh and cached dispatch, combine)."""
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, 2, False)
    mine = make_inputs(98, num_ranks, [64] * num_ranks, 2048, NUM_EXPERTS, TOPK)[rank]
    x, kwargs = mine.x.to(device), _dispatch_kwargs(buffer, mine, device)
    first = buffer.dispatch(x, **kwargs)[4]
    second = buffer.dispatch(x, **kwargs)[4]
    torch.cuda.synchronize()
    odd_rank = rank == odd

    def call():
        if case == "x.size(1)":
            return buffer.dispatch(x[:, :1024].contiguous() if odd_rank else x, **kwargs)[0]
        if case == "topk_idx.size(1)":
            return buffer.dispatch(
                x, **(dict(kwargs, topk_idx=None, topk_weights=None) if odd_rank else kwargs)
            )[0]
        if case == "operation":  # a cached dispatch against fresh ones
            return (buffer.dispatch(x, handle=second) if odd_rank else buffer.dispatch(x, **kwargs))[0]
        return buffer.dispatch(x, handle=first if odd_rank else second)[0]  # another dispatch's handle

    raised, out = _raised_by(buffer, call)
    poisoned = out is not None and bool(torch.isnan(out.float()).all())
    spec = {"num_nvl_ranks": 2, "tokens": [64 + 7 * r for r in range(num_ranks)], "bias": 1}
    _check_one_round(rank, num_ranks, group, spec, buffer, 99)
    torch.cuda.synchronize()
    return raised, poisoned


DISAGREEMENTS = [("x.size(1)", 3), ("topk_idx.size(1)", 0), ("operation", 2), ("handle", 1)]


@pytest.mark.parametrize("case,odd", DISAGREEMENTS, ids=[c for c, _ in DISAGREEMENTS])
def test_ranks_that_disagree_on_the_call_raise_on_every_rank(rank_pool, case, odd):
    """Every rank sends its call's signature (operation, x.dtype, hidden, top-k, experts, handle identity)
    in the op's exchange and compares all of them on the GPU: ranks of different nodes that disagree all
    reject the op alike (no row moves), and every rank raises naming the field and both ranks' values. The
    next round is correct (the ranks' handle numbering stayed aligned)."""
    for rank, (raised, poisoned) in enumerate(rank_pool(4).run(_rank_disagreeing_call, case, odd)):
        assert raised is not None, f"rank {rank}: nothing raised"
        message, where = raised
        assert message.startswith(f"{case}: ranks disagree"), f"rank {rank}: {message}"
        assert f"rank {odd}: " in message, f"rank {rank}: {message}"
        assert where == "call" or poisoned, (
            f"rank {rank}: the rejected call returned outputs that are not NaN"
        )


def _rank_graph_replay(rank, num_ranks, group):
    """Layout, a num_worst_tokens dispatch and a combine captured once in a CUDA graph, replayed with fresh
    data (the combine stages its inputs under capture)."""
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device())
    buffer = _buffer(group, num_ranks, 2, False)
    tokens, hidden = [150 + 10 * r for r in range(num_ranks)], 2048
    worst = sum(tokens)
    static_x = torch.empty(tokens[rank], hidden, dtype=torch.bfloat16, device=device)
    static_idx = torch.empty(tokens[rank], TOPK, dtype=torch.int64, device=device)
    static_weights = torch.empty(tokens[rank], TOPK, dtype=torch.float32, device=device)

    def step():
        per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(static_idx, NUM_EXPERTS)
        recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(
            static_x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_node,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=static_idx,
            topk_weights=static_weights,
            num_worst_tokens=worst,
        )
        combined, combined_weights, _ = buffer.combine(
            _combine_input(recv_x, rank), handle, topk_weights=recv_weights
        )
        return recv_x, combined, combined_weights

    def load(seed):
        inputs = make_inputs(seed, num_ranks, tokens, hidden, NUM_EXPERTS, TOPK, "uniform", torch.bfloat16)
        static_x.copy_(inputs[rank].x)
        static_idx.copy_(inputs[rank].topk_idx)
        static_weights.copy_(inputs[rank].topk_weights)
        return inputs

    load(80)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, combined, combined_weights = step()
    for seed in (81, 82, 83):
        inputs = load(seed)
        graph.replay()
        torch.cuda.synchronize()
        buffer.check()
        _, expected = _expected_dispatches(inputs, {"worst": worst}, num_ranks)
        where = f"rank {rank}, replay with seed {seed}"
        assert bytes_equal(recv_x.cpu(), expected[rank].recv_x), f"{where}: recv_x"
        want, want_weights = _hierarchical_combine(
            rank,
            2,
            [_combine_input(e.recv_x, d) for d, e in enumerate(expected)],
            [e.recv_topk_weights for e in expected],
            expected[rank].handle.send_head,
            [],
        )
        assert torch.equal(combined.cpu(), want), f"{where}: combined_x"
        assert torch.equal(combined_weights.cpu(), want_weights), f"{where}: combined_topk_weights"
    return True


def test_cuda_graph_replay_of_layout_dispatch_and_combine(rank_pool):
    """With num_worst_tokens nothing in the three calls waits for the GPU, so they capture into one graph."""
    assert all(rank_pool(4).run(_rank_graph_replay))


# --- a peer that never arrives -----------------------------------------------------------------------------

MISSING_PEER_TIMEOUT_S = 2


def _rank_missing_peer(rank, num_ranks, group, op, missing):
    """Every rank makes one valid dispatch (for the handle); then `missing` skips `op` while the others call
    it. Returns (error text, seconds from the call to the error) on the ranks that called, None on `missing`.
    The fresh dispatch raises inside the call (its host waits for the counts); the others' kernels time out
    and the next call on the Buffer raises."""
    device = torch.device("cuda", torch.cuda.current_device())
    size = Config().get_rdma_buffer_size_hint(
        2048 * 2, num_ranks, num_nvl_ranks=2, num_max_tokens_per_rank=MAX_TOKENS_PER_RANK
    )
    with environment("DEEP_EP_TIMEOUT_S", str(MISSING_PEER_TIMEOUT_S)):
        buffer = deep_ep.Buffer(group, 0, size, backend="cuda", num_nvl_ranks=2, explicitly_destroy=True)
    mine = make_inputs(91, num_ranks, [64] * num_ranks, 2048, NUM_EXPERTS, TOPK)[rank]
    x, topk_idx = mine.x.to(device), mine.topk_idx.to(device)
    layout = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    kwargs = dict(
        num_tokens_per_rank=layout[0],
        num_tokens_per_rdma_rank=layout[1],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        topk_idx=topk_idx,
        topk_weights=mine.topk_weights.to(device),
    )
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, **kwargs)
    torch.cuda.synchronize()
    dist.barrier(group=group)
    result = None
    try:
        if rank != missing:
            start = time.monotonic()
            poisoned = None  # whether what the call returned is all NaN; None: it returned nothing
            try:
                out = None
                if op == "dispatch":
                    buffer.dispatch(x, **kwargs)
                elif op == "cached_dispatch":
                    out = buffer.dispatch(x, handle=handle)[0]
                else:
                    out = buffer.combine(recv_x, handle)[0]
                torch.cuda.synchronize()
                if out is not None:
                    poisoned = bool(torch.isnan(out.float()).all())
                buffer.dispatch(x, handle=handle)  # the next call surfaces a kernel's timeout
                result = ("no error", time.monotonic() - start, poisoned)
            except RuntimeError as error:
                result = (str(error), time.monotonic() - start, poisoned)
        torch.cuda.synchronize()
        dist.barrier(group=group)
    finally:
        buffer.destroy()
    return result


@pytest.mark.parametrize(
    "op,missing",
    [("dispatch", 3), ("dispatch", 1), ("cached_dispatch", 2), ("combine", 3)],
    ids=["dispatch-other-node", "dispatch-same-node", "cached-other-node", "combine-other-node"],
)
def test_a_missing_peer_gives_an_error_within_the_timeout(op, missing):
    # Its own pool: the timed-out Buffers are destroyed, but a broken rank must not take later tests along.
    with RankPool(4, timeout_s=180) as pool:
        results = pool.run(_rank_missing_peer, op, missing)
    assert results[missing] is None
    for rank, result in enumerate(results):
        if rank == missing:
            continue
        message, seconds, poisoned = result
        assert "timed out" in message or "did not finish in time" in message, f"rank {rank}: {message}"
        # The kernels' waits end after the timeout; the host's count wait after twice that plus 10 s.
        assert seconds < 4 * MISSING_PEER_TIMEOUT_S + 15, f"rank {rank}: error after {seconds:.1f} s"
        # A call that returned before its kernels timed out returned NaN everywhere, never stale rows. (The
        # missing rank's node peer raises inside the combine: its host exchange times out first.)
        assert poisoned is not False, f"rank {rank}: {op} returned outputs that are not poisoned"
    if op != "dispatch":  # the fresh dispatch raises inside the call: its host waits for the counts
        assert any(r is not None and r[2] for r in results), results
