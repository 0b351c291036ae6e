"""The reference backend: every operation as an all-gather over the Buffer's torch.distributed group (gloo
included; CUDA tensors cross a gloo group through host memory) plus the pure functions of
deep_ep.backends.reference. It is the CPU fallback and, as functions, the oracle of the GPU tests.

Its interface is the CUDA backend's (deep_ep/backends/cuda.py): `Buffer` hands every call's arguments over as
the user passed them, and each method returns DeepEP V1's tuple. With `num_nvl_ranks` below the group size
(an inter-node Buffer) normal ops move the same rows and return V1's inter-node layout and handle
(deep_ep.backends.reference_internode), sized against `num_rdma_bytes`. Arguments are checked here, in Python, by
deep_ep.backends.validation (the CUDA backend checks the same in C++); expert ids are checked on the host.

It runs synchronously on the current stream: it waits for `previous_event`, and with `async_finish` returns an
event recorded after its work (an empty EventOverlap on CPU). `allocate_on_comm_stream`, `config`,
`use_logfmt` (treated as BF16) and the wait-cost statistics (nothing waits: it adds 0) have no effect on it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ..event import EventOverlap, record_event
from ..handles import InternodeHandle, LowLatencyHandle, unpack_layout_range
from . import reference_internode, validation, validation_low_latency
from .reference import (
    dispatch_layout,
    intranode_combine,
    intranode_dispatch,
    low_latency_combine,
    low_latency_dispatch,
)
from .reference_internode import as_intranode_handle, internode_handle


def _check_agree(name: str, values: list) -> None:
    """Raise the same error on every rank when ranks disagree (all of them see the gathered values)."""
    if any(v != values[0] for v in values):
        raise ValueError(f"{name}: ranks disagree: {values}")


class ReferenceBackend:
    """Every operation as all-gather + pure function; see the module docstring for the interface."""

    name = "reference"
    load_kind = "n/a"

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
        num_nvl_ranks: Optional[int] = None,
        **unused_options,
    ) -> None:
        if group is None:
            raise ValueError("group: the reference backend needs a torch.distributed process group")
        self.group, self.rank, self.num_ranks = group, rank, num_ranks
        # Ranks a node (deep_ep.topology); fewer than num_ranks: inter-node normal mode.
        self.num_nvl_ranks = num_ranks if num_nvl_ranks is None else num_nvl_ranks
        self.is_internode = self.num_nvl_ranks < num_ranks
        self.device = torch.device(device)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        # NCCL collectives need device tensors; every other backend (gloo) goes through host memory.
        self._comm_device = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self._next_combine_buffer: Optional[torch.Tensor] = None

    # --- plumbing -------------------------------------------------------------------------------------

    def _all_gather(self, tensors: list) -> list[list]:
        """Every rank's version of `tensors` (None entries stay None), moved as raw bytes: bit-exact for
        every dtype (FP8 included) and any per-rank shape."""
        metas = [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]
        chunks = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors if t is not None]
        flat = torch.cat(chunks).to(self._comm_device) if chunks else torch.empty(0, dtype=torch.uint8)
        all_metas: list = [None] * self.num_ranks
        dist.all_gather_object(all_metas, (metas, flat.numel()), group=self.group)
        padded = torch.zeros(
            max(1, max(n for _, n in all_metas)), dtype=torch.uint8, device=self._comm_device
        )
        padded[: flat.numel()] = flat
        received = [torch.empty_like(padded) for _ in range(self.num_ranks)]
        dist.all_gather(received, padded, group=self.group)
        result = []
        for (rank_metas, _), raw in zip(all_metas, received):
            raw, offset, tensors_of_rank = raw.to(self.device), 0, []
            for meta in rank_metas:
                if meta is None:
                    tensors_of_rank.append(None)
                    continue
                shape, dtype = meta
                nbytes = math.prod(shape) * dtype.itemsize
                # clone: a fresh, aligned allocation that can be reinterpreted as `dtype`
                tensors_of_rank.append(raw[offset : offset + nbytes].clone().view(dtype).view(shape))
                offset += nbytes
            result.append(tensors_of_rank)
        return result

    @staticmethod
    def _wait(previous_event: Optional[EventOverlap]) -> None:
        if previous_event is not None:
            previous_event.current_stream_wait()

    def _event(self, async_finish: bool, keep_alive: Optional[tuple] = None) -> EventOverlap:
        """With async_finish, an event after the work, holding `keep_alive` as V1's events hold the tensors
        their op uses (nothing is in flight here, but callers may rely on the attribute)."""
        if not async_finish:
            return EventOverlap(None)
        return EventOverlap(record_event(self.device), keep_alive)

    @staticmethod
    def _intranode_view(handle):
        """The intra-node functions' view of a validated handle of either kind (None stays None)."""
        return as_intranode_handle(handle) if isinstance(handle, InternodeHandle) else handle

    def _require_low_latency(self, op: str) -> None:
        if not self.low_latency_mode:
            raise RuntimeError(f"{op}: requires Buffer(..., low_latency_mode=True)")

    # --- normal mode ----------------------------------------------------------------------------------

    def get_dispatch_layout(
        self, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
    ):
        validation.check_common(None, previous_event)
        num_experts = validation.validate_layout(
            topk_idx, num_experts, num_ranks=self.num_ranks, device=self.device
        )
        self._wait(previous_event)
        per_rank, per_expert, in_rank = dispatch_layout(topk_idx, num_experts, self.num_ranks)
        per_rdma_rank = None
        if self.is_internode:
            per_rdma_rank = reference_internode.num_tokens_per_rdma_rank(in_rank, self.num_nvl_ranks)
        return per_rank, per_rdma_rank, per_expert, in_rank, self._event(async_finish)

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
        args = validation.validate_dispatch(
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
            num_ranks=self.num_ranks,
            device=self.device,
            num_nvl_bytes=self.num_nvl_bytes,
            num_nvl_ranks=self.num_nvl_ranks,
            num_rdma_bytes=self.num_rdma_bytes,
        )
        self._wait(previous_event)
        handle = self._intranode_view(args.handle)
        is_token_in_rank = args.is_token_in_rank if handle is None else handle.is_token_in_rank
        gathered = self._all_gather(
            [
                args.x,
                args.x_scales,
                is_token_in_rank,
                args.num_tokens_per_rank,
                args.num_tokens_per_expert,
                args.topk_idx,
                args.topk_weights,
                args.num_tokens_per_rdma_rank,
            ]
        )
        xs, scales, in_rank, per_rank, per_expert, idx, weights, per_rdma_rank = (
            list(col) for col in zip(*gathered)
        )
        _check_agree("x", [(t.size(1), t.dtype) for t in xs])
        _check_agree("x[1]", [s is None for s in scales])
        _check_agree("topk_idx", [t is None for t in idx])
        if handle is None:
            _check_agree("num_tokens_per_expert", [t.numel() for t in per_expert])
            for s in range(self.num_ranks):
                if not torch.equal(per_rank[s].long(), in_rank[s].sum(0)):
                    raise ValueError(
                        f"num_tokens_per_rank: on rank {s} it differs from is_token_in_rank.sum(0)"
                    )
                per_node = per_rdma_rank[s]
                if per_node is not None and not torch.equal(
                    per_node, reference_internode.num_tokens_per_rdma_rank(in_rank[s], self.num_nvl_ranks)
                ):
                    raise ValueError(
                        f"num_tokens_per_rdma_rank: on rank {s} it differs from is_token_in_rank's tokens "
                        "per node"
                    )
        result = intranode_dispatch(
            self.rank,
            xs,
            in_rank,
            x_scales=None if scales[0] is None else scales,
            topk_idx=None if idx[0] is None else idx,
            topk_weights=None if weights[0] is None else weights,
            num_tokens_per_expert=None if handle is not None else per_expert,
            expert_alignment=args.expert_alignment,
            num_worst_tokens=args.num_worst_tokens if handle is None else 0,
            num_recv_rows=None if handle is None else handle.recv_src_idx.size(0),
        )
        recv_x = result.recv_x if args.x_scales is None else (result.recv_x, result.recv_x_scales)
        if handle is not None:
            return recv_x, None, None, None, None, self._event(async_finish)
        handle = result.handle
        if self.is_internode:
            handle = internode_handle(self.rank, handle, in_rank, self.num_nvl_ranks)
        return (
            recv_x,
            result.recv_topk_idx,
            result.recv_topk_weights,
            result.num_recv_tokens_per_expert_list,
            handle,
            self._event(async_finish),
        )

    def combine(
        self, x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream
    ):
        args = validation.validate_combine(
            x,
            handle,
            topk_weights,
            bias,
            config,
            previous_event,
            num_ranks=self.num_ranks,
            device=self.device,
            num_nvl_bytes=self.num_nvl_bytes,
            num_nvl_ranks=self.num_nvl_ranks,
            num_rdma_bytes=self.num_rdma_bytes,
        )
        self._wait(previous_event)
        handle = self._intranode_view(args.handle)
        gathered = self._all_gather(
            [args.x, handle.recv_src_idx, handle.rank_prefix_matrix, args.topk_weights]
        )
        xs, src_idx, prefix, weights = (list(col) for col in zip(*gathered))
        _check_agree("x", [t.size(1) for t in xs])
        _check_agree("topk_weights", [None if w is None else w.size(1) for w in weights])
        combined, combined_weights = intranode_combine(
            self.rank,
            xs,
            src_idx,
            prefix,
            handle.is_token_in_rank.size(0),
            topk_weights=None if weights[0] is None else weights,
            bias_0=args.bias_0,
            bias_1=args.bias_1,
        )
        return combined, combined_weights, self._event(async_finish)

    # --- low-latency mode -----------------------------------------------------------------------------

    @staticmethod
    def _hook(return_recv_hook: bool):
        # Everything already arrived; the hook exists so V1 code that calls it keeps working.
        return (lambda: None) if return_recv_hook else None

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
        self._require_low_latency("low_latency_dispatch")
        m, num_experts = validation_low_latency.validate_low_latency_dispatch(
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats,
            use_fp8,
            round_scale,
            use_ue8m0,
            num_ranks=self.num_ranks,
            device=self.device,
            num_rdma_bytes=self.num_rdma_bytes,
        )
        gathered = self._all_gather([x, topk_idx])
        xs, idx = (list(col) for col in zip(*gathered))
        _check_agree("x", [t.size(1) for t in xs])
        result = low_latency_dispatch(
            self.rank,
            xs,
            idx,
            m,
            num_experts,
            use_fp8=use_fp8,
            round_scale=round_scale and use_fp8,
            use_ue8m0=use_ue8m0,
        )
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += result.recv_count
        # dispatch_wait_recv_cost_stats: nothing is waited for here, so nothing is added.
        handle = LowLatencyHandle(
            result.packed_recv_src_info, result.packed_recv_layout_range, m, x.size(1), num_experts
        )
        recv_x = (result.recv_x, result.recv_x_scales) if use_fp8 else result.recv_x
        event = self._event(async_finish, (x, topk_idx, *result))
        return recv_x, result.recv_count, handle, event, self._hook(return_recv_hook)

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
        self._require_low_latency("low_latency_combine")
        handle = validation_low_latency.validate_low_latency_combine(
            x,
            topk_idx,
            topk_weights,
            handle,
            out,
            combine_wait_recv_cost_stats,
            num_ranks=self.num_ranks,
            device=self.device,
            num_rdma_bytes=self.num_rdma_bytes,
        )
        if zero_copy and self._next_combine_buffer is not None:
            x = self._next_combine_buffer  # the user wrote the expert outputs there
        begin, count = unpack_layout_range(handle.packed_recv_layout_range)
        rows_used = int((begin + count).max()) if count.numel() else 0
        # Only rows that some handle range points at are read; send just those.
        gathered = self._all_gather(
            [x[:, :rows_used], handle.packed_recv_src_info, handle.packed_recv_layout_range]
        )
        xs, src_info, layout = (list(col) for col in zip(*gathered))
        combined = low_latency_combine(
            self.rank, xs, topk_idx, topk_weights, src_info, layout, handle.num_experts
        )
        if out is not None:
            combined = out.copy_(combined)
        event = self._event(async_finish, (x, topk_idx, topk_weights, combined))
        return combined, event, self._hook(return_recv_hook)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        self._require_low_latency("clean_low_latency_buffer")
        validation_low_latency.validate_clean_low_latency_buffer(
            num_max_dispatch_tokens_per_rank,
            hidden,
            num_experts,
            num_ranks=self.num_ranks,
            num_rdma_bytes=self.num_rdma_bytes,
        )
        self._next_combine_buffer = None  # nothing else is kept between calls

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        self._require_low_latency("get_next_low_latency_combine_buffer")
        handle = validation_low_latency.validate_low_latency_handle(
            handle, num_ranks=self.num_ranks, device=self.device
        )
        num_local_experts = handle.num_experts // self.num_ranks
        rows = self.num_ranks * handle.num_max_dispatch_tokens_per_rank
        self._next_combine_buffer = torch.zeros(
            num_local_experts, rows, handle.hidden, dtype=torch.bfloat16, device=self.device
        )
        return self._next_combine_buffer

    # --- buffer access --------------------------------------------------------------------------------

    def get_local_buffer_tensor(self, dtype, size, offset, use_rdma_buffer):
        raise NotImplementedError(
            "get_local_buffer_tensor: the reference backend has no communication buffer (use backend='cuda')"
        )

    def get_comm_stream(self):
        # The reference works on the current stream.
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def destroy(self) -> None:
        self._next_combine_buffer = None
