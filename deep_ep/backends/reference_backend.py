"""The reference backend: every operation as an all-gather over the Buffer's torch.distributed group (gloo
included; CUDA tensors cross a gloo group through host memory) plus the pure functions of
deep_ep.backends.reference. It is the CPU fallback and, as functions, the oracle of the GPU tests.

Its interface is the CUDA backend's (deep_ep/backends/cuda.py): `Buffer` hands every call's arguments over as
the user passed them, and each method returns DeepEP V1's tuple. With `num_nvl_ranks` below the group size
(an inter-node Buffer) normal ops move the same rows and return V1's inter-node layout and handle
(deep_ep.backends.reference_internode), sized against `num_rdma_bytes`. Arguments are checked here, in Python, by
deep_ep.backends.validation (the CUDA backend checks the same in C++); expert ids are checked on the host.

Errors are agreed (deep_ep.backends.agreement, docs/errors.md): every collective op (dispatch, cached or not,
combine, the low-latency ops and clean_low_latency_buffer, intra- and inter-node) first checks its arguments
locally, keeping the error, plus the tensor contents the reference can read on the host
(deep_ep.backends.reference_checks); then ONE all-gather carries each rank's (operation, error, signature,
per-rank extras, payload shapes). If a rank failed or the ranks disagree on the call, every rank raises the
same exception and no payload moves; otherwise the payload all-gather follows. get_dispatch_layout and
get_next_low_latency_combine_buffer communicate nothing: their errors stay on the rank that made them.
Handles are stamped with the dispatch that made them (the Buffer's `uid` and a dispatch count kept in step
by the handshake), checked on use.

A peer that never arrives: each collective waits at most the Buffer's timeout (DEEP_EP_TIMEOUT_S, as the
CUDA kernels), then raises a RuntimeError naming the operation and the rank. The group then holds an
all-gather that never completed (a late peer would pair with it), so the Buffer refuses every later call
(as a timed-out CUDA Buffer does) and its group must not be used again: the surviving ranks make a new group
(`torch.distributed.new_group(survivors, use_local_synchronization=True)`) and a new Buffer on it.

It runs synchronously on the current stream: it waits for `previous_event`, and with `async_finish` returns an
event recorded after its work (an empty EventOverlap on CPU). `allocate_on_comm_stream`, `config`,
`use_logfmt` (treated as BF16) and the wait-cost statistics (nothing waits: it adds 0) have no effect on it.
"""

from __future__ import annotations

import datetime
import math
import pickle
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..config import peer_timeout_s
from ..event import EventOverlap, record_event
from ..handles import InternodeHandle, LowLatencyHandle, unpack_layout_range
from . import agreement, reference_checks, reference_internode, validation, validation_low_latency
from .reference import (
    dispatch_layout,
    intranode_combine,
    intranode_dispatch,
    low_latency_combine,
    low_latency_dispatch,
)
from .reference_internode import as_intranode_handle, internode_handle

# The handle element a dispatch's identity is keyed on (deep_ep.backends.agreement): the source indices, the
# element combine scatters by.
_INTRANODE_KEY, _INTERNODE_KEY, _LOW_LATENCY_KEY = 3, 7, 0


class _Local(NamedTuple):
    """What a collective op's local phase yields: its checked arguments, the signature every rank must
    share, per-rank data for the other ranks' checks (not compared), and the payload this rank sends."""

    args: Any
    signature: dict
    extra: Any
    tensors: list


class _Handshake(NamedTuple):
    """Every rank's handshake record (the extras and payload shapes), and this rank's packed payload."""

    op: str
    extras: list
    metas: list
    flat: torch.Tensor


def _identity_field(seq: Optional[int]) -> Optional[str]:
    return None if seq is None else f"dispatch #{seq}"


def _checksum(t: torch.Tensor) -> str:
    """A digest of a small tensor that must be identical on every rank (compared in the signature)."""
    return f"crc32 {zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes()):#010x}"


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
        uid: Optional[str] = None,
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
        # The Buffer's identity, agreed by its ranks at construction (Buffer passes it), and the dispatches
        # made so far: together, the identity of a handle.
        self.uid = f"unshared-{id(self)}" if uid is None else uid
        self._num_dispatches = 0
        # NCCL collectives need device tensors; every other backend (gloo) goes through host memory.
        self._comm_device = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self._next_combine_buffer: Optional[torch.Tensor] = None
        self.timeout_s = peer_timeout_s()
        self._timed_out: Optional[str] = None  # the first collective that timed out, sticky

    # --- plumbing -------------------------------------------------------------------------------------

    def _wait_for_peers(self, op: str, work) -> None:
        """Wait for one collective of `op`, at most the Buffer's timeout."""
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as error:
            self._timed_out = (
                f"{op}: rank {self.rank} of {self.num_ranks} timed out after {self.timeout_s:g} s waiting for its "
                "peers (DEEP_EP_TIMEOUT_S): a peer never made this call, crashed or diverged. This Buffer and its "
                "group are unusable now; the surviving ranks make a new group "
                "(torch.distributed.new_group(ranks, use_local_synchronization=True)) and a new Buffer"
            )
            raise RuntimeError(self._timed_out) from error

    def _all_gather_object(self, op: str, obj: Any) -> list:
        """Every rank's `obj` (pickled, as torch.distributed.all_gather_object), each wait bounded by the
        Buffer's timeout."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(self._comm_device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self._comm_device)
        sizes = [torch.empty_like(size) for _ in range(self.num_ranks)]
        self._wait_for_peers(op, dist.all_gather(sizes, size, group=self.group, async_op=True))
        lengths = [int(n.item()) for n in sizes]
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=self._comm_device)
        padded[: data.numel()] = data
        received = [torch.empty_like(padded) for _ in range(self.num_ranks)]
        self._wait_for_peers(op, dist.all_gather(received, padded, group=self.group, async_op=True))
        return [pickle.loads(raw[:n].cpu().numpy().tobytes()) for raw, n in zip(received, lengths)]

    def _handshake(self, op: str, local_phase: Callable[[], _Local]) -> tuple[_Local, _Handshake]:
        """Run `local_phase` (checks that raise), then exchange every rank's record in one all-gather and
        raise on every rank if any rank failed or the ranks disagree (deep_ep.backends.agreement). The
        records also carry the payload's shapes, so the payload follows in one more all-gather."""
        if self._timed_out is not None:
            raise RuntimeError(f"{op}: the Buffer is unusable after an earlier timeout ({self._timed_out})")
        error, local = None, None
        metas, flat = None, torch.empty(0, dtype=torch.uint8, device=self._comm_device)
        try:
            local = local_phase()
            metas = [None if t is None else (tuple(t.shape), t.dtype) for t in local.tensors]
            chunks = [t.contiguous().reshape(-1).view(torch.uint8) for t in local.tensors if t is not None]
            if chunks:
                flat = torch.cat(chunks).to(self._comm_device)
        except Exception as e:  # noqa: BLE001 - every local failure is agreed, whatever its type
            error, local, metas = e, None, None
        record = (
            op,
            agreement.outcome_of(error),
            None if local is None else local.signature,
            None if local is None else local.extra,
            metas,
            flat.numel(),
        )
        records = self._all_gather_object(op, record)
        agreement.check_operations([r[0] for r in records])
        agreement.raise_if_failed(op, [r[1] for r in records], cause=error)
        agreement.check_signatures(op, [r[2] for r in records], unknown_ok=("handle",))
        return local, _Handshake(op, [r[3] for r in records], [(r[4], r[5]) for r in records], flat)

    def _exchange(self, handshake: _Handshake) -> list[list]:
        """Every rank's payload tensors (None entries stay None), moved as raw bytes: bit-exact for every
        dtype (FP8 included) and any per-rank shape."""
        flat = handshake.flat
        padded = torch.zeros(
            max(1, max(n for _, n in handshake.metas)), dtype=torch.uint8, device=self._comm_device
        )
        padded[: flat.numel()] = flat
        received = [torch.empty_like(padded) for _ in range(self.num_ranks)]
        self._wait_for_peers(handshake.op, dist.all_gather(received, padded, group=self.group, async_op=True))
        result = []
        for (rank_metas, _), raw in zip(handshake.metas, received):
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

    def _columns(self, handshake: _Handshake) -> list[list]:
        """The exchanged payload as one list per tensor argument, indexed by rank."""
        return [list(col) for col in zip(*self._exchange(handshake))]

    def _next_dispatch(self) -> int:
        """The sequence number of a dispatch whose handshake passed (so every rank counts it)."""
        self._num_dispatches += 1
        return self._num_dispatches

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

    def _normal_handle_view(self, handle) -> tuple:
        """(the intra-node view, the field names, the identity key) of a validated normal handle."""
        if isinstance(handle, InternodeHandle):
            return as_intranode_handle(handle), reference_checks.INTERNODE_NAMES, _INTERNODE_KEY
        return handle, reference_checks.INTRANODE_NAMES, _INTRANODE_KEY

    def _checked_normal_handle(self, handle) -> tuple:
        """(view, names, signature fields) of a validated normal handle: its identity (ValueError for
        another Buffer's or an altered handle), its contents, and its rank prefix matrix's checksum."""
        view, names, key = self._normal_handle_view(handle)
        identity = agreement.handle_identity(handle, key, self.uid)
        reference_checks.check_normal_handle(view, self.rank, names)
        fields = {
            "handle": _identity_field(identity),
            f"handle.{names.rank_prefix_matrix}": _checksum(view.rank_prefix_matrix),
        }
        return view, names, fields

    def _require_low_latency(self, op: str) -> None:
        if not self.low_latency_mode:
            raise RuntimeError(f"{op}: requires Buffer(..., low_latency_mode=True)")

    # --- normal mode ----------------------------------------------------------------------------------

    def get_dispatch_layout(
        self, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
    ):
        # Local: nothing is communicated, so an error here is this rank's alone.
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
        cached = handle is not None

        def local_phase() -> _Local:
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
            signature = {"x.dtype": str(args.x.dtype), "x.size(1)": args.x.size(1)}
            if cached:
                view, _, fields = self._checked_normal_handle(args.handle)
                signature.update(fields)
                extra, in_rank = None, view.is_token_in_rank
            else:
                reference_checks.check_layout(args, self.num_ranks, self.num_nvl_ranks)
                signature["topk_idx.size(1)"] = None if args.topk_idx is None else args.topk_idx.size(1)
                signature["num_tokens_per_expert.size(0)"] = args.num_tokens_per_expert.size(0)
                extra, in_rank = (
                    (args.num_tokens_per_rank.tolist(), args.num_worst_tokens),
                    args.is_token_in_rank,
                )
            self._wait(previous_event)
            tensors = [args.x, args.x_scales, in_rank]
            if not cached:
                tensors += [args.num_tokens_per_expert, args.topk_idx, args.topk_weights]
            return _Local(args, signature, extra, tensors)

        op = agreement.dispatch_op(cached)
        local, handshake = self._handshake(op, local_phase)
        args = local.args
        if cached:
            xs, scales, in_rank = self._columns(handshake)
            view = self._normal_handle_view(args.handle)[0]
            result = intranode_dispatch(
                self.rank,
                xs,
                in_rank,
                x_scales=None if scales[0] is None else scales,
                expert_alignment=args.expert_alignment,
                num_recv_rows=view.recv_src_idx.size(0),
            )
            recv_x = result.recv_x if args.x_scales is None else (result.recv_x, result.recv_x_scales)
            return recv_x, None, None, None, None, self._event(async_finish)

        # Every rank checks every rank's receive capacity on the exchanged counts, before any row moves.
        reference_checks.check_receive_capacity_all_ranks(
            [per_rank for per_rank, _ in handshake.extras], [worst for _, worst in handshake.extras]
        )
        seq = self._next_dispatch()
        xs, scales, in_rank, per_expert, idx, weights = self._columns(handshake)
        result = intranode_dispatch(
            self.rank,
            xs,
            in_rank,
            x_scales=None if scales[0] is None else scales,
            topk_idx=None if idx[0] is None else idx,
            topk_weights=None if weights[0] is None else weights,
            num_tokens_per_expert=per_expert,
            expert_alignment=args.expert_alignment,
            num_worst_tokens=args.num_worst_tokens,
        )
        recv_x = result.recv_x if args.x_scales is None else (result.recv_x, result.recv_x_scales)
        new_handle, key = result.handle, _INTRANODE_KEY
        if self.is_internode:
            new_handle = internode_handle(self.rank, new_handle, in_rank, self.num_nvl_ranks)
            key = _INTERNODE_KEY
        agreement.stamp_handle(new_handle, key, self.uid, seq)
        return (
            recv_x,
            result.recv_topk_idx,
            result.recv_topk_weights,
            result.num_recv_tokens_per_expert_list,
            new_handle,
            self._event(async_finish),
        )

    def combine(
        self, x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream
    ):
        def local_phase() -> _Local:
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
            view, names, fields = self._checked_normal_handle(args.handle)
            num_topk = None if args.topk_weights is None else args.topk_weights.size(1)
            signature = {"x.size(1)": args.x.size(1), "topk_weights.size(1)": num_topk, **fields}
            self._wait(previous_event)
            tensors = [args.x, view.recv_src_idx, args.topk_weights]
            return _Local((args, view, names), signature, view.is_token_in_rank.size(0), tensors)

        local, handshake = self._handshake("combine", local_phase)
        args, view, names = local.args
        xs, src_idx, weights = self._columns(handshake)
        # The rank prefix matrix is the same on every rank (the signature compared its checksum).
        reference_checks.check_recv_src_idx_all_ranks(
            src_idx, view.rank_prefix_matrix, handshake.extras, names
        )
        combined, combined_weights = intranode_combine(
            self.rank,
            xs,
            src_idx,
            [view.rank_prefix_matrix] * self.num_ranks,
            view.is_token_in_rank.size(0),
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
        def local_phase() -> _Local:
            self._require_low_latency("low_latency_dispatch")
            m, num_experts_checked = validation_low_latency.validate_low_latency_dispatch(
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
            signature = {
                "x.size(1)": x.size(1),
                "topk_idx.size(1)": topk_idx.size(1),
                "num_experts": num_experts_checked,
                "num_max_dispatch_tokens_per_rank": m,
                "use_fp8": bool(use_fp8),
                "round_scale": bool(round_scale and use_fp8),
                "use_ue8m0": bool(use_ue8m0),
            }
            return _Local((m, num_experts_checked), signature, None, [x, topk_idx])

        local, handshake = self._handshake("low_latency_dispatch", local_phase)
        m, num_experts = local.args
        seq = self._next_dispatch()
        xs, idx = self._columns(handshake)
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
        agreement.stamp_handle(handle, _LOW_LATENCY_KEY, self.uid, seq)
        recv_x = (result.recv_x, result.recv_x_scales) if use_fp8 else result.recv_x
        event = self._event(async_finish, (x, topk_idx, *result))
        return recv_x, result.recv_count, handle, event, self._hook(return_recv_hook)

    def _low_latency_identity(self, checked: LowLatencyHandle) -> Optional[int]:
        """The identity of a validated low-latency handle (ValueError for another Buffer's or an altered
        handle), after checking its contents."""
        identity = agreement.handle_identity(checked, _LOW_LATENCY_KEY, self.uid)
        reference_checks.check_low_latency_handle(checked, self.num_ranks)
        return identity

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
        def local_phase() -> _Local:
            self._require_low_latency("low_latency_combine")
            checked = validation_low_latency.validate_low_latency_combine(
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
            identity = self._low_latency_identity(checked)
            rows = x
            if zero_copy and self._next_combine_buffer is not None:
                rows = self._next_combine_buffer  # the user wrote the expert outputs there
            begin, count = unpack_layout_range(checked.packed_recv_layout_range)
            rows_used = int((begin + count).max()) if count.numel() else 0
            signature = {
                "x.size(2)": checked.hidden,
                "topk_idx.size(1)": topk_idx.size(1),
                "handle": _identity_field(identity),
                "handle.num_experts": checked.num_experts,
                "handle.num_max_dispatch_tokens_per_rank": checked.num_max_dispatch_tokens_per_rank,
                "use_logfmt": bool(use_logfmt),
            }
            # Only rows that some handle range points at are read; send just those.
            tensors = [
                rows[:, :rows_used],
                checked.packed_recv_src_info,
                checked.packed_recv_layout_range,
                topk_idx,
            ]
            return _Local((checked, rows), signature, None, tensors)

        local, handshake = self._handshake("low_latency_combine", local_phase)
        checked, rows = local.args
        xs, src_info, layout, idx = self._columns(handshake)
        reference_checks.check_low_latency_routes_all_ranks(src_info, layout, idx)
        combined = low_latency_combine(
            self.rank, xs, topk_idx, topk_weights, src_info, layout, checked.num_experts
        )
        if out is not None:
            combined = out.copy_(combined)
        event = self._event(async_finish, (rows, topk_idx, topk_weights, combined))
        return combined, event, self._hook(return_recv_hook)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        # Collective, as V1's (its kernel has a barrier): the ranks agree on the call, nothing else moves.
        def local_phase() -> _Local:
            self._require_low_latency("clean_low_latency_buffer")
            m, checked_hidden, checked_experts = validation_low_latency.validate_clean_low_latency_buffer(
                num_max_dispatch_tokens_per_rank,
                hidden,
                num_experts,
                num_ranks=self.num_ranks,
                num_rdma_bytes=self.num_rdma_bytes,
            )
            signature = {
                "num_max_dispatch_tokens_per_rank": m,
                "hidden": checked_hidden,
                "num_experts": checked_experts,
            }
            return _Local(None, signature, None, [])

        self._handshake("clean_low_latency_buffer", local_phase)
        self._next_combine_buffer = None  # nothing else is kept between calls

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        # Local: nothing is communicated, so an error here is this rank's alone.
        self._require_low_latency("get_next_low_latency_combine_buffer")
        handle = validation_low_latency.validate_low_latency_handle(
            handle, num_ranks=self.num_ranks, device=self.device
        )
        self._low_latency_identity(handle)
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

    def check(self) -> None:
        """Nothing is ever pending (every operation finished or raised before it returned); after a timeout
        it raises that timeout again, as the CUDA backend does."""
        if self._timed_out is not None:
            raise RuntimeError(self._timed_out)

    def destroy(self) -> None:
        self._next_combine_buffer = None
