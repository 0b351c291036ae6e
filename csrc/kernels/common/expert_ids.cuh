// Expert ids as kernels read them from a user's topk_idx: range-checked on the GPU, so the host never
// waits for the GPU to check them. An id outside [-1, num_experts) is treated as -1 (no expert) and the
// first one is recorded in the Buffer's host-mapped InvalidExpertIdWord, which the host raises as a
// ValueError once the op's kernels are queued on every rank. The low-latency dispatch also carries the
// first bad id of each rank in its count words, so every rank of the call records (and raises) it.
#pragma once

#include <climits>
#include <cstdint>

#include "kernels/api.cuh"

namespace deep_ep::expert_ids {

/// Records an out-of-range id unless the word already holds one the host has not raised yet.
/// `reporting_rank` < 0: this rank's own kernel found it; else the rank a low-latency dispatch reported it for.
__device__ __forceinline__ void record(InvalidExpertIdWord* invalid, int value, int num_experts, int reporting_rank) {
    if (invalid == nullptr || atomicCAS(&invalid->claimed, 0, 1) != 0)
        return;
    invalid->value = value;
    invalid->num_experts = num_experts;
    invalid->rank = reporting_rank;
    // The host reads the word without synchronising with the GPU: the fields must be visible to it before
    // found is.
    __threadfence_system();
    atomicExch(&invalid->found, 1);
}

/// An id as the error message shows it (int64 ids clamped to the int range).
__device__ __forceinline__ int clamped(int64_t expert) {
    return static_cast<int>(expert < INT_MIN ? INT_MIN : expert > INT_MAX ? INT_MAX : expert);
}

__device__ __forceinline__ bool in_range(int64_t expert, int num_experts) { return expert >= -1 && expert < num_experts; }

/// Only the first offender is recorded: one compare-and-swap per bad id, none for good ones.
__device__ __forceinline__ bool is_valid(int64_t expert, int num_experts, InvalidExpertIdWord* invalid) {
    if (in_range(expert, num_experts))
        return true;
    record(invalid, clamped(expert), num_experts, -1);
    return false;
}

/// topk_idx[index] as stored (int64 or int32).
__device__ __forceinline__ int64_t raw(const void* topk_idx, bool is_int64, int64_t index) {
    return is_int64 ? static_cast<const int64_t*>(topk_idx)[index] : static_cast<const int*>(topk_idx)[index];
}

/// Flags the first out-of-range id of topk_idx[0, numel) (int64 or int32), every thread of the calling grid
/// striding over it with kUnroll loads in flight: the check an op makes in a kernel of its own, or inside
/// one it launches anyway.
__device__ __forceinline__ void check_range(const void* topk_idx, bool is_int64, int64_t numel, int num_experts,
                                            InvalidExpertIdWord* invalid) {
    constexpr int kUnroll = 8;
    const int64_t stride = int64_t{gridDim.x} * blockDim.x;
    for (int64_t base = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; base < numel; base += kUnroll * stride) {
        int64_t ids[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            ids[u] = base + u * stride < numel ? raw(topk_idx, is_int64, base + u * stride) : -1;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            is_valid(ids[u], num_experts, invalid);
    }
}

/// topk_idx[index] (int64 or int32), -1 if it is out of range.
__device__ __forceinline__ int load(const void* topk_idx, bool is_int64, int64_t index, int num_experts,
                                    InvalidExpertIdWord* invalid) {
    const int64_t expert = raw(topk_idx, is_int64, index);
    return is_valid(expert, num_experts, invalid) ? static_cast<int>(expert) : -1;
}

}  // namespace deep_ep::expert_ids
