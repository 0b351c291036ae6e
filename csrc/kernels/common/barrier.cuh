// The cross-rank barrier of the intra-node group. Each rank owns a row of signal slots in its NVLink
// buffer; slot p is written only by rank p, with the epoch of the barrier it reached. Epochs only grow,
// so a slot never needs resetting and a late reader of an older epoch still passes.
//
// Epochs are counted on the GPU, not handed in by the host: a CUDA graph replays kernels with the
// arguments they were captured with, so a host-side epoch would repeat on every replay and the barrier
// would pass at once. Each barrier kernel targets this rank's epoch counter + 1, read at its start; the
// last of its blocks to leave stores that target into the counter, so the next kernel on the stream
// targets the one after. Every rank runs the same sequence of barrier kernels, so the counters agree.
#pragma once

#include "kernels/api.cuh"
#include "kernels/common/buffer_layout.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/sync.cuh"

namespace deep_ep {

/// Tells every rank (this one included) that this rank reached `epoch`. Thread p < num_ranks of
/// the calling block signals rank p. The caller guarantees that every store the peers may read after the
/// barrier was made before: by this block (followed by __syncthreads) or by an earlier kernel.
__device__ __forceinline__ void nvl_barrier_arrive(const NvlPeers& peers, const NvlBarrier& barrier, int epoch) {
    if (!barrier.active || threadIdx.x >= peers.num_ranks)
        return;
    // The release store is cumulative only over what this thread has observed; the fence makes the other
    // threads' stores, ordered before us by the caller's __syncthreads, part of it at system scope.
    ptx::fence_acq_rel_sys();
    int* peer_signals = layout::barrier_signals(peers.buffers[threadIdx.x]);
    ptx::st_release_sys_global(peer_signals + peers.rank, epoch);
}

/// Waits, in every block that calls it, until all ranks arrived at `epoch`. Returns false (in all
/// threads of the block) when a wait timed out or another thread failed: the kernel must then return.
__device__ __forceinline__ bool nvl_barrier_wait(const NvlPeers& peers, const NvlBarrier& barrier, int epoch) {
    if (!barrier.active)
        return true;
    bool arrived = true;
    if (threadIdx.x < peers.num_ranks) {
        const int* own_signals = layout::barrier_signals(peers.buffers[peers.rank]);
        arrived = wait_at_least(barrier.wait, WaitSite::kBarrier, threadIdx.x, own_signals + threadIdx.x, epoch);
    }
    // bar.sync extends the acquiring loads above to the whole block (causality order is transitive).
    return __syncthreads_and(arrived) != 0;
}

/// The barrier that opens a kernel, constructed at the kernel's start by every thread: block 0 arrives
/// on behalf of this rank, every block waits. Its destructor counts the block out (thread 0, whatever
/// return path the kernel takes after construction); the last block advances the epoch counter.
class NvlKernelBarrier {
  public:
    __device__ __forceinline__ NvlKernelBarrier(const NvlPeers& peers, const NvlBarrier& barrier)
        : own_(peers.buffers[peers.rank]), active_(barrier.active) {
        if (!active_) {
            passed_ = true;
            return;
        }
        __shared__ int target;
        if (threadIdx.x == 0)
            target = ptx::ld_volatile_global(layout::epoch_counter(own_)) + 1;
        __syncthreads();
        epoch_ = target;
        if (blockIdx.x == 0)
            nvl_barrier_arrive(peers, barrier, epoch_);
        passed_ = nvl_barrier_wait(peers, barrier, epoch_);
    }

    __device__ __forceinline__ ~NvlKernelBarrier() {
        if (!active_ || threadIdx.x != 0 || closed_)
            return;
        // Every block read the counter before its thread 0 gets here (the constructor's __syncthreads).
        if (atomicAdd(layout::kernel_exits(own_), 1) == static_cast<int>(gridDim.x) - 1) {
            *layout::kernel_exits(own_) = 0;
            ptx::st_volatile_global(layout::epoch_counter(own_), epoch_);
        }
    }

    NvlKernelBarrier(const NvlKernelBarrier&) = delete;
    NvlKernelBarrier& operator=(const NvlKernelBarrier&) = delete;

    /// False (in all threads of the block) when a wait timed out or another thread failed: the kernel
    /// must then return.
    __device__ __forceinline__ bool passed() const { return passed_; }

    /// The closing barrier, for a barrier opened with `closes` (a no-op otherwise): every thread of every
    /// block calls it at the kernel's end. The last block of this rank to get here tells every rank that
    /// this rank has finished reading their inputs, and waits until all ranks have; only then does this
    /// rank's stream move on (to work that may free or overwrite its own inputs). The same epoch sequence
    /// as a separate barrier kernel after this one, one launch fewer.
    __device__ __forceinline__ void close(const NvlPeers& peers, const NvlBarrier& barrier) {
        if (!active_ || !barrier.closes)
            return;
        closed_ = true;
        __shared__ bool is_last_block;
        // The block's peer loads are done: their values were stored before this bar.sync. The fence makes
        // them precede this block's count, which the last block observes before it arrives.
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            is_last_block = atomicAdd(layout::kernel_exits(own_), 1) == static_cast<int>(gridDim.x) - 1;
        }
        __syncthreads();
        if (!is_last_block)
            return;
        __threadfence();
        nvl_barrier_arrive(peers, barrier, epoch_ + 1);
        nvl_barrier_wait(peers, barrier, epoch_ + 1);  // on a timeout the error word is already set
        if (threadIdx.x == 0) {
            *layout::kernel_exits(own_) = 0;
            ptx::st_volatile_global(layout::epoch_counter(own_), epoch_ + 1);
        }
    }

  private:
    void* own_;
    bool active_;
    bool passed_ = false;
    bool closed_ = false;
    int epoch_ = 0;
};

}  // namespace deep_ep
