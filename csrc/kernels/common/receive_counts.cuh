// What a fresh normal dispatch's count exchange hands the host (intra- and inter-node alike): per local
// expert the rows received, rounded up to expert_alignment, and the total, in host-mapped ints the host
// polls (layout: IntranodeNotifyArgs::mapped_counters), the tag written last.
#pragma once

#include "kernels/common/ptx.cuh"

namespace deep_ep {

/// Block-wide: local expert e receives the sum over sources s < num_sources of count_of(s, e), rounded up to
/// `alignment`; stored in out[e] and, when mapped is not null, in mapped[2 + e].
template <typename CountOf>
__device__ __forceinline__ void store_expert_counts(int num_local_experts, int num_sources, int alignment,
                                                    CountOf count_of, int* out, int* mapped) {
    for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x) {
        int count = 0;
        for (int src = 0; src < num_sources; ++src)
            count += count_of(src, e);
        const int aligned = (count + alignment - 1) / alignment * alignment;
        out[e] = aligned;
        if (mapped != nullptr)
            ptx::st_volatile_global(mapped + 2 + e, aligned);
    }
}

/// Thread 0, after a __syncthreads that follows every other store to `mapped`: the rows received, then the tag.
__device__ __forceinline__ void publish_receive_counts(int* mapped, int num_recv_tokens, int tag) {
    if (threadIdx.x != 0 || mapped == nullptr)
        return;
    ptx::st_volatile_global(mapped + 1, num_recv_tokens);
    // The host polls the tag: every count above (ordered by the caller's __syncthreads) must reach host memory
    // before it does.
    ptx::fence_acq_rel_sys();
    ptx::st_release_sys_global(mapped, tag);
}

}  // namespace deep_ep
