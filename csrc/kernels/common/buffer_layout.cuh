// Offsets inside each rank's NVLink buffer (runtime::Buffer), for host and device alike, so that the size
// checks the host makes and the addresses the kernels compute cannot disagree.
//
//   [0, kControlBytes)            control region
//     [0, 32)                     barrier signals: int[kMaxNvlRanks]; slot p is written by rank p only
//     [64, 68)                    staged_num_tokens: tokens the owner staged for the dispatch in flight
//     [128, 136)                  the owner's barrier epoch counter and the exit count of the kernel in flight
//     [kCountAreaOffset, ...)     dispatch count exchange: for each source rank s, the counts s sends here
//   [kControlBytes, end)          data region: the staged rows of the op in flight
#pragma once

#include <cstdint>

#include "kernels/api.cuh"

namespace deep_ep::layout {

inline constexpr int64_t kControlBytes = 1 << 20;
inline constexpr int64_t kBarrierSignalOffset = 0;
inline constexpr int64_t kStagedNumTokensOffset = 64;  // int: tokens this rank staged for the dispatch in flight
inline constexpr int64_t kEpochCounterOffset = 128;   // int: epoch of the owner's last completed barrier
inline constexpr int64_t kKernelExitsOffset = 132;    // int: blocks of the barrier kernel in flight that left
// int: the fresh dispatch in flight was rejected by every rank (1 + the lowest rank that would receive more
// rows than its num_worst_tokens), or 0.
inline constexpr int64_t kDispatchVerdictOffset = 136;
inline constexpr int64_t kCountAreaOffset = 4096;
// Local experts per rank the count exchange can carry; the host-mapped counters (4096 ints) hold 2 + this.
inline constexpr int kMaxLocalExperts = 2048;

__host__ __device__ constexpr int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

__host__ __device__ inline int* barrier_signals(void* buffer) {
    return reinterpret_cast<int*>(static_cast<char*>(buffer) + kBarrierSignalOffset);
}

__host__ __device__ inline int* epoch_counter(void* buffer) {
    return reinterpret_cast<int*>(static_cast<char*>(buffer) + kEpochCounterOffset);
}

__host__ __device__ inline int* kernel_exits(void* buffer) {
    return reinterpret_cast<int*>(static_cast<char*>(buffer) + kKernelExitsOffset);
}

__host__ __device__ inline int* dispatch_verdict(void* buffer) {
    return reinterpret_cast<int*>(static_cast<char*>(buffer) + kDispatchVerdictOffset);
}

__host__ __device__ inline int* staged_num_tokens(void* buffer) {
    return reinterpret_cast<int*>(static_cast<char*>(buffer) + kStagedNumTokensOffset);
}

/// What source rank `src` sends to this buffer's owner: [num_ranks] per-rank token counts (the whole row
/// of src's num_tokens_per_rank, so every rank can build the full rank_prefix_matrix), the counts of the
/// owner's local experts, and src's num_worst_tokens (0: none).
struct CountArea {
    static constexpr int kStride = kMaxNvlRanks + kMaxLocalExperts + 1;
    __host__ __device__ static int* tokens_per_rank(void* buffer, int src) {
        return reinterpret_cast<int*>(static_cast<char*>(buffer) + kCountAreaOffset) + src * kStride;
    }
    __host__ __device__ static int* tokens_per_local_expert(void* buffer, int src) {
        return tokens_per_rank(buffer, src) + kMaxNvlRanks;
    }
    __host__ __device__ static int* num_worst_tokens(void* buffer, int src) {
        return tokens_per_local_expert(buffer, src) + kMaxLocalExperts;
    }
};
static_assert(kCountAreaOffset + int64_t{kMaxNvlRanks} * CountArea::kStride * 4 <= kControlBytes);

__host__ __device__ inline char* data_region(void* buffer) { return static_cast<char*>(buffer) + kControlBytes; }

/// Dispatch staging of a rank that sends num_tokens tokens: one row slot per token t at
/// data_region + t * stride (x, then its float32 scales, top-k expert ids as int32 and top-k weights, the
/// 4-byte parts packed, the slot padded to 16 bytes), then one int32 send list per destination rank:
/// entry k of list d is the k-th token this rank sends to d. Receivers read num_tokens from the sender's
/// control region (staged_num_tokens), written before the barrier that precedes the pull. Sizes agree
/// with deep_ep.config.nvl_buffer_bytes_needed(kind="dispatch"), which bounds them from above.
struct DispatchRowLayout {
    int64_t x_offset, scales_offset, topk_idx_offset, topk_weights_offset, stride;
    int num_ranks;

    __host__ __device__ explicit DispatchRowLayout(const DispatchRowShape& shape) : num_ranks(shape.num_ranks) {
        x_offset = 0;
        scales_offset = x_offset + align16(shape.hidden_bytes);
        topk_idx_offset = scales_offset + int64_t{shape.num_scales} * 4;
        topk_weights_offset = topk_idx_offset + int64_t{shape.num_topk} * 4;
        stride = align16(topk_weights_offset + int64_t{shape.num_topk} * 4);
    }
    __host__ __device__ char* row(void* buffer, int64_t slot) const { return data_region(buffer) + slot * stride; }
    __host__ __device__ int* send_list(void* buffer, int64_t num_tokens, int dst) const {
        return reinterpret_cast<int*>(data_region(buffer) + num_tokens * stride) + dst * num_tokens;
    }
    __host__ __device__ int64_t data_bytes(int64_t num_tokens) const {
        return num_tokens * stride + int64_t{num_ranks} * num_tokens * 4;
    }
};

/// One staged combine row per received row i: the bf16 hidden vector, then its top-k weights if any.
struct CombineRowLayout {
    int64_t x_offset, topk_weights_offset, stride;

    __host__ __device__ CombineRowLayout(int hidden, int num_topk) {
        x_offset = 0;
        topk_weights_offset = align16(int64_t{hidden} * 2);
        stride = topk_weights_offset + align16(int64_t{num_topk} * 4);
    }
    __host__ __device__ char* row(void* buffer, int64_t slot) const { return data_region(buffer) + slot * stride; }
    __host__ __device__ int64_t data_bytes(int64_t num_rows) const { return num_rows * stride; }
};

}  // namespace deep_ep::layout
