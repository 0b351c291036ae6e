"""The executable semantics of the library (DESIGN section 3): pure functions (`dispatch_layout`,
`intranode_dispatch`, `intranode_combine`, `low_latency_dispatch`, `low_latency_combine`) that compute ONE
rank's outputs from ALL ranks' inputs, given as lists indexed by rank. No communication: they are the oracle
of the GPU tests, which regenerate every rank's inputs from one seed, and deep_ep.backends.reference_backend
runs them over any torch.distributed group as the CPU fallback. Inter-node normal mode moves the same rows:
deep_ep.backends.reference_internode builds its layout and handle on these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch

from ..handles import IntranodeHandle, unpack_layout_range
from .fp8 import pack_ue8m0, per_token_cast_to_fp8

Tensors = Sequence[torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# (a) Pure functions
# ---------------------------------------------------------------------------------------------------------


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R]).

    A token goes to a rank when at least one of its experts lives there (rank r owns experts
    [r*E/R, (r+1)*E/R)); num_tokens_per_expert counts (token, slot) pairs, -1 slots excluded.
    """
    idx = topk_idx.long()
    valid = idx >= 0
    num_local_experts = num_experts // num_ranks
    num_tokens_per_expert = torch.bincount(idx[valid], minlength=num_experts).int()
    owner = torch.where(valid, idx.div(num_local_experts, rounding_mode="floor"), num_ranks)  # R = nowhere
    in_rank = torch.zeros(idx.size(0), num_ranks + 1, dtype=torch.bool, device=idx.device)
    is_token_in_rank = in_rank.scatter_(1, owner, True)[:, :num_ranks].contiguous()
    return is_token_in_rank.sum(0).int(), num_tokens_per_expert, is_token_in_rank


def _pad_rows(t: torch.Tensor, num_rows: int, value: float) -> torch.Tensor:
    if t.size(0) == num_rows:
        return t
    padding = torch.full((num_rows - t.size(0), *t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, padding])


class DispatchResult(NamedTuple):
    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert_list: Optional[list]
    handle: IntranodeHandle


def intranode_dispatch(
    rank: int,
    x: Tensors,
    is_token_in_rank: Tensors,
    *,
    x_scales: Optional[Tensors] = None,
    topk_idx: Optional[Tensors] = None,
    topk_weights: Optional[Tensors] = None,
    num_tokens_per_expert: Optional[Tensors] = None,
    num_experts: Optional[int] = None,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    num_recv_rows: Optional[int] = None,
) -> DispatchResult:
    """Rank `rank`'s outputs of a normal dispatch; every list argument is indexed by source rank.

    Rows are grouped by source rank in rank order, and within a source in token order. recv_topk_idx
    (int64) holds local expert ids, -1 for experts on other ranks (recv_topk_weights 0 there).
    num_recv_tokens_per_expert_list[e] = sum over sources of num_tokens_per_expert[rank*L + e], rounded up
    to expert_alignment. With num_worst_tokens > 0 the outputs have exactly that many rows (padding: x
    and scales 0, topk_idx -1, weights 0, recv_src_idx -1) and the list is empty, as in V1.
    `num_recv_rows` pads the same way without emptying the list (a cached dispatch through such a handle).
    Handle: see deep_ep.handles.IntranodeHandle; send_head[t][j] is the row of recv_x on rank j holding
    token t of this rank, or -1.
    """
    num_ranks = len(x)
    # send_counts[s][j]: tokens rank s sends to rank j.
    send_counts = torch.stack([m.sum(0) for m in is_token_in_rank]).long()
    selected = [m[:, rank].nonzero().squeeze(1) for m in is_token_in_rank]  # ascending token order
    recv_x = torch.cat([x[s][selected[s]] for s in range(num_ranks)])
    recv_x_scales = None
    if x_scales is not None:
        recv_x_scales = torch.cat([x_scales[s][selected[s]] for s in range(num_ranks)])
    recv_src_idx = torch.cat(selected).int()

    if num_experts is None and num_tokens_per_expert is not None:
        num_experts = num_tokens_per_expert[0].numel()
    recv_topk_idx = recv_topk_weights = None
    if topk_idx is not None:
        num_local_experts = num_experts // num_ranks
        first = rank * num_local_experts
        idx = torch.cat([topk_idx[s][selected[s]].long() for s in range(num_ranks)])
        is_local = (idx >= first) & (idx < first + num_local_experts)
        recv_topk_idx = torch.where(is_local, idx - first, -1)
        weights = torch.cat([topk_weights[s][selected[s]] for s in range(num_ranks)])
        recv_topk_weights = torch.where(is_local, weights, torch.zeros_like(weights))

    per_expert = None
    if num_tokens_per_expert is not None:
        num_local_experts = num_experts // num_ranks
        first = rank * num_local_experts
        counts = sum(n[first : first + num_local_experts].long() for n in num_tokens_per_expert)
        aligned = (counts + expert_alignment - 1) // expert_alignment * expert_alignment
        per_expert = [int(c) for c in aligned.tolist()]

    mine = is_token_in_rank[rank]
    rows_before = send_counts[:rank].sum(0)  # rows each destination receives from ranks before this one
    send_head = torch.where(mine, mine.long().cumsum(0) - 1 + rows_before, -1).int()
    recv_column = send_counts[:, rank]
    handle = IntranodeHandle(
        rank_prefix_matrix=send_counts.cumsum(0).int(),
        channel_prefix_matrix=send_counts[rank].view(num_ranks, 1).int(),
        recv_channel_prefix_matrix=(recv_column.cumsum(0) - recv_column).view(num_ranks, 1).int(),
        recv_src_idx=recv_src_idx,
        is_token_in_rank=mine,
        send_head=send_head,
    )

    capacity = num_worst_tokens if num_worst_tokens > 0 else num_recv_rows
    if capacity is not None:
        num_rows = recv_x.size(0)
        if num_rows > capacity:
            what = "num_worst_tokens" if num_worst_tokens > 0 else "handle"
            raise ValueError(
                f"{what}: rank {rank} receives {num_rows} rows, more than the {capacity} allowed"
            )
        recv_x = _pad_rows(recv_x, capacity, 0)
        recv_x_scales = None if recv_x_scales is None else _pad_rows(recv_x_scales, capacity, 0)
        recv_topk_idx = None if recv_topk_idx is None else _pad_rows(recv_topk_idx, capacity, -1)
        recv_topk_weights = None if recv_topk_weights is None else _pad_rows(recv_topk_weights, capacity, 0)
        handle = handle._replace(recv_src_idx=_pad_rows(recv_src_idx, capacity, -1))
        if num_worst_tokens > 0:
            per_expert = []
    return DispatchResult(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, per_expert, handle)


def intranode_combine(
    rank: int,
    x: Tensors,
    recv_src_idx: Tensors,
    rank_prefix_matrix: Tensors,
    num_tokens: int,
    *,
    topk_weights: Optional[Tensors] = None,
    bias_0: Optional[torch.Tensor] = None,
    bias_1: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rank `rank`'s combine output; list arguments are indexed by the rank that holds the rows
    (the destination of the dispatch), each with that rank's handle fields.

    For each token t: acc = +0.0 (float32); for d = 0..R-1, if rank d holds a copy of t:
    acc += float32(x_d[row]); then acc += float32(bias_0[t]); acc += float32(bias_1[t]); output bf16(acc)
    (round to nearest even). topk_weights are summed the same way (without bias), output float32.
    """
    num_ranks = len(x)
    device, hidden = x[rank].device, x[rank].size(1)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    acc_weights = None
    if topk_weights is not None:
        acc_weights = torch.zeros(num_tokens, topk_weights[rank].size(1), dtype=torch.float32, device=device)
    for d in range(num_ranks):
        prefix = rank_prefix_matrix[d][:, d].long()  # rows rank d got from ranks 0..i
        begin = int(prefix[rank - 1]) if rank > 0 else 0
        end = int(prefix[rank])
        tokens = recv_src_idx[d][begin:end].long()  # distinct, so each element gets one add per rank
        acc.index_add_(0, tokens, x[d][begin:end].float())
        if acc_weights is not None:
            acc_weights.index_add_(0, tokens, topk_weights[d][begin:end].float())
    for bias in (bias_0, bias_1):
        if bias is not None:
            acc += bias.float()
    return acc.to(torch.bfloat16), acc_weights


class LowLatencyDispatchResult(NamedTuple):
    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_count: torch.Tensor
    packed_recv_src_info: torch.Tensor
    packed_recv_layout_range: torch.Tensor


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """Same values as `t` [L, N, G], stored as [L, G, N] and viewed transposed (V1's TMA-friendly layout)."""
    out = torch.empty(t.size(0), t.size(2), t.size(1), dtype=t.dtype, device=t.device).transpose(1, 2)
    return out.copy_(t)


def low_latency_dispatch(
    rank: int,
    x: Tensors,
    topk_idx: Tensors,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    *,
    use_fp8: bool = True,
    round_scale: bool = False,
    use_ue8m0: bool = False,
) -> LowLatencyDispatchResult:
    """Rank `rank`'s low-latency receive tensors; `x` and `topk_idx` are indexed by source rank.

    Local expert e receives each token whose top-k contains expert rank*L + e (once, even if listed twice).
    Rows of e: sources in rank order, tokens in order within a source, packed from row 0; the rows from
    source s are [begin, begin + count) with packed_recv_layout_range[e][s] = (begin << 32) | count.
    Rows past recv_count[e] are zeros (a kernel may leave garbage there; only valid rows are compared).
    FP8 rows are quantized on the source rank with deep_ep.fp8's formula; scales are column-major.
    """
    num_ranks, m = len(x), num_max_dispatch_tokens_per_rank
    num_local_experts = num_experts // num_ranks
    device, hidden = x[rank].device, x[rank].size(1)
    payload = x
    scales = None
    if use_fp8:
        quantized = [per_token_cast_to_fp8(xs, round_scale=round_scale) for xs in x]
        payload = [q for q, _ in quantized]
        source_scales = [s for _, s in quantized]
        scales = torch.zeros(
            num_local_experts, num_ranks * m, hidden // 128, dtype=torch.float32, device=device
        )
    recv_x = torch.zeros(num_local_experts, num_ranks * m, hidden, dtype=payload[0].dtype, device=device)
    src_info = torch.zeros(num_local_experts, num_ranks * m, dtype=torch.int32, device=device)
    layout_range = torch.zeros(num_local_experts, num_ranks, dtype=torch.int64, device=device)
    recv_count = torch.zeros(num_local_experts, dtype=torch.int32, device=device)
    for e in range(num_local_experts):
        expert, row = rank * num_local_experts + e, 0
        for s in range(num_ranks):
            tokens = (topk_idx[s].long() == expert).any(dim=1).nonzero().squeeze(1)
            n = tokens.numel()
            recv_x[e, row : row + n] = payload[s][tokens]
            if scales is not None:
                scales[e, row : row + n] = source_scales[s][tokens]
            src_info[e, row : row + n] = tokens.int()
            layout_range[e, s] = (row << 32) | n
            row += n
        recv_count[e] = row
    if scales is not None:
        scales = _column_major(pack_ue8m0(scales) if use_ue8m0 else scales)
    return LowLatencyDispatchResult(recv_x, scales, recv_count, src_info, layout_range)


def low_latency_combine(
    rank: int,
    x: Tensors,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    packed_recv_src_info: Tensors,
    packed_recv_layout_range: Tensors,
    num_experts: int,
) -> torch.Tensor:
    """Rank `rank`'s low-latency combine output [T, H] bf16.

    `x`, `packed_recv_src_info`, `packed_recv_layout_range` are indexed by the rank owning the experts
    (each rank's expert outputs [L, >= rows used, H] and its handle); topk_idx/topk_weights are this rank's.
    For each token t: acc = +0.0; for k = 0..K-1 with topk_idx[t,k] = g != -1:
    acc = float32(acc + float32(topk_weights[t,k] * float32(x_owner(g)[g mod L][row of t])))
    (a kernel that fuses the multiply-add differs by float32 rounding only); output bf16(acc).
    """
    num_ranks = len(x)
    num_local_experts = num_experts // num_ranks
    num_tokens, num_topk = topk_idx.shape
    device, hidden = x[rank].device, x[rank].size(-1)
    # row_of[g][t]: row of global expert g's receive tensor holding this rank's token t, or -1.
    row_of = torch.full((num_experts, num_tokens), -1, dtype=torch.int64, device=device)
    for d in range(num_ranks):
        begin, count = unpack_layout_range(packed_recv_layout_range[d][:, rank])
        for e in range(num_local_experts):
            b, c = int(begin[e]), int(count[e])
            tokens = packed_recv_src_info[d][e, b : b + c].long()
            row_of[d * num_local_experts + e, tokens] = torch.arange(b, b + c, device=device)
    idx = topk_idx.long()
    token_ids = torch.arange(num_tokens, device=device)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    for k in range(num_topk):
        valid = idx[:, k] >= 0
        expert = idx[:, k].clamp_min(0)
        rows = row_of[expert, token_ids]
        missing = valid & (rows < 0)
        if bool(missing.any()):
            t = int(missing.nonzero()[0])
            raise ValueError(f"handle: token {t} of rank {rank} was not received by expert {int(expert[t])}")
        values = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
        owner = expert.div(num_local_experts, rounding_mode="floor")
        for d in range(num_ranks):
            sel = (valid & (owner == d)).nonzero().squeeze(1)
            values[sel] = x[d][expert[sel] % num_local_experts, rows[sel]].float()
        product = topk_weights[:, k : k + 1].float() * values
        acc = torch.where(valid.unsqueeze(1), acc + product, acc)
    return acc.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# (b) The reference backend
# ---------------------------------------------------------------------------------------------------------
