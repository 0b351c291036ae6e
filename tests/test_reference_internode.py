"""The reference backend's inter-node normal mode over gloo: 4 ranks as 2 nodes x 2, 8 ranks as 2 x 4 and 4 x 2.

Inter-node dispatch and combine have the intra-node semantics, so each rank runs the same calls through an
inter-node Buffer (num_nvl_ranks=L) and an intra-node one over the same group and compares: received rows,
top-k and scales bit-exactly, per-expert counts exactly, combine bit-exactly (same reduction order). What
only the inter-node path has (num_tokens_per_rdma_rank, the handle's node fields) is compared with a
brute-force oracle: plain loops over (source rank, token), routing read from topk_idx.
"""

from __future__ import annotations

import pytest
import torch
from oracle import bytes_equal, make_inputs

import deep_ep
from deep_ep import config as cfg
from deep_ep.backends.fp8 import per_token_cast_to_fp8
from deep_ep.config import nvl_buffer_size_hint
from deep_ep.handles import InternodeHandle

SEED = 23
# (ranks, ranks a node)
SPLITS = [(4, 2), (8, 4), (8, 2)]
SPLIT_IDS = [f"{r // n}x{n}" for r, n in SPLITS]


class Case:
    def __init__(self, name, hidden, topk, num_experts, tokens, routing="uniform"):
        self.name, self.hidden, self.topk, self.num_experts = name, hidden, topk, num_experts
        self._tokens, self.routing = tokens, routing

    def args(self, num_ranks: int, num_nvl_ranks: int) -> tuple:
        tokens = [self._tokens[r % len(self._tokens)] for r in range(num_ranks)]
        return (num_nvl_ranks, self.hidden, self.topk, self.num_experts, tokens, self.routing)


CASES = [
    Case("basic", 256, 4, 32, [37, 41]),
    Case("zero_tokens_on_a_rank", 128, 2, 32, [0, 5, 9, 0]),
    Case("minus_one", 512, 6, 48, [23, 17, 0, 31], "with_minus_one"),
    # Every token picks experts of one rank only: everything goes to one node.
    Case("all_to_one_node", 256, 3, 32, [20], "all_to_one_rank"),
    Case("top1", 128, 1, 16, [40, 3]),
]
CASE_IDS = [c.name for c in CASES]


# ---------------------------------------------------------------------------------------------------------
# Brute-force oracle of the inter-node-only outputs
# ---------------------------------------------------------------------------------------------------------


def dest_nodes(topk_row: list, num_local_experts: int, num_nvl_ranks: int) -> set:
    return {e // num_local_experts // num_nvl_ranks for e in topk_row if e >= 0}


def brute_node_count_matrix(inputs, num_experts: int, num_nvl_ranks: int) -> torch.Tensor:
    """[g][n] = tokens rank g sends to node n (once per token, however many ranks of n get it)."""
    num_ranks = len(inputs)
    lx, num_nodes = num_experts // num_ranks, num_ranks // num_nvl_ranks
    counts = [[0] * num_nodes for _ in range(num_ranks)]
    for g, inp in enumerate(inputs):
        for row in inp.topk_idx.tolist():
            for n in dest_nodes(row, lx, num_nvl_ranks):
                counts[g][n] += 1
    return torch.tensor(counts, dtype=torch.int32)


def brute_send_rdma_head(inputs, rank: int, num_experts: int, num_nvl_ranks: int) -> torch.Tensor:
    num_ranks = len(inputs)
    lx, num_nodes = num_experts // num_ranks, num_ranks // num_nvl_ranks
    sent, head = [0] * num_nodes, []
    for row in inputs[rank].topk_idx.tolist():
        nodes = dest_nodes(row, lx, num_nvl_ranks)
        head.append([sent[n] if n in nodes else -1 for n in range(num_nodes)])
        for n in nodes:
            sent[n] += 1
    return torch.tensor(head, dtype=torch.int32).view(-1, num_nodes)


def brute_forward_offsets(node_count: torch.Tensor, rank: int, num_nvl_ranks: int) -> list:
    node, local = divmod(rank, num_nvl_ranks)
    offsets = [0]
    for m in range(node_count.size(1)):
        offsets.append(offsets[-1] + (0 if m == node else int(node_count[m * num_nvl_ranks + local, node])))
    return offsets


# ---------------------------------------------------------------------------------------------------------
# Rank side
# ---------------------------------------------------------------------------------------------------------


class Setup:
    """All ranks' inputs, and an intra-node and an inter-node Buffer over the same group."""

    def __init__(self, rank, num_ranks, group, case_args, dtype=torch.bfloat16, num_rdma_bytes=None):
        num_nvl_ranks, hidden, topk, num_experts, tokens, routing = case_args
        self.rank, self.num_nvl_ranks, self.num_experts = rank, num_nvl_ranks, num_experts
        self.inputs = make_inputs(SEED, num_ranks, tokens, hidden, num_experts, topk, routing, dtype)
        nvl = nvl_buffer_size_hint(hidden * 2, num_ranks, num_max_tokens_per_rank=max(tokens))
        self.intra = deep_ep.Buffer(group, nvl, backend="reference", num_nvl_ranks=num_ranks)
        if num_rdma_bytes is None:
            num_rdma_bytes = deep_ep.Config().get_rdma_buffer_size_hint(
                hidden * 2, num_ranks, num_nvl_ranks=num_nvl_ranks, num_max_tokens_per_rank=max(tokens)
            )
        self.inter = deep_ep.Buffer(
            group, 0, num_rdma_bytes, backend="reference", num_nvl_ranks=num_nvl_ranks
        )
        assert self.inter.is_internode and not self.intra.is_internode
        self.mine = self.inputs[rank]

    def layout(self, buffer):
        return buffer.get_dispatch_layout(self.mine.topk_idx, self.num_experts)

    def dispatch(self, buffer, x=None, with_rdma_counts=True, **kwargs):
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.layout(buffer)
        return buffer.dispatch(
            self.mine.x if x is None else x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank if with_rdma_counts else None,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=self.mine.topk_idx,
            topk_weights=self.mine.topk_weights,
            **kwargs,
        )


def assert_same_dispatch(got, want, what: str) -> None:
    """Two dispatch tuples move the same rows: recv_x (or its FP8 parts), top-k and counts."""
    got_x, want_x = got[0], want[0]
    if isinstance(want_x, tuple):
        assert all(bytes_equal(g, w) for g, w in zip(got_x, want_x)), f"{what}: recv_x (FP8 + scales)"
    else:
        assert bytes_equal(got_x, want_x), f"{what}: recv_x"
    for i, name in ((1, "recv_topk_idx"), (2, "recv_topk_weights")):
        assert (got[i] is None and want[i] is None) or bytes_equal(got[i], want[i]), f"{what}: {name}"
    assert got[3] == want[3], f"{what}: num_recv_tokens_per_expert_list {got[3]} != {want[3]}"


def rank_layout(rank, num_ranks, group, case_args):
    s = Setup(rank, num_ranks, group, case_args)
    per_rank, per_rdma_rank, per_expert, in_rank, event = s.layout(s.inter)
    want_per_rank, want_none, want_per_expert, want_in_rank, _ = s.layout(s.intra)
    assert want_none is None and isinstance(event, deep_ep.EventOverlap)
    assert torch.equal(per_rank, want_per_rank) and torch.equal(per_expert, want_per_expert)
    assert torch.equal(in_rank, want_in_rank)
    want = brute_node_count_matrix(s.inputs, s.num_experts, s.num_nvl_ranks)[rank]
    assert per_rdma_rank.dtype == torch.int32 and torch.equal(per_rdma_rank, want), (
        f"num_tokens_per_rdma_rank {per_rdma_rank.tolist()} != {want.tolist()}"
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("num_ranks", "num_nvl_ranks"), SPLITS, ids=SPLIT_IDS)
def test_layout_counts_tokens_per_node(rank_pool, num_ranks, num_nvl_ranks, case):
    rank_pool(num_ranks).run(rank_layout, case.args(num_ranks, num_nvl_ranks))


def rank_dispatch(rank, num_ranks, group, case_args):
    s = Setup(rank, num_ranks, group, case_args)
    got, want = s.dispatch(s.inter), s.dispatch(s.intra)
    assert_same_dispatch(got, want, "inter-node vs intra-node dispatch")
    handle, intra = got[4], want[4]
    assert isinstance(handle, InternodeHandle) and len(handle) == 10
    num_tokens, num_nodes, lnvl = s.mine.x.size(0), num_ranks // s.num_nvl_ranks, s.num_nvl_ranks
    num_recv = want[0].size(0)
    node_count = brute_node_count_matrix(s.inputs, s.num_experts, lnvl)
    offsets = brute_forward_offsets(node_count, rank, lnvl)
    expected = {
        "is_token_in_rank": intra.is_token_in_rank,
        "rdma_channel_prefix_matrix": node_count,
        "gbl_channel_prefix_matrix": intra.rank_prefix_matrix,
        "recv_rdma_channel_prefix_matrix": torch.tensor(offsets, dtype=torch.int32),
        "recv_rdma_rank_prefix_sum": torch.full((offsets[-1], lnvl), -1, dtype=torch.int32),
        "recv_gbl_channel_prefix_matrix": intra.recv_channel_prefix_matrix.flatten(),
        "recv_gbl_rank_prefix_sum": intra.rank_prefix_matrix[:, rank],
        "recv_src_meta": intra.recv_src_idx,
        "send_rdma_head": brute_send_rdma_head(s.inputs, rank, s.num_experts, lnvl),
        "send_nvl_head": intra.send_head,
    }
    for name, want_value in expected.items():
        got_value = getattr(handle, name)
        assert got_value.dtype == want_value.dtype and torch.equal(got_value, want_value), f"handle.{name}"
    shapes = [(num_tokens, num_ranks), (num_ranks, num_nodes), (num_ranks, num_ranks), (num_nodes + 1,)]
    shapes += [(offsets[-1], lnvl), (num_ranks,), (num_ranks,), (num_recv,), (num_tokens, num_nodes)]
    assert [tuple(t.shape) for t in handle] == shapes + [(num_tokens, num_ranks)]
    # V1 code reads the inclusive receive prefix at index -4; its last entry is the row count.
    assert handle[-4] is handle.recv_gbl_rank_prefix_sum and int(handle[-4][-1]) == num_recv


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("num_ranks", "num_nvl_ranks"), SPLITS, ids=SPLIT_IDS)
def test_dispatch_equals_intranode_and_handle_is_v1_layout(rank_pool, num_ranks, num_nvl_ranks, case):
    rank_pool(num_ranks).run(rank_dispatch, case.args(num_ranks, num_nvl_ranks))


def rank_fp8_and_options(rank, num_ranks, group, case_args):
    s = Setup(rank, num_ranks, group, case_args, torch.float8_e4m3fn)
    q, scales = s.mine.x_fp8
    for options in ({}, {"expert_alignment": 4}, {"with_rdma_counts": False}):
        want = s.dispatch(s.intra, x=(q, scales.t().contiguous().t()), **options)
        got = s.dispatch(s.inter, x=(q, scales.t().contiguous().t()), **options)
        assert_same_dispatch(got, want, f"FP8 dispatch {options}")
    # Without top-k: counts from num_tokens_per_expert, recv_topk_* None.
    per_rank, per_rdma_rank, per_expert, in_rank, _ = s.layout(s.inter)
    got = s.inter.dispatch(s.mine.x, None, per_rank, per_rdma_rank, in_rank, per_expert, async_finish=True)
    want = s.intra.dispatch(s.mine.x, None, per_rank, None, in_rank, per_expert)
    assert_same_dispatch(got, want, "dispatch without top-k")
    assert isinstance(got[5], deep_ep.EventOverlap)


@pytest.mark.parametrize(("num_ranks", "num_nvl_ranks"), SPLITS[:1], ids=SPLIT_IDS[:1])
def test_fp8_alignment_and_layout_only_dispatch(rank_pool, num_ranks, num_nvl_ranks):
    rank_pool(num_ranks).run(rank_fp8_and_options, CASES[2].args(num_ranks, num_nvl_ranks))


def rank_combine(rank, num_ranks, group, case_args, num_rdma_bytes=None):
    s = Setup(rank, num_ranks, group, case_args, num_rdma_bytes=num_rdma_bytes)
    outs = []
    for buffer in (s.inter, s.intra):
        recv_x, _, recv_weights, _, handle, _ = s.dispatch(buffer)
        # Expert outputs differ per holder, so the order of the additions shows in the result.
        expert_out = (recv_x.float() * (2.0 ** (10 * (rank % 3)) * (1 - 2 * (rank % 2)))).to(torch.bfloat16)
        bias = (s.mine.x.flip(0), -s.mine.x)
        outs.append(buffer.combine(expert_out, handle, topk_weights=recv_weights, bias=bias))
    (got_x, got_weights, _), (want_x, want_weights, _) = outs
    assert bytes_equal(got_x, want_x), "combined_x"
    assert bytes_equal(got_weights, want_weights), "combined_topk_weights"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("num_ranks", "num_nvl_ranks"), SPLITS, ids=SPLIT_IDS)
def test_combine_equals_intranode(rank_pool, num_ranks, num_nvl_ranks, case):
    rank_pool(num_ranks).run(rank_combine, case.args(num_ranks, num_nvl_ranks))


@pytest.mark.parametrize(("num_ranks", "num_nvl_ranks"), SPLITS, ids=SPLIT_IDS)
def test_a_buffer_sized_for_the_default_path_runs_below_the_hint(rank_pool, num_ranks, num_nvl_ranks):
    """As the CUDA backend outside graph capture: a combine needs room for the rows it forwards and a partial
    sum per token and other node, not for staged rows, so a Buffer sized for the dispatch and that combine
    (DeepEP V1's scripts pass a fixed num_rdma_bytes) runs although it is below the hint."""
    args = CASES[0].args(num_ranks, num_nvl_ranks)
    _, hidden, topk, _, tokens, _ = args
    most, num_other_nodes = max(tokens), num_ranks // num_nvl_ranks - 1
    size = max(
        cfg.internode_dispatch_bytes(hidden * 2, 0, topk, num_ranks, num_nvl_ranks, most),
        cfg.internode_combine_call_bytes(
            hidden, topk, num_ranks, num_nvl_ranks, 0, num_other_nodes * most, most
        ),
    )
    hint = deep_ep.Config().get_rdma_buffer_size_hint(
        hidden * 2, num_ranks, num_nvl_ranks=num_nvl_ranks, num_max_tokens_per_rank=most
    )
    assert size < hint, (size, hint)
    rank_pool(num_ranks).run(rank_combine, args, size)


def rank_cached_dispatch(rank, num_ranks, group, case_args):
    s = Setup(rank, num_ranks, group, case_args)
    handles = [s.dispatch(buffer)[4] for buffer in (s.inter, s.intra)]
    new_x = (s.mine.x.float() * -2 + 1).to(torch.bfloat16)
    for x in (new_x, per_token_cast_to_fp8(new_x)):
        got = s.inter.dispatch(x, handle=handles[0])
        want = s.intra.dispatch(x, handle=handles[1])
        assert got[1:5] == (None, None, None, None), "a cached dispatch returns V1's tuple"
        assert_same_dispatch(got, want, "cached dispatch")
    # The handle may come back as a plain tuple or list (V1 code rebuilds it).
    want_x = s.intra.dispatch(new_x, handle=handles[1])[0]
    for rebuilt in (tuple(handles[0]), list(handles[0])):
        assert bytes_equal(s.inter.dispatch(new_x, handle=rebuilt)[0], want_x), type(rebuilt).__name__


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASE_IDS[0], CASE_IDS[2]])
@pytest.mark.parametrize(("num_ranks", "num_nvl_ranks"), SPLITS, ids=SPLIT_IDS)
def test_cached_dispatch_equals_intranode(rank_pool, num_ranks, num_nvl_ranks, case):
    rank_pool(num_ranks).run(rank_cached_dispatch, case.args(num_ranks, num_nvl_ranks))


def rank_num_worst_tokens(rank, num_ranks, group, case_args):
    s = Setup(rank, num_ranks, group, case_args)
    worst = sum(i.x.size(0) for i in s.inputs) + 3
    got, want = s.dispatch(s.inter, num_worst_tokens=worst), s.dispatch(s.intra, num_worst_tokens=worst)
    assert_same_dispatch(got, want, "num_worst_tokens dispatch")
    handle = got[4]
    assert handle.recv_src_meta.size(0) == worst and torch.equal(handle.recv_src_meta, want[4].recv_src_idx)
    # Padding rows belong to no token: combine and a cached dispatch through the padded handle still agree.
    got_c, _, _ = s.inter.combine(got[0], handle, topk_weights=got[2])
    want_c, _, _ = s.intra.combine(want[0], want[4], topk_weights=want[2])
    assert bytes_equal(got_c, want_c), "combine through a padded handle"
    assert bytes_equal(
        s.inter.dispatch(s.mine.x, handle=handle)[0], s.intra.dispatch(s.mine.x, handle=want[4])[0]
    )


@pytest.mark.parametrize(("num_ranks", "num_nvl_ranks"), SPLITS[:2], ids=SPLIT_IDS[:2])
def test_num_worst_tokens_pads_like_intranode(rank_pool, num_ranks, num_nvl_ranks):
    rank_pool(num_ranks).run(rank_num_worst_tokens, CASES[2].args(num_ranks, num_nvl_ranks))


# ---------------------------------------------------------------------------------------------------------
# Errors (every rank makes the same call, so every rank raises before communicating)
# ---------------------------------------------------------------------------------------------------------


def error_of(call) -> tuple:
    try:
        call()
    except (TypeError, ValueError) as error:
        return type(error).__name__, str(error)
    return None


def rank_cross_mode_handles(rank, num_ranks, group, case_args):
    s = Setup(rank, num_ranks, group, case_args)
    inter_out, intra_out = s.dispatch(s.inter), s.dispatch(s.intra)
    errors = {
        "inter_dispatch_6": error_of(lambda: s.inter.dispatch(s.mine.x, handle=intra_out[4])),
        "inter_combine_6": error_of(lambda: s.inter.combine(intra_out[0], intra_out[4])),
        "intra_dispatch_10": error_of(lambda: s.intra.dispatch(s.mine.x, handle=inter_out[4])),
        "intra_combine_10": error_of(lambda: s.intra.combine(inter_out[0], inter_out[4])),
        "inter_short": error_of(lambda: s.inter.dispatch(s.mine.x, handle=tuple(inter_out[4])[:9])),
        "inter_field_shape": error_of(
            lambda: s.inter.combine(
                inter_out[0], inter_out[4]._replace(send_rdma_head=inter_out[4].send_nvl_head)
            )
        ),
    }
    # Both Buffers still work after the rejected calls.
    assert_same_dispatch(s.dispatch(s.inter), s.dispatch(s.intra), "after the rejected calls")
    return errors


def test_a_buffer_takes_only_handles_of_its_own_kind(rank_pool):
    for errors in rank_pool(4).run(rank_cross_mode_handles, CASES[0].args(4, 2)):
        for name, error in errors.items():
            assert error is not None and error[0] == "ValueError", (name, error)
        assert errors["inter_dispatch_6"][1].startswith("handle: this is an intra-node handle (6 elements)")
        assert errors["intra_combine_10"][1].startswith("handle: this is an inter-node handle (10 elements)")
        assert errors["inter_short"][1].startswith(
            "handle: expected the 10-element inter-node handle, got 9 elements"
        )
        assert errors["inter_field_shape"][1].startswith("handle.send_rdma_head: expected shape")


def rank_rdma_count_checks(rank, num_ranks, group, case_args):
    s = Setup(rank, num_ranks, group, case_args)
    per_rank, per_rdma_rank, per_expert, in_rank, _ = s.layout(s.inter)

    def dispatch(per_rdma):
        return s.inter.dispatch(s.mine.x, None, per_rank, per_rdma, in_rank, per_expert)

    lie = per_rdma_rank + (1 if rank == 1 else 0)  # one rank's counts do not match its is_token_in_rank
    return {
        "dtype": error_of(lambda: dispatch(per_rdma_rank.long())),
        "shape": error_of(lambda: dispatch(per_rank)),
        "lie": error_of(lambda: dispatch(lie)),
        "none": error_of(lambda: dispatch(None)),
    }


def test_num_tokens_per_rdma_rank_is_checked(rank_pool):
    for errors in rank_pool(4).run(rank_rdma_count_checks, CASES[0].args(4, 2)):
        assert errors["dtype"][0] == "TypeError" and errors["dtype"][1].startswith(
            "num_tokens_per_rdma_rank:"
        )
        assert errors["shape"][0] == "ValueError" and errors["shape"][1].startswith(
            "num_tokens_per_rdma_rank:"
        )
        assert errors["lie"] == ("ValueError", errors["lie"][1]) and "on rank 1" in errors["lie"][1]
        assert errors["none"] is None


def rank_capacity(rank, num_ranks, group, case_args):
    s = Setup(rank, num_ranks, group, case_args, num_rdma_bytes=1 << 16)
    return error_of(lambda: s.dispatch(s.inter))


def test_inter_node_ops_are_sized_against_num_rdma_bytes(rank_pool):
    for error in rank_pool(4).run(rank_capacity, CASES[0].args(4, 2)):
        assert error is not None and error[0] == "ValueError" and error[1].startswith("x: "), error
        assert "num_rdma_bytes=65536" in error[1], error
