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
    """Returned by an inter-node `dispatch` (V1 element order; `recv_gbl_rank_prefix_sum` is at index -4)."""

    is_token_in_rank: torch.Tensor
    rdma_channel_prefix_matrix: torch.Tensor
    gbl_channel_prefix_matrix: torch.Tensor
    recv_rdma_channel_prefix_matrix: torch.Tensor
    recv_rdma_rank_prefix_sum: torch.Tensor
    recv_gbl_channel_prefix_matrix: torch.Tensor
    # [R] int32: rows received from ranks 0..i (cumulative).
    recv_gbl_rank_prefix_sum: torch.Tensor
    recv_src_meta: torch.Tensor
    send_rdma_head: torch.Tensor
    send_nvl_head: torch.Tensor


def unpack_layout_range(packed_recv_layout_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `packed_recv_layout_range` into (begin, count), both int64 with the same shape."""
    packed = packed_recv_layout_range.to(torch.int64)
    return packed >> 32, packed & 0xFFFFFFFF
