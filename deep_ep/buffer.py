"""`Buffer`: DeepEP V1's public API, as plumbing to a backend.

Each method hands its arguments, as the caller passed them, to the backend chosen at construction
(deep_ep.backends.cuda.CudaBackend, whose C++ side checks and runs each call in one binding call, or
deep_ep.backends.reference_backend.ReferenceBackend, the pure-PyTorch semantics over torch.distributed); the
backend checks them before anything runs or is communicated, so a rejected call leaves the Buffer usable,
and returns V1's tuple. Errors are agreed (docs/errors.md): construction, and every collective call of the
reference backend, make one rank's error every rank's error, so no rank is left in a call its peers left.
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid
import weakref
from collections.abc import Callable
from typing import Optional, Union

import torch
import torch.distributed as dist

from .backends import agreement, validation
from .config import (
    DEFAULT_NUM_SMS,
    Config,
    default_combine_config,
    default_dispatch_config,
    low_latency_rdma_size_hint,
)
from .event import EventOverlap, capture
from .topology import agree_num_nvl_ranks

BACKENDS = ("auto", "cuda", "reference")

# Every live Buffer by a process-unique name (Buffer.op_key): a torch.library custom op cannot take a Buffer,
# so deep_ep.library's ops name it by this key, which torch.compile reads as a constant of the graph.
_live_buffers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_next_op_key = itertools.count(1)
INTERNODE_KEY_SUFFIX = "/internode"


def buffer_by_op_key(key: int) -> Buffer:
    """The live Buffer whose op_key is `key` (RuntimeError when none is)."""
    buffer = _live_buffers.get(key)
    if buffer is None:
        raise RuntimeError(f"no live deep_ep.Buffer has op_key {key}")
    return buffer


CONSERVATIVE_LOADS_ENV = "DEEP_EP_CONSERVATIVE_LOADS"


def _cuda_extension():
    """deep_ep._C, or None when it is not built or cannot load (no GPU driver, CPU build of torch)."""
    try:
        from . import _C  # noqa: PLC0415 - optional compiled extension
    except (ImportError, OSError):
        return None
    return _C


def _resolve_backend(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    cuda_ready = _cuda_extension() is not None and torch.cuda.is_available()
    if backend == "auto":
        return "cuda" if cuda_ready else "reference"
    if backend == "cuda" and not cuda_ready:
        why = "deep_ep._C is not built or does not load" if _cuda_extension() is None else "no CUDA device"
        raise RuntimeError(f"backend: 'cuda' requested but {why}; use backend='reference'")
    return backend


def _check_conservative_loads(conservative_loads: Optional[bool]) -> Optional[bool]:
    if conservative_loads is not None and not isinstance(conservative_loads, bool):
        raise TypeError(
            f"conservative_loads: expected a bool or None, got {type(conservative_loads).__name__}"
        )
    return conservative_loads


def _env_wants_conservative_loads() -> bool:
    return os.environ.get(CONSERVATIVE_LOADS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


class _DestroyedBackend:
    """Stands in for the backend after `destroy()`: every operation raises, naming itself."""

    name = "destroyed"
    load_kind = "n/a"

    def __getattr__(self, op: str):
        def raise_destroyed(*args, **kwargs):
            raise RuntimeError(f"{op}: the Buffer was destroyed")

        return raise_destroyed


class Buffer:
    """Expert-parallel communication buffer: normal dispatch/combine (NVLink) and low-latency
    dispatch/combine (NVSHMEM), DeepEP V1 compatible.

    Our keyword-only additions: `backend` ("auto": the CUDA kernels when deep_ep._C loads and CUDA is
    available, else the pure-PyTorch reference; "cuda"; "reference"), `conservative_loads` (None: read
    DEEP_EP_CONSERVATIVE_LOADS; True: `ld.volatile.global` peer loads instead of the aggressive
    `ld.global.nc.L1::no_allocate.L2::256B`) and `num_nvl_ranks` (ranks per NVLink domain, "node"; None:
    DEEP_EP_NUM_NVL_RANKS, else detected from the ranks' hostnames, see deep_ep.topology). With fewer
    ranks a node than in the group the Buffer is inter-node (`is_internode`): normal ops then take
    `num_rdma_bytes` (size it with Config.get_rdma_buffer_size_hint) and return DeepEP V1's inter-node layout
    and handle. Tensors live on `buffer.device`: the current CUDA device when CUDA is available, else the
    CPU (reference backend only).
    """

    num_sms: int = DEFAULT_NUM_SMS  # V1's 20; set_num_sms changes it class-wide

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        comm: Optional[object] = None,
        *,
        backend: str = "auto",
        conservative_loads: Optional[bool] = None,
        num_nvl_ranks: Optional[int] = None,
    ) -> None:
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"group: expected a torch.distributed.ProcessGroup or None, got {type(group).__name__}"
            )
        if group is not None:
            self.rank, self.group_size = group.rank(), group.size()
        elif comm is not None:
            self.rank, self.group_size = comm.Get_rank(), comm.Get_size()
        else:
            raise ValueError("group: either group or comm must be given")
        self.group, self.comm = group, comm

        # Checked locally, then agreed in the one exchange construction makes anyway (the agreement of backend
        # and nodes below): a rank whose arguments are wrong raises together with its peers, instead of leaving
        # them in a collective that would pair with its next one (deep_ep.backends.agreement).
        error, backend_name = None, None
        try:
            self.num_nvl_bytes = validation.check_int("num_nvl_bytes", num_nvl_bytes, minimum=0)
            self.num_rdma_bytes = validation.check_int("num_rdma_bytes", num_rdma_bytes, minimum=0)
            self.num_qps_per_rank = validation.check_int("num_qps_per_rank", num_qps_per_rank, minimum=1)
            self.low_latency_mode = validation.check_bool("low_latency_mode", low_latency_mode)
            self.allow_nvlink_for_low_latency_mode = validation.check_bool(
                "allow_nvlink_for_low_latency_mode", allow_nvlink_for_low_latency_mode
            )
            self.allow_mnnvl = validation.check_bool("allow_mnnvl", allow_mnnvl)
            self.explicitly_destroy = validation.check_bool("explicitly_destroy", explicitly_destroy)
            conservative_loads = _check_conservative_loads(conservative_loads)
            if num_nvl_ranks is not None:
                validation.check_int("num_nvl_ranks", num_nvl_ranks, minimum=1)
            backend_name = _resolve_backend(backend)
        except Exception as e:  # noqa: BLE001 - agreed below, whatever its type
            error = e
        # V1 (newer releases) has rank shrinking behind this flag; we do not, so it is always False.
        self.enable_shrink = False
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )

        # Every rank must run the same backend, or the first collective would hang, and must agree on the
        # mode and the symmetric buffer's size (allocated collectively): agree up front. Rank 0's random uid
        # names the Buffer on every rank (the identity of its handles).
        settings = (backend_name, self.low_latency_mode, self.num_rdma_bytes) if error is None else None
        records = self._all_gather_object(
            ("Buffer()", agreement.outcome_of(error), settings, socket.gethostname(), uuid.uuid4().hex)
        )
        agreement.check_operations([r[0] for r in records])
        agreement.raise_if_failed("Buffer()", [r[1] for r in records], cause=error)
        names = [r[2][0] for r in records]
        if any(n != names[0] for n in names):
            raise RuntimeError(
                f"backend: ranks resolved different backends {names}; pass backend= explicitly"
            )
        agreement.check_signatures(
            "Buffer()",
            [{"low_latency_mode": r[2][1], "num_rdma_bytes": r[2][2]} for r in records],
        )
        self.uid = records[0][4]
        self.num_nvl_ranks = agree_num_nvl_ranks(
            num_nvl_ranks, [r[3] for r in records], self.rank, self._all_gather_object
        )
        self.num_rdma_ranks = self.group_size // self.num_nvl_ranks
        self.is_internode = self.num_rdma_ranks > 1
        # The name torch.library's ops know this Buffer by; it says the mode, so that deep_ep.library can pick
        # the op for it while torch.compile traces (the key is a constant of the graph, the Buffer is not).
        self.op_key = f"deep_ep.Buffer#{next(_next_op_key)}" + (
            INTERNODE_KEY_SUFFIX if self.is_internode else ""
        )
        _live_buffers[self.op_key] = self

        if backend_name == "cuda":
            from .backends.cuda import CudaBackend as backend_cls  # noqa: PLC0415 - needs the compiled extension
        else:
            from .backends.reference_backend import ReferenceBackend as backend_cls  # noqa: PLC0415
        self._backend = backend_cls(
            group,
            self.rank,
            self.group_size,
            self.device,
            num_nvl_bytes=self.num_nvl_bytes,
            num_rdma_bytes=self.num_rdma_bytes,
            low_latency_mode=self.low_latency_mode,
            num_qps_per_rank=self.num_qps_per_rank,
            allow_nvlink_for_low_latency_mode=self.allow_nvlink_for_low_latency_mode,
            allow_mnnvl=self.allow_mnnvl,
            explicitly_destroy=self.explicitly_destroy,
            comm=comm,
            conservative_loads=conservative_loads,  # None: the backend follows DEEP_EP_CONSERVATIVE_LOADS
            default_num_sms=lambda: type(self).num_sms,  # read per call: V1 code sets Buffer.num_sms
            num_nvl_ranks=self.num_nvl_ranks,
            uid=self.uid,
        )
        self.backend_name = self._backend.name
        # 'aggressive' or 'conservative' peer loads (CUDA backend), 'n/a' (reference)
        self.load_kind = self._backend.load_kind
        if self._backend.load_kind == "n/a":
            self.conservative_loads = (
                _env_wants_conservative_loads() if conservative_loads is None else conservative_loads
            )
        else:
            self.conservative_loads = self._backend.load_kind == "conservative"

    def _all_gather_object(self, obj: object) -> list:
        if self.group is not None:
            gathered: list = [None] * self.group_size
            dist.all_gather_object(gathered, obj, group=self.group)
            return gathered
        return list(self.comm.allgather(obj))

    # --- state --------------------------------------------------------------------------------------------

    @property
    def runtime(self):
        """The backend object (V1 exposes its C++ runtime under this name); None once destroyed."""
        return None if isinstance(self._backend, _DestroyedBackend) else self._backend

    def check(self) -> None:
        """Raise what the GPU has reported for this Buffer so far, without waiting for it: a wait that timed
        out (RuntimeError naming the rank, what it waited for and the peer that never answered; the Buffer
        then refuses every later call) or an expert id out of range (ValueError naming it and the rank). The
        kernels report asynchronously: synchronise first (e.g. `torch.cuda.synchronize()`) to learn whether
        every call before it succeeded. The reference backend runs synchronously: nothing is ever pending."""
        self._backend.check()

    def destroy(self) -> None:
        """Release the communication resources now (requires explicitly_destroy=True, as in V1); any later
        call on this Buffer raises RuntimeError."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy: requires Buffer(..., explicitly_destroy=True)")
        self._backend.destroy()
        self._backend = _DestroyedBackend()

    # --- statics ------------------------------------------------------------------------------------------

    @staticmethod
    def is_sm90_compiled() -> bool:
        ext = _cuda_extension()
        return bool(ext.is_sm90_compiled()) if ext is not None and hasattr(ext, "is_sm90_compiled") else False

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """SM budget of the normal-mode kernels, used by the default configs (class-wide, as in V1)."""
        Buffer.num_sms = validation.check_int("new_num_sms", new_num_sms, minimum=1)

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current CUDA stream (an empty EventOverlap without CUDA)."""
        return capture()

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return default_dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return default_combine_config(num_ranks, Buffer.num_sms)

    def get_comm_stream(self):
        return self._backend.get_comm_stream()

    def get_local_buffer_tensor(
        self,
        dtype: torch.dtype,
        size: Optional[torch.Size] = None,
        offset: int = 0,
        use_rdma_buffer: bool = False,
    ) -> torch.Tensor:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
        offset = validation.check_int("offset", offset, minimum=0)
        return self._backend.get_local_buffer_tensor(dtype, size, offset, use_rdma_buffer)

    # --- normal mode --------------------------------------------------------------------------------------

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """-> (num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank, num_tokens_per_expert int32 [E],
        is_token_in_rank bool [T, R], event). num_tokens_per_rdma_rank: None on an intra-node Buffer; on an
        inter-node one int32 [num_rdma_ranks], the tokens with at least one destination rank on each node."""
        return self._backend.get_dispatch_layout(
            topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
        )

    def dispatch(
        self,
        x: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
        handle: Optional[tuple] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple:
        """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event).

        recv_x matches x's form (tensor, or (fp8, scales) tuple). A cached dispatch (handle given) returns
        (recv_x, None, None, None, None, event), as V1 does. See deep_ep.backends.reference.intranode_dispatch
        for the exact semantics (row order, padding with num_worst_tokens, handle contents). An inter-node
        Buffer moves the same rows; its handle is deep_ep.handles.InternodeHandle (10 elements, V1's
        layout) instead of IntranodeHandle (6), and it accepts num_tokens_per_rdma_rank from
        get_dispatch_layout (optional: it follows from is_token_in_rank).
        """
        return self._backend.dispatch(
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
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], None] = None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """-> (combined_x bf16 [T, H], combined_topk_weights float32 [T, k] or None, event).
        Sums (without weights) every received copy back into its source token; see
        deep_ep.backends.reference.intranode_combine for the reduction order."""
        return self._backend.combine(
            x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream
        )

    # --- low-latency mode ---------------------------------------------------------------------------------

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        self._backend.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple:
        """-> (recv_x, recv_count int32 [L], handle, event, hook). recv_x: bf16 [L, R*M, H], or with use_fp8
        the tuple (float8_e4m3fn [L, R*M, H], scales) with column-major scales float32 [L, R*M, H/128]
        (use_ue8m0: int32 [L, R*M, H/512]). Only the first recv_count[l] rows of expert l are valid."""
        return self._backend.low_latency_dispatch(
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

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
        combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, EventOverlap, Optional[Callable]]:
        """-> (combined_x bf16 [T, H] (`out` when given), event, hook): sum_k topk_weights[t, k] times the
        output of expert topk_idx[t, k] for token t, skipping -1. `combine_wait_recv_cost_stats` (int64 [R])
        accumulates the nanoseconds the receiving side waited for each source rank."""
        return self._backend.low_latency_combine(
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
        )

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The [L, R*M, H] bf16 tensor the next low_latency_combine(..., zero_copy=True) reads."""
        return self._backend.get_next_low_latency_combine_buffer(handle)
