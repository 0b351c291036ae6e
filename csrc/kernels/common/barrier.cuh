// The cross-rank barrier of the intra-node group, run by one thread block. Each rank owns a row of
// signal slots in its NVLink buffer; slot p is written only by rank p, with the epoch of the barrier it
// reached. Epochs come from the host (runtime::Buffer::next_barrier_epoch), identical on every rank, and
// only grow, so a slot never needs resetting and a late reader of an older epoch still passes.
#pragma once

#include "kernels/api.cuh"
#include "kernels/common/buffer_layout.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/sync.cuh"

namespace deep_ep {

/// Tells every rank (this one included) that this rank reached barrier.epoch. Thread p < num_ranks of
/// the calling block signals rank p. The caller guarantees that every store the peers may read after the
/// barrier was made before: by this block (followed by __syncthreads) or by an earlier kernel.
__device__ __forceinline__ void nvl_barrier_arrive(const NvlPeers& peers, const NvlBarrier& barrier) {
    if (barrier.epoch == 0 || threadIdx.x >= peers.num_ranks)
        return;
    // The release store is cumulative only over what this thread has observed; the fence makes the other
    // threads' stores, ordered before us by the caller's __syncthreads, part of it at system scope.
    ptx::fence_acq_rel_sys();
    int* peer_signals = layout::barrier_signals(peers.buffers[threadIdx.x]);
    ptx::st_release_sys_global(peer_signals + peers.rank, barrier.epoch);
}

/// Waits, in every block that calls it, until all ranks arrived at barrier.epoch. Returns false (in all
/// threads of the block) when a wait timed out or another thread failed: the kernel must then return.
__device__ __forceinline__ bool nvl_barrier_wait(const NvlPeers& peers, const NvlBarrier& barrier) {
    if (barrier.epoch == 0)
        return true;
    bool arrived = true;
    if (threadIdx.x < peers.num_ranks) {
        const int* own_signals = layout::barrier_signals(peers.buffers[peers.rank]);
        arrived = wait_at_least(barrier.wait, WaitSite::kBarrier, threadIdx.x, own_signals + threadIdx.x,
                                barrier.epoch);
    }
    // bar.sync extends the acquiring loads above to the whole block (causality order is transitive).
    return __syncthreads_and(arrived) != 0;
}

/// The barrier that opens a kernel: block 0 arrives on behalf of this rank, every block waits.
__device__ __forceinline__ bool nvl_barrier_at_kernel_start(const NvlPeers& peers, const NvlBarrier& barrier) {
    if (blockIdx.x == 0)
        nvl_barrier_arrive(peers, barrier);
    return nvl_barrier_wait(peers, barrier);
}

}  // namespace deep_ep
