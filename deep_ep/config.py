"""Performance config, default configs per rank count, and the buffer sizes.

Buffer sizes come from one description of each buffer's layout, the C++ one the kernels use
(csrc/runtime/size_hints.hpp): the size hints users allocate with and the capacity checks that reject an
operation the buffer cannot hold both ask it, so a Buffer sized by a hint always passes the checks for the
shapes it was sized for. Where the extension is not built (a reference-only install) a Python transcription of
the same formulas stands in; tests/test_extension.py checks in CI that the two agree.
"""

from __future__ import annotations

import os
from typing import Optional

from .topology import MAX_NVL_RANKS, env_num_nvl_ranks

try:
    from ._C import layout as _cpp_layout
except (ImportError, OSError):  # not built, or no CUDA driver: the transcription below stands in
    _cpp_layout = None

# Bytes reserved in every NVLink buffer for barriers, counters and per-op metadata.
NVL_CONTROL_BYTES = 1 << 20
# Every hint is rounded up to this, the granularity CUDA IPC / VMM allocations come in anyway.
BUFFER_ALIGNMENT_BYTES = 2 << 20
# Largest top-k accepted by normal dispatch (and assumed by the NVL size hints).
MAX_NUM_TOPK = 16
# Largest top-k accepted by low-latency dispatch/combine (DeepEP V1's kernel limit).
LOW_LATENCY_MAX_NUM_TOPK = 9
# Low-latency limits of the kernels' tables: experts (a shared-memory histogram) and tokens per rank (the
# count field of a signal word).
LOW_LATENCY_MAX_EXPERTS = 4096
LOW_LATENCY_MAX_TOKENS_PER_RANK = 16383
# Hidden sizes low-latency ops accept (DeepEP V1's instantiations).
LOW_LATENCY_SUPPORTED_HIDDEN = (2048, 2560, 4096, 5120, 7168, 8192)
# FP8 scales cover this many consecutive hidden elements each.
FP8_SCALE_BLOCK = 128
# Largest number of experts one rank may own (the kernels' per-rank expert count tables).
MAX_LOCAL_EXPERTS = 2048

# How long any wait for a peer may take before it becomes an error naming the operation, on both backends;
# read when a Buffer is created.
TIMEOUT_ENV = "DEEP_EP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 100.0


def peer_timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


# DeepEP V1's SM budget: of Config() and of the default configs (Buffer.num_sms).
DEFAULT_NUM_SMS = 20


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
    The defaults are V1's: `Config()` is `Config(20, 6, 256, 6, 256)`.
    """

    def __init__(
        self,
        num_sms: int = DEFAULT_NUM_SMS,
        num_max_nvl_chunked_send_tokens: int = 6,
        num_max_nvl_chunked_recv_tokens: int = 256,
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
        self,
        hidden_bytes: int,
        num_ranks: int,
        *,
        num_max_tokens_per_rank: int = 4096,
        num_nvl_ranks: Optional[int] = None,
    ) -> int:
        """Bytes of symmetric (RDMA) buffer per rank for inter-node normal dispatch + combine of up to
        `num_max_tokens_per_rank` tokens per rank, with nodes of `num_nvl_ranks` ranks (None:
        DEEP_EP_NUM_NVL_RANKS if set, else min(8, num_ranks))."""
        if num_nvl_ranks is None:
            from_env = env_num_nvl_ranks()
            num_nvl_ranks = min(MAX_NVL_RANKS, num_ranks) if from_env is None else from_env
        return internode_size_hint(
            hidden_bytes, num_ranks, num_nvl_ranks, num_max_tokens_per_rank=num_max_tokens_per_rank
        )


# ---------------------------------------------------------------------------------------------------------
# Size formulas (shared by hints and validation)
# ---------------------------------------------------------------------------------------------------------


def _align16(num_bytes: int) -> int:
    return _round_up(num_bytes, 16)


class _PythonLayout:
    """The C++ layouts' sizes (csrc/kernels/common/buffer_layout.cuh, LowLatencyLayout), transcribed."""

    @staticmethod
    def nvl_dispatch_bytes(hidden_bytes, num_scales, num_topk, num_ranks, num_tokens):
        # One staged row: x, float32 scales, int32 top-k ids, float32 top-k weights; then per-rank send lists.
        stride = _align16(_align16(hidden_bytes) + num_scales * 4 + num_topk * 8)
        return NVL_CONTROL_BYTES + num_tokens * stride + num_ranks * num_tokens * 4

    @staticmethod
    def nvl_combine_bytes(hidden, num_topk, num_rows):
        return NVL_CONTROL_BYTES + num_rows * (_align16(hidden * 2) + _align16(num_topk * 4))

    @staticmethod
    def nvl_size_hint(hidden_bytes, num_ranks, num_max_tokens_per_rank):
        num_scales = -(-hidden_bytes // FP8_SCALE_BLOCK)
        dispatch = _PythonLayout.nvl_dispatch_bytes(
            hidden_bytes, num_scales, MAX_NUM_TOPK, num_ranks, num_max_tokens_per_rank
        )
        combine = _PythonLayout.nvl_combine_bytes(
            (hidden_bytes + 1) // 2, MAX_NUM_TOPK, num_ranks * num_max_tokens_per_rank
        )
        return _round_up(max(dispatch, combine), BUFFER_ALIGNMENT_BYTES)

    @staticmethod
    def low_latency_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        # Two sets, each: 16 bytes of signals per expert, a send and a receive region of rows of a 16-byte
        # header plus BF16 [hidden] (an FP8 row with its scales is smaller).
        m, row = num_max_dispatch_tokens_per_rank, 16 + hidden * 2
        send = max(m * row, num_experts * m * hidden * 2)
        return 2 * (num_experts * 16 + send + num_experts * m * row)

    @staticmethod
    def low_latency_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        needed = _PythonLayout.low_latency_bytes(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )
        return _round_up(needed, BUFFER_ALIGNMENT_BYTES)

    # Inter-node normal mode: one symmetric (NVSHMEM) buffer per rank; N = num_ranks // num_nvl_ranks nodes.

    @staticmethod
    def internode_control_bytes(num_ranks, num_nvl_ranks):
        # Signal words (8 bytes each) and counters, then the messages: [2 parities][R] in and [R] out, one
        # row of int32 per rank (a 16-int header, then per-rank counts, per-node counts, a slice of the
        # per-expert counts, the sender's num_worst_tokens).
        num_nodes = num_ranks // num_nvl_ranks
        msg_ints = 16 + _round_up(num_ranks + num_nodes + MAX_LOCAL_EXPERTS + 1, 4)
        counters = 8 * (num_ranks + 2 * num_nodes + num_nvl_ranks)
        signal_bytes = _round_up(counters + 64, 4096)
        return _round_up(signal_bytes + 3 * num_ranks * msg_ints * 4, 4096)

    @staticmethod
    def internode_dispatch_stride(hidden_bytes, num_scales, num_topk):
        # One row: a 16-byte header, x, float32 scales, int32 top-k ids + float32 top-k weights.
        return _align16(16 + _align16(hidden_bytes) + num_scales * 4 + num_topk * 8)

    @staticmethod
    def internode_dispatch_bytes(hidden_bytes, num_scales, num_topk, num_ranks, num_nvl_ranks, num_tokens):
        stride = _PythonLayout.internode_dispatch_stride(hidden_bytes, num_scales, num_topk)
        num_nodes = num_ranks // num_nvl_ranks
        control = _PythonLayout.internode_control_bytes(num_ranks, num_nvl_ranks)
        # Token slots come in fours, so that every list area keeps the rows after it 16-byte aligned.
        slots = _round_up(num_tokens, 4)
        return control + slots * (stride + num_nodes * (stride + 8 * num_nvl_ranks))

    @staticmethod
    def internode_combine_stride(hidden, num_topk):
        return _align16(hidden * 2) + _align16(num_topk * 4)

    @staticmethod
    def internode_combine_call_bytes(
        hidden, num_topk, num_ranks, num_nvl_ranks, num_staged_rows, num_forwarded, num_tokens
    ):
        # Rows staged (none with direct reads) and forwarded from the front, a partial sum per token and
        # other node from the back.
        num_other_nodes = num_ranks // num_nvl_ranks - 1
        control = _PythonLayout.internode_control_bytes(num_ranks, num_nvl_ranks)
        stride = _PythonLayout.internode_combine_stride(hidden, num_topk)
        return control + (num_staged_rows + num_forwarded + num_other_nodes * num_tokens) * stride

    @staticmethod
    def internode_combine_bytes(hidden, num_topk, num_ranks, num_nvl_ranks, num_tokens):
        # The worst case: every token of every rank staged here, every token of each other node's
        # counterpart forwarded.
        num_other_nodes = num_ranks // num_nvl_ranks - 1
        return _PythonLayout.internode_combine_call_bytes(
            hidden,
            num_topk,
            num_ranks,
            num_nvl_ranks,
            num_ranks * num_tokens,
            num_other_nodes * num_tokens,
            num_tokens,
        )

    @staticmethod
    def internode_size_hint(hidden_bytes, num_ranks, num_nvl_ranks, num_max_tokens_per_rank):
        num_scales = -(-hidden_bytes // FP8_SCALE_BLOCK)
        dispatch = _PythonLayout.internode_dispatch_bytes(
            hidden_bytes, num_scales, MAX_NUM_TOPK, num_ranks, num_nvl_ranks, num_max_tokens_per_rank
        )
        combine = _PythonLayout.internode_combine_bytes(
            (hidden_bytes + 1) // 2, MAX_NUM_TOPK, num_ranks, num_nvl_ranks, num_max_tokens_per_rank
        )
        return _round_up(max(dispatch, combine), BUFFER_ALIGNMENT_BYTES)


# The sizes every check and hint uses: the C++ layouts themselves when the extension is built.
layout = _cpp_layout if _cpp_layout is not None else _PythonLayout
# An extension built before the current inter-node layout lacks its functions: the transcription stands in.
internode_layout = layout if hasattr(layout, "internode_combine_call_bytes") else _PythonLayout


def nvl_dispatch_bytes(
    hidden_bytes: int, num_scales: int, num_topk: int, num_ranks: int, num_tokens: int
) -> int:
    """NVLink buffer bytes a rank needs to dispatch `num_tokens` rows of `hidden_bytes` bytes with
    `num_scales` float32 scales and `num_topk` top-k entries each (control region included)."""
    return layout.nvl_dispatch_bytes(hidden_bytes, num_scales, num_topk, num_ranks, num_tokens)


def nvl_combine_bytes(hidden: int, num_topk: int, num_rows: int) -> int:
    """NVLink buffer bytes a rank needs to combine `num_rows` received BF16 rows (control region included)."""
    return layout.nvl_combine_bytes(hidden, num_topk, num_rows)


def low_latency_bytes(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Symmetric (NVSHMEM) bytes per rank of low-latency dispatch + combine, exactly."""
    return layout.low_latency_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)


def nvl_buffer_size_hint(hidden_bytes: int, num_ranks: int, *, num_max_tokens_per_rank: int = 4096) -> int:
    """Smallest 2 MiB multiple that holds a dispatch of `num_max_tokens_per_rank` tokens (BF16, or FP8 with
    scales, any top-k) and the combine of everything all ranks could send back."""
    _check_positive_int("hidden_bytes", hidden_bytes)
    _check_positive_int("num_ranks", num_ranks)
    _check_positive_int("num_max_tokens_per_rank", num_max_tokens_per_rank, allow_zero=True)
    return layout.nvl_size_hint(hidden_bytes, num_ranks, num_max_tokens_per_rank)


def _check_num_nvl_ranks(num_ranks: int, num_nvl_ranks: int) -> None:
    _check_positive_int("num_ranks", num_ranks)
    _check_positive_int("num_nvl_ranks", num_nvl_ranks)
    if num_nvl_ranks > MAX_NVL_RANKS or num_ranks % num_nvl_ranks != 0:
        raise ValueError(
            f"num_nvl_ranks: must be at most {MAX_NVL_RANKS} and divide num_ranks={num_ranks}, got {num_nvl_ranks}"
        )


def internode_dispatch_bytes(
    hidden_bytes: int, num_scales: int, num_topk: int, num_ranks: int, num_nvl_ranks: int, num_tokens: int
) -> int:
    """Symmetric buffer bytes a rank of an inter-node Buffer needs to dispatch `num_tokens` rows of
    `hidden_bytes` bytes with `num_scales` float32 scales and `num_topk` top-k entries each (control region
    included)."""
    _check_positive_int("hidden_bytes", hidden_bytes)
    _check_positive_int("num_scales", num_scales, allow_zero=True)
    _check_positive_int("num_topk", num_topk, allow_zero=True)
    _check_num_nvl_ranks(num_ranks, num_nvl_ranks)
    _check_positive_int("num_tokens", num_tokens, allow_zero=True)
    return internode_layout.internode_dispatch_bytes(
        hidden_bytes, num_scales, num_topk, num_ranks, num_nvl_ranks, num_tokens
    )


def internode_combine_bytes(
    hidden: int, num_topk: int, num_ranks: int, num_nvl_ranks: int, num_tokens: int
) -> int:
    """Symmetric buffer bytes a rank of an inter-node Buffer needs to combine BF16 rows of `hidden` values
    back into up to `num_tokens` tokens per rank, whatever the routing and with the rows staged (control
    region included)."""
    _check_positive_int("hidden", hidden)
    _check_positive_int("num_topk", num_topk, allow_zero=True)
    _check_num_nvl_ranks(num_ranks, num_nvl_ranks)
    _check_positive_int("num_tokens", num_tokens, allow_zero=True)
    return internode_layout.internode_combine_bytes(hidden, num_topk, num_ranks, num_nvl_ranks, num_tokens)


def internode_combine_call_bytes(
    hidden: int,
    num_topk: int,
    num_ranks: int,
    num_nvl_ranks: int,
    num_staged_rows: int,
    num_forwarded: int,
    num_tokens: int,
) -> int:
    """Symmetric buffer bytes one inter-node combine uses on a rank: `num_staged_rows` received rows staged
    (0 when the node reads its inputs in place, the default outside CUDA graph capture), `num_forwarded` rows
    summed as forwarder (the handle's forward map), a partial sum per token of its `num_tokens` and other
    node (control region included). internode_combine_bytes is the worst case of it."""
    _check_positive_int("hidden", hidden)
    _check_positive_int("num_topk", num_topk, allow_zero=True)
    _check_num_nvl_ranks(num_ranks, num_nvl_ranks)
    for name, value in (
        ("num_staged_rows", num_staged_rows),
        ("num_forwarded", num_forwarded),
        ("num_tokens", num_tokens),
    ):
        _check_positive_int(name, value, allow_zero=True)
    return internode_layout.internode_combine_call_bytes(
        hidden, num_topk, num_ranks, num_nvl_ranks, num_staged_rows, num_forwarded, num_tokens
    )


def internode_size_hint(
    hidden_bytes: int, num_ranks: int, num_nvl_ranks: int, *, num_max_tokens_per_rank: int = 4096
) -> int:
    """Smallest 2 MiB multiple that holds an inter-node dispatch of `num_max_tokens_per_rank` tokens per rank
    (BF16, or FP8 with scales, any top-k) and its combine."""
    _check_positive_int("hidden_bytes", hidden_bytes)
    _check_num_nvl_ranks(num_ranks, num_nvl_ranks)
    _check_positive_int("num_max_tokens_per_rank", num_max_tokens_per_rank, allow_zero=True)
    return internode_layout.internode_size_hint(
        hidden_bytes, num_ranks, num_nvl_ranks, num_max_tokens_per_rank
    )


def low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    _check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
    _check_positive_int("hidden", hidden)
    _check_positive_int("num_ranks", num_ranks)
    _check_positive_int("num_experts", num_experts)
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts: must be divisible by num_ranks={num_ranks}, got {num_experts}")
    return layout.low_latency_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)


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
