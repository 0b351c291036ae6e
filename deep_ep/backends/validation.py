"""Argument checks of the reference backend, in Python (the CUDA backend makes the same checks in C++,
csrc/ops/arguments.hpp, with the same exception types and messages).

Every documented constraint raises before any byte is communicated, so a rejected call leaves the Buffer
exactly as it was. Errors name the offending argument first:
    TypeError  - wrong Python type or tensor dtype
    ValueError - wrong shape, device, contiguity, value range, or a buffer too small for the call
The checks read only shapes and dtypes, with one exception: expert ids are range-checked with one
`aminmax` over `topk_idx` (the CUDA backend checks them on the GPU instead, where a host check would wait
for the GPU to drain).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import torch

from ..config import (
    FP8_SCALE_BLOCK,
    LOW_LATENCY_MAX_EXPERTS,
    LOW_LATENCY_MAX_NUM_TOPK,
    LOW_LATENCY_MAX_TOKENS_PER_RANK,
    LOW_LATENCY_SUPPORTED_HIDDEN,
    MAX_NUM_TOPK,
    Config,
    low_latency_bytes,
    nvl_combine_bytes,
    nvl_dispatch_bytes,
)
from ..event import EventOverlap
from ..handles import IntranodeHandle, LowLatencyHandle

TOPK_IDX_DTYPES = (torch.int64, torch.int32)
# Rows are copied with 16-byte vector accesses, so a row's byte size must be a multiple of 16.
ROW_BYTES_MULTIPLE = 16


def _shape_str(shape: Sequence[Optional[int]]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_int(name: str, value: Any, *, minimum: Optional[int] = None) -> int:
    if type(value) is not int:  # the abstract-class check is slow: only for the uncommon types
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def check_tensor(
    name: str,
    t: Any,
    *,
    dtypes: Sequence[torch.dtype],
    shape: Optional[Sequence[Optional[int]]] = None,
    ndim: Optional[int] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Type, dtype, shape (None = any size), device and contiguity of one tensor argument. Runs for every
    tensor of every op, so the common case takes the fewest Python operations."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {wanted}, got {t.dtype}")
    if shape is not None:
        got = t.shape
        if len(got) != len(shape):
            raise ValueError(f"{name}: expected shape {_shape_str(shape)}, got {list(got)}")
        for wanted_size, got_size in zip(shape, got):
            if wanted_size is not None and wanted_size != got_size:
                raise ValueError(f"{name}: expected shape {_shape_str(shape)}, got {list(got)}")
    elif ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected shape a {ndim}-D tensor, got {list(t.shape)}")
    if device is not None:
        got_device = t.device
        if got_device != device and not _same_device(got_device, device):
            raise ValueError(f"{name}: must be on the buffer's device {device}, found {got_device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")
    return t


def check_expert_ids(name: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Every id in [-1, num_experts). One aminmax (a host sync on CUDA, see the module docstring)."""
    if topk_idx.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(topk_idx))
    if lo < -1 or hi >= num_experts:
        found = lo if lo < -1 else hi
        raise ValueError(f"{name}: expert ids must be in [-1, {num_experts}), found {found}")


def check_num_experts(num_experts: Any, num_ranks: int) -> int:
    num_experts = check_int("num_experts", num_experts, minimum=1)
    if num_experts % num_ranks != 0:
        raise ValueError(
            f"num_experts: must be divisible by the number of ranks {num_ranks}, got {num_experts}"
        )
    return num_experts


def check_topk_idx(
    topk_idx: Any, num_tokens: Optional[int], num_experts: int, max_topk: int, device
) -> torch.Tensor:
    check_tensor("topk_idx", topk_idx, dtypes=TOPK_IDX_DTYPES, shape=(num_tokens, None), device=device)
    if not 1 <= topk_idx.size(1) <= max_topk:
        raise ValueError(f"topk_idx: top-k must be in [1, {max_topk}], got {topk_idx.size(1)}")
    check_expert_ids("topk_idx", topk_idx, num_experts)
    return topk_idx


def check_optional_type(name: str, value: Any, cls: type) -> None:
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name}: expected {cls.__name__} or None, got {type(value).__name__}")


def check_common(config: Any, previous_event: Any) -> None:
    check_optional_type("config", config, Config)
    check_optional_type("previous_event", previous_event, EventOverlap)


def check_capacity(name: str, needed: int, available: int, buffer_arg: str, what: str) -> None:
    if needed > available:
        raise ValueError(
            f"{name}: {what} needs {needed} bytes of buffer but the Buffer was created with "
            f"{buffer_arg}={available}; size it with the matching size hint"
        )


# ---------------------------------------------------------------------------------------------------------
# Normal mode
# ---------------------------------------------------------------------------------------------------------


def validate_layout(topk_idx: Any, num_experts: Any, *, num_ranks: int, device: torch.device) -> int:
    num_experts = check_num_experts(num_experts, num_ranks)
    check_topk_idx(topk_idx, None, num_experts, MAX_NUM_TOPK, device)
    return num_experts


def split_x(x: Any, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`x` is BF16 [T, H], or the FP8 tuple (float8_e4m3fn [T, H], float32 scales [T, H / 128]).

    Scales may have any strides (DeepGEMM produces column-major ones); the Buffer makes them contiguous.
    """
    if isinstance(x, tuple):  # V1's test: only a tuple means FP8
        if len(x) != 2:
            raise ValueError(f"x: an FP8 input is a tuple (x_fp8, x_scales), got {len(x)} elements")
        data, scales = x
        check_tensor("x[0]", data, dtypes=(torch.float8_e4m3fn,), ndim=2, device=device)
        if data.size(1) % FP8_SCALE_BLOCK != 0:
            raise ValueError(
                f"x[0]: FP8 hidden size must be a multiple of {FP8_SCALE_BLOCK}, got {data.size(1)}"
            )
        num_groups = data.size(1) // FP8_SCALE_BLOCK
        check_tensor(
            "x[1]",
            scales,
            dtypes=(torch.float32,),
            shape=(data.size(0), num_groups),
            device=device,
            contiguous=False,
        )
        return data, scales
    if isinstance(x, torch.Tensor) and x.dtype == torch.float8_e4m3fn:
        raise TypeError("x: an FP8 tensor must come with its scales, as the tuple (x_fp8, x_scales)")
    check_tensor("x", x, dtypes=(torch.bfloat16,), ndim=2, device=device)
    if x.size(1) * x.element_size() % ROW_BYTES_MULTIPLE != 0:
        raise ValueError(f"x: hidden size must be a multiple of 8 for BF16 (16-byte rows), got {x.size(1)}")
    return x, None


def validate_handle(handle: Any, *, num_ranks: int, device: torch.device) -> IntranodeHandle:
    if not isinstance(handle, (tuple, list)):
        raise TypeError(f"handle: expected the tuple returned by dispatch, got {type(handle).__name__}")
    if len(handle) == 5:
        raise ValueError(
            "handle: this is a low-latency handle (5 elements); normal ops need dispatch's 6-element one"
        )
    if len(handle) == 10:
        raise ValueError("handle: inter-node handles (10 elements) are not supported by an intra-node Buffer")
    if len(handle) != 6:
        raise ValueError(f"handle: expected the 6-element intra-node handle, got {len(handle)} elements")
    h = IntranodeHandle(*handle)
    int32, r = (torch.int32,), num_ranks
    check_tensor("handle.rank_prefix_matrix", h.rank_prefix_matrix, dtypes=int32, shape=(r, r), device=device)
    check_tensor(
        "handle.channel_prefix_matrix", h.channel_prefix_matrix, dtypes=int32, shape=(r, None), device=device
    )
    check_tensor(
        "handle.recv_channel_prefix_matrix",
        h.recv_channel_prefix_matrix,
        dtypes=int32,
        shape=(r, None),
        device=device,
    )
    check_tensor("handle.recv_src_idx", h.recv_src_idx, dtypes=int32, ndim=1, device=device)
    check_tensor(
        "handle.is_token_in_rank", h.is_token_in_rank, dtypes=(torch.bool,), shape=(None, r), device=device
    )
    num_tokens = h.is_token_in_rank.size(0)
    check_tensor("handle.send_head", h.send_head, dtypes=int32, shape=(num_tokens, r), device=device)
    return h


class DispatchArgs(NamedTuple):
    """A validated dispatch, as backends receive it (x_scales is None for BF16)."""

    x: torch.Tensor
    x_scales: Optional[torch.Tensor]
    handle: Optional[IntranodeHandle]
    num_tokens_per_rank: Optional[torch.Tensor]
    is_token_in_rank: torch.Tensor
    num_tokens_per_expert: Optional[torch.Tensor]
    topk_idx: Optional[torch.Tensor]
    topk_weights: Optional[torch.Tensor]
    expert_alignment: int
    num_worst_tokens: int


def validate_dispatch(
    x: Any,
    handle: Any,
    num_tokens_per_rank: Any,
    num_tokens_per_rdma_rank: Any,
    is_token_in_rank: Any,
    num_tokens_per_expert: Any,
    topk_idx: Any,
    topk_weights: Any,
    expert_alignment: Any,
    num_worst_tokens: Any,
    config: Any,
    previous_event: Any,
    *,
    num_ranks: int,
    device: torch.device,
    num_nvl_bytes: int,
) -> DispatchArgs:
    check_common(config, previous_event)
    expert_alignment = check_int("expert_alignment", expert_alignment, minimum=1)
    num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, minimum=0)
    check_optional_type(
        "num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, torch.Tensor
    )  # unused intra-node
    data, scales = split_x(x, device)
    num_tokens, r = data.size(0), num_ranks

    if handle is not None:
        handle = validate_handle(handle, num_ranks=r, device=device)
        for name, value in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            if value is not None:
                raise ValueError(
                    f"{name}: must be None for a cached dispatch (handle given); top-k is not resent"
                )
        if handle.is_token_in_rank.size(0) != num_tokens:
            raise ValueError(
                f"x: has {num_tokens} tokens but the handle was made for {handle.is_token_in_rank.size(0)}"
            )
        is_token_in_rank, num_topk = handle.is_token_in_rank, 0
    else:
        for name, value in (
            ("num_tokens_per_rank", num_tokens_per_rank),
            ("is_token_in_rank", is_token_in_rank),
            ("num_tokens_per_expert", num_tokens_per_expert),
        ):
            if value is None:
                raise ValueError(
                    f"{name}: required when no handle is given (get it from get_dispatch_layout)"
                )
        check_tensor(
            "num_tokens_per_rank", num_tokens_per_rank, dtypes=(torch.int32,), shape=(r,), device=device
        )
        check_tensor(
            "is_token_in_rank", is_token_in_rank, dtypes=(torch.bool,), shape=(num_tokens, r), device=device
        )
        check_tensor(
            "num_tokens_per_expert", num_tokens_per_expert, dtypes=(torch.int32,), ndim=1, device=device
        )
        num_experts = num_tokens_per_expert.size(0)
        if num_experts == 0 or num_experts % r != 0:
            raise ValueError(
                f"num_tokens_per_expert: length (the expert count) must be a positive multiple of {r} ranks, "
                f"got {num_experts}"
            )
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError("topk_weights: topk_idx and topk_weights must be given together (or both None)")
        num_topk = 0
        if topk_idx is not None:
            check_topk_idx(topk_idx, num_tokens, num_experts, MAX_NUM_TOPK, device)
            num_topk = topk_idx.size(1)
            check_tensor(
                "topk_weights",
                topk_weights,
                dtypes=(torch.float32,),
                shape=(num_tokens, num_topk),
                device=device,
            )
        elif num_worst_tokens > 0:
            raise ValueError("num_worst_tokens: requires topk_idx and topk_weights (as in DeepEP V1)")

    num_scales = 0 if scales is None else scales.size(1)
    needed = nvl_dispatch_bytes(data.size(1) * data.element_size(), num_scales, num_topk, r, num_tokens)
    check_capacity("x", needed, num_nvl_bytes, "num_nvl_bytes", f"dispatching {num_tokens} tokens")
    return DispatchArgs(
        data,
        None if scales is None else scales.contiguous(),
        handle,
        num_tokens_per_rank,
        is_token_in_rank,
        num_tokens_per_expert,
        topk_idx,
        topk_weights,
        expert_alignment,
        num_worst_tokens,
    )


def split_bias(
    bias: Any, num_tokens: int, hidden: int, device
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`bias` is None, one tensor, or a tuple of up to two tensors, each BF16 [T, H]."""
    if bias is None:
        parts: tuple = ()
    elif isinstance(bias, torch.Tensor):
        parts = (bias,)
    elif isinstance(bias, (tuple, list)):
        if len(bias) > 2:
            raise ValueError(f"bias: at most 2 tensors, got {len(bias)}")
        parts = tuple(bias)
    else:
        raise TypeError(f"bias: expected a tensor or a tuple of tensors, got {type(bias).__name__}")
    for i, b in enumerate(parts):
        check_tensor(f"bias[{i}]", b, dtypes=(torch.bfloat16,), shape=(num_tokens, hidden), device=device)
    parts = parts + (None,) * (2 - len(parts))
    return parts[0], parts[1]


class CombineArgs(NamedTuple):
    """A validated combine, as backends receive it (bias split into its 0, 1 or 2 tensors)."""

    x: torch.Tensor
    handle: IntranodeHandle
    topk_weights: Optional[torch.Tensor]
    bias_0: Optional[torch.Tensor]
    bias_1: Optional[torch.Tensor]


def validate_combine(
    x: Any,
    handle: Any,
    topk_weights: Any,
    bias: Any,
    config: Any,
    previous_event: Any,
    *,
    num_ranks: int,
    device: torch.device,
    num_nvl_bytes: int,
) -> CombineArgs:
    check_common(config, previous_event)
    if handle is None:
        raise ValueError("handle: combine needs the handle returned by dispatch")
    handle = validate_handle(handle, num_ranks=num_ranks, device=device)
    num_rows = handle.recv_src_idx.size(0)
    check_tensor("x", x, dtypes=(torch.bfloat16,), ndim=2, device=device)
    if x.size(0) != num_rows:
        raise ValueError(f"x: has {x.size(0)} rows but the handle's dispatch received {num_rows}")
    if x.size(1) * 2 % ROW_BYTES_MULTIPLE != 0:
        raise ValueError(f"x: hidden size must be a multiple of 8 (16-byte rows), got {x.size(1)}")
    num_topk = 0
    if topk_weights is not None:
        check_tensor(
            "topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_rows, None), device=device
        )
        num_topk = topk_weights.size(1)
        if not 1 <= num_topk <= MAX_NUM_TOPK:
            raise ValueError(f"topk_weights: top-k must be in [1, {MAX_NUM_TOPK}], got {num_topk}")
    bias_0, bias_1 = split_bias(bias, handle.is_token_in_rank.size(0), x.size(1), device)
    needed = nvl_combine_bytes(x.size(1), num_topk, num_rows)
    check_capacity("x", needed, num_nvl_bytes, "num_nvl_bytes", f"combining {num_rows} rows")
    return CombineArgs(x, handle, topk_weights, bias_0, bias_1)


# ---------------------------------------------------------------------------------------------------------
# Low-latency mode
# ---------------------------------------------------------------------------------------------------------


def check_low_latency_hidden(name: str, hidden: int) -> None:
    if hidden not in LOW_LATENCY_SUPPORTED_HIDDEN:
        raise ValueError(
            f"{name}: hidden size {hidden} is not supported in low-latency mode "
            f"(supported: {LOW_LATENCY_SUPPORTED_HIDDEN})"
        )


def check_low_latency_num_experts(num_experts: Any, num_ranks: int) -> int:
    num_experts = check_num_experts(num_experts, num_ranks)
    if num_experts > LOW_LATENCY_MAX_EXPERTS:
        raise ValueError(
            f"num_experts: low-latency mode supports up to {LOW_LATENCY_MAX_EXPERTS} experts, got {num_experts}"
        )
    return num_experts


def check_low_latency_capacity(
    name: str, m: int, hidden: int, num_ranks: int, num_experts: int, rdma: int
) -> None:
    needed = low_latency_bytes(m, hidden, num_ranks, num_experts)
    what = f"low-latency mode with {m} tokens per rank, hidden {hidden}, {num_experts} experts"
    check_capacity(name, needed, rdma, "num_rdma_bytes", what)


def validate_low_latency_dispatch(
    x: Any,
    topk_idx: Any,
    num_max_dispatch_tokens_per_rank: Any,
    num_experts: Any,
    cumulative_local_expert_recv_stats: Any,
    dispatch_wait_recv_cost_stats: Any,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
    *,
    num_ranks: int,
    device: torch.device,
    num_rdma_bytes: int,
) -> tuple[int, int]:
    """Returns (num_max_dispatch_tokens_per_rank, num_experts) as ints."""
    m = check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
    num_experts = check_low_latency_num_experts(num_experts, num_ranks)
    check_tensor("x", x, dtypes=(torch.bfloat16,), ndim=2, device=device)
    num_tokens, hidden = x.shape
    check_low_latency_hidden("x", hidden)
    if num_tokens > m:
        raise ValueError(f"x: {num_tokens} tokens exceed num_max_dispatch_tokens_per_rank={m}")
    if m > LOW_LATENCY_MAX_TOKENS_PER_RANK:
        raise ValueError(
            f"num_max_dispatch_tokens_per_rank: at most {LOW_LATENCY_MAX_TOKENS_PER_RANK}, got {m}"
        )
    check_topk_idx(topk_idx, num_tokens, num_experts, LOW_LATENCY_MAX_NUM_TOPK, device)
    if cumulative_local_expert_recv_stats is not None:
        check_tensor(
            "cumulative_local_expert_recv_stats",
            cumulative_local_expert_recv_stats,
            dtypes=(torch.int32,),
            shape=(num_experts // num_ranks,),
            device=device,
        )
    if dispatch_wait_recv_cost_stats is not None:
        check_tensor(
            "dispatch_wait_recv_cost_stats",
            dispatch_wait_recv_cost_stats,
            dtypes=(torch.int64,),
            shape=(num_ranks,),
            device=device,
        )
    if use_ue8m0 and not (use_fp8 and round_scale):
        raise ValueError("use_ue8m0: requires use_fp8=True and round_scale=True")
    check_low_latency_capacity("x", m, hidden, num_ranks, num_experts, num_rdma_bytes)
    return m, num_experts


def validate_low_latency_handle(handle: Any, *, num_ranks: int, device: torch.device) -> LowLatencyHandle:
    if not isinstance(handle, (tuple, list)):
        raise TypeError(
            f"handle: expected the tuple returned by low_latency_dispatch, got {type(handle).__name__}"
        )
    if len(handle) != 5:
        raise ValueError(f"handle: expected the 5-element low-latency handle, got {len(handle)} elements")
    h = LowLatencyHandle(*handle)
    m = check_int("handle.num_max_dispatch_tokens_per_rank", h.num_max_dispatch_tokens_per_rank, minimum=1)
    hidden = check_int("handle.hidden", h.hidden, minimum=1)
    num_experts = check_low_latency_num_experts(h.num_experts, num_ranks)
    num_local_experts = num_experts // num_ranks
    check_tensor(
        "handle.packed_recv_src_info",
        h.packed_recv_src_info,
        dtypes=(torch.int32,),
        shape=(num_local_experts, num_ranks * m),
        device=device,
    )
    check_tensor(
        "handle.packed_recv_layout_range",
        h.packed_recv_layout_range,
        dtypes=(torch.int64,),
        shape=(num_local_experts, num_ranks),
        device=device,
    )
    return LowLatencyHandle(h.packed_recv_src_info, h.packed_recv_layout_range, m, hidden, num_experts)


def validate_low_latency_combine(
    x: Any,
    topk_idx: Any,
    topk_weights: Any,
    handle: Any,
    out: Any,
    combine_wait_recv_cost_stats: Any,
    *,
    num_ranks: int,
    device: torch.device,
    num_rdma_bytes: int,
) -> LowLatencyHandle:
    handle = validate_low_latency_handle(handle, num_ranks=num_ranks, device=device)
    m, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
    check_tensor(
        "x",
        x,
        dtypes=(torch.bfloat16,),
        shape=(num_experts // num_ranks, num_ranks * m, hidden),
        device=device,
    )
    check_topk_idx(topk_idx, None, num_experts, LOW_LATENCY_MAX_NUM_TOPK, device)
    num_tokens, num_topk = topk_idx.shape
    if num_tokens > m:
        raise ValueError(f"topk_idx: {num_tokens} tokens exceed num_max_dispatch_tokens_per_rank={m}")
    check_tensor(
        "topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk), device=device
    )
    if out is not None:
        check_tensor("out", out, dtypes=(torch.bfloat16,), shape=(num_tokens, hidden), device=device)
    if combine_wait_recv_cost_stats is not None:
        check_tensor(
            "combine_wait_recv_cost_stats",
            combine_wait_recv_cost_stats,
            dtypes=(torch.int64,),
            shape=(num_ranks,),
            device=device,
        )
    check_low_latency_capacity("x", m, hidden, num_ranks, num_experts, num_rdma_bytes)
    return handle


def validate_clean_low_latency_buffer(
    num_max_dispatch_tokens_per_rank: Any,
    hidden: Any,
    num_experts: Any,
    *,
    num_ranks: int,
    num_rdma_bytes: int,
) -> tuple[int, int, int]:
    m = check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
    hidden = check_int("hidden", hidden, minimum=1)
    check_low_latency_hidden("hidden", hidden)
    num_experts = check_low_latency_num_experts(num_experts, num_ranks)
    check_low_latency_capacity(
        "num_max_dispatch_tokens_per_rank", m, hidden, num_ranks, num_experts, num_rdma_bytes
    )
    return m, hidden, num_experts
