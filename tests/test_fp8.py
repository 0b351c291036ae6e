"""deep_ep.fp8 follows the formula in its docstring (the one the CUDA kernels reproduce)."""

from __future__ import annotations

import math

import pytest
import torch

from deep_ep.backends.fp8 import (
    compute_scales,
    pack_ue8m0,
    per_token_cast_back,
    per_token_cast_to_fp8,
    round_scale_to_pow2,
    unpack_ue8m0,
)


def sample(rows: int = 16, hidden: int = 1024, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen) * torch.logspace(-6, 4, rows).view(-1, 1)
    x[0, :128] = 0  # an all-zero block: amax clamps to 1e-4
    x[1, 128:256] = 3e-5  # a block below the clamp
    return x.to(torch.bfloat16)


def test_scale_is_amax_over_448_with_clamp():
    x = sample()
    scales = compute_scales(x)
    for r in range(x.size(0)):
        for g in range(x.size(1) // 128):
            amax = max(float(x[r, g * 128 : (g + 1) * 128].float().abs().max()), 1e-4)
            want = torch.tensor(amax, dtype=torch.float32) / 448.0
            assert scales[r, g] == want, (r, g)


def test_round_scale_is_next_power_of_two():
    scales = compute_scales(sample())
    rounded = round_scale_to_pow2(scales)
    for s, r in zip(scales.flatten().tolist(), rounded.flatten().tolist()):
        assert r == 2.0 ** math.ceil(math.log2(s)) and r >= s
    powers = torch.tensor([2.0**-20, 0.5, 1.0, 4.0])
    assert torch.equal(round_scale_to_pow2(powers), powers), "powers of two stay"


@pytest.mark.parametrize("round_scale", [False, True])
def test_quantized_values_are_x_over_scale_rounded(round_scale):
    x = sample()
    q, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scales.shape == (16, 8)
    want = (x.float().view(16, 8, 128) / scales.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), want.view(16, -1).view(torch.uint8))
    assert float(q.float().abs().max()) <= 448


@pytest.mark.parametrize("round_scale", [False, True])
def test_dequantization_error_is_within_e4m3_precision(round_scale):
    x = sample()
    q, scales = per_token_cast_to_fp8(x, round_scale=round_scale)
    back = per_token_cast_back(q, scales).float()
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2**-4 for normals; subnormals (below 2**-6
    # in scaled units) are spaced 2**-9, so absolute error <= 2**-10 * scale; BF16 output adds 2**-9 relative.
    bound = x.float().abs() * (2**-4 + 2**-9) + scales.repeat_interleave(128, dim=1) * 2**-10
    assert bool(((back - x.float()).abs() <= bound * 1.001).all())


def test_ue8m0_packs_exponent_bytes_little_endian():
    scales = round_scale_to_pow2(compute_scales(sample(hidden=1536)))  # 12 groups -> 3 int32
    packed = pack_ue8m0(scales)
    assert packed.dtype == torch.int32 and packed.shape == (16, 3)
    exponents = ((scales.view(torch.int32) >> 23) & 0xFF).tolist()
    for r, row in enumerate(packed.tolist()):
        for i, word in enumerate(row):
            for j in range(4):
                assert (word >> (8 * j)) & 0xFF == exponents[r][4 * i + j]
    assert torch.equal(unpack_ue8m0(packed, 12), scales)


def test_ue8m0_pads_a_partial_last_group_with_zero():
    scales = torch.tensor([[0.5, 2.0, 8.0, 1.0, 0.25, 4.0]])  # 6 groups -> 2 int32, last two bytes 0
    packed = pack_ue8m0(scales)
    assert packed.shape == (1, 2) and (int(packed[0, 1]) >> 16) & 0xFFFF == 0
    assert torch.equal(unpack_ue8m0(packed, 6), scales)


def test_ue8m0_cast_matches_round_scale_and_dequantizes_identically():
    x = sample()
    q_round, scales_round = per_token_cast_to_fp8(x, round_scale=True)
    q, packed = per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    assert torch.equal(q.view(torch.uint8), q_round.view(torch.uint8))
    assert torch.equal(per_token_cast_back(q, packed), per_token_cast_back(q_round, scales_round))


def test_ue8m0_requires_round_scale():
    with pytest.raises(ValueError, match="^use_ue8m0:"):
        per_token_cast_to_fp8(sample(), use_ue8m0=True)
