"""Checks of tensor contents that only the reference backend makes (they read tensors on the host; on the
CUDA backend these would cost a host-GPU synchronisation per call, so its GPU path treats what they catch as
garbage in, see docs/errors.md).

Two kinds, both raising ValueError naming the argument first:
- local checks of this rank's own tensors (layout tensors against topk_idx, a handle's consistency), run
  before the call's handshake so that every rank raises their error (deep_ep.backends.agreement);
- checks over every rank's tensors after the reference's all-gather (`*_all_ranks`): every rank runs them on
  the same gathered values in the same order, so every rank raises the same error and no result is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..handles import IntranodeHandle, unpack_layout_range
from .reference import dispatch_layout
from .reference_internode import num_tokens_per_rdma_rank


def _first(mask: torch.Tensor) -> tuple:
    """Index tuple of the first True element of `mask`."""
    return tuple(int(i) for i in mask.nonzero()[0])


# ---------------------------------------------------------------------------------------------------------
# Fresh dispatch: layout tensors
# ---------------------------------------------------------------------------------------------------------


def check_layout(args, num_ranks: int, num_nvl_ranks: int) -> None:
    """The layout tensors of a dispatch (validation.DispatchArgs) agree with each other and with topk_idx:
    num_tokens_per_rank is is_token_in_rank.sum(0), num_tokens_per_rdma_rank its tokens per node, and when
    topk_idx is given is_token_in_rank and num_tokens_per_expert are what get_dispatch_layout computes from it
    (without it, num_tokens_per_expert is only checked to be >= 0)."""
    in_rank, per_expert = args.is_token_in_rank, args.num_tokens_per_expert
    if not torch.equal(args.num_tokens_per_rank.long(), in_rank.sum(0)):
        raise ValueError(
            f"num_tokens_per_rank: {args.num_tokens_per_rank.tolist()} differs from is_token_in_rank.sum(0) "
            f"{in_rank.sum(0).tolist()}"
        )
    per_node = args.num_tokens_per_rdma_rank
    if per_node is not None and not torch.equal(per_node, num_tokens_per_rdma_rank(in_rank, num_nvl_ranks)):
        raise ValueError("num_tokens_per_rdma_rank: differs from is_token_in_rank's tokens per node")
    negative = per_expert < 0
    if bool(negative.any()):
        (expert,) = _first(negative)
        raise ValueError(
            f"num_tokens_per_expert: counts must be >= 0, found {int(per_expert[expert])} (expert {expert})"
        )
    if args.topk_idx is None:
        return
    _, expected_per_expert, expected_in_rank = dispatch_layout(args.topk_idx, per_expert.numel(), num_ranks)
    wrong = in_rank != expected_in_rank
    if bool(wrong.any()):
        token, rank = _first(wrong)
        has = "has an" if bool(expected_in_rank[token, rank]) else "has no"
        raise ValueError(
            f"is_token_in_rank: contradicts topk_idx: token {token} {has} expert on rank {rank} but "
            f"is_token_in_rank[{token}, {rank}] is {bool(in_rank[token, rank])} (use get_dispatch_layout)"
        )
    wrong = per_expert != expected_per_expert
    if bool(wrong.any()):
        (expert,) = _first(wrong)
        raise ValueError(
            f"num_tokens_per_expert: contradicts topk_idx: expert {expert} has {int(per_expert[expert])}, "
            f"topk_idx routes {int(expected_per_expert[expert])} to it (use get_dispatch_layout)"
        )


def check_receive_capacity_all_ranks(
    num_tokens_per_rank: Sequence[Sequence[int]], num_worst_tokens: Sequence[int]
) -> None:
    """Every rank d with num_worst_tokens[d] > 0 receives at most that many rows (num_tokens_per_rank[s][d]
    summed over the sources s): checked on the counts exchanged in the handshake, before any row moves."""
    for d, capacity in enumerate(num_worst_tokens):
        received = sum(per_rank[d] for per_rank in num_tokens_per_rank)
        if 0 < capacity < received:
            raise ValueError(
                f"num_worst_tokens: rank {d} would receive {received} rows, more than its "
                f"num_worst_tokens={capacity}"
            )


# ---------------------------------------------------------------------------------------------------------
# Normal handles
# ---------------------------------------------------------------------------------------------------------


class HandleNames(NamedTuple):
    """What the intra-node view's fields are called in the handle the user passed."""

    rank_prefix_matrix: str
    recv_src_idx: str
    is_token_in_rank: str


INTRANODE_NAMES = HandleNames("rank_prefix_matrix", "recv_src_idx", "is_token_in_rank")
INTERNODE_NAMES = HandleNames("gbl_channel_prefix_matrix", "recv_src_meta", "is_token_in_rank")


def check_normal_handle(handle: IntranodeHandle, rank: int, names: HandleNames) -> None:
    """What the reference reads of a (validated) handle is consistent: the rank prefix matrix is cumulative
    over source ranks, this rank's is_token_in_rank sent what the matrix says, and recv_src_idx holds the
    matrix's rows of this rank (source indices >= 0, increasing within each source's rows) then -1 padding.
    The matrix being the same on every rank is checked by the call's signature."""
    prefix = handle.rank_prefix_matrix.long()
    if int(prefix.min()) < 0 or bool((prefix[1:] < prefix[:-1]).any()):
        raise ValueError(
            f"handle.{names.rank_prefix_matrix}: not a rank prefix matrix (entries must be >= 0 and "
            "non-decreasing over the source rank)"
        )
    sent = prefix[rank] - (prefix[rank - 1] if rank > 0 else 0)
    if not torch.equal(handle.is_token_in_rank.sum(0), sent):
        raise ValueError(
            f"handle.{names.rank_prefix_matrix}: says this rank sent {sent.tolist()} tokens to the ranks, "
            f"handle.{names.is_token_in_rank} sends {handle.is_token_in_rank.sum(0).tolist()}"
        )
    src, ends = handle.recv_src_idx.long(), prefix[:, rank]
    num_received = int(ends[-1])
    if num_received > src.numel():
        raise ValueError(
            f"handle.{names.recv_src_idx}: has {src.numel()} rows, handle.{names.rank_prefix_matrix} says this "
            f"rank received {num_received}"
        )
    received, padding = src[:num_received], src[num_received:]
    if bool((padding != -1).any()):
        raise ValueError(
            f"handle.{names.recv_src_idx}: rows past the {num_received} received must be -1 (padding)"
        )
    if num_received == 0:
        return
    if int(received.min()) < 0:
        raise ValueError(
            f"handle.{names.recv_src_idx}: source token indices of received rows must be >= 0, found "
            f"{int(received.min())}"
        )
    block_start = torch.zeros(num_received, dtype=torch.bool, device=src.device)
    starts = ends[:-1][ends[:-1] < num_received]
    block_start[starts] = True
    if bool(((received[1:] <= received[:-1]) & ~block_start[1:]).any()):
        raise ValueError(
            f"handle.{names.recv_src_idx}: source token indices must increase within each source rank's rows"
        )


def check_recv_src_idx_all_ranks(
    recv_src_idx: Sequence[torch.Tensor],
    rank_prefix_matrix: torch.Tensor,
    num_tokens: Sequence[int],
    names: HandleNames,
) -> None:
    """Every rank d's rows from source s point at tokens rank s has (num_tokens[s]): after the all-gather,
    identically on every rank. The rows of a source increase (check_normal_handle), so its last row decides."""
    prefix = rank_prefix_matrix.long()
    limits = torch.tensor(num_tokens, dtype=torch.long, device=prefix.device)
    for d, src in enumerate(recv_src_idx):
        ends = prefix[:, d]
        begins = torch.cat([ends.new_zeros(1), ends[:-1]])
        nonempty = ends > begins
        if not bool(nonempty.any()):
            continue
        last = src.long()[(ends - 1).clamp_min(0)]
        beyond = nonempty & (last >= limits)
        if bool(beyond.any()):
            (s,) = _first(beyond)
            raise ValueError(
                f"handle.{names.recv_src_idx}: rank {d}'s rows from rank {s} point at token {int(last[s])}, "
                f"but rank {s} has {num_tokens[s]} tokens"
            )


# ---------------------------------------------------------------------------------------------------------
# Low-latency handles
# ---------------------------------------------------------------------------------------------------------


def check_low_latency_handle(handle, num_ranks: int) -> None:
    """The row blocks of packed_recv_layout_range lie inside the receive tensor without overlapping, hold at
    most num_max_dispatch_tokens_per_rank rows each, and their packed_recv_src_info rows are token indices
    in [0, num_max_dispatch_tokens_per_rank)."""
    m, rows = handle.num_max_dispatch_tokens_per_rank, num_ranks * handle.num_max_dispatch_tokens_per_rank
    begin, count = unpack_layout_range(handle.packed_recv_layout_range)
    if bool(((count > m) | (begin + count > rows)).any()) or bool(
        (handle.packed_recv_layout_range < 0).any()
    ):
        raise ValueError(
            f"handle.packed_recv_layout_range: row blocks must hold at most {m} rows each and lie in the "
            f"{rows} rows of the receive tensor"
        )
    for expert in range(begin.size(0)):
        spans = sorted((b, c) for b, c in zip(begin[expert].tolist(), count[expert].tolist()) if c > 0)
        for (b, c), (next_b, _) in zip(spans, spans[1:]):
            if b + c > next_b:
                raise ValueError(
                    f"handle.packed_recv_layout_range: row blocks of local expert {expert} overlap"
                )
        for b, c in spans:
            tokens = handle.packed_recv_src_info[expert, b : b + c]
            if bool(((tokens < 0) | (tokens >= m)).any()):
                raise ValueError(
                    f"handle.packed_recv_src_info: local expert {expert} holds source token indices outside "
                    f"[0, {m})"
                )


def check_low_latency_routes_all_ranks(
    packed_recv_src_info: Sequence[torch.Tensor],
    packed_recv_layout_range: Sequence[torch.Tensor],
    topk_idx: Sequence[torch.Tensor],
) -> None:
    """For a low-latency combine, after the all-gather, identically on every rank: the rows every expert
    holds from source rank s point at tokens s has, and every (token, expert) pair of s's topk_idx was
    received by that expert in the handles' dispatch (so every rank's sum finds all its terms)."""
    num_ranks = len(topk_idx)
    num_local_experts = packed_recv_layout_range[0].size(0)
    for s, idx in enumerate(topk_idx):
        num_tokens = idx.size(0)
        received = torch.zeros(num_ranks * num_local_experts, num_tokens, dtype=torch.bool, device=idx.device)
        for d in range(num_ranks):
            begin, count = unpack_layout_range(packed_recv_layout_range[d][:, s])
            for e, (b, c) in enumerate(zip(begin.tolist(), count.tolist())):
                tokens = packed_recv_src_info[d][e, b : b + c].long()
                if c and int(tokens.max()) >= num_tokens:
                    raise ValueError(
                        f"handle.packed_recv_src_info: rank {d}'s rows of expert {d * num_local_experts + e} "
                        f"from rank {s} point at token {int(tokens.max())}, but rank {s} combines "
                        f"{num_tokens} tokens"
                    )
                received[d * num_local_experts + e, tokens] = True
        idx = idx.long()
        tokens = torch.arange(num_tokens, device=idx.device).unsqueeze(1).expand_as(idx)
        valid = idx >= 0
        missing = valid.clone()
        missing[valid] = ~received[idx[valid], tokens[valid]]
        if bool(missing.any()):
            token, slot = _first(missing)
            raise ValueError(
                f"topk_idx: on rank {s}, expert {int(idx[token, slot])} (token {token}, slot {slot}) did not "
                "receive that token in the handle's dispatch; pass the topk_idx given to low_latency_dispatch"
            )
