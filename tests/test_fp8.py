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


def _bits(q: torch.Tensor) -> list[int]:
    return q.view(torch.uint8).tolist()


def test_nan_stays_in_its_element():
    """A NaN does not enter its block's amax (the kernels' fmaxf): the block's other values are cast as
    without it, its own byte is an e4m3 NaN and dequantizes to NaN."""
    x = sample(rows=2, hidden=256)
    with_nan = x.clone()
    with_nan[0, 5] = float("nan")
    q, s = per_token_cast_to_fp8(with_nan)
    q_ref, s_ref = per_token_cast_to_fp8(
        torch.where(with_nan.isnan(), 0.0, with_nan.float()).to(torch.bfloat16)
    )
    assert torch.equal(s, s_ref)
    assert q.view(torch.uint8)[0, 5].item() & 0x7F == 0x7F  # S.1111.111: e4m3's NaN
    keep = ~with_nan.isnan()
    assert torch.equal(q.view(torch.uint8)[keep], q_ref.view(torch.uint8)[keep])
    back = per_token_cast_back(q, s)
    assert back[0, 5].isnan() and not back[keep].isnan().any()
    for round_scale in (False, True):  # the rounded scale stays finite too (no NaN bit tricks)
        assert torch.isfinite(per_token_cast_to_fp8(with_nan, round_scale=round_scale)[1]).all()


def test_an_all_nan_block_gets_the_clamped_scale():
    x = sample(rows=4, hidden=256)
    x[2, :128] = float("nan")
    q, s = per_token_cast_to_fp8(x)
    assert s[2, 0] == torch.tensor(1e-4, dtype=torch.float32) / 448.0
    assert all(b & 0x7F == 0x7F for b in _bits(q[2, :128]))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_inf_turns_its_block_to_nan_and_leaves_the_others(sign):
    x = sample(rows=4, hidden=384)[2:3].clone()  # a row of ordinary magnitudes
    x[0, 130] = sign * float("inf")
    for round_scale, use_ue8m0 in ((False, False), (True, False), (True, True)):
        q, s = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
        back = per_token_cast_back(q, s)
        assert back[0, 128:256].isnan().all(), (round_scale, use_ue8m0)
        assert torch.isfinite(back[0, :128]).all() and torch.isfinite(back[0, 256:]).all()
        if use_ue8m0:
            assert (int(s[0, 0]) >> 8) & 0xFF == 0xFF  # block 1's exponent byte
        else:
            assert s[0, 1] == float("inf")
        finite = [b for i, b in enumerate(_bits(q[0, 128:256])) if i != 2]
        assert all(b & 0x7F == 0 for b in finite)  # +-0
