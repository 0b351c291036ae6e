"""NVSHMEM for the low-latency ops: initialised once per process from a unique id that group rank 0 creates
and broadcasts with the group's object collective (gloo works, so ranks may share a GPU); it stays
initialised for the process's lifetime, and every Buffer allocates (and frees in `destroy`) its own
symmetric buffer. The C++ runtime (csrc/runtime/nvshmem.cu) is the only code touching NVSHMEM's host API.
"""

from __future__ import annotations

import os
from typing import Optional

import torch.distributed as dist

from .. import _C

_members: Optional[tuple[int, int]] = None  # (rank, num_ranks) NVSHMEM was initialised with


def init_once(group: dist.ProcessGroup, rank: int, num_ranks: int, heap_bytes: int, shared_gpu: bool) -> None:
    global _members
    nvshmem = _C.nvshmem
    if nvshmem.is_initialized():
        if _members != (rank, num_ranks):
            raise RuntimeError(
                f"NVSHMEM is already initialised in this process as PE {_members} of a different group; "
                f"low-latency Buffers of one process must share one group (got rank {rank} of {num_ranks})"
            )
        return
    # Environment NVSHMEM reads at init; explicit user settings win.
    os.environ.setdefault("NVSHMEM_DISABLE_NCCL", "1")
    if shared_gpu:  # several PEs on one GPU run under MPS, whose thread percentage NVSHMEM would check
        os.environ.setdefault("NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "1")
    # The initial heap holds the first Buffer with room to spare; NVSHMEM grows it (CUDA VMM) if needed.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(max(heap_bytes + (256 << 20), 3 << 30)))
    unique_id = [nvshmem.get_unique_id() if rank == 0 else None]
    dist.broadcast_object_list(unique_id, src=dist.get_global_rank(group, 0), group=group)
    nvshmem.init(unique_id[0], rank, num_ranks)
    _members = (rank, num_ranks)


def allocate_symmetric(
    num_bytes: int, rank: int, num_ranks: int, num_nvl_ranks: int, allow_nvlink: bool
) -> tuple[int, list[int]]:
    """Collective: this rank's zeroed symmetric buffer and, per rank, the address that reaches its copy with
    loads and stores (NVLink, or another process on this GPU): only the ranks of this rank's node (the
    `num_nvl_ranks` consecutive ranks holding it), and none when `allow_nvlink` is False; 0 means NVSHMEM
    puts reach it. So ranks of another node, even one a virtual split of this host, are reached by puts, and
    kernels never ask which transport carries a put: the same code runs on P2P, IBGDA, IBRC, UCX and
    libfabric."""
    base = _C.nvshmem.alloc(num_bytes)
    node = rank // num_nvl_ranks
    mapped = [
        _C.nvshmem.peer_ptr(base, pe) if allow_nvlink and pe // num_nvl_ranks == node else 0
        for pe in range(num_ranks)
    ]
    return base, mapped


def free_symmetric(base: int) -> None:
    """Collective: nvshmem_free synchronises all PEs."""
    _C.nvshmem.free(base)
