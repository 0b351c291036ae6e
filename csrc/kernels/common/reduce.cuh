// The combine reduction, one warp per output row: sum bf16 rows from several sources in float32, in the
// order the sources are given, add up to two bf16 biases, round once to bf16. Shared by the intra-node
// combine and usable by the low-latency one (which passes weights folded in by its caller).
#pragma once

#include <cuda_bf16.h>

#include "kernels/common/ptx.cuh"
#include "kernels/common/token.cuh"

namespace deep_ep {

inline constexpr int kBf16PerVector = 8;  // bf16 values in one 16-byte vector

__device__ __forceinline__ void accumulate_bf16x8(float (&acc)[kBf16PerVector], const int4& packed) {
    const auto* values = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
    for (int j = 0; j < kBf16PerVector / 2; ++j) {
        const float2 pair = __bfloat1622float2(values[j]);
        acc[2 * j] += pair.x;
        acc[2 * j + 1] += pair.y;
    }
}

__device__ __forceinline__ int4 round_to_bf16x8(const float (&acc)[kBf16PerVector]) {
    int4 packed;
    auto* values = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int j = 0; j < kBf16PerVector / 2; ++j)
        values[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
    return packed;
}

/// dst = bf16( ((sum over s < num_sources, in order, of float(sources[s])) + bias_0) + bias_1 ), where
/// sources may be peer memory (read with kKind) and the biases (nullable) are this rank's own inputs.
/// All kMaxSources x kUnroll loads of an iteration are issued before the first add, so a lane keeps
/// up to that many 16-byte loads in flight whatever the number of sources.
template <ptx::LoadKind kKind, int kMaxSources, int kUnroll>
__device__ __forceinline__ void warp_reduce_bf16_rows(int4* dst, const int4* const (&sources)[kMaxSources],
                                                      int num_sources, const int4* bias_0, const int4* bias_1,
                                                      int num_vectors, int lane) {
    for (int base = lane; base < num_vectors; base += kUnroll * kWarpSize) {
        int4 loaded[kMaxSources][kUnroll];
#pragma unroll
        for (int s = 0; s < kMaxSources; ++s)
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (s < num_sources && base + u * kWarpSize < num_vectors)
                    loaded[s][u] = ptx::ld_peer<kKind>(sources[s] + base + u * kWarpSize);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kWarpSize;
            if (i >= num_vectors)
                break;
            float acc[kBf16PerVector] = {};
#pragma unroll
            for (int s = 0; s < kMaxSources; ++s)
                if (s < num_sources)
                    accumulate_bf16x8(acc, loaded[s][u]);
            if (bias_0 != nullptr)
                accumulate_bf16x8(acc, __ldg(bias_0 + i));
            if (bias_1 != nullptr)
                accumulate_bf16x8(acc, __ldg(bias_1 + i));
            ptx::st_global_L1_no_allocate(dst + i, round_to_bf16x8(acc));
        }
    }
}

}  // namespace deep_ep
