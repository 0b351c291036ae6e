"""Argument checks of the reference backend, in Python (the CUDA backend makes the same checks in C++,
csrc/ops/arguments.hpp, with the same exception types and messages).

Every documented constraint raises before any byte is communicated, so a rejected call leaves the Buffer
exactly as it was; the reference backend makes every rank of a collective call raise it (its handshake,
deep_ep.backends.agreement; the contents it also checks are deep_ep.backends.reference_checks'). Errors name
the offending argument first:
    TypeError  - wrong Python type or tensor dtype
    ValueError - wrong shape, device, contiguity, value range, or a buffer too small for the call
The checks read only shapes and dtypes, with one exception: expert ids are range-checked with one
`aminmax` over `topk_idx` (the CUDA backend checks them on the GPU instead, where a host check would wait
for the GPU to drain).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import torch

from ..config import (
    FP8_SCALE_BLOCK,
    MAX_LOCAL_EXPERTS,
    MAX_NUM_TOPK,
    Config,
    internode_combine_call_bytes,
    internode_dispatch_bytes,
    nvl_combine_bytes,
    nvl_dispatch_bytes,
)
from ..event import EventOverlap
from ..handles import InternodeHandle, IntranodeHandle

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


def check_bool(name: str, value: Any) -> bool:
    """A flag: a bool, or the int 0 / 1 (a string such as "False" would otherwise read as true)."""
    if type(value) is bool:
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


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
    # Named here rather than by the allocator, which a huge count would make fail on the per-expert counts.
    if num_experts // num_ranks > MAX_LOCAL_EXPERTS:
        raise ValueError(
            f"num_experts: at most {MAX_LOCAL_EXPERTS} experts a rank in normal mode "
            f"({MAX_LOCAL_EXPERTS * num_ranks} for {num_ranks} ranks), got {num_experts}"
        )
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


# Normal-mode handles by length: a Buffer takes the kind of its own dispatch.
_NORMAL_HANDLE_KINDS = {6: "intra-node", 10: "inter-node"}


def _check_normal_handle_length(handle: Any, num_elements: int) -> None:
    if not isinstance(handle, (tuple, list)):
        raise TypeError(f"handle: expected the tuple returned by dispatch, got {type(handle).__name__}")
    kind, length = _NORMAL_HANDLE_KINDS[num_elements], len(handle)
    if length == 5:
        raise ValueError(
            f"handle: this is a low-latency handle (5 elements); normal ops need dispatch's {num_elements}-element one"
        )
    if length != num_elements and length in _NORMAL_HANDLE_KINDS:
        raise ValueError(
            f"handle: this is an {_NORMAL_HANDLE_KINDS[length]} handle ({length} elements); this Buffer is {kind}"
        )
    if length != num_elements:
        raise ValueError(f"handle: expected the {num_elements}-element {kind} handle, got {length} elements")


def validate_handle(
    handle: Any, *, num_ranks: int, device: torch.device, num_nvl_ranks: Optional[int] = None
) -> Union[IntranodeHandle, InternodeHandle]:
    """The dispatch handle of this Buffer's kind: 6 elements intra-node, 10 inter-node (num_nvl_ranks <
    num_ranks)."""
    if num_nvl_ranks is not None and num_nvl_ranks < num_ranks:
        return validate_internode_handle(
            handle, num_ranks=num_ranks, num_nvl_ranks=num_nvl_ranks, device=device
        )
    _check_normal_handle_length(handle, 6)
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


def validate_internode_handle(
    handle: Any, *, num_ranks: int, num_nvl_ranks: int, device: torch.device
) -> InternodeHandle:
    """The 10-element handle of an inter-node dispatch; shapes as documented in deep_ep.handles."""
    _check_normal_handle_length(handle, 10)
    h = InternodeHandle(*handle)
    int32, r, n = (torch.int32,), num_ranks, num_ranks // num_nvl_ranks
    check_tensor(
        "handle.is_token_in_rank", h.is_token_in_rank, dtypes=(torch.bool,), shape=(None, r), device=device
    )
    num_tokens = h.is_token_in_rank.size(0)
    for name, shape in (
        ("rdma_channel_prefix_matrix", (r, n)),
        ("gbl_channel_prefix_matrix", (r, r)),
        ("recv_rdma_channel_prefix_matrix", (n + 1,)),
        ("recv_rdma_rank_prefix_sum", (None, num_nvl_ranks)),
        ("recv_gbl_channel_prefix_matrix", (r,)),
        ("recv_gbl_rank_prefix_sum", (r,)),
        ("recv_src_meta", (None,)),
        ("send_rdma_head", (num_tokens, n)),
        ("send_nvl_head", (num_tokens, r)),
    ):
        check_tensor(f"handle.{name}", getattr(h, name), dtypes=int32, shape=shape, device=device)
    return h


def handle_num_recv_rows(handle: Union[IntranodeHandle, InternodeHandle]) -> int:
    """Rows the handle's dispatch received (num_worst_tokens when padded)."""
    rows = handle.recv_src_meta if isinstance(handle, InternodeHandle) else handle.recv_src_idx
    return rows.size(0)


class DispatchArgs(NamedTuple):
    """A validated dispatch, as backends receive it (x_scales is None for BF16)."""

    x: torch.Tensor
    x_scales: Optional[torch.Tensor]
    handle: Union[IntranodeHandle, InternodeHandle, None]
    num_tokens_per_rank: Optional[torch.Tensor]
    is_token_in_rank: torch.Tensor
    num_tokens_per_expert: Optional[torch.Tensor]
    topk_idx: Optional[torch.Tensor]
    topk_weights: Optional[torch.Tensor]
    expert_alignment: int
    num_worst_tokens: int
    num_tokens_per_rdma_rank: Optional[torch.Tensor] = None  # inter-node only


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
    num_nvl_ranks: Optional[int] = None,
    num_rdma_bytes: int = 0,
) -> DispatchArgs:
    """An inter-node Buffer passes num_nvl_ranks < num_ranks: it takes the 10-element handle, checks
    num_tokens_per_rdma_rank, and sizes against num_rdma_bytes instead of num_nvl_bytes."""
    check_common(config, previous_event)
    expert_alignment = check_int("expert_alignment", expert_alignment, minimum=1)
    num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, minimum=0)
    internode = num_nvl_ranks is not None and num_nvl_ranks < num_ranks
    if internode and num_tokens_per_rdma_rank is not None:
        check_tensor(
            "num_tokens_per_rdma_rank",
            num_tokens_per_rdma_rank,
            dtypes=(torch.int32,),
            shape=(num_ranks // num_nvl_ranks,),
            device=device,
        )
    else:  # unused intra-node
        check_optional_type("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, torch.Tensor)
    data, scales = split_x(x, device)
    num_tokens, r = data.size(0), num_ranks

    if handle is not None:
        handle = validate_handle(handle, num_ranks=r, device=device, num_nvl_ranks=num_nvl_ranks)
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
        if num_experts // r > MAX_LOCAL_EXPERTS:
            raise ValueError(
                f"num_tokens_per_expert: length (the expert count) must be at most {MAX_LOCAL_EXPERTS} a rank, "
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

    num_scales, hidden_bytes = 0 if scales is None else scales.size(1), data.size(1) * data.element_size()
    what = f"dispatching {num_tokens} tokens"
    if internode:
        needed = internode_dispatch_bytes(hidden_bytes, num_scales, num_topk, r, num_nvl_ranks, num_tokens)
        check_capacity("x", needed, num_rdma_bytes, "num_rdma_bytes", f"{what} inter-node")
    else:
        needed = nvl_dispatch_bytes(hidden_bytes, num_scales, num_topk, r, num_tokens)
        check_capacity("x", needed, num_nvl_bytes, "num_nvl_bytes", what)
    if handle is None and num_worst_tokens > 0:
        # Padded rows no combine of this Buffer could take back are refused here, by name, rather than by the
        # allocator of the padded outputs.
        check_combine_capacity(
            "num_worst_tokens",
            f"padding to {num_worst_tokens} rows (combining them back)",
            data.size(1),
            num_topk,
            num_worst_tokens,
            num_tokens,
            num_ranks=r,
            num_nvl_ranks=num_nvl_ranks,
            num_nvl_bytes=num_nvl_bytes,
            num_rdma_bytes=num_rdma_bytes,
        )
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
        num_tokens_per_rdma_rank if internode else None,
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
    handle: Union[IntranodeHandle, InternodeHandle]
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
    num_nvl_ranks: Optional[int] = None,
    num_rdma_bytes: int = 0,
) -> CombineArgs:
    """As validate_dispatch: an inter-node Buffer (num_nvl_ranks < num_ranks) takes the 10-element handle
    and sizes against num_rdma_bytes."""
    check_common(config, previous_event)
    if handle is None:
        raise ValueError("handle: combine needs the handle returned by dispatch")
    handle = validate_handle(handle, num_ranks=num_ranks, device=device, num_nvl_ranks=num_nvl_ranks)
    num_rows = handle_num_recv_rows(handle)
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
    num_tokens = handle.is_token_in_rank.size(0)
    bias_0, bias_1 = split_bias(bias, num_tokens, x.size(1), device)
    check_combine_capacity(
        "x",
        f"combining {num_rows} rows",
        x.size(1),
        num_topk,
        num_rows,
        num_tokens,
        num_ranks=num_ranks,
        num_nvl_ranks=num_nvl_ranks if isinstance(handle, InternodeHandle) else None,
        num_nvl_bytes=num_nvl_bytes,
        num_rdma_bytes=num_rdma_bytes,
        num_forwarded=handle.recv_rdma_rank_prefix_sum.size(0) if isinstance(handle, InternodeHandle) else 0,
    )
    return CombineArgs(x, handle, topk_weights, bias_0, bias_1)


def check_combine_capacity(
    name: str,
    what: str,
    hidden: int,
    num_topk: int,
    num_rows: int,
    num_tokens: int,
    *,
    num_ranks: int,
    num_nvl_ranks: Optional[int],
    num_nvl_bytes: int,
    num_rdma_bytes: int,
    num_forwarded: int = 0,
) -> None:
    """The buffer holds a combine of `num_rows` BF16 rows back into `num_tokens` tokens a rank (inter-node
    when num_nvl_ranks < num_ranks, forwarding `num_forwarded` rows)."""
    if num_nvl_ranks is not None and num_nvl_ranks < num_ranks:
        # As the CUDA backend's default path (direct reads): rows forwarded, and a partial sum per token and
        # other node; staged rows count only under CUDA graph capture there.
        needed = internode_combine_call_bytes(
            hidden, num_topk, num_ranks, num_nvl_ranks, 0, num_forwarded, num_tokens
        )
        check_capacity(name, needed, num_rdma_bytes, "num_rdma_bytes", f"{what} inter-node")
    else:
        needed = nvl_combine_bytes(hidden, num_topk, num_rows)
        check_capacity(name, needed, num_nvl_bytes, "num_nvl_bytes", what)
