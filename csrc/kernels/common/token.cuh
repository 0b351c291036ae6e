// Moving one row (a token's hidden vector or any 16-byte-aligned part of a slot) with one warp. Shared by
// the intra-node stage/pull kernels and usable by the low-latency path: the load policy is a template
// parameter, a batch of 16-byte loads is in flight per lane before its first store (the tail included:
// a serial tail would cost one full load latency per leftover vector), and payload stores skip L1
// because the writer never reads them back.
#pragma once

#include "kernels/common/ptx.cuh"

namespace deep_ep {

inline constexpr int kWarpSize = 32;

// Grid-wide warp indices: kernels that hand one row to one warp stride over rows by these.
__device__ __forceinline__ int global_warp_id() { return (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize; }
__device__ __forceinline__ int num_global_warps() { return gridDim.x * blockDim.x / kWarpSize; }

/// dst[i] = load(src[i]) for i < num_vectors (16-byte vectors), lane-strided, kUnroll loads in flight.
template <int kUnroll, typename Load>
__device__ __forceinline__ void warp_copy_vectors_with(int4* dst, const int4* src, int num_vectors, int lane,
                                                       Load load) {
    for (int base = lane; base < num_vectors; base += kUnroll * kWarpSize) {
        int4 values[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + u * kWarpSize < num_vectors)
                values[u] = load(src + base + u * kWarpSize);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + u * kWarpSize < num_vectors)
                ptx::st_global_L1_no_allocate(dst + base + u * kWarpSize, values[u]);
    }
}

/// Copy out of memory another rank (or another process on this GPU) wrote: the load kind decides.
template <ptx::LoadKind kKind, int kUnroll>
__device__ __forceinline__ void warp_copy_peer_vectors(int4* dst, const int4* src, int num_vectors, int lane) {
    warp_copy_vectors_with<kUnroll>(dst, src, num_vectors, lane,
                                    [](const int4* p) { return ptx::ld_peer<kKind>(p); });
}

/// Copy out of this rank's own inputs, which nothing writes while the kernel runs: the read-only path.
template <int kUnroll>
__device__ __forceinline__ void warp_copy_own_vectors(int4* dst, const int4* src, int num_vectors, int lane) {
    warp_copy_vectors_with<kUnroll>(dst, src, num_vectors, lane, [](const int4* p) { return __ldg(p); });
}

/// 4-byte words out of peer memory (scales, top-k ids and weights: a few per row).
template <ptx::LoadKind kKind>
__device__ __forceinline__ void warp_copy_peer_words(int* dst, const int* src, int num_words, int lane) {
    for (int i = lane; i < num_words; i += kWarpSize)
        dst[i] = ptx::ld_peer<kKind>(src + i);
}

__device__ __forceinline__ void warp_copy_own_words(int* dst, const int* src, int num_words, int lane) {
    for (int i = lane; i < num_words; i += kWarpSize)
        dst[i] = __ldg(src + i);
}

/// The few 4-byte words of a row (scales, top-k ids and weights), held in registers: a warp loads them
/// together with the row's first vectors and stores them after the row, so they cost no extra round trip.
/// Words beyond kWordsPerLane * 32 (rare shapes) are moved by the caller with warp_copy_*_words.
template <int kWordsPerLane>
struct LaneWords {
    int values[kWordsPerLane];

    template <typename Load>
    __device__ __forceinline__ void load(const int* src, int num_words, int lane, Load load_word) {
#pragma unroll
        for (int u = 0; u < kWordsPerLane; ++u)
            if (lane + u * kWarpSize < num_words)
                values[u] = load_word(src + lane + u * kWarpSize);
    }
    __device__ __forceinline__ void store(int* dst, int num_words, int lane) const {
#pragma unroll
        for (int u = 0; u < kWordsPerLane; ++u)
            if (lane + u * kWarpSize < num_words)
                dst[lane + u * kWarpSize] = values[u];
    }
    static constexpr int kCapacity = kWordsPerLane * kWarpSize;
};

}  // namespace deep_ep
