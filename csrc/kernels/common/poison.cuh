// What a receive that timed out leaves in its outputs: values that cannot pass for data (NaN in every
// element, -1 in counts) instead of whatever the buffers held, so a caller that uses them before the
// error surfaces (the next call, a hook, Buffer.check()) computes NaN rather than plausible numbers.
#pragma once

#include <cstdint>

#include "kernels/common/token.cuh"

namespace deep_ep::poison {

inline constexpr int kBf16NaNs = 0x7fc07fc0;  // two bf16 quiet NaNs
inline constexpr int kFp8E4m3NaNs = 0x7f7f7f7f;  // four e4m3 NaNs
inline constexpr int kFloatNaN = 0x7fc00000;
inline constexpr int kMinusOnes = -1;           // int32 -1, and each half of an int64 -1

/// The block fills `num_bytes` (a multiple of 16) at `dst` with the 32-bit `pattern`.
__device__ __forceinline__ void fill(void* dst, int64_t num_bytes, int pattern) {
    const int4 values = make_int4(pattern, pattern, pattern, pattern);
    auto* vectors = static_cast<int4*>(dst);
    for (int64_t i = threadIdx.x; i < num_bytes / 16; i += blockDim.x)
        vectors[i] = values;
}

/// The warp fills `num_words` 32-bit words at `dst` (4-byte aligned) with `pattern`.
__device__ __forceinline__ void warp_fill_words(void* dst, int64_t num_words, int pattern, int lane) {
    auto* words = static_cast<int*>(dst);
    for (int64_t i = lane; i < num_words; i += kWarpSize)
        words[i] = pattern;
}

/// A normal-mode dispatch's receive outputs (the intra- and inter-node pull kernels fill the same ones).
struct DispatchRows {
    void* recv_x;                // [rows, hidden_bytes]: FP8 when it has scales, else BF16
    float* recv_x_scales;        // [rows, num_scales] or nullptr
    int64_t* recv_topk_idx;      // [rows, num_topk] or nullptr
    float* recv_topk_weights;    // [rows, num_topk] or nullptr
    int* recv_src_idx;           // [rows] or nullptr
    int hidden_bytes, num_scales, num_topk;
};

/// The warp poisons row `row` of a dispatch's outputs: NaN values and weights, -1 expert ids and sources.
__device__ __forceinline__ void warp_poison_dispatch_row(const DispatchRows& out, int64_t row, int lane) {
    warp_fill_words(static_cast<char*>(out.recv_x) + row * out.hidden_bytes, out.hidden_bytes / 4,
                    out.recv_x_scales != nullptr ? kFp8E4m3NaNs : kBf16NaNs, lane);
    if (out.recv_x_scales != nullptr)
        warp_fill_words(out.recv_x_scales + row * out.num_scales, out.num_scales, kFloatNaN, lane);
    if (out.recv_topk_idx != nullptr)
        warp_fill_words(out.recv_topk_idx + row * out.num_topk, 2 * int64_t{out.num_topk}, kMinusOnes, lane);
    if (out.recv_topk_weights != nullptr)
        warp_fill_words(out.recv_topk_weights + row * out.num_topk, out.num_topk, kFloatNaN, lane);
    if (out.recv_src_idx != nullptr && lane == 0)
        out.recv_src_idx[row] = kMinusOnes;
}

/// The warp poisons token `token` of a combine's outputs: a NaN row and NaN top-k weights.
__device__ __forceinline__ void warp_poison_combined_token(void* combined_x, int hidden, float* combined_topk_weights,
                                                           int num_topk, int64_t token, int lane) {
    warp_fill_words(static_cast<char*>(combined_x) + token * hidden * 2, hidden / 2, kBf16NaNs, lane);
    if (combined_topk_weights != nullptr)
        warp_fill_words(combined_topk_weights + token * num_topk, num_topk, kFloatNaN, lane);
}

/// A normal-mode pull kernel whose opening wait failed: each warp poisons the rows (tokens) it would have
/// written, so every row is poisoned whichever blocks got further.
__device__ __forceinline__ void poison_dispatch_rows(const DispatchRows& out, int num_rows) {
    for (int row = global_warp_id(); row < num_rows; row += num_global_warps())
        warp_poison_dispatch_row(out, row, threadIdx.x % kWarpSize);
}

__device__ __forceinline__ void poison_combined_tokens(void* combined_x, int hidden, float* combined_topk_weights,
                                                       int num_topk, int num_tokens) {
    for (int token = global_warp_id(); token < num_tokens; token += num_global_warps())
        warp_poison_combined_token(combined_x, hidden, combined_topk_weights, num_topk, token, threadIdx.x % kWarpSize);
}

}  // namespace deep_ep::poison
