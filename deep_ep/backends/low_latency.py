"""Low-latency dispatch/combine on the GPU through NVSHMEM (the CUDA backend delegates here).

What this class owns:
- NVSHMEM, initialised once per process from a unique id that group rank 0 creates and broadcasts with the
  group's object collective (gloo works, so ranks may share a GPU); it stays initialised for the process's
  lifetime, and every Buffer allocates (and frees in `destroy`) its own symmetric buffer.
- The symmetric buffer's two sets. Consecutive operations alternate between them (dispatch, combine,
  dispatch, ... as DeepEP V1 does), so two results can be held and a combine never lands in the set its
  round's dispatch rows are still read from. Offsets: csrc/kernels/api_low_latency.cuh (LowLatencyLayout),
  which fits deep_ep.config.low_latency_buffer_bytes_needed exactly.
- How each rank is reached: a store through the mapping nvshmem_ptr gives (NVLink, or another process on
  this GPU) or, when there is none or `allow_nvlink` is False, NVSHMEM put-with-signal. Kernels never
  ask which transport carries a put, so the same code runs on P2P, IBGDA, IBRC, UCX and libfabric.

Ordering contract (as DeepEP V1's): at most two results in flight; a hook must be called before the
operation two calls after its own is issued. `dispatch_wait_recv_cost_stats[s]` accumulates nanoseconds
(GPU global timer) the receiving kernel waited for source rank s, summed over local experts.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

from ..config import LOW_LATENCY_SUPPORTED_HIDDEN
from ..event import record_event
from ..handles import LowLatencyHandle
from .device_memory import local_buffer_view

_nvshmem_members: Optional[tuple[int, int]] = None  # (rank, num_ranks) NVSHMEM was initialised with


def _C():
    from deep_ep import _C as extension

    return extension


def ranks_sharing_this_gpu(group: dist.ProcessGroup) -> int:
    """How many ranks of `group` run on this process's GPU (same host, same device UUID)."""
    device = torch.cuda.current_device()
    me = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, me, group=group)
    return sum(1 for other in everyone if other == me)


def _init_nvshmem(
    group: dist.ProcessGroup, rank: int, num_ranks: int, heap_bytes: int, shared_gpu: bool
) -> None:
    global _nvshmem_members
    nvshmem = _C().nvshmem
    if nvshmem.is_initialized():
        if _nvshmem_members != (rank, num_ranks):
            raise RuntimeError(
                f"NVSHMEM is already initialised in this process as PE {_nvshmem_members} of a different group; "
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
    _nvshmem_members = (rank, num_ranks)


class LowLatencyCuda:
    """Methods and arguments as deep_ep/reference.py's backend interface; Buffer has validated them."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        num_ranks: int,
        num_rdma_bytes: int,
        timeout_s: float,
        conservative_loads: bool,
        allow_nvlink: bool,
        num_sms: Optional[int] = None,
    ) -> None:
        extension = _C()
        if not getattr(extension, "low_latency_compiled", False):
            raise RuntimeError(
                "low-latency mode needs deep_ep built with NVSHMEM (install nvidia-nvshmem-cu13 or set "
                "NVSHMEM_DIR, then rebuild)"
            )
        self.group, self.rank, self.num_ranks = group, rank, num_ranks
        self.num_rdma_bytes = num_rdma_bytes
        self.timeout_s = timeout_s
        self.conservative_loads = conservative_loads
        self.allow_nvlink = allow_nvlink
        self.device = torch.device("cuda", torch.cuda.current_device())
        sharing = ranks_sharing_this_gpu(group)
        # Kernels of ranks sharing the GPU run concurrently (MPS) and wait for each other: together they
        # must fit on the SMs, or a spinning block could keep a peer's block from ever starting.
        sm_count = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.num_blocks = num_sms if num_sms is not None else max(1, sm_count // sharing)
        _init_nvshmem(group, rank, num_ranks, num_rdma_bytes, sharing > 1)
        # The error word and wait context (timeouts -> exception naming the rank); no NVLink bytes.
        self.runtime = extension.RuntimeBuffer(rank, num_ranks, 0, timeout_s)
        self.symmetric_base = extension.nvshmem.alloc(num_rdma_bytes)  # collective, zeroed
        mapped = [
            extension.nvshmem.peer_ptr(self.symmetric_base, pe) if allow_nvlink else 0
            for pe in range(num_ranks)
        ]
        self.all_ranks_mapped = all(p != 0 for p in mapped)
        self.mapped_bases = torch.tensor(mapped, dtype=torch.int64, device=self.device)
        self.combine_done_blocks = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.buffer_set = 0
        self.shape: Optional[tuple[int, int, int]] = None  # (M, hidden, experts) of the signal layout in use
        self.destroyed = False
        dist.barrier(group=group)

    def get_local_buffer_tensor(self, dtype, size, offset):
        """This rank's NVSHMEM symmetric buffer (what V1 calls the RDMA buffer)."""
        return local_buffer_view(self.symmetric_base, self.num_rdma_bytes, self.device, dtype, size, offset)

    # --- helpers -------------------------------------------------------------------------------------

    def _take_set(self) -> int:
        current = self.buffer_set
        self.buffer_set ^= 1
        return current

    def _use_shape(self, m: int, hidden: int, num_experts: int) -> None:
        """Signal words sit at shape-dependent offsets: a new shape starts from a clean buffer."""
        if self.shape == (m, hidden, num_experts):
            return
        needed = _C().low_latency_rdma_size_hint(m, hidden, self.num_ranks, num_experts)
        if needed > self.num_rdma_bytes:
            raise ValueError(
                f"num_rdma_bytes={self.num_rdma_bytes} is too small for low-latency mode with {m} tokens per "
                f"rank, hidden {hidden}, {num_experts} experts (needs {needed}): use "
                f"Buffer.get_low_latency_rdma_size_hint"
            )
        if self.shape is not None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "low-latency shape changed during CUDA graph capture: call clean_low_latency_buffer first"
                )
            self.clean_low_latency_buffer(m, hidden, num_experts)
        self.shape = (m, hidden, num_experts)

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _common(self) -> tuple:
        # A timed-out earlier op left the Buffer unusable: say so before launching anything.
        self.raise_if_failed()
        return (self.runtime, self.symmetric_base, self.mapped_bases, self.all_ranks_mapped)

    # --- backend interface ---------------------------------------------------------------------------

    def low_latency_dispatch(
        self,
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        cumulative_local_expert_recv_stats,
        dispatch_wait_recv_cost_stats,
        use_fp8,
        round_scale,
        use_ue8m0,
        async_finish,
        return_recv_hook,
    ):
        m, hidden = num_max_dispatch_tokens_per_rank, x.size(1)
        # Buffer validated these already; the benchmark and tests call this class directly.
        if x.size(0) > m:
            raise ValueError(f"x: {x.size(0)} tokens exceed num_max_dispatch_tokens_per_rank={m}")
        if hidden not in LOW_LATENCY_SUPPORTED_HIDDEN:
            raise ValueError(
                f"x: hidden size {hidden} is not supported (supported: {LOW_LATENCY_SUPPORTED_HIDDEN})"
            )
        self._use_shape(m, hidden, num_experts)
        buffer_set = self._take_set()
        round_scale = bool(round_scale and use_fp8)
        x, topk_idx = x.contiguous(), topk_idx.contiguous()

        def launch(do_send: bool, do_recv: bool, outputs):
            return _C().low_latency_dispatch(
                *self._common(), x, topk_idx, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
                m, num_experts, buffer_set, use_fp8, round_scale, use_ue8m0, do_send, do_recv, outputs,
                self.num_blocks, self.conservative_loads, self._stream(),
            )  # fmt: skip

        outputs = launch(True, not return_recv_hook, None)

        def hook() -> None:
            launch(False, True, outputs)

        hook = hook if return_recv_hook else None
        recv_x, recv_scales, recv_count, src_info, layout_range = outputs
        event = record_event(self.device) if async_finish else None
        return recv_x, (recv_scales if use_fp8 else None), recv_count, src_info, layout_range, event, hook

    def low_latency_combine(
        self, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out
    ):
        handle = LowLatencyHandle(*handle)
        m, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        self._use_shape(m, hidden, num_experts)
        buffer_set = self._take_set()
        # use_logfmt (V1's log-format compression) is not implemented: rows travel as BF16, the
        # reference's treatment too.
        topk_idx, topk_weights = topk_idx.contiguous(), topk_weights.contiguous()
        if not zero_copy:
            x = x.contiguous()
        if out is None:
            out = torch.empty(topk_idx.size(0), hidden, dtype=torch.bfloat16, device=self.device)

        def launch(do_send: bool, do_recv: bool):
            return _C().low_latency_combine(
                *self._common(), x, zero_copy, handle.packed_recv_src_info, handle.packed_recv_layout_range,
                topk_idx, topk_weights, out, self.combine_done_blocks, m, num_experts, buffer_set,
                do_send, do_recv, self.num_blocks, self.conservative_loads, self._stream(),
            )  # fmt: skip

        launch(True, not return_recv_hook)

        def hook() -> None:
            launch(False, True)

        hook = hook if return_recv_hook else None
        event = record_event(self.device) if async_finish else None
        return out, event, hook

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        handle = LowLatencyHandle(*handle)
        m, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        self._use_shape(m, hidden, num_experts)
        return _C().low_latency_combine_send_buffer(
            self.symmetric_base, m, hidden, self.num_ranks, num_experts, self.buffer_set, self.device.index
        )

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        """Zero every signal word (both sets); collective, so no rank is still sending when it runs."""
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        _C().low_latency_clean(
            self.symmetric_base,
            num_max_dispatch_tokens_per_rank,
            hidden,
            self.num_ranks,
            num_experts,
            self._stream(),
        )
        self.combine_done_blocks.zero_()
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self.shape = (num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def raise_if_failed(self) -> None:
        """Raise the timeout a kernel recorded, naming this rank; call after a synchronisation. Sticky: the
        ranks' signal words no longer agree, so the Buffer cannot be used again."""
        if self.runtime.failed:
            raise RuntimeError(
                f"rank {self.rank} timed out after {self.timeout_s} s in a low-latency kernel waiting for a peer's "
                f"rows or receive counts; a peer is missing, crashed or diverged. This Buffer cannot be used "
                f"again: destroy it."
            )

    def destroy(self) -> None:
        """Collective: every rank of the group must call it (nvshmem_free synchronises all PEs)."""
        if self.destroyed:
            return
        self.destroyed = True
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        _C().nvshmem.free(self.symmetric_base)
        self.symmetric_base = 0
        self.runtime.destroy()
