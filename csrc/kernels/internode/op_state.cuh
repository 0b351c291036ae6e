// What every inter-node kernel after the opening exchange reads of the op in flight: its epoch, and whether
// some rank rejected it (the exchange recorded it, kernels/internode/notify.cu).
#pragma once

#include "kernels/api.cuh"
#include "kernels/common/peer.cuh"
#include "kernels/common/ptx.cuh"

namespace deep_ep::internode {

__device__ __forceinline__ int read_epoch(const peer::SymmetricView& view, const InternodeControl& control) {
    return ptx::ld_volatile_global(view.local<int>(control.epoch_counter()));
}

/// Block-uniform: a rank's argument checks failed and it opened this op with its verdict only; every rank
/// skips the op's work (no kernel after the exchange waits for a peer then).
__device__ __forceinline__ bool block_sees_rejection(const peer::SymmetricView& view, const InternodeControl& control) {
    const bool rejected = threadIdx.x == 0 && ptx::ld_volatile_global(view.local<int>(control.rejected_epoch())) ==
                                                  read_epoch(view, control);
    return __syncthreads_or(rejected) != 0;
}

}  // namespace deep_ep::internode
