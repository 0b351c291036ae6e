// Expert ids as kernels read them from a user's topk_idx: range-checked on the GPU, so the host never
// waits for the GPU to check them. An id outside [-1, num_experts) is treated as -1 (no expert) and the
// first one is recorded in the Buffer's host-mapped InvalidExpertIdWord, which the host raises as a
// ValueError once the op's kernels are queued on every rank.
#pragma once

#include <climits>
#include <cstdint>

#include "kernels/api.cuh"

namespace deep_ep::expert_ids {

/// Only the first offender is recorded: one compare-and-swap per bad id, none for good ones.
__device__ __forceinline__ bool is_valid(int64_t expert, int num_experts, InvalidExpertIdWord* invalid) {
    if (expert >= -1 && expert < num_experts)
        return true;
    if (invalid != nullptr && atomicCAS(&invalid->claimed, 0, 1) == 0) {
        invalid->value = static_cast<int>(expert < INT_MIN ? INT_MIN : expert > INT_MAX ? INT_MAX : expert);
        invalid->num_experts = num_experts;
        // The host reads the word without synchronising with the GPU: value and num_experts must be visible
        // to it before found is.
        __threadfence_system();
        atomicExch(&invalid->found, 1);
    }
    return false;
}

/// topk_idx[index] (int64 or int32), -1 if it is out of range.
__device__ __forceinline__ int load(const void* topk_idx, bool is_int64, int64_t index, int num_experts,
                                    InvalidExpertIdWord* invalid) {
    const int64_t expert = is_int64 ? static_cast<const int64_t*>(topk_idx)[index] : static_cast<const int*>(topk_idx)[index];
    return is_valid(expert, num_experts, invalid) ? static_cast<int>(expert) : -1;
}

}  // namespace deep_ep::expert_ids
