"""Inputs for every rank from one seed, and comparisons shared by the CPU and GPU tests.

Every rank calls `make_inputs` with the same arguments and gets ALL ranks' inputs, so it can compute the
expected output of any rank locally (with deep_ep.reference's pure functions or a brute-force loop),
without communicating.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Optional

import torch

from deep_ep.backends.fp8 import per_token_cast_to_fp8
from deep_ep.handles import unpack_layout_range

ROUTINGS = ("uniform", "all_to_one_rank", "with_minus_one")
# A float32 sum rounded to BF16 (round to nearest even) is within half a BF16 ulp (2**-8 relative) of the
# exact sum; two float32 sums of the same terms in a different order may round to neighbouring BF16
# values, so results of different reduction orders agree within one ulp: 2**-7 relative.
BF16_HALF_ULP = 2.0**-8
BF16_ULP = 2.0**-7


class RankInputs(NamedTuple):
    x: torch.Tensor  # [T, H] bf16
    x_fp8: Optional[tuple]  # (float8_e4m3fn [T, H], float32 [T, H/128]) when dtype is FP8, else None
    topk_idx: torch.Tensor  # [T, k] int64, -1 = no expert
    topk_weights: torch.Tensor  # [T, k] float32


def make_inputs(
    seed: int,
    rank_count: int,
    tokens_per_rank: Sequence[int],
    hidden: int,
    num_experts: int,
    topk: int,
    routing: str = "uniform",
    dtype: torch.dtype = torch.bfloat16,
) -> list[RankInputs]:
    """All ranks' inputs, identical on every caller (one CPU generator, ranks generated in order).

    routing: "uniform" - top-k of uniform random scores (distinct experts per token);
             "all_to_one_rank" - every token picks only experts of rank seed % rank_count (slots beyond the
             rank's expert count are -1);
             "with_minus_one" - uniform, then ~30% of the slots set to -1 and token 0 of each rank fully -1.
    dtype: torch.bfloat16, or torch.float8_e4m3fn to also produce the FP8 tuple of x.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing: expected one of {ROUTINGS}, got {routing!r}")
    if len(tokens_per_rank) != rank_count:
        raise ValueError(f"tokens_per_rank: expected {rank_count} entries, got {len(tokens_per_rank)}")
    gen = torch.Generator().manual_seed(seed)
    num_local_experts = num_experts // rank_count
    inputs = []
    for num_tokens in tokens_per_rank:
        x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
        if routing == "all_to_one_rank":
            target = seed % rank_count
            k = min(topk, num_local_experts)
            scores = torch.rand(num_tokens, num_local_experts, generator=gen)
            local = scores.topk(k, dim=1).indices + target * num_local_experts
            topk_idx = torch.full((num_tokens, topk), -1, dtype=torch.int64)
            topk_idx[:, :k] = local
        else:
            scores = torch.rand(num_tokens, num_experts, generator=gen)
            topk_idx = scores.topk(topk, dim=1).indices
            if routing == "with_minus_one":
                drop = torch.rand(num_tokens, topk, generator=gen) < 0.3
                topk_idx = topk_idx.masked_fill(drop, -1)
                topk_idx[:1] = -1
        topk_weights = torch.rand(num_tokens, topk, generator=gen) + 0.1
        x_fp8 = per_token_cast_to_fp8(x) if dtype == torch.float8_e4m3fn else None
        inputs.append(RankInputs(x, x_fp8, topk_idx.contiguous(), topk_weights))
    return inputs


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality for any dtype (torch.equal has no FP8 kernel on CPU); shapes must match."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def assert_bf16_close(
    actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0, what: str = ""
) -> None:
    """|actual - expected| <= ulps * BF16_ULP * |expected| elementwise (see BF16_ULP for why one ulp)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.float(), expected.float()
    bad = (a - e).abs() > ulps * BF16_ULP * e.abs()
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} elements differ by more than {ulps} bf16 ulp"


def low_latency_blocks(layout_range: torch.Tensor, recv_count: torch.Tensor) -> list[list[torch.Tensor]]:
    """Rows of each (local expert, source rank) block; checks that the blocks tile [0, recv_count[e])."""
    begin, count = unpack_layout_range(layout_range.cpu())
    blocks = []
    for e in range(layout_range.size(0)):
        spans = sorted((int(b), int(c)) for b, c in zip(begin[e], count[e]) if int(c) > 0)
        covered = 0
        for b, c in spans:
            assert b == covered, f"expert {e}: row blocks {spans} do not tile [0, {int(recv_count[e])})"
            covered += c
        assert covered == int(recv_count[e]), (
            f"expert {e}: blocks cover {covered} rows, recv_count {int(recv_count[e])}"
        )
        blocks.append([torch.arange(int(b), int(b) + int(c)) for b, c in zip(begin[e], count[e])])
    return blocks


def assert_low_latency_dispatch_equivalent(actual, expected) -> None:
    """Compare two low-latency dispatch outputs as multisets of rows per (local expert, source rank).

    Each argument is (recv_x or (fp8, scales), recv_count, packed_recv_src_info, packed_recv_layout_range).
    A kernel may order the blocks of an expert and the rows inside a block differently from the reference;
    the rows themselves (payload and scales) must be bit-identical, matched by source token index.
    """
    a_x, a_count, a_src, a_range = (t.cpu() if isinstance(t, torch.Tensor) else t for t in actual)
    e_x, e_count, e_src, e_range = (t.cpu() if isinstance(t, torch.Tensor) else t for t in expected)
    assert torch.equal(a_count, e_count), f"recv_count {a_count.tolist()} != {e_count.tolist()}"
    a_parts = [t.cpu() for t in a_x] if isinstance(a_x, (tuple, list)) else [a_x]
    e_parts = [t.cpu() for t in e_x] if isinstance(e_x, (tuple, list)) else [e_x]
    assert len(a_parts) == len(e_parts), "one output is FP8, the other is not"
    a_blocks, e_blocks = low_latency_blocks(a_range, a_count), low_latency_blocks(e_range, e_count)
    for e, (a_rows_by_src, e_rows_by_src) in enumerate(zip(a_blocks, e_blocks)):
        for s, (a_rows, e_rows) in enumerate(zip(a_rows_by_src, e_rows_by_src)):
            where = f"expert {e}, source rank {s}"
            assert a_rows.numel() == e_rows.numel(), f"{where}: {a_rows.numel()} rows != {e_rows.numel()}"
            a_tokens, a_order = a_src[e, a_rows].sort()
            e_tokens, e_order = e_src[e, e_rows].sort()
            assert torch.equal(a_tokens, e_tokens), (
                f"{where}: source tokens {a_tokens.tolist()} != {e_tokens.tolist()}"
            )
            for part, (a_part, e_part) in enumerate(zip(a_parts, e_parts)):
                got, want = a_part[e, a_rows[a_order]], e_part[e, e_rows[e_order]]
                assert bytes_equal(got, want), f"{where}: rows differ (part {part})"


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """`name=value` while the block runs (e.g. DEEP_EP_TIMEOUT_S, read when a Buffer is created); rank
    processes of a pool are reused by later tests, so the old value comes back afterwards."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def low_latency_compiled() -> bool:
    """A CUDA GPU and deep_ep._C built with NVSHMEM: what the low-latency GPU tests need."""
    try:
        from deep_ep import _C  # noqa: PLC0415 - optional compiled extension
    except (ImportError, OSError):
        return False
    return torch.cuda.is_available() and bool(getattr(_C, "low_latency_compiled", False))
