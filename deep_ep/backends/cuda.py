"""The CUDA backend: argument plumbing from `deep_ep.Buffer` to the compiled extension, one binding call per
operation. The C++ side (csrc/ops/) checks every argument (TypeError / ValueError naming it), orders the op
on the communication stream, allocates, launches and returns V1's tuples; this file only resolves the SM
budget, wraps handles and events in their Python types, and sets the Buffer up once (peer mappings, the host
exchange for direct reads, NVSHMEM).

Normal ops run intra-node (csrc/ops/intranode.cpp: CUDA IPC in one NVLink domain) or, when the group spans
several nodes of `num_nvl_ranks` ranks, inter-node (csrc/ops/internode.cpp: the NVSHMEM symmetric buffer,
puts between nodes, NVLink reads inside one); the choice is made once, at construction.

Streams (DeepEP V1 semantics, csrc/runtime/op_streams.hpp): normal ops run on the Buffer's communication
stream after the caller's stream (or `previous_event`); outputs are allocated on the caller's stream, or on
the communication stream with `allocate_on_comm_stream`; unless `async_finish`, the caller's stream waits for
the op, else an event is returned. Low-latency ops run on the caller's current stream.

Host-GPU synchronisation: none, except the fresh normal dispatch's wait for the receive counts (none with
`num_worst_tokens`), so every other call can be captured in a CUDA graph (barrier epochs are counted on the
GPU; while a stream is captured the normal ops read through staging, since opening peers' IPC handles is not
allowed then). Expert ids are range-checked on the GPU: an id outside [-1, num_experts) is treated as -1 and
the ValueError is raised, on the rank that passed it (on every rank for a low-latency dispatch, whose count
words carry it), by the first op of this Buffer that ends after the GPU ran the flagging kernel, once that
op's own kernels are queued (a receive hook raises it after launching).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist

from .. import _C
from ..config import Config, peer_timeout_s
from ..event import EventOverlap
from ..handles import InternodeHandle, IntranodeHandle, LowLatencyHandle
from . import agreement, nvshmem
from .device_memory import local_buffer_view
from .loads import CONSERVATIVE, resolve_load_kind
from .validation import check_optional_type

# Intra-node ops read peers' input tensors directly (one pass over memory) unless this is "0"; they fall
# back to staging copies by themselves where the tensors cannot be shared (csrc/kernels/api_intranode.cuh).
DIRECT_READS_ENV = "DEEP_EP_DIRECT_READS"
# "1": check expert ids on the host before anything runs, as the reference does (one GPU synchronisation per
# call that takes topk_idx), instead of on the GPU (README, "Bad arguments").
HOST_EXPERT_ID_CHECK_ENV = "DEEP_EP_HOST_EXPERT_ID_CHECK"
# "0": every normal op runs on the communication stream, as in DeepEP V1; by default an op without
# previous_event / async_finish / allocate_on_comm_stream runs on the caller's stream (csrc/runtime/op_streams.hpp).
INLINE_OPS_ENV = "DEEP_EP_INLINE_OPS"

_make_intranode_handle = IntranodeHandle._make
_make_internode_handle = InternodeHandle._make
_make_low_latency_handle = LowLatencyHandle._make


def _check_previous_event(previous_event) -> None:
    """A TypeError naming previous_event unless it is an EventOverlap or None (the C++ side reads .event)."""
    if previous_event is not None and type(previous_event) is not EventOverlap:
        check_optional_type("previous_event", previous_event, EventOverlap)


class CudaBackend:
    name = "cuda"

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        rank: int,
        num_ranks: int,
        device: torch.device,
        *,
        default_num_sms: Callable[[], int],
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        allow_nvlink_for_low_latency_mode: bool = True,
        comm: Optional[object] = None,
        conservative_loads: Optional[bool] = None,
        num_nvl_ranks: Optional[int] = None,
        **unused_options,
    ) -> None:
        self.group, self.comm, self.rank, self.num_ranks = group, comm, rank, num_ranks
        self.num_nvl_ranks = num_ranks if num_nvl_ranks is None else num_nvl_ranks
        # A group over several NVLink domains runs the normal ops inter-node (csrc/ops/internode.cpp), all in
        # the NVSHMEM symmetric buffer: the NVLink (IPC) buffer is not used then.
        self.internode = self.num_nvl_ranks < num_ranks
        if self.internode:
            num_nvl_bytes = 0
            if not low_latency_mode and num_rdma_bytes == 0:
                raise ValueError(
                    "num_rdma_bytes: an inter-node Buffer (num_nvl_ranks="
                    f"{self.num_nvl_ranks} < {num_ranks} ranks) runs its normal ops in the RDMA buffer; size it "
                    "with Config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks, num_nvl_ranks=...)"
                )
            if not getattr(_C, "internode_compiled", False):
                raise RuntimeError(
                    "inter-node mode needs deep_ep built with NVSHMEM (install nvidia-nvshmem-cu13 or set "
                    "NVSHMEM_DIR, then rebuild)"
                )
        self.low_latency_mode = low_latency_mode
        # Normal mode's (dispatch, combine, handle type), fixed for the Buffer's life; None: not available.
        self._normal = (_C.intranode_dispatch, _C.intranode_combine, _make_intranode_handle)
        if self.internode:
            self._normal = (
                None
                if low_latency_mode
                else (_C.internode_dispatch, _C.internode_combine, _make_internode_handle)
            )
        self.device = torch.device(device)
        self.num_rdma_bytes = num_rdma_bytes
        self.load_kind = resolve_load_kind(conservative_loads, self.device.index)
        self.timeout_s = peer_timeout_s()
        self.comm_stream = torch.cuda.Stream(self.device)
        self._default_num_sms = default_num_sms

        # Ranks on one GPU share its SMs: a spinning kernel of one must never keep another's off the GPU.
        me = (socket.gethostname(), str(torch.cuda.get_device_properties(self.device).uuid))
        everyone = self._all_gather_object(me)
        self.ranks_per_gpu = max(sum(1 for other in everyone if other == who) for who in everyone)
        self.sm_cap = max(
            1, torch.cuda.get_device_properties(self.device).multi_processor_count // self.ranks_per_gpu
        )
        self.runtime = _C.RuntimeBuffer(
            rank,
            num_ranks,
            num_nvl_bytes,
            self.timeout_s,
            self.comm_stream.cuda_stream,
            self.sm_cap,
            self.load_kind == CONSERVATIVE,
            os.environ.get(HOST_EXPERT_ID_CHECK_ENV, "0") == "1",
            os.environ.get(INLINE_OPS_ENV, "1") == "0",
            self.num_nvl_ranks,
        )
        if num_nvl_bytes > 0:
            handles = self._all_gather_object(self.runtime.local_ipc_handle())
            self.runtime.connect(handles)
            if all(host == everyone[0][0] for host, _ in everyone):
                self._attach_host_exchange()
            self.runtime.direct_reads = os.environ.get(DIRECT_READS_ENV, "1") != "0"
        elif self._normal is not None and self.internode:
            # Inter-node combine reads its node's inputs in place: the ranks of a node share a host.
            self._attach_host_exchange()
            self.runtime.direct_reads = os.environ.get(DIRECT_READS_ENV, "1") != "0"

        self._symmetric_base = 0
        if low_latency_mode or self.internode:
            if not getattr(_C, "low_latency_compiled", False):
                raise RuntimeError(
                    "low-latency mode needs deep_ep built with NVSHMEM (install nvidia-nvshmem-cu13 or set "
                    "NVSHMEM_DIR, then rebuild)"
                )
            nvshmem.init_once(
                self._all_gather_object, rank, num_ranks, num_rdma_bytes, self.ranks_per_gpu > 1
            )
            # Ranks of this node are reached over NVLink (low-latency mode: unless the user forbids it), all
            # others by NVSHMEM puts.
            self._symmetric_base, mapped = nvshmem.allocate_symmetric(
                num_rdma_bytes,
                rank,
                num_ranks,
                self.num_nvl_ranks,
                allow_nvlink_for_low_latency_mode or not low_latency_mode,
            )
            # Kernels of ranks sharing the GPU run concurrently (MPS) and wait for each other: together they
            # must fit on the SMs, or a spinning block could keep a peer's block from ever starting.
            self.runtime.attach_symmetric(self._symmetric_base, num_rdma_bytes, mapped, self.sm_cap)
            self._barrier()

    # --- set-up -----------------------------------------------------------------------------------------

    def _all_gather_object(self, obj: object) -> list:
        if self.group is not None:
            gathered: list = [None] * self.num_ranks
            dist.all_gather_object(gathered, obj, group=self.group)
            return gathered
        return list(self.comm.allgather(obj))

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)
        else:
            self.comm.barrier()

    def _attach_host_exchange(self) -> None:
        """Shared memory for the per-call address exchange of direct reads, one segment per node: the
        node's first rank creates it, the others map it, then the name is removed so that nothing outlives
        the processes."""
        names = self._all_gather_object(f"/deep_ep_{os.getpid()}_{uuid.uuid4().hex[:16]}")
        first = self.rank // self.num_nvl_ranks * self.num_nvl_ranks
        creates = self.rank == first
        if creates:
            self.runtime.attach_host_exchange(names[first], True)
        self._all_gather_object(None)
        if not creates:
            self.runtime.attach_host_exchange(names[first], False)
        self._all_gather_object(None)
        if creates:
            self.runtime.unlink_host_exchange()

    @property
    def direct_reads(self) -> bool:
        """Intra-node ops, and the inter-node combine inside a node, read peers' inputs in place."""
        attached = self.runtime.num_nvl_bytes > 0 or (self.internode and self._normal is not None)
        return attached and self.runtime.direct_reads

    @direct_reads.setter
    def direct_reads(self, enabled: bool) -> None:
        """Every rank must set the same value before its next op (benchmarks and tests compare both)."""
        self.runtime.direct_reads = bool(enabled)

    def _num_sms(self, config) -> int:
        if config is None:
            return self._default_num_sms()
        if type(config) is not Config:
            check_optional_type("config", config, Config)
        return config.num_sms

    def _agreed_python_checks(self, op: str, config, previous_event) -> int:
        """num_sms, after the checks made here rather than in C++ (config, previous_event). A failure is agreed
        like the C++ checks' (docs/errors.md): intra-node, this rank makes the op's host exchange with the
        error in it (runtime/call_agreement.hpp); inter-node, it opens the op with a verdict naming the
        argument (csrc/ops/internode.cpp). Either way every rank raises."""
        try:
            num_sms = self._num_sms(config)
            _check_previous_event(previous_event)
        except (TypeError, ValueError) as error:
            try:
                if self.internode:
                    _C.internode_reject(self.runtime, op, type(error).__name__, str(error))
                else:
                    self.runtime.agree_on_error(op, type(error).__name__, str(error))
            except (TypeError, ValueError, RuntimeError) as agreed:
                raise agreed from error
            raise  # both always raise
        return num_sms

    # --- normal mode --------------------------------------------------------------------------------------

    def get_dispatch_layout(
        self, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
    ):
        _check_previous_event(previous_event)
        per_rank, per_node, per_expert, in_rank, event = _C.get_dispatch_layout(
            self.runtime, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
        )
        return per_rank, per_node, per_expert, in_rank, EventOverlap(event)

    def _normal_ops(self):
        """(dispatch, combine, handle type) of this Buffer's normal mode, chosen at construction."""
        if self._normal is None:
            raise RuntimeError(
                "dispatch/combine: an inter-node Buffer made with low_latency_mode=True keeps its RDMA buffer "
                "for the low-latency ops; make a second Buffer with low_latency_mode=False for normal mode"
            )
        return self._normal

    def dispatch(
        self,
        x,
        handle,
        num_tokens_per_rank,
        num_tokens_per_rdma_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        topk_idx,
        topk_weights,
        expert_alignment,
        num_worst_tokens,
        config,
        previous_event,
        async_finish,
        allocate_on_comm_stream,
    ):
        dispatch, _, make_handle = self._normal_ops()
        num_sms = self._agreed_python_checks(
            agreement.dispatch_op(handle is not None), config, previous_event
        )
        recv_x, recv_topk_idx, recv_topk_weights, per_expert, new_handle, event = dispatch(
            self.runtime,
            x,
            handle,
            num_tokens_per_rank,
            num_tokens_per_rdma_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            num_sms,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )
        if new_handle is not None:
            new_handle = make_handle(new_handle)
        return recv_x, recv_topk_idx, recv_topk_weights, per_expert, new_handle, EventOverlap(event)

    def combine(
        self, x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream
    ):
        _, combine, _ = self._normal_ops()
        num_sms = self._agreed_python_checks("combine", config, previous_event)
        combined_x, combined_topk_weights, event = combine(
            self.runtime,
            x,
            handle,
            topk_weights,
            bias,
            num_sms,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )
        return combined_x, combined_topk_weights, EventOverlap(event)

    def barrier_on_current_stream(self) -> None:
        """A group barrier on the GPU, enqueued on the current stream (benchmarks line ranks up with it)."""
        barrier = _C.internode_barrier if self.internode else _C.intranode_barrier
        barrier(self.runtime, torch.cuda.current_stream(self.device).cuda_stream)

    # --- low-latency mode ---------------------------------------------------------------------------------

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
        if not self.low_latency_mode:
            self._raise_not_low_latency("low_latency_dispatch")
        recv_x, recv_count, handle, event, hook = _C.low_latency_dispatch(
            self.runtime,
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
        )
        return recv_x, recv_count, _make_low_latency_handle(handle), EventOverlap(event), hook

    def low_latency_combine(
        self,
        x,
        topk_idx,
        topk_weights,
        handle,
        use_logfmt,
        zero_copy,
        async_finish,
        return_recv_hook,
        out,
        combine_wait_recv_cost_stats,
    ):
        # use_logfmt (V1's log-format compression) is not implemented: rows travel as BF16, as the
        # reference treats them too.
        if not self.low_latency_mode:
            self._raise_not_low_latency("low_latency_combine")
        combined_x, event, hook = _C.low_latency_combine(
            self.runtime,
            x,
            topk_idx,
            topk_weights,
            handle,
            zero_copy,
            async_finish,
            return_recv_hook,
            out,
            combine_wait_recv_cost_stats,
        )
        return combined_x, EventOverlap(event), hook

    @staticmethod
    def _raise_not_low_latency(op: str) -> None:
        # An inter-node Buffer has a symmetric buffer too, laid out for the normal ops: the low-latency ones
        # would overwrite it.
        raise RuntimeError(f"{op}: requires Buffer(..., low_latency_mode=True)")

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        if not self.low_latency_mode:
            self._raise_not_low_latency("get_next_low_latency_combine_buffer")
        return _C.get_next_low_latency_combine_buffer(self.runtime, handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        if not self.low_latency_mode:
            self._raise_not_low_latency("clean_low_latency_buffer")
        _C.clean_low_latency_buffer(self.runtime, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    # --- buffer access --------------------------------------------------------------------------------

    def get_local_buffer_tensor(self, dtype, size, offset, use_rdma_buffer):
        if use_rdma_buffer:
            if self._symmetric_base == 0:
                raise RuntimeError(
                    "get_local_buffer_tensor(use_rdma_buffer=True): requires Buffer(..., low_latency_mode=True)"
                )
            return local_buffer_view(
                self._symmetric_base, self.num_rdma_bytes, self.device, dtype, size, offset
            )
        if self.runtime.num_nvl_bytes == 0:
            raise RuntimeError("get_local_buffer_tensor: the Buffer has no NVLink buffer (num_nvl_bytes=0)")
        return local_buffer_view(
            self.runtime.local_buffer_ptr, self.runtime.num_nvl_bytes, self.device, dtype, size, offset
        )

    def get_comm_stream(self):
        return self.comm_stream

    def check(self) -> None:
        self.runtime.raise_if_failed()
        self.runtime.raise_if_invalid_expert_id()
        self.runtime.raise_if_rejected_by_peer()

    def destroy(self) -> None:
        torch.cuda.synchronize(self.device)
        # No rank may unmap its buffer while a peer's kernel could still read it.
        self._barrier()
        if self._symmetric_base:
            nvshmem.free_symmetric(self._symmetric_base)
            self._symmetric_base = 0
        self.runtime.destroy()
