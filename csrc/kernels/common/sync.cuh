// Every spin-wait in deep_ep goes through wait_until: it gives up after the Buffer's timeout, records
// what it waited for in the host-visible error word, and stops early once any other thread has failed,
// so a missing peer becomes a Python exception instead of a hung GPU.
#pragma once

#include "kernels/api.cuh"
#include "kernels/common/ptx.cuh"

namespace deep_ep {

// Polling the error word on every spin would add a system-scope load to each iteration.
inline constexpr int kAbortPollInterval = 64;

__device__ __forceinline__ bool wait_aborted(const WaitContext& ctx) {
    return ptx::ld_volatile_global(&ctx.error->status) != 0;
}

/// Block-uniform: true once a wait of the Buffer failed. A kernel queued after another kernel of its op
/// waited (an op-opening exchange) calls it first and leaves at once when true: its epochs, lists and counts
/// are not this op's, and acting on them could read or overwrite what peers still use.
__device__ __forceinline__ bool block_sees_abort(const WaitContext& ctx) {
    return __syncthreads_or(threadIdx.x == 0 && wait_aborted(ctx)) != 0;
}

__device__ __forceinline__ void report_wait_timeout(const WaitContext& ctx, WaitSite site, int peer, int expected,
                                                    int observed) {
    // Only the first failing thread fills the details; later ones would overwrite the root cause.
    if (ptx::atom_cas_relaxed_sys_global(&ctx.error->status, 0, 1) == 0) {
        ctx.error->rank = ctx.rank;
        ctx.error->site = static_cast<int>(site);
        ctx.error->peer = peer;
        ctx.error->expected = expected;
        ctx.error->observed = observed;
        ptx::fence_acq_rel_sys();
    }
}

/// Spins until read() returns a value v with done(v). Returns false on timeout or abort; the caller must
/// then leave the kernel without touching shared state (its outputs are garbage, the host raises).
template <typename Read, typename Done>
__device__ __forceinline__ bool wait_until(const WaitContext& ctx, WaitSite site, int peer, int expected, Read read,
                                           Done done) {
    const uint64_t start_ns = ptx::mov_u64_globaltimer();
    for (int spin = 0;; ++spin) {
        const int observed = read();
        if (done(observed))
            return true;
        if (spin % kAbortPollInterval == kAbortPollInterval - 1) {
            if (wait_aborted(ctx))
                return false;
            if (ptx::mov_u64_globaltimer() - start_ns > ctx.timeout_ns) {
                report_wait_timeout(ctx, site, peer, expected, observed);
                return false;
            }
        }
    }
}

/// The common case: a monotonically increasing counter or epoch, published with a release store.
__device__ __forceinline__ bool wait_at_least(const WaitContext& ctx, WaitSite site, int peer, const int* address,
                                              int target) {
    return wait_until(
        ctx, site, peer, target, [=] { return ptx::ld_acquire_sys_global(address); },
        [=](int v) { return v - target >= 0; });  // wrap-safe comparison of epochs
}

/// Called by every thread of every block at the end of its work: true (in all threads of one block, the
/// last to get here) once every block's earlier stores are visible to it. `exits` (device int, 0 between
/// kernels) is reset by that block, so the next kernel on the stream (or a CUDA-graph replay) finds 0.
__device__ __forceinline__ bool is_last_block_to_finish(int* exits) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        // Release this block's stores before counting it out; the last block acquires everyone's.
        __threadfence();
        last = atomicAdd(exits, 1) == static_cast<int>(gridDim.x) - 1;
        if (last) {
            *exits = 0;
            __threadfence();
        }
    }
    __syncthreads();
    return last;
}

}  // namespace deep_ep
