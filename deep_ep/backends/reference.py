"""The executable semantics of the library (DESIGN section 3) and the reference backend.

Two layers:
(a) Pure functions (`dispatch_layout`, `intranode_dispatch`, `intranode_combine`, `low_latency_dispatch`,
    `low_latency_combine`) compute ONE rank's outputs from ALL ranks' inputs, given as lists indexed by
    rank. No communication: they are the oracle of the GPU tests, which regenerate every rank's inputs
    from one seed.
(b) `ReferenceBackend` all-gathers what they need over any torch.distributed group (gloo included; CUDA
    tensors cross a gloo group through host memory) and calls them. It is also the CPU fallback.

Backend interface (the CUDA backend in deep_ep/cuda_backend.py implements the same). `Buffer` validates
every argument first (deep_ep.validation), fills in defaults, and then calls, with validated arguments:

    Backend(group, rank, num_ranks, device, *, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
            num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, explicitly_destroy, comm,
            conservative_loads)          conservative_loads: None (follow DEEP_EP_CONSERVATIVE_LOADS) or bool
    .name -> str ("reference" | "cuda");  .load_kind -> "aggressive" | "conservative" | "n/a"
    .get_dispatch_layout(topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream)
        -> (num_tokens_per_rank, num_tokens_per_rdma_rank | None, num_tokens_per_expert, is_token_in_rank, event)
    .dispatch(args: deep_ep.validation.DispatchArgs, config, previous_event, async_finish, allocate_on_comm_stream)
        -> (recv_x, recv_x_scales | None, recv_topk_idx | None, recv_topk_weights | None,
            num_recv_tokens_per_expert_list | None, handle: IntranodeHandle, event)
        args.x_scales is None for BF16; args.handle is None for a fresh dispatch, an IntranodeHandle for a
        cached one (then topk_* and num_tokens_* are None and is_token_in_rank is handle.is_token_in_rank).
    .combine(args: deep_ep.validation.CombineArgs, config, previous_event, async_finish, allocate_on_comm_stream)
        -> (combined_x, combined_topk_weights | None, event)
    .low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                          cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
                          round_scale, use_ue8m0, async_finish, return_recv_hook)
        -> (recv_x, recv_x_scales | None, recv_count, packed_recv_src_info, packed_recv_layout_range, event, hook)
    .low_latency_combine(x, topk_idx, topk_weights, handle: LowLatencyHandle, use_logfmt, zero_copy,
                         async_finish, return_recv_hook, out) -> (combined_x, event, hook)
    .clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None
    .get_next_low_latency_combine_buffer(handle: LowLatencyHandle) -> Tensor [L, R*M, H] bf16
    .get_local_buffer_tensor(dtype, size, offset, use_rdma_buffer) -> Tensor
    .get_comm_stream() -> torch.cuda.Stream | None
    .destroy() -> None
`previous_event` arrives unwrapped (a torch.cuda.Event, the backend's own event, or None); `event` is
returned unwrapped the same way (None when there is nothing to wait for) and `hook` is a callable or None.
Buffer wraps them into EventOverlap and builds the LowLatencyHandle.

The reference runs synchronously on the current stream: it waits for `previous_event`, and with
`async_finish` returns an event recorded after its work (None on CPU). `allocate_on_comm_stream`, `config`,
`use_logfmt` (treated as BF16) and `dispatch_wait_recv_cost_stats` (it adds 0) have no effect on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from ..event import EventOverlap, record_event
from ..handles import IntranodeHandle, LowLatencyHandle, unpack_layout_range
from .fp8 import pack_ue8m0, per_token_cast_to_fp8

Tensors = Sequence[torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# (a) Pure functions
# ---------------------------------------------------------------------------------------------------------


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R]).

    A token goes to a rank when at least one of its experts lives there (rank r owns experts
    [r*E/R, (r+1)*E/R)); num_tokens_per_expert counts (token, slot) pairs, -1 slots excluded.
    """
    idx = topk_idx.long()
    valid = idx >= 0
    num_local_experts = num_experts // num_ranks
    num_tokens_per_expert = torch.bincount(idx[valid], minlength=num_experts).int()
    owner = torch.where(valid, idx.div(num_local_experts, rounding_mode="floor"), num_ranks)  # R = nowhere
    in_rank = torch.zeros(idx.size(0), num_ranks + 1, dtype=torch.bool, device=idx.device)
    is_token_in_rank = in_rank.scatter_(1, owner, True)[:, :num_ranks].contiguous()
    return is_token_in_rank.sum(0).int(), num_tokens_per_expert, is_token_in_rank


def _pad_rows(t: torch.Tensor, num_rows: int, value: float) -> torch.Tensor:
    if t.size(0) == num_rows:
        return t
    padding = torch.full((num_rows - t.size(0), *t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, padding])


class DispatchResult(NamedTuple):
    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert_list: Optional[list]
    handle: IntranodeHandle


def intranode_dispatch(
    rank: int,
    x: Tensors,
    is_token_in_rank: Tensors,
    *,
    x_scales: Optional[Tensors] = None,
    topk_idx: Optional[Tensors] = None,
    topk_weights: Optional[Tensors] = None,
    num_tokens_per_expert: Optional[Tensors] = None,
    num_experts: Optional[int] = None,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
    num_recv_rows: Optional[int] = None,
) -> DispatchResult:
    """Rank `rank`'s outputs of a normal dispatch; every list argument is indexed by source rank.

    Rows are grouped by source rank in rank order, and within a source in token order. recv_topk_idx
    (int64) holds local expert ids, -1 for experts on other ranks (recv_topk_weights 0 there).
    num_recv_tokens_per_expert_list[e] = sum over sources of num_tokens_per_expert[rank*L + e], rounded up
    to expert_alignment. With num_worst_tokens > 0 the outputs have exactly that many rows (padding: x
    and scales 0, topk_idx -1, weights 0, recv_src_idx -1) and the list is empty, as in V1.
    `num_recv_rows` pads the same way without emptying the list (a cached dispatch through such a handle).
    Handle: see deep_ep.handles.IntranodeHandle; send_head[t][j] is the row of recv_x on rank j holding
    token t of this rank, or -1.
    """
    num_ranks = len(x)
    # send_counts[s][j]: tokens rank s sends to rank j.
    send_counts = torch.stack([m.sum(0) for m in is_token_in_rank]).long()
    selected = [m[:, rank].nonzero().squeeze(1) for m in is_token_in_rank]  # ascending token order
    recv_x = torch.cat([x[s][selected[s]] for s in range(num_ranks)])
    recv_x_scales = None
    if x_scales is not None:
        recv_x_scales = torch.cat([x_scales[s][selected[s]] for s in range(num_ranks)])
    recv_src_idx = torch.cat(selected).int()

    if num_experts is None and num_tokens_per_expert is not None:
        num_experts = num_tokens_per_expert[0].numel()
    recv_topk_idx = recv_topk_weights = None
    if topk_idx is not None:
        num_local_experts = num_experts // num_ranks
        first = rank * num_local_experts
        idx = torch.cat([topk_idx[s][selected[s]].long() for s in range(num_ranks)])
        is_local = (idx >= first) & (idx < first + num_local_experts)
        recv_topk_idx = torch.where(is_local, idx - first, -1)
        weights = torch.cat([topk_weights[s][selected[s]] for s in range(num_ranks)])
        recv_topk_weights = torch.where(is_local, weights, torch.zeros_like(weights))

    per_expert = None
    if num_tokens_per_expert is not None:
        num_local_experts = num_experts // num_ranks
        first = rank * num_local_experts
        counts = sum(n[first : first + num_local_experts].long() for n in num_tokens_per_expert)
        aligned = (counts + expert_alignment - 1) // expert_alignment * expert_alignment
        per_expert = [int(c) for c in aligned.tolist()]

    mine = is_token_in_rank[rank]
    rows_before = send_counts[:rank].sum(0)  # rows each destination receives from ranks before this one
    send_head = torch.where(mine, mine.long().cumsum(0) - 1 + rows_before, -1).int()
    recv_column = send_counts[:, rank]
    handle = IntranodeHandle(
        rank_prefix_matrix=send_counts.cumsum(0).int(),
        channel_prefix_matrix=send_counts[rank].view(num_ranks, 1).int(),
        recv_channel_prefix_matrix=(recv_column.cumsum(0) - recv_column).view(num_ranks, 1).int(),
        recv_src_idx=recv_src_idx,
        is_token_in_rank=mine,
        send_head=send_head,
    )

    capacity = num_worst_tokens if num_worst_tokens > 0 else num_recv_rows
    if capacity is not None:
        num_rows = recv_x.size(0)
        if num_rows > capacity:
            what = "num_worst_tokens" if num_worst_tokens > 0 else "handle"
            raise ValueError(
                f"{what}: rank {rank} receives {num_rows} rows, more than the {capacity} allowed"
            )
        recv_x = _pad_rows(recv_x, capacity, 0)
        recv_x_scales = None if recv_x_scales is None else _pad_rows(recv_x_scales, capacity, 0)
        recv_topk_idx = None if recv_topk_idx is None else _pad_rows(recv_topk_idx, capacity, -1)
        recv_topk_weights = None if recv_topk_weights is None else _pad_rows(recv_topk_weights, capacity, 0)
        handle = handle._replace(recv_src_idx=_pad_rows(recv_src_idx, capacity, -1))
        if num_worst_tokens > 0:
            per_expert = []
    return DispatchResult(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, per_expert, handle)


def intranode_combine(
    rank: int,
    x: Tensors,
    recv_src_idx: Tensors,
    rank_prefix_matrix: Tensors,
    num_tokens: int,
    *,
    topk_weights: Optional[Tensors] = None,
    bias_0: Optional[torch.Tensor] = None,
    bias_1: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rank `rank`'s combine output; list arguments are indexed by the rank that holds the rows
    (the destination of the dispatch), each with that rank's handle fields.

    For each token t: acc = +0.0 (float32); for d = 0..R-1, if rank d holds a copy of t:
    acc += float32(x_d[row]); then acc += float32(bias_0[t]); acc += float32(bias_1[t]); output bf16(acc)
    (round to nearest even). topk_weights are summed the same way (without bias), output float32.
    """
    num_ranks = len(x)
    device, hidden = x[rank].device, x[rank].size(1)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    acc_weights = None
    if topk_weights is not None:
        acc_weights = torch.zeros(num_tokens, topk_weights[rank].size(1), dtype=torch.float32, device=device)
    for d in range(num_ranks):
        prefix = rank_prefix_matrix[d][:, d].long()  # rows rank d got from ranks 0..i
        begin = int(prefix[rank - 1]) if rank > 0 else 0
        end = int(prefix[rank])
        tokens = recv_src_idx[d][begin:end].long()  # distinct, so each element gets one add per rank
        acc.index_add_(0, tokens, x[d][begin:end].float())
        if acc_weights is not None:
            acc_weights.index_add_(0, tokens, topk_weights[d][begin:end].float())
    for bias in (bias_0, bias_1):
        if bias is not None:
            acc += bias.float()
    return acc.to(torch.bfloat16), acc_weights


class LowLatencyDispatchResult(NamedTuple):
    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_count: torch.Tensor
    packed_recv_src_info: torch.Tensor
    packed_recv_layout_range: torch.Tensor


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """Same values as `t` [L, N, G], stored as [L, G, N] and viewed transposed (V1's TMA-friendly layout)."""
    out = torch.empty(t.size(0), t.size(2), t.size(1), dtype=t.dtype, device=t.device).transpose(1, 2)
    return out.copy_(t)


def low_latency_dispatch(
    rank: int,
    x: Tensors,
    topk_idx: Tensors,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    *,
    use_fp8: bool = True,
    round_scale: bool = False,
    use_ue8m0: bool = False,
) -> LowLatencyDispatchResult:
    """Rank `rank`'s low-latency receive tensors; `x` and `topk_idx` are indexed by source rank.

    Local expert e receives each token whose top-k contains expert rank*L + e (once, even if listed twice).
    Rows of e: sources in rank order, tokens in order within a source, packed from row 0; the rows from
    source s are [begin, begin + count) with packed_recv_layout_range[e][s] = (begin << 32) | count.
    Rows past recv_count[e] are zeros (a kernel may leave garbage there; only valid rows are compared).
    FP8 rows are quantized on the source rank with deep_ep.fp8's formula; scales are column-major.
    """
    num_ranks, m = len(x), num_max_dispatch_tokens_per_rank
    num_local_experts = num_experts // num_ranks
    device, hidden = x[rank].device, x[rank].size(1)
    payload = x
    scales = None
    if use_fp8:
        quantized = [per_token_cast_to_fp8(xs, round_scale=round_scale) for xs in x]
        payload = [q for q, _ in quantized]
        source_scales = [s for _, s in quantized]
        scales = torch.zeros(
            num_local_experts, num_ranks * m, hidden // 128, dtype=torch.float32, device=device
        )
    recv_x = torch.zeros(num_local_experts, num_ranks * m, hidden, dtype=payload[0].dtype, device=device)
    src_info = torch.zeros(num_local_experts, num_ranks * m, dtype=torch.int32, device=device)
    layout_range = torch.zeros(num_local_experts, num_ranks, dtype=torch.int64, device=device)
    recv_count = torch.zeros(num_local_experts, dtype=torch.int32, device=device)
    for e in range(num_local_experts):
        expert, row = rank * num_local_experts + e, 0
        for s in range(num_ranks):
            tokens = (topk_idx[s].long() == expert).any(dim=1).nonzero().squeeze(1)
            n = tokens.numel()
            recv_x[e, row : row + n] = payload[s][tokens]
            if scales is not None:
                scales[e, row : row + n] = source_scales[s][tokens]
            src_info[e, row : row + n] = tokens.int()
            layout_range[e, s] = (row << 32) | n
            row += n
        recv_count[e] = row
    if scales is not None:
        scales = _column_major(pack_ue8m0(scales) if use_ue8m0 else scales)
    return LowLatencyDispatchResult(recv_x, scales, recv_count, src_info, layout_range)


def low_latency_combine(
    rank: int,
    x: Tensors,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    packed_recv_src_info: Tensors,
    packed_recv_layout_range: Tensors,
    num_experts: int,
) -> torch.Tensor:
    """Rank `rank`'s low-latency combine output [T, H] bf16.

    `x`, `packed_recv_src_info`, `packed_recv_layout_range` are indexed by the rank owning the experts
    (each rank's expert outputs [L, >= rows used, H] and its handle); topk_idx/topk_weights are this rank's.
    For each token t: acc = +0.0; for k = 0..K-1 with topk_idx[t,k] = g != -1:
    acc = float32(acc + float32(topk_weights[t,k] * float32(x_owner(g)[g mod L][row of t])))
    (a kernel that fuses the multiply-add differs by float32 rounding only); output bf16(acc).
    """
    num_ranks = len(x)
    num_local_experts = num_experts // num_ranks
    num_tokens, num_topk = topk_idx.shape
    device, hidden = x[rank].device, x[rank].size(-1)
    # row_of[g][t]: row of global expert g's receive tensor holding this rank's token t, or -1.
    row_of = torch.full((num_experts, num_tokens), -1, dtype=torch.int64, device=device)
    for d in range(num_ranks):
        begin, count = unpack_layout_range(packed_recv_layout_range[d][:, rank])
        for e in range(num_local_experts):
            b, c = int(begin[e]), int(count[e])
            tokens = packed_recv_src_info[d][e, b : b + c].long()
            row_of[d * num_local_experts + e, tokens] = torch.arange(b, b + c, device=device)
    idx = topk_idx.long()
    token_ids = torch.arange(num_tokens, device=device)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    for k in range(num_topk):
        valid = idx[:, k] >= 0
        expert = idx[:, k].clamp_min(0)
        rows = row_of[expert, token_ids]
        missing = valid & (rows < 0)
        if bool(missing.any()):
            t = int(missing.nonzero()[0])
            raise ValueError(f"handle: token {t} of rank {rank} was not received by expert {int(expert[t])}")
        values = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
        owner = expert.div(num_local_experts, rounding_mode="floor")
        for d in range(num_ranks):
            sel = (valid & (owner == d)).nonzero().squeeze(1)
            values[sel] = x[d][expert[sel] % num_local_experts, rows[sel]].float()
        product = topk_weights[:, k : k + 1].float() * values
        acc = torch.where(valid.unsqueeze(1), acc + product, acc)
    return acc.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# (b) The reference backend
# ---------------------------------------------------------------------------------------------------------


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
        **unused_options,
    ) -> None:
        if group is None:
            raise ValueError("group: the reference backend needs a torch.distributed process group")
        self.group, self.rank, self.num_ranks = group, rank, num_ranks
        self.device = torch.device(device)
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
    def _wait(previous_event) -> None:
        EventOverlap(previous_event).current_stream_wait()

    def _event(self, async_finish: bool):
        return record_event(self.device) if async_finish else None

    # --- normal mode ----------------------------------------------------------------------------------

    def get_dispatch_layout(
        self, topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
    ):
        self._wait(previous_event)
        per_rank, per_expert, in_rank = dispatch_layout(topk_idx, num_experts, self.num_ranks)
        return per_rank, None, per_expert, in_rank, self._event(async_finish)

    def dispatch(self, args, config, previous_event, async_finish, allocate_on_comm_stream):
        self._wait(previous_event)
        handle = args.handle
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
            ]
        )
        xs, scales, in_rank, per_rank, per_expert, idx, weights = (list(col) for col in zip(*gathered))
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
        return (*result, self._event(async_finish))

    def combine(self, args, config, previous_event, async_finish, allocate_on_comm_stream):
        self._wait(previous_event)
        handle = args.handle
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
        gathered = self._all_gather([x, topk_idx])
        xs, idx = (list(col) for col in zip(*gathered))
        _check_agree("x", [t.size(1) for t in xs])
        result = low_latency_dispatch(
            self.rank,
            xs,
            idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            use_fp8=use_fp8,
            round_scale=round_scale and use_fp8,
            use_ue8m0=use_ue8m0,
        )
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += result.recv_count
        # dispatch_wait_recv_cost_stats: nothing is waited for here, so nothing is added.
        return (*result, self._event(async_finish), self._hook(return_recv_hook))

    def low_latency_combine(
        self, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out
    ):
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
        return combined, self._event(async_finish), self._hook(return_recv_hook)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        self._next_combine_buffer = None  # nothing else is kept between calls

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
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
