"""Per-128 FP8 (e4m3) casting with float32 scales, UE8M0 packing, and the inverse.

The exact formula (the CUDA kernels in csrc/kernels/common/fp8.cuh reproduce it bit for bit). For each
row and each block of 128 consecutive hidden elements `x[0..127]` (BF16, widened to float32 exactly):

    amax  = max_i |x[i]|                                  float32, exact
    scale = max(amax, 1e-4f) / 448.0f                     one IEEE float32 division, round-to-nearest-even
    if round_scale:                                       round UP to a power of two, exactly on the bits:
        bits  = float_as_int(scale)
        scale = int_as_float((bits + 0x7FFFFF) & 0xFF800000)     == 2 ** ceil(log2(scale))
    q[i]  = fp8_e4m3(clamp(x[i] / scale, -448, 448))      IEEE float32 division (not a multiply by a
                                                          reciprocal), then round-to-nearest-even to e4m3
                                                          (CUDA: __nv_cvt_float_to_fp8(v, __NV_SATFINITE,
                                                          __NV_E4M3))

`1e-4f` is the float32 nearest to 1e-4 (0x38D1B717); `448` is e4m3's largest finite value, so with an
unrounded scale `|x / scale|` exceeds 448 only by a rounding error and the clamp is what SATFINITE does.
The scale stays a normal float32 (>= 1e-4 / 448), which the bit trick above relies on.

UE8M0 (`use_ue8m0`, only with `round_scale`): a power-of-two scale is stored as its 8-bit biased exponent
`(bits >> 23) & 0xFF`; four consecutive blocks are packed into one int32, block 4k + j in byte j (bits
8j..8j+7, little-endian byte order), so the packed tensor has `ceil(hidden / 512)` columns; a missing block
of the last group is stored as byte 0.

Dequantization: `bf16(float32(q[i]) * scale)` with round-to-nearest-even; a UE8M0 byte e means the scale
`int_as_float(e << 23)`.

Non-finite inputs (the kernels' max is CUDA's fmaxf, which returns the other operand when one is NaN):
- NaN does not enter its block's amax: the block's other values are cast as if it were not there, and the
  NaN element's FP8 byte is a NaN (e4m3 has one, S.1111.111; the sign bit is unspecified), which
  dequantizes to NaN. An all-NaN block gets the clamped scale 1e-4 / 448.
- +-Inf makes its block's amax, and so its scale, Inf: every finite value of that block is cast to 0 and the
  Inf values to NaN, so the whole block dequantizes to NaN (0 x Inf). With round_scale the scale stays Inf;
  with use_ue8m0 its byte is 0xFF. The other blocks of the row are unaffected.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP8_AMAX_EPS = 1e-4
SCALE_BLOCK = 128
UE8M0_SCALES_PER_INT32 = 4
_MANTISSA_MASK = 0x7FFFFF
_EXPONENT_SIGN_MASK = -0x800000  # 0xFF800000 as a signed int32


def round_scale_to_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Round positive normal float32 scales up to the next power of two (unchanged if already one)."""
    if scale.dtype != torch.float32:
        raise TypeError(f"scale: expected torch.float32, got {scale.dtype}")
    bits = scale.contiguous().view(torch.int32)
    return torch.bitwise_and(bits + _MANTISSA_MASK, _EXPONENT_SIGN_MASK).view(torch.float32)


def compute_scales(x: torch.Tensor, *, round_scale: bool = False) -> torch.Tensor:
    """float32 scales `[..., H / 128]` of a BF16 (or float32) tensor `[..., H]`."""
    if x.size(-1) % SCALE_BLOCK != 0:
        raise ValueError(f"x: hidden size must be a multiple of {SCALE_BLOCK}, got {x.size(-1)}")
    magnitude = x.float().reshape(*x.shape[:-1], x.size(-1) // SCALE_BLOCK, SCALE_BLOCK).abs()
    # NaN does not enter the max, as in the kernels' fmaxf (module docstring, "Non-finite inputs").
    amax = torch.where(magnitude.isnan(), 0.0, magnitude).amax(dim=-1).clamp_min(FP8_AMAX_EPS)
    # A tensor divisor, not a Python scalar: CUDA torch turns `tensor / scalar` into a multiply by the
    # float32 reciprocal (1/448 is inexact), which would break the IEEE division the formula promises.
    scale = amax / torch.full_like(amax, FP8_E4M3_MAX)
    return round_scale_to_pow2(scale) if round_scale else scale


def per_token_cast_to_fp8(
    x: torch.Tensor, *, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x [..., H]` (BF16) to `(float8_e4m3fn [..., H], scales)`.

    scales: float32 `[..., H / 128]`, or with `use_ue8m0` int32 `[..., ceil(H / 512)]` (packed exponents).
    """
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0: requires round_scale=True (only powers of two are representable)")
    scale = compute_scales(x, round_scale=round_scale)
    blocks = x.float().reshape(*scale.shape, SCALE_BLOCK)
    q = (blocks / scale.unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(x.shape)
    return q, (pack_ue8m0(scale) if use_ue8m0 else scale)


def pack_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two float32 scales `[..., G]` into int32 `[..., ceil(G / 4)]` (see module docstring)."""
    if scale.dtype != torch.float32:
        raise TypeError(f"scale: expected torch.float32, got {scale.dtype}")
    exponent = torch.bitwise_right_shift(scale.contiguous().view(torch.int32), 23).bitwise_and(0xFF)
    num_groups = scale.size(-1)
    num_packed = (num_groups + UE8M0_SCALES_PER_INT32 - 1) // UE8M0_SCALES_PER_INT32
    padded = exponent.new_zeros(*scale.shape[:-1], num_packed * UE8M0_SCALES_PER_INT32)
    padded[..., :num_groups] = exponent
    # Build each int32 arithmetically (byte j << 8j) so the layout does not depend on the host's endianness.
    lanes = padded.reshape(*scale.shape[:-1], num_packed, UE8M0_SCALES_PER_INT32).to(torch.int64)
    shifts = torch.arange(UE8M0_SCALES_PER_INT32, device=scale.device, dtype=torch.int64) * 8
    packed = torch.bitwise_left_shift(lanes, shifts).sum(dim=-1)
    # Values >= 2**31 wrap to negative int32, matching the raw bit pattern.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_ue8m0(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of `pack_ue8m0`: int32 `[..., P]` to float32 scales `[..., num_groups]`."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed: expected torch.int32, got {packed.dtype}")
    lanes = packed.to(torch.int64).bitwise_and(0xFFFFFFFF).unsqueeze(-1)
    shifts = torch.arange(UE8M0_SCALES_PER_INT32, device=packed.device, dtype=torch.int64) * 8
    exponent = torch.bitwise_right_shift(lanes, shifts).bitwise_and(0xFF)
    exponent = exponent.reshape(*packed.shape[:-1], -1)[..., :num_groups]
    return torch.bitwise_left_shift(exponent, 23).to(torch.int32).view(torch.float32)


def per_token_cast_back(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize `(float8_e4m3fn [..., H], scales)` to BF16 `[..., H]`; scales float32 `[..., H/128]` or
    UE8M0-packed int32 `[..., ceil(H/512)]`, in any memory layout (column-major included)."""
    num_groups = x_fp8.size(-1) // SCALE_BLOCK
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales, num_groups)
    blocks = x_fp8.float().reshape(*x_fp8.shape[:-1], num_groups, SCALE_BLOCK)
    return (blocks * scales.unsqueeze(-1)).reshape(x_fp8.shape).to(torch.bfloat16)
