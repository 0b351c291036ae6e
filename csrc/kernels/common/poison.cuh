// What a receive that timed out leaves in its outputs: values that cannot pass for data (NaN in every
// element, -1 in counts) instead of whatever the buffers held, so a caller that uses them before the
// error surfaces (the next call, a hook, Buffer.check()) computes NaN rather than plausible numbers.
#pragma once

#include <cstdint>

namespace deep_ep::poison {

inline constexpr int kBf16NaNs = 0x7fc07fc0;  // two bf16 quiet NaNs
inline constexpr int kFp8E4m3NaNs = 0x7f7f7f7f;  // four e4m3 NaNs

/// The block fills `num_bytes` (a multiple of 16) at `dst` with the 32-bit `pattern`.
__device__ __forceinline__ void fill(void* dst, int64_t num_bytes, int pattern) {
    const int4 values = make_int4(pattern, pattern, pattern, pattern);
    auto* vectors = static_cast<int4*>(dst);
    for (int64_t i = threadIdx.x; i < num_bytes / 16; i += blockDim.x)
        vectors[i] = values;
}

}  // namespace deep_ep::poison
