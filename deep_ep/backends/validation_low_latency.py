"""Argument checks of the reference backend's low-latency mode (see deep_ep.backends.validation for the
conventions: the CUDA backend makes the same checks in C++, errors name the offending argument first)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import (
    LOW_LATENCY_MAX_EXPERTS,
    LOW_LATENCY_MAX_NUM_TOPK,
    LOW_LATENCY_MAX_TOKENS_PER_RANK,
    LOW_LATENCY_SUPPORTED_HIDDEN,
    low_latency_bytes,
)
from ..handles import LowLatencyHandle
from .validation import check_capacity, check_int, check_num_experts, check_tensor, check_topk_idx


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
    # In the CUDA backend's order: with the handle and topk_idx checked, a rank can take part in the round
    # whatever else is wrong (docs/errors.md).
    check_topk_idx(topk_idx, None, num_experts, LOW_LATENCY_MAX_NUM_TOPK, device)
    num_tokens, num_topk = topk_idx.shape
    if num_tokens > m:
        raise ValueError(f"topk_idx: {num_tokens} tokens exceed num_max_dispatch_tokens_per_rank={m}")
    check_tensor(
        "x",
        x,
        dtypes=(torch.bfloat16,),
        shape=(num_experts // num_ranks, num_ranks * m, hidden),
        device=device,
    )
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
