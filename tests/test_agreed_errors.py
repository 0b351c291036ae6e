"""Errors are agreed (docs/errors.md): a bad argument, bad handle or disagreeing call on ONE rank makes EVERY
rank raise the same error, naming that rank and the argument, and the next valid call is correct.

Each case is run with every rank of 2 and of 4 in turn as the bad one, on the reference backend (gloo): the
bad rank makes the call with the case's arguments, the others make the valid call; then all ranks make the
valid call, whose result is compared with deep_ep.backends.reference's pure functions.
"""

from __future__ import annotations

import pytest
import torch
from oracle import make_inputs
from test_validation import CASES as VALIDATION_CASES
from test_validation import Valid

import deep_ep
from deep_ep.backends.fp8 import per_token_cast_to_fp8
from deep_ep.backends.reference import (
    dispatch_layout,
    intranode_combine,
    intranode_dispatch,
    low_latency_combine,
    low_latency_dispatch,
)
from deep_ep.config import internode_size_hint, nvl_buffer_size_hint

# Tokens a rank, hidden (a low-latency size), top-k, experts, low-latency max tokens a rank.
T, H, K, E, M = 8, 2048, 4, 16, 16
SEED = 11


def layout_of(topk_idx, num_experts, num_ranks):
    per_rank, per_expert, in_rank = dispatch_layout(topk_idx, num_experts, num_ranks)
    return {"num_tokens_per_rank": per_rank, "is_token_in_rank": in_rank, "num_tokens_per_expert": per_expert}


class Setup:
    """One rank's Buffers, valid arguments, handles (the valid one, a later dispatch's with the same
    routing, another Buffer's) and the expected outputs of every valid call."""

    def __init__(self, rank, num_ranks, group, internode=False, backend="reference"):
        self.rank, self.num_ranks, self.group, self.internode = rank, num_ranks, group, internode
        self.backend = backend
        # The CUDA twin checks the normal ops only: its Buffer has no low-latency part.
        self.low_latency = not internode and backend == "reference"
        self.num_nvl_ranks = max(1, num_ranks // 2) if internode else None
        inputs = make_inputs(SEED, num_ranks, [T] * num_ranks, H, E, K)
        self.nvl = nvl_buffer_size_hint(H * 2, num_ranks, num_max_tokens_per_rank=T)
        # Room for the signature cases' doubled expert count and hidden size.
        self.rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(M, 2 * H, num_ranks, 2 * E)
        if backend != "reference" and not internode:
            self.rdma = 0  # an intra-node CUDA Buffer without low-latency mode has no RDMA buffer
        if internode:
            self.rdma = internode_size_hint(H * 2, num_ranks, self.num_nvl_ranks, num_max_tokens_per_rank=T)
        self.buffer, other = call(self, "buffer"), call(self, "buffer")
        dev = self.buffer.device
        self.x, self.topk_idx, self.topk_weights = (
            t.to(dev) for t in (inputs[rank].x, inputs[rank].topk_idx, inputs[rank].topk_weights)
        )
        self.layout = {k: v.to(dev) for k, v in layout_of(inputs[rank].topk_idx, E, num_ranks).items()}
        self.topk = {"topk_idx": self.topk_idx, "topk_weights": self.topk_weights}
        self.recv_x, _, self.recv_topk_weights, _, self.handle, _ = call(self, "dispatch")
        self.spare_handle = call(self, "dispatch")[4]
        self.other_handle = other.dispatch(self.x, **self.layout, **self.topk)[4]
        if self.low_latency:
            self.ll_recv, _, self.ll_handle, _, _ = call(self, "ll_dispatch")
            self.ll_spare = call(self, "ll_dispatch")[2]
            self.ll_other = other.low_latency_dispatch(self.x, self.topk_idx, M, E, use_fp8=False)[2]

        xs, idxs = [i.x for i in inputs], [i.topk_idx for i in inputs]
        layouts = [layout_of(i, E, num_ranks) for i in idxs]
        self.expected_dispatch = [
            intranode_dispatch(
                d,
                xs,
                [lay["is_token_in_rank"] for lay in layouts],
                topk_idx=idxs,
                topk_weights=[i.topk_weights for i in inputs],
                num_tokens_per_expert=[lay["num_tokens_per_expert"] for lay in layouts],
            )
            for d in range(num_ranks)
        ]
        ed = self.expected_dispatch
        self.expected_combine = intranode_combine(
            rank,
            [r.recv_x for r in ed],
            [r.handle.recv_src_idx for r in ed],
            [r.handle.rank_prefix_matrix for r in ed],
            T,
            topk_weights=[r.recv_topk_weights for r in ed],
        )
        ll = [low_latency_dispatch(d, xs, idxs, M, E, use_fp8=False) for d in range(num_ranks)]
        self.expected_ll_dispatch = ll[rank]
        self.expected_ll_combine = low_latency_combine(
            rank,
            [r.recv_x for r in ll],
            idxs[rank],
            inputs[rank].topk_weights,
            [r.packed_recv_src_info for r in ll],
            [r.packed_recv_layout_range for r in ll],
            E,
        )


def call(v: Setup, op: str, **overrides):
    """Operation `op` with the valid arguments of `v`, `overrides` replacing some."""
    if op == "buffer":
        kwargs = {
            "num_nvl_bytes": v.nvl,
            "num_rdma_bytes": v.rdma,
            "low_latency_mode": v.low_latency,
            "backend": v.backend,
            "num_nvl_ranks": v.num_nvl_ranks,
        }
        return deep_ep.Buffer(v.group, **{**kwargs, **overrides})
    if op == "dispatch":
        return v.buffer.dispatch(**{"x": v.x, **v.layout, **v.topk, **overrides})
    if op == "cached":
        return v.buffer.dispatch(**{"x": v.x, "handle": v.handle, **overrides})
    if op == "combine":
        kwargs = {"x": v.recv_x, "handle": v.handle, "topk_weights": v.recv_topk_weights}
        return v.buffer.combine(**{**kwargs, **overrides})
    if op == "ll_dispatch":
        kwargs = {
            "x": v.x,
            "topk_idx": v.topk_idx,
            "num_max_dispatch_tokens_per_rank": M,
            "num_experts": E,
            "use_fp8": False,
        }
        return v.buffer.low_latency_dispatch(**{**kwargs, **overrides})
    if op == "ll_combine":
        kwargs = {
            "x": v.ll_recv,
            "topk_idx": v.topk_idx,
            "topk_weights": v.topk_weights,
            "handle": v.ll_handle,
        }
        return v.buffer.low_latency_combine(**{**kwargs, **overrides})
    assert op == "clean", op
    kwargs = {"num_max_dispatch_tokens_per_rank": M, "hidden": H, "num_experts": E}
    return v.buffer.clean_low_latency_buffer(**{**kwargs, **overrides})


def same(a, b) -> bool:
    return a is None and b is None or torch.equal(a.cpu(), b.cpu())


def valid_call_is_correct(v: Setup, op: str) -> bool:
    """The valid call of `op` (all ranks make it) returns what the reference functions compute."""
    if op == "buffer":  # a new Buffer works
        out = call(v, "buffer").dispatch(v.x, **v.layout, **v.topk)
        return same(out[0], v.expected_dispatch[v.rank].recv_x)
    if op == "clean":
        return call(v, "clean") is None and valid_call_is_correct(v, "ll_dispatch")
    out = call(v, op)
    if op == "dispatch":
        expected = v.expected_dispatch[v.rank]
        return (
            same(out[0], expected.recv_x)
            and same(out[1], expected.recv_topk_idx)
            and same(out[2], expected.recv_topk_weights)
            and out[3] == expected.num_recv_tokens_per_expert_list
        )
    if op == "cached":
        return same(out[0], v.expected_dispatch[v.rank].recv_x)
    if op == "combine":
        return same(out[0], v.expected_combine[0]) and same(out[1], v.expected_combine[1])
    if op == "ll_dispatch":
        expected = v.expected_ll_dispatch
        return same(out[0], expected.recv_x) and same(out[1], expected.recv_count)
    return same(out[0], v.expected_ll_combine)


def altered_in_place(handle, field):
    getattr(handle, field).add_(0)  # same values, but the tensor was written after the dispatch returned it
    return handle


def foreign_expert_topk(v):
    """topk_idx with token 0's first slot moved to an expert its dispatch never sent it to."""
    idx = v.topk_idx.clone()
    idx[0, 0] = next(e for e in range(E) if e not in v.topk_idx[0].tolist())
    return idx


# Kinds of error message: "local" - a rank's own check, agreed ("(on rank b of R; ...)"); "signature" - the
# ranks disagree on a field ("<field>: ranks disagree ... rank b: <value>"); "gathered" - a check over every
# rank's exchanged tensors, naming the rank whose tensors fail it.
LOCAL, SIGNATURE, GATHERED = "local", "signature", "gathered"

# name -> (operation, exception type, argument the message starts with, kind, the bad rank's overrides)
CASES = {
    # Buffer construction
    "ctor_low_latency_mode_str": ("buffer", TypeError, "low_latency_mode", LOCAL, lambda v: {"low_latency_mode": "False"}),
    "ctor_num_nvl_bytes": ("buffer", ValueError, "num_nvl_bytes", LOCAL, lambda v: {"num_nvl_bytes": -1}),
    "ctor_backend": ("buffer", ValueError, "backend", LOCAL, lambda v: {"backend": "fast"}),
    "ctor_mode_differs": ("buffer", ValueError, "low_latency_mode", SIGNATURE, lambda v: {"low_latency_mode": False}),
    "ctor_rdma_differs": ("buffer", ValueError, "num_rdma_bytes", SIGNATURE, lambda v: {"num_rdma_bytes": 2 * v.rdma}),
    # fresh dispatch: arguments, layout contents, receive capacity
    "x_dtype": ("dispatch", TypeError, "x", LOCAL, lambda v: {"x": v.x.float()}),
    "x_hidden_multiple": ("dispatch", ValueError, "x", LOCAL, lambda v: {"x": v.x[:, :12].contiguous()}),
    "topk_idx_range": ("dispatch", ValueError, "topk_idx", LOCAL, lambda v: {"topk_idx": v.topk_idx + E}),
    "topk_weights_dtype": ("dispatch", TypeError, "topk_weights", LOCAL, lambda v: {"topk_weights": v.topk_weights.double()}),
    "config_type": ("dispatch", TypeError, "config", LOCAL, lambda v: {"config": (20, 6, 256)}),
    "expert_alignment": ("dispatch", ValueError, "expert_alignment", LOCAL, lambda v: {"expert_alignment": 0}),
    "num_tokens_per_rank_lie": (
        "dispatch", ValueError, "num_tokens_per_rank", LOCAL,
        lambda v: {"num_tokens_per_rank": v.layout["num_tokens_per_rank"] + 1},
    ),
    "is_token_in_rank_contradicts_topk": (
        "dispatch", ValueError, "is_token_in_rank", LOCAL,
        lambda v: (lambda m: {"is_token_in_rank": m, "num_tokens_per_rank": m.sum(0).int()})(
            torch.cat([~v.layout["is_token_in_rank"][:1], v.layout["is_token_in_rank"][1:]])
        ),
    ),
    "num_tokens_per_expert_negative": (
        "dispatch", ValueError, "num_tokens_per_expert", LOCAL,
        lambda v: {"num_tokens_per_expert": v.layout["num_tokens_per_expert"] - 100},
    ),
    "num_tokens_per_expert_contradicts_topk": (
        "dispatch", ValueError, "num_tokens_per_expert", LOCAL,
        lambda v: {"num_tokens_per_expert": v.layout["num_tokens_per_expert"] + 1},
    ),
    "num_worst_tokens_huge": ("dispatch", ValueError, "num_worst_tokens", LOCAL, lambda v: {"num_worst_tokens": 1 << 40}),
    "local_experts_over_limit": (
        "dispatch", ValueError, "num_tokens_per_expert", LOCAL, lambda v: layout_of(v.topk_idx, 2049 * v.num_ranks, v.num_ranks),
    ),
    "num_worst_tokens_too_few": ("dispatch", ValueError, "num_worst_tokens", GATHERED, lambda v: {"num_worst_tokens": 1}),
    # fresh dispatch: ranks disagreeing on the call
    "operation_differs": ("dispatch", ValueError, "operation", SIGNATURE, lambda v: {"op": "cached"}),
    "hidden_differs": ("dispatch", ValueError, "x.size(1)", SIGNATURE, lambda v: {"x": v.x[:, : H // 2].contiguous()}),
    "fp8_differs": ("dispatch", ValueError, "x.dtype", SIGNATURE, lambda v: {"x": per_token_cast_to_fp8(v.x)}),
    "topk_missing": ("dispatch", ValueError, "topk_idx.size(1)", SIGNATURE, lambda v: {"topk_idx": None, "topk_weights": None}),
    "topk_differs": (
        "dispatch", ValueError, "topk_idx.size(1)", SIGNATURE,
        lambda v: {
            "topk_idx": v.topk_idx[:, :-1].contiguous(),
            "topk_weights": v.topk_weights[:, :-1].contiguous(),
            **layout_of(v.topk_idx[:, :-1], E, v.num_ranks),
        },
    ),
    "num_experts_differs": (
        "dispatch", ValueError, "num_tokens_per_expert.size(0)", SIGNATURE,
        lambda v: layout_of(v.topk_idx, 2 * E, v.num_ranks),
    ),
    # cached dispatch
    "cached_token_count": ("cached", ValueError, "x", LOCAL, lambda v: {"x": v.x[:-1].contiguous()}),
    "cached_with_topk": ("cached", ValueError, "topk_idx", LOCAL, lambda v: {"topk_idx": v.topk_idx}),
    "cached_another_buffers_handle": ("cached", ValueError, "handle", LOCAL, lambda v: {"handle": v.other_handle}),
    "cached_handle_altered": (
        "cached", ValueError, "handle.rank_prefix_matrix", LOCAL,
        lambda v: {"handle": altered_in_place(v.spare_handle, "rank_prefix_matrix")},
    ),
    "cached_zeroed_rank_prefix_matrix": (
        "cached", ValueError, "handle.rank_prefix_matrix", LOCAL,
        lambda v: {"handle": v.handle._replace(rank_prefix_matrix=torch.zeros_like(v.handle.rank_prefix_matrix))},
    ),
    "cached_handle_of_another_dispatch": ("cached", ValueError, "handle", SIGNATURE, lambda v: {"handle": v.spare_handle}),
    # combine
    "combine_x_dtype": ("combine", TypeError, "x", LOCAL, lambda v: {"x": v.recv_x.float()}),
    "combine_x_rows": ("combine", ValueError, "x", LOCAL, lambda v: {"x": torch.cat([v.recv_x, v.recv_x[:1]])}),
    "combine_bias_dtype": ("combine", TypeError, "bias[0]", LOCAL, lambda v: {"bias": v.x.float()}),
    "combine_another_buffers_handle": ("combine", ValueError, "handle", LOCAL, lambda v: {"handle": v.other_handle}),
    "combine_handle_altered": (
        "combine", ValueError, "handle.recv_src_idx", LOCAL,
        lambda v: {"handle": altered_in_place(v.spare_handle, "recv_src_idx")},
    ),
    "combine_zeroed_rank_prefix_matrix": (
        "combine", ValueError, "handle.rank_prefix_matrix", LOCAL,
        lambda v: {"handle": v.handle._replace(rank_prefix_matrix=torch.zeros_like(v.handle.rank_prefix_matrix))},
    ),
    "combine_source_index_out_of_range": (
        "combine", ValueError, "handle.recv_src_idx", GATHERED,
        lambda v: {"handle": v.handle._replace(recv_src_idx=v.handle.recv_src_idx + 1000)},
    ),
    "combine_handle_of_another_dispatch": ("combine", ValueError, "handle", SIGNATURE, lambda v: {"handle": v.spare_handle}),
    "combine_hidden_differs": ("combine", ValueError, "x.size(1)", SIGNATURE, lambda v: {"x": v.recv_x[:, : H // 2].contiguous()}),
    "combine_weights_missing": ("combine", ValueError, "topk_weights.size(1)", SIGNATURE, lambda v: {"topk_weights": None}),
    # low-latency dispatch
    "ll_x_dtype": ("ll_dispatch", TypeError, "x", LOCAL, lambda v: {"x": v.x.half()}),
    "ll_expert_range": ("ll_dispatch", ValueError, "topk_idx", LOCAL, lambda v: {"topk_idx": v.topk_idx + E}),
    "ll_too_many_tokens": ("ll_dispatch", ValueError, "x", LOCAL, lambda v: {"num_max_dispatch_tokens_per_rank": T - 1}),
    "ll_capacity": ("ll_dispatch", ValueError, "x", LOCAL, lambda v: {"num_max_dispatch_tokens_per_rank": 64 * M}),
    "ll_num_max_tokens_differs": (
        "ll_dispatch", ValueError, "num_max_dispatch_tokens_per_rank", SIGNATURE,
        lambda v: {"num_max_dispatch_tokens_per_rank": T},
    ),
    "ll_num_experts_differs": ("ll_dispatch", ValueError, "num_experts", SIGNATURE, lambda v: {"num_experts": 2 * E}),
    "ll_fp8_differs": ("ll_dispatch", ValueError, "use_fp8", SIGNATURE, lambda v: {"use_fp8": True}),
    "ll_hidden_differs": ("ll_dispatch", ValueError, "x.size(1)", SIGNATURE, lambda v: {"x": torch.cat([v.x, v.x], 1)}),
    "ll_topk_differs": (
        "ll_dispatch", ValueError, "topk_idx.size(1)", SIGNATURE,
        lambda v: {"topk_idx": v.topk_idx[:, :-1].contiguous()},
    ),
    # low-latency combine
    "ll_combine_x_shape": ("ll_combine", ValueError, "x", LOCAL, lambda v: {"x": v.ll_recv[:, :-1]}),
    "ll_combine_weights": ("ll_combine", ValueError, "topk_weights", LOCAL, lambda v: {"topk_weights": v.topk_weights[:-1]}),
    "ll_combine_out_dtype": ("ll_combine", TypeError, "out", LOCAL, lambda v: {"out": torch.empty(T, H, device=v.x.device)}),
    "ll_combine_another_buffers_handle": ("ll_combine", ValueError, "handle", LOCAL, lambda v: {"handle": v.ll_other}),
    "ll_combine_handle_altered": (
        "ll_combine", ValueError, "handle.packed_recv_layout_range", LOCAL,
        lambda v: {"handle": altered_in_place(v.ll_spare, "packed_recv_layout_range")},
    ),
    "ll_combine_source_index_out_of_range": (
        "ll_combine", ValueError, "handle.packed_recv_src_info", LOCAL,
        lambda v: {"handle": v.ll_handle._replace(packed_recv_src_info=v.ll_handle.packed_recv_src_info + M)},
    ),
    "ll_combine_topk_not_dispatched": (
        "ll_combine", ValueError, "topk_idx", GATHERED, lambda v: {"topk_idx": foreign_expert_topk(v)},
    ),
    "ll_combine_handle_of_another_dispatch": ("ll_combine", ValueError, "handle", SIGNATURE, lambda v: {"handle": v.ll_spare}),
    "ll_combine_logfmt_differs": ("ll_combine", ValueError, "use_logfmt", SIGNATURE, lambda v: {"use_logfmt": True}),
    # clean_low_latency_buffer
    "clean_hidden": ("clean", ValueError, "hidden", LOCAL, lambda v: {"hidden": 1000}),
    "clean_num_experts_differs": ("clean", ValueError, "num_experts", SIGNATURE, lambda v: {"num_experts": 2 * E}),
}  # fmt: skip

# The same checks through an inter-node Buffer (nodes of half the ranks).
INTERNODE_CASES = {
    "topk_idx_range": ("dispatch", ValueError, "topk_idx", LOCAL, lambda v: {"topk_idx": v.topk_idx + E}),
    "num_tokens_per_rdma_rank_lie": (
        "dispatch", ValueError, "num_tokens_per_rdma_rank", LOCAL,
        lambda v: {"num_tokens_per_rdma_rank": torch.full((2,), T + 1, dtype=torch.int32, device=v.x.device)},
    ),
    "cached_handle_of_another_dispatch": ("cached", ValueError, "handle", SIGNATURE, lambda v: {"handle": v.spare_handle}),
    "combine_handle_altered": (
        "combine", ValueError, "handle.gbl_channel_prefix_matrix", LOCAL,
        lambda v: {"handle": altered_in_place(v.spare_handle, "gbl_channel_prefix_matrix")},
    ),
    "combine_source_index_out_of_range": (
        "combine", ValueError, "handle.recv_src_meta", GATHERED,
        lambda v: {"handle": v.handle._replace(recv_src_meta=v.handle.recv_src_meta + 1000)},
    ),
}  # fmt: skip


def rank_one_bad_rank_at_a_time(rank, num_ranks, group, case_name, internode, backend="reference"):
    v = Setup(rank, num_ranks, group, internode, backend)
    op, _, _, _, bad = (INTERNODE_CASES if internode else CASES)[case_name]
    results = []
    for bad_rank in range(num_ranks):
        overrides = bad(v) if rank == bad_rank else {}
        try:
            call(v, overrides.pop("op", op), **overrides)
        except Exception as e:  # noqa: BLE001 - checked by the caller
            error = (type(e).__name__, str(e))
        else:
            error = None
        results.append((error, valid_call_is_correct(v, op)))
    return results


def check_agreed(results_by_rank, case, num_ranks):
    _, error_type, argument, kind, _ = case
    for bad_rank in range(num_ranks):
        errors = [results[bad_rank][0] for results in results_by_rank]
        for rank, error in enumerate(errors):
            assert error is not None, f"bad rank {bad_rank}: rank {rank} raised nothing"
            assert error[0] == error_type.__name__, f"bad rank {bad_rank}: rank {rank}: {error}"
        messages = {message for _, message in errors}
        assert len(messages) == 1, f"bad rank {bad_rank}: the ranks raised different messages {messages}"
        message = messages.pop()
        assert message.startswith(f"{argument}:"), (
            f"bad rank {bad_rank}: does not name {argument!r}: {message}"
        )
        named = {
            LOCAL: f"(on rank {bad_rank} of {num_ranks};",
            SIGNATURE: f"rank {bad_rank}: ",
            GATHERED: f"rank {bad_rank}",
        }[kind]
        assert named in message, f"bad rank {bad_rank}: {named!r} not in {message!r}"
        if kind == SIGNATURE:
            assert "ranks disagree" in message, message
        for rank, results in enumerate(results_by_rank):
            assert results[bad_rank][1], f"bad rank {bad_rank}: rank {rank}'s next valid call was wrong"


@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("case_name", CASES)
def test_one_bad_rank_makes_every_rank_raise(rank_pool, case_name, num_ranks):
    results = rank_pool(num_ranks).run(rank_one_bad_rank_at_a_time, case_name, False)
    check_agreed(results, CASES[case_name], num_ranks)


@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("case_name", INTERNODE_CASES)
def test_one_bad_rank_makes_every_rank_raise_internode(rank_pool, case_name, num_ranks):
    results = rank_pool(num_ranks).run(rank_one_bad_rank_at_a_time, case_name, True)
    check_agreed(results, INTERNODE_CASES[case_name], num_ranks)


# The cases the CUDA backend agrees on (docs/errors.md, "The CUDA backend"): its C++ and Python argument checks,
# handle identity and the signature fields it exchanges; not the reference's content checks, nor expert ids
# (checked on the GPU, raised by the rank that passed them).
CUDA_CASES = [
    "x_dtype", "x_hidden_multiple", "topk_weights_dtype", "config_type", "expert_alignment", "num_worst_tokens_huge",
    "local_experts_over_limit",
    "operation_differs", "hidden_differs", "fp8_differs", "topk_missing", "topk_differs", "num_experts_differs",
    "cached_token_count", "cached_with_topk", "cached_another_buffers_handle", "cached_handle_altered",
    "cached_handle_of_another_dispatch", "combine_x_dtype", "combine_x_rows", "combine_bias_dtype",
    "combine_another_buffers_handle", "combine_handle_altered", "combine_handle_of_another_dispatch",
    "combine_hidden_differs", "combine_weights_missing",
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_one_bad_rank_makes_every_rank_raise_cuda(rank_pool, num_ranks):
    """The same cases through the CUDA backend's intra-node ops (ranks sharing the GPU under MPS)."""
    for case_name in CUDA_CASES:
        results = rank_pool(num_ranks).run(rank_one_bad_rank_at_a_time, case_name, False, "cuda")
        try:
            check_agreed(results, CASES[case_name], num_ranks)
        except AssertionError as e:
            raise AssertionError(f"case {case_name}: {e}") from e


def validation_case_op(name: str):
    """The collective call tests/test_validation.py's case `name` makes (the good ranks make its valid call
    meanwhile); None for the local calls and for the cases that make a second collective (a Buffer made
    inside the case)."""
    if name.startswith("layout_") or name in (
        "ctor_no_group",
        "nvl_capacity",
        "ll_mode_off",
        "ll_next_buffer_handle",
        "local_buffer_dtype",
    ):
        return None
    for prefix, op in (("ctor_", "buffer"), ("ll_combine_", "ll_combine"), ("ll_clean_", "clean")):
        if name.startswith(prefix):
            return op
    if name.startswith("ll_"):
        return "ll_dispatch"
    if name.startswith("combine_") or name == "handle_send_head_shape":
        return "combine"
    return "cached" if name.startswith(("cached_", "handle_")) else "dispatch"


def rank_validation_cases_one_bad_rank(rank, num_ranks, group):
    v, valid = Setup(rank, num_ranks, group), Valid(rank, group, num_ranks)
    results = {}
    for name, (_, _, bad_call) in VALIDATION_CASES.items():
        op = validation_case_op(name)
        if op is None:
            continue
        results[name] = []
        for bad_rank in range(num_ranks):
            try:
                bad_call(valid) if rank == bad_rank else call(v, op)
            except Exception as e:  # noqa: BLE001 - checked by the caller
                error = (type(e).__name__, str(e))
            else:
                error = None
            results[name].append((error, valid_call_is_correct(v, op)))
    return results


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_every_documented_argument_check_is_agreed(rank_pool, num_ranks):
    """tests/test_validation.py's checks of the collective calls, one bad rank at a time."""
    results_by_rank = rank_pool(num_ranks).run(rank_validation_cases_one_bad_rank)
    assert len(results_by_rank[0]) > 60
    for name in results_by_rank[0]:
        error_type, argument, _ = VALIDATION_CASES[name]
        case = (validation_case_op(name), error_type, argument, LOCAL, None)
        try:
            check_agreed([results[name] for results in results_by_rank], case, num_ranks)
        except AssertionError as e:
            raise AssertionError(f"test_validation case {name}: {e}") from e


# ---------------------------------------------------------------------------------------------------------
# Handles without identity, older handles, and the checks of non-collective calls
# ---------------------------------------------------------------------------------------------------------


def rank_handles_accepted(rank, num_ranks, group):
    """Handles that are not the latest dispatch's or carry no identity (copies) still work, when every rank
    passes a handle of the same dispatch."""
    v = Setup(rank, num_ranks, group)
    cloned = type(v.handle)(*(t.clone() for t in v.handle))
    ll_cloned = v.ll_handle._replace(
        packed_recv_src_info=v.ll_handle.packed_recv_src_info.clone(),
        packed_recv_layout_range=v.ll_handle.packed_recv_layout_range.clone(),
    )
    results = {}
    for name, handle in (
        ("older", v.handle),  # every rank passes dispatch #1's handle after dispatch #2
        ("later", v.spare_handle),
        ("cloned", cloned),
        ("cloned_on_rank_0", cloned if rank == 0 else v.handle),  # no identity matches any
    ):
        combined = v.buffer.combine(v.recv_x, handle, topk_weights=v.recv_topk_weights)
        cached = v.buffer.dispatch(v.x, handle=handle)
        results[name] = same(combined[0], v.expected_combine[0]) and same(
            cached[0], v.expected_dispatch[rank].recv_x
        )
    combined = call(v, "ll_combine", handle=ll_cloned)
    results["ll_cloned"] = same(combined[0], v.expected_ll_combine)
    return results


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_handles_of_one_dispatch_on_every_rank_are_accepted(rank_pool, num_ranks):
    for rank, results in enumerate(rank_pool(num_ranks).run(rank_handles_accepted)):
        assert all(results.values()), f"rank {rank}: {results}"


def rank_symmetric_and_local_errors(rank, num_ranks, group):
    """(type, message) of: a handle altered on every rank, and the non-collective calls' errors, which stay on
    the rank that made them (here every rank makes them)."""
    v = Setup(rank, num_ranks, group)
    errors = {}
    for name, fn in (
        (
            "altered_everywhere",
            lambda: call(v, "combine", handle=altered_in_place(v.spare_handle, "send_head")),
        ),
        ("layout_num_experts", lambda: v.buffer.get_dispatch_layout(v.topk_idx, num_ranks << 40)),
        ("next_combine_buffer", lambda: v.buffer.get_next_low_latency_combine_buffer(v.ll_other)),
    ):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - checked by the caller
            errors[name] = (type(e).__name__, str(e))
    errors["still_works"] = valid_call_is_correct(v, "combine") and valid_call_is_correct(v, "ll_combine")
    return errors


def test_symmetric_and_local_errors(rank_pool):
    for errors in rank_pool(2).run(rank_symmetric_and_local_errors):
        assert errors["altered_everywhere"][0] == "ValueError"
        assert errors["altered_everywhere"][1].startswith("handle.send_head: modified in place")
        assert "(on ranks 0, 1 of 2;" in errors["altered_everywhere"][1]
        assert errors["layout_num_experts"][0] == "ValueError"
        assert errors["layout_num_experts"][1].startswith("num_experts: at most")
        assert errors["next_combine_buffer"][0] == "ValueError"
        assert errors["next_combine_buffer"][1].startswith("handle: it was made by another Buffer")
        assert errors["still_works"]


def test_checks_without_a_group():
    with pytest.raises(TypeError, match="^group: expected a torch.distributed.ProcessGroup"):
        deep_ep.Buffer("world")
    with pytest.raises(ValueError, match="^num_experts: must be divisible by num_ranks=3"):
        deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 3, 256)
