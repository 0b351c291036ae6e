// Per-128 FP8 (e4m3) cast, scales and UE8M0 packing. The arithmetic mirrors deep_ep/fp8.py operation by
// operation (same float32 operations, same rounding), so the bytes a kernel produces equal the
// reference's: a change to one must be made to the other.
//
//   amax      = max(|x| over the 128 values, as float32), clamped below at 1e-4f
//   scale     = amax / 448                  one IEEE division (what a receiver multiplies by)
//   round_scale: scale = float((bits(scale) + 0x7FFFFF) & 0xFF800000), i.e. 2^ceil(log2(scale)) exactly
//   fp8       = e4m3(x / scale)             IEEE division (not a reciprocal multiply), round to nearest
//                                           even, saturating at +-448 (the reference clamps, then rounds)
//   ue8m0     = the exponent byte of the power-of-two scale; 4 groups per int32, group 4i+b in byte b
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "kernels/api.cuh"

namespace deep_ep::fp8 {

inline constexpr float kE4m3Max = 448.0f;
inline constexpr float kAmaxFloor = 1e-4f;
inline constexpr int kGroupSize = kFp8GroupSize;
// A half-warp casts one group: 16 lanes x 8 values, one 16-byte load each.
inline constexpr int kLanesPerGroup = 16;
inline constexpr int kValuesPerLane = 8;

/// The per-group scale (dequantisation factor) from the group's absolute maximum.
__device__ __forceinline__ float scale_from_amax(float amax, bool round_scale) {
    const float scale = __fdiv_rn(fmaxf(amax, kAmaxFloor), kE4m3Max);
    // The scale is a normal float (>= 1e-4 / 448), so rounding the bits up to the next exponent is exact.
    return round_scale ? __uint_as_float((__float_as_uint(scale) + 0x7fffffu) & 0xff800000u) : scale;
}

/// The exponent byte of a power-of-two float (UE8M0: value = 2^(byte - 127)).
__device__ __forceinline__ uint32_t ue8m0_byte(float power_of_two) {
    return (__float_as_uint(power_of_two) >> 23) & 0xff;
}

/// Max over the 16 lanes of a half-warp (xor offsets below 16 stay inside the half).
__device__ __forceinline__ float half_warp_max(float value) {
#pragma unroll
    for (int offset = kLanesPerGroup / 2; offset > 0; offset /= 2)
        value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

/// Casts this lane's 8 bf16 values of a group (16 bytes) to 8 e4m3 bytes; all 32 lanes call it, each
/// half-warp on its own group. Returns the group's scale (the same in all 16 lanes).
__device__ __forceinline__ float cast_lane_values(const int4& bf16_values, uint2& fp8_out, bool round_scale) {
    const auto* values = reinterpret_cast<const __nv_bfloat16*>(&bf16_values);
    float f[kValuesPerLane];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kValuesPerLane; ++i) {
        f[i] = __bfloat162float(values[i]);
        amax = fmaxf(amax, fabsf(f[i]));
    }
    amax = half_warp_max(amax);
    const float scale = scale_from_amax(amax, round_scale);
    uint32_t packed[2];
#pragma unroll
    for (int i = 0; i < kValuesPerLane; i += 2) {
        const __nv_fp8x2_storage_t pair = __nv_cvt_float2_to_fp8x2(
            make_float2(__fdiv_rn(f[i], scale), __fdiv_rn(f[i + 1], scale)), __NV_SATFINITE, __NV_E4M3);
        const int word = i / 4, shift = (i % 4) * 8;
        if (shift == 0)
            packed[word] = pair;
        else
            packed[word] |= static_cast<uint32_t>(pair) << shift;
    }
    fp8_out = make_uint2(packed[0], packed[1]);
    return scale;
}

}  // namespace deep_ep::fp8
