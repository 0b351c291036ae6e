"""The executable semantics of inter-node normal mode: pure functions over ALL ranks' inputs (lists indexed by
rank), like deep_ep.backends.reference, whose intra-node functions they build on.

Inter-node dispatch and combine move the same rows as intra-node ones (same order, same top-k, same counts,
same sums); only the layout's extra output and the handle differ. So an inter-node dispatch is the
intra-node dispatch plus `internode_handle`, which re-expresses its handle as DeepEP V1's 10-element one
(deep_ep.handles.InternodeHandle), and an inter-node combine is `intranode_combine` over the handles'
`recv_src_meta` and `gbl_channel_prefix_matrix` (`as_intranode_handle` gives them their intra-node names).

Nodes: L = num_nvl_ranks consecutive ranks each; rank g is on node g // L with local index g % L.
"""

from __future__ import annotations

import torch

from ..handles import InternodeHandle, IntranodeHandle
from .reference import DispatchResult, Tensors, intranode_dispatch


def is_token_in_node(is_token_in_rank: torch.Tensor, num_nvl_ranks: int) -> torch.Tensor:
    """[T, N] bool: whether token t goes to at least one rank of node n."""
    num_tokens, num_ranks = is_token_in_rank.shape
    return is_token_in_rank.view(num_tokens, num_ranks // num_nvl_ranks, num_nvl_ranks).any(2)


def num_tokens_per_rdma_rank(is_token_in_rank: torch.Tensor, num_nvl_ranks: int) -> torch.Tensor:
    """int32 [N]: tokens with at least one destination rank on node n (get_dispatch_layout's second output
    on an inter-node Buffer)."""
    return is_token_in_node(is_token_in_rank, num_nvl_ranks).sum(0).int()


def internode_handle(
    rank: int, handle: IntranodeHandle, is_token_in_rank: Tensors, num_nvl_ranks: int
) -> InternodeHandle:
    """Rank `rank`'s inter-node handle, from its intra-node handle of the same dispatch and every rank's
    is_token_in_rank (indexed by source rank). Field by field as documented in deep_ep.handles."""
    num_ranks = len(is_token_in_rank)
    node, local = divmod(rank, num_nvl_ranks)
    in_node = [is_token_in_node(m, num_nvl_ranks) for m in is_token_in_rank]
    node_count_matrix = torch.stack([m.sum(0) for m in in_node]).int()  # [R, N]

    # Rows this rank forwards inside its node: what its counterpart (same local index) on every other node
    # sends to this node.
    forwarded = node_count_matrix[local::num_nvl_ranks, node].long().clone()  # [N], by source node
    forwarded[node] = 0
    forward_offsets = torch.cat([forwarded.new_zeros(1), forwarded.cumsum(0)]).int()
    forward_map = torch.full(
        (int(forward_offsets[-1]), num_nvl_ranks), -1, dtype=torch.int32, device=forward_offsets.device
    )

    mine = in_node[rank]
    send_rdma_head = torch.where(mine, mine.long().cumsum(0) - 1, -1).int()
    return InternodeHandle(
        is_token_in_rank=handle.is_token_in_rank,
        rdma_channel_prefix_matrix=node_count_matrix,
        gbl_channel_prefix_matrix=handle.rank_prefix_matrix,
        recv_rdma_channel_prefix_matrix=forward_offsets,
        recv_rdma_rank_prefix_sum=forward_map,
        recv_gbl_channel_prefix_matrix=handle.recv_channel_prefix_matrix.view(num_ranks).clone(),
        recv_gbl_rank_prefix_sum=handle.rank_prefix_matrix[:, rank].contiguous(),
        recv_src_meta=handle.recv_src_idx,
        send_rdma_head=send_rdma_head,
        send_nvl_head=handle.send_head,
    )


def as_intranode_handle(handle: InternodeHandle) -> IntranodeHandle:
    """The intra-node handle of the same dispatch (every intra-node field is one of, or follows from, the
    inter-node fields), so the intra-node functions serve inter-node handles."""
    num_ranks = handle.is_token_in_rank.size(1)
    return IntranodeHandle(
        rank_prefix_matrix=handle.gbl_channel_prefix_matrix,
        channel_prefix_matrix=handle.is_token_in_rank.sum(0).int().view(num_ranks, 1),
        recv_channel_prefix_matrix=handle.recv_gbl_channel_prefix_matrix.view(num_ranks, 1),
        recv_src_idx=handle.recv_src_meta,
        is_token_in_rank=handle.is_token_in_rank,
        send_head=handle.send_nvl_head,
    )


def internode_dispatch(
    rank: int, x: Tensors, is_token_in_rank: Tensors, *, num_nvl_ranks: int, **options
) -> DispatchResult:
    """Rank `rank`'s outputs of an inter-node dispatch: `intranode_dispatch(rank, x, is_token_in_rank,
    **options)` (same arguments, same rows) with the handle as InternodeHandle."""
    result = intranode_dispatch(rank, x, is_token_in_rank, **options)
    return result._replace(handle=internode_handle(rank, result.handle, is_token_in_rank, num_nvl_ranks))
