"""Performance config, default configs per rank count, and every buffer-size formula.

The size formulas live here, in one place, because two parties must agree on them: the size hints users call
to allocate a Buffer, and the capacity checks in `deep_ep.validation` that reject an operation the buffer
cannot hold. A buffer sized with a hint always passes the checks for the shapes the hint was asked about.
"""

from __future__ import annotations

import math

# Bytes reserved in every NVLink buffer for barriers, counters and per-op metadata.
NVL_CONTROL_BYTES = 1 << 20
# Every hint is rounded up to this, the granularity CUDA IPC / VMM allocations come in anyway.
BUFFER_ALIGNMENT_BYTES = 2 << 20
# Rows staged in a buffer start on 16-byte boundaries so kernels can copy them with 128-bit accesses.
ROW_ALIGNMENT_BYTES = 16
# Largest top-k accepted by normal dispatch (and assumed by the NVL size hints).
MAX_NUM_TOPK = 16
# Largest top-k accepted by low-latency dispatch/combine (DeepEP V1's kernel limit).
LOW_LATENCY_MAX_NUM_TOPK = 9
# Hidden sizes the low-latency kernels are instantiated for.
LOW_LATENCY_SUPPORTED_HIDDEN = (2048, 2560, 4096, 5120, 7168, 8192)
# FP8 scales cover this many consecutive hidden elements each.
FP8_SCALE_BLOCK = 128

DEFAULT_NUM_SMS = 24


def _round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _check_positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name}: must be {bound}, got {value}")
    return value


class Config:
    """Performance knobs of normal (intra-/inter-node) dispatch and combine, DeepEP V1 compatible.

    `num_sms` is the SM budget of the communication kernels; the chunk sizes are V1's tuning knobs (our
    pull-based intra-node kernels read only `num_sms`, the others are kept so V1 code runs unchanged).
    """

    def __init__(
        self,
        num_sms: int,
        num_max_nvl_chunked_send_tokens: int,
        num_max_nvl_chunked_recv_tokens: int,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ) -> None:
        self.num_sms = _check_positive_int("num_sms", num_sms)
        self.num_max_nvl_chunked_send_tokens = _check_positive_int(
            "num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens
        )
        self.num_max_nvl_chunked_recv_tokens = _check_positive_int(
            "num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens
        )
        self.num_max_rdma_chunked_send_tokens = _check_positive_int(
            "num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens
        )
        self.num_max_rdma_chunked_recv_tokens = _check_positive_int(
            "num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens
        )
        # A sender chunk larger than the receiver's window could never be admitted (V1 asserts the same).
        if num_max_nvl_chunked_send_tokens > num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "num_max_nvl_chunked_send_tokens: must be <= num_max_nvl_chunked_recv_tokens "
                f"({num_max_nvl_chunked_send_tokens} > {num_max_nvl_chunked_recv_tokens})"
            )
        if num_max_rdma_chunked_send_tokens > num_max_rdma_chunked_recv_tokens:
            raise ValueError(
                "num_max_rdma_chunked_send_tokens: must be <= num_max_rdma_chunked_recv_tokens "
                f"({num_max_rdma_chunked_send_tokens} > {num_max_rdma_chunked_recv_tokens})"
            )

    def _fields(self) -> tuple[int, int, int, int, int]:
        return (
            self.num_sms,
            self.num_max_nvl_chunked_send_tokens,
            self.num_max_nvl_chunked_recv_tokens,
            self.num_max_rdma_chunked_send_tokens,
            self.num_max_rdma_chunked_recv_tokens,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "Config(num_sms={}, nvl_send={}, nvl_recv={}, rdma_send={}, rdma_recv={})".format(
            *self._fields()
        )

    def get_nvl_buffer_size_hint(
        self, hidden_bytes: int, num_ranks: int, *, num_max_tokens_per_rank: int = 4096
    ) -> int:
        """Bytes of NVLink buffer per rank for normal dispatch + combine of up to `num_max_tokens_per_rank`
        tokens per rank. `hidden_bytes` is V1's convention: `hidden * max(x.element_size(), 2)`."""
        return nvl_buffer_size_hint(hidden_bytes, num_ranks, num_max_tokens_per_rank=num_max_tokens_per_rank)

    def get_rdma_buffer_size_hint(
        self, hidden_bytes: int, num_ranks: int, *, num_max_tokens_per_rank: int = 4096
    ) -> int:
        """Bytes of RDMA buffer per rank for inter-node normal mode; for now the NVL formula over all ranks."""
        return nvl_buffer_size_hint(hidden_bytes, num_ranks, num_max_tokens_per_rank=num_max_tokens_per_rank)


# ---------------------------------------------------------------------------------------------------------
# Size formulas (shared by hints and validation)
# ---------------------------------------------------------------------------------------------------------


def dispatch_row_bytes(hidden_bytes: int, num_topk: int) -> int:
    """Bytes of one staged dispatch row: hidden bytes, per-128 float32 scales, top-k ids and weights.

    Scales are counted as `ceil(hidden_bytes / 128) * 4` even for BF16 rows: `hidden <= hidden_bytes`, so this
    bounds the FP8 case exactly and the BF16 case from above, and one formula serves both.
    """
    scale_bytes = math.ceil(hidden_bytes / FP8_SCALE_BLOCK) * 4
    topk_bytes = num_topk * (4 + 4)  # int32 expert id + float32 weight per slot
    return _round_up(hidden_bytes + scale_bytes + topk_bytes, ROW_ALIGNMENT_BYTES)


def combine_row_bytes(hidden_bytes: int, num_topk: int) -> int:
    """Bytes of one staged combine row: the BF16 expert output and its float32 top-k weights."""
    return _round_up(hidden_bytes + num_topk * 4, ROW_ALIGNMENT_BYTES)


def nvl_buffer_bytes_needed(
    num_rows: int, hidden_bytes: int, num_ranks: int, num_topk: int, kind: str
) -> int:
    """NVLink buffer bytes one rank needs for one operation.

    kind="dispatch": `num_rows` = tokens this rank sends; each is staged once, whatever the number of
        receivers, plus one int32 send list of up to `num_rows` entries per destination rank.
    kind="combine": `num_rows` = rows this rank received in the dispatch and now sends back.
    Both include `NVL_CONTROL_BYTES` of control space.
    """
    if kind == "dispatch":
        payload = num_rows * dispatch_row_bytes(hidden_bytes, num_topk) + num_ranks * num_rows * 4
    elif kind == "combine":
        payload = num_rows * combine_row_bytes(hidden_bytes, num_topk)
    else:
        raise ValueError(f"kind: expected 'dispatch' or 'combine', got {kind!r}")
    return NVL_CONTROL_BYTES + payload


def nvl_buffer_size_hint(hidden_bytes: int, num_ranks: int, *, num_max_tokens_per_rank: int = 4096) -> int:
    """Smallest 2 MiB multiple that holds a dispatch of `num_max_tokens_per_rank` tokens and the combine of
    everything all ranks could send back (`num_ranks * num_max_tokens_per_rank` rows), for any top-k."""
    _check_positive_int("hidden_bytes", hidden_bytes)
    _check_positive_int("num_ranks", num_ranks)
    _check_positive_int("num_max_tokens_per_rank", num_max_tokens_per_rank, allow_zero=True)
    dispatch = nvl_buffer_bytes_needed(
        num_max_tokens_per_rank, hidden_bytes, num_ranks, MAX_NUM_TOPK, "dispatch"
    )
    combine = nvl_buffer_bytes_needed(
        num_ranks * num_max_tokens_per_rank, hidden_bytes, num_ranks, MAX_NUM_TOPK, "combine"
    )
    return _round_up(max(dispatch, combine), BUFFER_ALIGNMENT_BYTES)


def low_latency_buffer_bytes_needed(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """RDMA (NVSHMEM) bytes per rank for low-latency dispatch + combine; an upper bound for any layout.

    One message is a BF16 row plus a 16-byte header (an FP8 row with its scales, `hidden + hidden / 32`
    bytes, is smaller). Send region: max(dispatch: M own tokens, combine: E * M expert outputs). Receive
    region: E * M slots ([local expert][source rank][token] for dispatch, [global expert][token] for combine).
    Plus two int64 signals per expert, and everything twice: two buffers alternate between consecutive ops.
    """
    m = num_max_dispatch_tokens_per_rank
    message_bytes = 16 + hidden * 2
    send_bytes = max(m * message_bytes, num_experts * m * hidden * 2)
    recv_bytes = num_experts * m * message_bytes
    signal_bytes = 2 * num_experts * 8
    return 2 * (send_bytes + recv_bytes + signal_bytes)


def low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    _check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
    _check_positive_int("hidden", hidden)
    _check_positive_int("num_ranks", num_ranks)
    _check_positive_int("num_experts", num_experts)
    needed = low_latency_buffer_bytes_needed(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)
    return _round_up(needed, BUFFER_ALIGNMENT_BYTES)


# ---------------------------------------------------------------------------------------------------------
# Default configs (DeepEP V1's tuned tables; chunk sizes per rank count)
# ---------------------------------------------------------------------------------------------------------

# num_ranks -> (nvl send, nvl recv, rdma send, rdma recv)
_DISPATCH_CHUNKS = {
    2: (24, 256, 6, 128),
    4: (6, 256, 6, 128),
    8: (6, 256, 6, 128),
    16: (36, 288, 20, 128),
    24: (8, 288, 32, 128),
    32: (32, 288, 32, 128),
    64: (20, 288, 28, 128),
    128: (20, 560, 32, 128),
    144: (32, 720, 12, 128),
    160: (28, 720, 12, 128),
}
_COMBINE_CHUNKS = {
    2: (10, 256, 6, 128),
    4: (9, 256, 6, 128),
    8: (4, 256, 6, 128),
    16: (4, 288, 12, 128),
    24: (1, 288, 8, 128),
    32: (1, 288, 8, 128),
    64: (1, 288, 20, 128),
    128: (1, 560, 12, 128),
    144: (2, 720, 8, 128),
    160: (2, 720, 8, 128),
}
SUPPORTED_NUM_RANKS = tuple(sorted(_DISPATCH_CHUNKS))


def _default_config(table: dict, num_ranks: int, num_sms: int) -> Config:
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int):
        raise TypeError(f"num_ranks: expected an int, got {type(num_ranks).__name__}")
    if num_ranks not in table:
        raise ValueError(
            f"num_ranks: no default config for {num_ranks} ranks (supported: {SUPPORTED_NUM_RANKS})"
        )
    return Config(num_sms, *table[num_ranks])


def default_dispatch_config(num_ranks: int, num_sms: int = DEFAULT_NUM_SMS) -> Config:
    return _default_config(_DISPATCH_CHUNKS, num_ranks, num_sms)


def default_combine_config(num_ranks: int, num_sms: int = DEFAULT_NUM_SMS) -> Config:
    return _default_config(_COMBINE_CHUNKS, num_ranks, num_sms)


def nearest_supported_num_ranks(num_ranks: int) -> int:
    """The smallest rank count with a default config that is >= num_ranks (for groups like 1, 3 or 6 ranks,
    which V1 rejects; our kernels run them, and the next larger table entry is a sane starting point)."""
    for candidate in SUPPORTED_NUM_RANKS:
        if candidate >= num_ranks:
            return candidate
    raise ValueError(f"num_ranks: no default config for {num_ranks} ranks (max {SUPPORTED_NUM_RANKS[-1]})")
