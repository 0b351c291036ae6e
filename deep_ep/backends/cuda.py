"""The CUDA backend: layout, intra-node dispatch and combine on the GPU (NVLink / CUDA IPC, ranks may share a
GPU), low-latency ops delegated to deep_ep.low_latency_backend.LowLatencyCuda.

Interface: the docstring at the top of deep_ep/reference.py. `Buffer` has validated every argument.

Streams: every op runs on this backend's communication stream, which first waits for `previous_event` (or for
the current stream when none is given). Outputs are allocated on the current stream, or on the communication
stream with `allocate_on_comm_stream`. With `async_finish` the op returns a `CommEvent` recorded on the
communication stream that keeps the op's inputs and outputs alive until it is waited for; otherwise the
current stream waits for the communication stream before the call returns. The C++ op does this ordering
(csrc/runtime/op_streams.hpp): torch's Python stream and event calls cost more host time than the kernels.

A non-cached dispatch synchronises with the CPU once (the receive counts decide the output sizes), unless
`num_worst_tokens` fixes them; a cached dispatch, a combine and the layout never do, so they can be captured
in CUDA graphs (barrier epochs are counted on the GPU, so replays stay synchronised; while a stream is being
captured the ops read through staging, since opening peers' IPC handles is not allowed then).
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Optional

import torch
import torch.distributed as dist

from .. import _C
from .device_memory import local_buffer_view
from .loads import CONSERVATIVE, resolve_load_kind

TIMEOUT_ENV = "DEEP_EP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 100.0
# Intra-node ops read peers' input tensors directly (one pass over memory) unless this is "0"; they fall
# back to staging copies by themselves where the tensors cannot be shared (csrc/kernels/api_intranode.cuh).
DIRECT_READS_ENV = "DEEP_EP_DIRECT_READS"


class CommEvent:
    """An event recorded on the communication stream, holding the tensors the op still uses."""

    def __init__(self, stream: torch.cuda.Stream, tensors: tuple) -> None:
        self.event = torch.cuda.Event()
        self.event.record(stream)
        self.tensors = tuple(t for t in tensors if t is not None)

    def wait(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        self.event.wait(stream)

    def current_stream_wait(self) -> None:
        self.event.wait()


class CudaBackend:
    name = "cuda"

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        rank: int,
        num_ranks: int,
        device: torch.device,
        *,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        allow_nvlink_for_low_latency_mode: bool = True,
        comm: Optional[object] = None,
        conservative_loads: Optional[bool] = None,
        **unused_options,
    ) -> None:
        self.group, self.comm, self.rank, self.num_ranks = group, comm, rank, num_ranks
        self.device = torch.device(device)
        self.load_kind = resolve_load_kind(conservative_loads, self.device.index)
        self.conservative_loads = self.load_kind == CONSERVATIVE
        self.timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        self.comm_stream = torch.cuda.Stream(self.device)
        self._stream_options_cache: dict = {}

        # Ranks on one GPU share its SMs: a spinning kernel of one must never keep another's off the GPU.
        me = (socket.gethostname(), str(torch.cuda.get_device_properties(self.device).uuid))
        everyone = self._all_gather_object(me)
        self.ranks_per_gpu = max(sum(1 for other in everyone if other == who) for who in everyone)
        self.sm_cap = max(
            1, torch.cuda.get_device_properties(self.device).multi_processor_count // self.ranks_per_gpu
        )

        self.runtime = None
        if num_nvl_bytes > 0:
            self.runtime = _C.RuntimeBuffer(rank, num_ranks, num_nvl_bytes, self.timeout_s)
            handles = self._all_gather_object(self.runtime.local_ipc_handle())
            self.runtime.connect(handles)
            if all(host == everyone[0][0] for host, _ in everyone):
                self._attach_host_exchange()
            self.runtime.direct_reads = os.environ.get(DIRECT_READS_ENV, "1") != "0"

        self._low_latency = None
        if low_latency_mode:
            from .low_latency import LowLatencyCuda  # noqa: PLC0415 - NVSHMEM only when asked for

            self._low_latency = LowLatencyCuda(
                group,
                rank,
                num_ranks,
                num_rdma_bytes,
                self.timeout_s,
                self.conservative_loads,
                allow_nvlink_for_low_latency_mode,
            )

    # --- plumbing -------------------------------------------------------------------------------------

    def _all_gather_object(self, obj: object) -> list:
        if self.group is not None:
            gathered: list = [None] * self.num_ranks
            dist.all_gather_object(gathered, obj, group=self.group)
            return gathered
        return list(self.comm.allgather(obj))

    def _attach_host_exchange(self) -> None:
        """Shared memory for the per-call address exchange of direct reads: rank 0 creates it, the others
        map it, then the name is removed so that nothing outlives the processes."""
        name = self._all_gather_object(f"/deep_ep_{os.getpid()}_{uuid.uuid4().hex[:16]}")[0]
        if self.rank == 0:
            self.runtime.attach_host_exchange(name, True)
        self._all_gather_object(None)
        if self.rank != 0:
            self.runtime.attach_host_exchange(name, False)
        self._all_gather_object(None)
        if self.rank == 0:
            self.runtime.unlink_host_exchange()

    @property
    def checks_expert_ids_on_device(self) -> bool:
        """Layout and dispatch range-check expert ids on the GPU: validation skips its host-syncing check."""
        return self.runtime is not None

    def _raise_invalid_expert_id(self) -> None:
        """Raises what the GPU check flagged, once the call's collective work is queued on every rank. The
        caller's stream first waits for ours, so the failed call's tensors may be freed safely."""
        if self.runtime is None:  # no GPU-side check ran: validation checked the ids on the host
            return
        try:
            self.runtime.raise_if_invalid_expert_id()
        except ValueError:
            torch.cuda.current_stream(self.device).wait_stream(self.comm_stream)
            raise

    @property
    def direct_reads(self) -> bool:
        return self.runtime is not None and self.runtime.direct_reads

    @direct_reads.setter
    def direct_reads(self, enabled: bool) -> None:
        """Every rank must set the same value before its next op (benchmarks and tests compare both)."""
        self._require_runtime("direct_reads").direct_reads = bool(enabled)

    def _require_runtime(self, op: str):
        if self.runtime is None:
            raise RuntimeError(f"{op}: the Buffer has no NVLink buffer (num_nvl_bytes=0)")
        self.runtime.raise_if_failed()
        return self.runtime

    def _num_sms(self, config) -> int:
        return max(1, min(config.num_sms, self.sm_cap))

    def _stream_options(self, previous_event, async_finish: bool, allocate_on_comm_stream: bool):
        """How the op orders itself around the caller's stream (csrc/runtime/op_streams.hpp does it in C++,
        cheaper than torch's Python stream calls). After `previous_event` instead of the caller's stream."""
        if previous_event is not None:
            previous_event.wait(self.comm_stream)
        key = (previous_event is None, bool(allocate_on_comm_stream), not async_finish)
        options = self._stream_options_cache.get(key)
        if options is None:
            options = _C.StreamOptions(self.comm_stream.cuda_stream, *key)
            self._stream_options_cache[key] = options
        return options

    def _finish(self, async_finish: bool, allocate_on_comm_stream: bool, inputs: tuple, outputs: tuple):
        """The caller's stream already waits for ours unless `async_finish`: then an event is returned. Ops
        call it only when one of the two flags is set (building the tuples costs host time)."""
        outputs = tuple(t for t in outputs if isinstance(t, torch.Tensor))
        if allocate_on_comm_stream:
            # Allocated in the communication stream's pool, used on the caller's: tell the allocator.
            compute = torch.cuda.current_stream(self.device)
            for t in outputs:
                t.record_stream(compute)
        if async_finish:
            return CommEvent(
                self.comm_stream, tuple(t for t in inputs if isinstance(t, torch.Tensor)) + outputs
            )
        return None

    # --- normal mode ----------------------------------------------------------------------------------

    def get_dispatch_layout(
        self, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
    ):
        streams = self._stream_options(previous_event, async_finish, allocate_on_comm_stream)
        per_rank, per_expert, in_rank = _C.get_dispatch_layout(
            self.runtime, topk_idx, num_experts, self.num_ranks, streams
        )
        event = None
        if async_finish or allocate_on_comm_stream:
            outputs = (per_rank, per_expert, in_rank)
            event = self._finish(async_finish, allocate_on_comm_stream, (topk_idx,), outputs)
        self._raise_invalid_expert_id()
        return per_rank, None, per_expert, in_rank, event

    def dispatch(self, args, config, previous_event, async_finish, allocate_on_comm_stream):
        # Validation checked every tensor's dtype and contiguity, the row size (16-byte multiple) and the
        # capacity of the NVLink buffer; its formula bounds the C++ layout's from above
        # (tests/test_extension.py), and the C++ op checks the capacity again.
        runtime = self._require_runtime("dispatch")
        handle = args.handle
        cached = handle is not None
        is_token_in_rank = handle.is_token_in_rank if cached else args.is_token_in_rank
        num_tokens_per_expert = args.num_tokens_per_expert
        num_experts = 0 if num_tokens_per_expert is None else num_tokens_per_expert.numel()

        outputs = _C.intranode_dispatch(
            runtime,
            args.x,
            args.x_scales,
            args.topk_idx,
            args.topk_weights,
            is_token_in_rank,
            None if cached else args.num_tokens_per_rank,  # cached: the handle has the counts
            None if cached else num_tokens_per_expert,
            num_experts,
            handle.rank_prefix_matrix if cached else None,
            handle.recv_src_idx.size(0) if cached else 0,
            args.expert_alignment,
            0 if cached else args.num_worst_tokens,
            self._num_sms(config),
            self.conservative_loads,
            self._stream_options(previous_event, async_finish, allocate_on_comm_stream),
        )
        recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, per_expert = outputs[:5]
        if cached:
            new_handle = handle._replace(recv_src_idx=outputs[8]) if hasattr(handle, "_replace") else handle
            per_expert = None
        else:
            new_handle = tuple(outputs[5:10])
            new_handle = new_handle[:4] + (is_token_in_rank,) + new_handle[4:]
        event = None
        if async_finish or allocate_on_comm_stream:
            inputs = (
                args.x,
                args.x_scales,
                args.topk_idx,
                args.topk_weights,
                is_token_in_rank,
                args.num_tokens_per_rank,
                num_tokens_per_expert,
            )
            outputs = tuple(outputs[:4]) + tuple(new_handle)
            event = self._finish(async_finish, allocate_on_comm_stream, inputs, outputs)
        self._raise_invalid_expert_id()
        return recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, per_expert, new_handle, event

    def combine(self, args, config, previous_event, async_finish, allocate_on_comm_stream):
        runtime = self._require_runtime("combine")  # validation checked dtypes and contiguity
        send_head = args.handle.send_head
        combined_x, combined_topk_weights = _C.intranode_combine(
            runtime,
            args.x,
            args.topk_weights,
            args.bias_0,
            args.bias_1,
            send_head,
            self._num_sms(config),
            self.conservative_loads,
            self._stream_options(previous_event, async_finish, allocate_on_comm_stream),
        )
        event = None
        if async_finish or allocate_on_comm_stream:
            inputs = (args.x, args.topk_weights, args.bias_0, args.bias_1, send_head)
            outputs = (combined_x, combined_topk_weights)
            event = self._finish(async_finish, allocate_on_comm_stream, inputs, outputs)
        self._raise_invalid_expert_id()
        return combined_x, combined_topk_weights, event

    def barrier_on_current_stream(self) -> None:
        """A group barrier on the GPU, enqueued on the current stream (benchmarks line ranks up with it)."""
        _C.intranode_barrier(
            self._require_runtime("barrier"), torch.cuda.current_stream(self.device).cuda_stream
        )

    # --- low-latency mode: NVSHMEM, another module -------------------------------------------------------

    def _require_low_latency(self, op: str):
        if self._low_latency is None:
            raise RuntimeError(f"{op}: requires Buffer(..., low_latency_mode=True)")
        return self._low_latency

    def low_latency_dispatch(self, *args, **kwargs):
        return self._require_low_latency("low_latency_dispatch").low_latency_dispatch(*args, **kwargs)

    def low_latency_combine(self, *args, **kwargs):
        return self._require_low_latency("low_latency_combine").low_latency_combine(*args, **kwargs)

    def get_next_low_latency_combine_buffer(self, *args, **kwargs):
        return self._require_low_latency(
            "get_next_low_latency_combine_buffer"
        ).get_next_low_latency_combine_buffer(*args, **kwargs)

    def clean_low_latency_buffer(self, *args, **kwargs):
        return self._require_low_latency("clean_low_latency_buffer").clean_low_latency_buffer(*args, **kwargs)

    # --- buffer access --------------------------------------------------------------------------------

    def get_local_buffer_tensor(self, dtype, size, offset, use_rdma_buffer):
        if use_rdma_buffer:
            low_latency = self._require_low_latency("get_local_buffer_tensor(use_rdma_buffer=True)")
            return low_latency.get_local_buffer_tensor(dtype, size, offset)
        runtime = self._require_runtime("get_local_buffer_tensor")
        return local_buffer_view(
            runtime.local_buffer_ptr, runtime.num_nvl_bytes, self.device, dtype, size, offset
        )

    def get_comm_stream(self):
        return self.comm_stream

    def destroy(self) -> None:
        torch.cuda.synchronize(self.device)
        # No rank may unmap its buffer while a peer's kernel could still read it.
        if self.group is not None:
            dist.barrier(group=self.group)
        elif self.comm is not None:
            self.comm.barrier()
        if self.runtime is not None:
            self.runtime.destroy()
            self.runtime = None
        if self._low_latency is not None:
            self._low_latency.destroy()
            self._low_latency = None
