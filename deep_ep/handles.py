"""Communication handles, laid out element by element as DeepEP V1's tuples.

They are NamedTuples: user code and V1's tests index them (`handle[0]`, `handle[-4]`) or unpack them, and
that keeps working; the names document what each element holds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class IntranodeHandle(NamedTuple):
    """Returned by an intra-node `dispatch`; consumed by `combine` and by a cached `dispatch`.

    R = ranks, T = tokens of this rank, N = rows this rank received (or num_worst_tokens when padded).
    """

    # [R, R] int32: [i][j] = rows rank j receives from ranks 0..i (cumulative over the source rank).
    # Identical on every rank.
    rank_prefix_matrix: torch.Tensor
    # [R, C] int32, sender side. Reference backend (C = 1): [j][0] = tokens this rank sends to rank j.
    # The CUDA backend may use more columns (per-channel prefix sums).
    channel_prefix_matrix: torch.Tensor
    # [R, C] int32, receiver side. Reference backend (C = 1): [i][0] = first row of recv_x that came from
    # rank i. The CUDA backend may use more columns.
    recv_channel_prefix_matrix: torch.Tensor
    # [N] int32: source token index of each received row (-1 in num_worst_tokens padding rows).
    recv_src_idx: torch.Tensor
    # [T, R] bool: whether token t of this rank was sent to rank r.
    is_token_in_rank: torch.Tensor
    # [T, R] int32: row of recv_x on rank r where token t of this rank landed, -1 where it was not sent.
    send_head: torch.Tensor


class LowLatencyHandle(NamedTuple):
    """Returned by `low_latency_dispatch`; consumed by `low_latency_combine`.

    L = local experts, R = ranks, M = num_max_dispatch_tokens_per_rank.
    """

    # [L, R*M] int32: source token index (on its source rank) of each received row.
    packed_recv_src_info: torch.Tensor
    # [L, R] int64: (begin << 32) | count of the rows of local expert l that came from rank r.
    packed_recv_layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int


class InternodeHandle(NamedTuple):
    """Returned by an inter-node `dispatch`; consumed by `combine` and by a cached `dispatch`.

    DeepEP V1's element names and order (`recv_gbl_rank_prefix_sum` is at index -4); the comments say what
    each element holds in this implementation (both backends produce this layout). R = ranks, L = ranks a
    node (num_nvl_ranks), N = R / L nodes, T = tokens of this rank, num_recv = rows this rank received (or
    num_worst_tokens when padded). Rank g is on node g // L with local index g % L.
    """

    # [T, R] bool: whether token t of this rank was sent to rank r.
    is_token_in_rank: torch.Tensor
    # [R, N] int32, the node count matrix: [g][n] = tokens rank g sends to node n (a token counts once per
    # node, however many ranks of that node receive it). Identical on every rank.
    rdma_channel_prefix_matrix: torch.Tensor
    # [R, R] int32, the rank prefix matrix: [i][j] = rows rank j receives from ranks 0..i (cumulative over
    # the source rank), as IntranodeHandle.rank_prefix_matrix. Identical on every rank.
    gbl_channel_prefix_matrix: torch.Tensor
    # [N + 1] int32, forward offsets (their use is the CUDA backend's). Reference backend: the exclusive
    # prefix sum over source nodes m of the tokens rank (m, this rank's local index) sends to this rank's
    # node, counting 0 for this rank's own node: the rows this rank forwards inside its node.
    recv_rdma_channel_prefix_matrix: torch.Tensor
    # [F, L] int32, forward map (its contents are the CUDA backend's): its first forward offsets[-1] rows are
    # used. CUDA backend: F is the most rows this rank can forward (the other nodes' counterparts each
    # sending all the tokens the buffer holds), known before the counts; reference backend: F = forward
    # offsets[-1], filled with -1.
    recv_rdma_rank_prefix_sum: torch.Tensor
    # [R] int32: first row of recv_x that came from rank i (exclusive prefix sum over source ranks).
    recv_gbl_channel_prefix_matrix: torch.Tensor
    # [R] int32: rows received from ranks 0..i (inclusive prefix sum over source ranks).
    recv_gbl_rank_prefix_sum: torch.Tensor
    # [num_recv] int32: source token index of each received row (-1 in num_worst_tokens padding rows).
    recv_src_meta: torch.Tensor
    # [T, N] int32: position of token t among the tokens this rank sends to node n (in token order), -1
    # where token t does not go to node n.
    send_rdma_head: torch.Tensor
    # [T, R] int32: row of recv_x on rank r where token t of this rank landed, -1 where it was not sent
    # (as IntranodeHandle.send_head).
    send_nvl_head: torch.Tensor


def unpack_layout_range(packed_recv_layout_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `packed_recv_layout_range` into (begin, count), both int64 with the same shape."""
    packed = packed_recv_layout_range.to(torch.int64)
    return packed >> 32, packed & 0xFFFFFFFF
