"""NVSHMEM for the low-latency ops: initialised once per process from a unique id that group rank 0 creates
and sends with the group's object collective (gloo works, so ranks may share a GPU); it stays
initialised for the process's lifetime, and every Buffer allocates (and frees in `destroy`) its own
symmetric buffer. The C++ runtime (csrc/runtime/nvshmem.cu) is the only code touching NVSHMEM's host API.

Another library may have initialised NVSHMEM in the process first, e.g. nvshmem4py (`nvshmem.core.init`):
both load the one `libnvshmem_host.so.3` (the nvidia-nvshmem-cu13 wheel's; a second load by soname finds the
first), so deep_ep sees it initialised. It then attaches instead of initialising: it checks that NVSHMEM's PEs
are the group's ranks in order (PE i = group rank i, as many PEs as ranks) and calls NVSHMEM's init once more,
which sets up this extension's own device state (the statically linked libnvshmem_device, which the other
library never saw). The other library's settings stay: its symmetric heap size (NVSHMEM grows the heap when a
Buffer needs more) and the environment it initialised with.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

from .. import _C

NVSHMEM_STATUS_NOT_INITIALIZED = 0  # nvshmemx_init_status(); 1 bootstrapped, 2 and above initialised

_members: Optional[tuple[int, int]] = None  # (rank, num_ranks) NVSHMEM was initialised or attached with
_attached = False  # True when another library initialised NVSHMEM and deep_ep attached to it


def init_once(
    all_gather: Callable[[object], list], rank: int, num_ranks: int, heap_bytes: int, shared_gpu: bool
) -> None:
    """Collective on the first call of the process (`all_gather(obj)`: every rank's obj, in rank order, over
    the Buffer's group or communicator); a later call only checks the group."""
    global _members, _attached
    nvshmem = _C.nvshmem
    if nvshmem.is_initialized():
        if _members != (rank, num_ranks):
            held = "an unknown group" if _members is None else f"rank {_members[0]} of {_members[1]}"
            raise RuntimeError(
                f"deep_ep's NVSHMEM already runs in this process as {held}, set up by an earlier Buffer; "
                f"low-latency Buffers of one process must share one group (got rank {rank} of {num_ranks})"
            )
        return
    # Every rank says where its NVSHMEM stands, so that all ranks take the same path (or raise together).
    status = nvshmem.init_status()
    pe = nvshmem.my_pe_and_n_pes() if status != NVSHMEM_STATUS_NOT_INITIALIZED else None
    everyone = all_gather((status, pe))
    if all(s == NVSHMEM_STATUS_NOT_INITIALIZED for s, _ in everyone):
        _init(all_gather, rank, num_ranks, heap_bytes, shared_gpu)
    else:
        _check_same_members([p for _, p in everyone], num_ranks)
        nvshmem.attach(rank, num_ranks)
        _attached = True
    _members = (rank, num_ranks)


def attached() -> bool:
    """Whether deep_ep attached to an NVSHMEM that another library initialised (rather than initialising it)."""
    return _attached


def _init(
    all_gather: Callable[[object], list], rank: int, num_ranks: int, heap_bytes: int, shared_gpu: bool
) -> None:
    nvshmem = _C.nvshmem
    # Environment NVSHMEM reads at init; explicit user settings win.
    os.environ.setdefault("NVSHMEM_DISABLE_NCCL", "1")
    if shared_gpu:  # several PEs on one GPU run under MPS, whose thread percentage NVSHMEM would check
        os.environ.setdefault("NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "1")
    # The initial heap holds the first Buffer with room to spare; NVSHMEM grows it (CUDA VMM) if needed.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(max(heap_bytes + (256 << 20), 3 << 30)))
    unique_id = all_gather(nvshmem.get_unique_id() if rank == 0 else None)[0]
    nvshmem.init(unique_id, rank, num_ranks)


def _check_same_members(pes: list[Optional[tuple[int, int]]], num_ranks: int) -> None:
    """`pes[r]`: (my PE, number of PEs) of rank r's NVSHMEM, None where it is not initialised. Raises on
    every rank unless rank r is PE r of num_ranks everywhere."""
    wrong = [(r, pe) for r, pe in enumerate(pes) if pe is None or tuple(pe) != (r, num_ranks)]
    if not wrong:
        return
    where = "; ".join(
        f"rank {r}: {'not initialised' if pe is None else f'PE {pe[0]} of {pe[1]}'}" for r, pe in wrong
    )
    raise RuntimeError(
        f"NVSHMEM was initialised by another library (e.g. nvshmem4py) on a group other than this Buffer's "
        f"{num_ranks} ranks: {where}. deep_ep can use an NVSHMEM initialised elsewhere only "
        "when its PEs are the group's ranks in order (PE i = group rank i, as many PEs as ranks); initialise "
        "it on this group (or not at all, and deep_ep initialises it)"
    )


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
