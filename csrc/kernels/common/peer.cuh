// How bytes reach a rank: NVLink-mapped stores where nvshmem_ptr maps the peer's symmetric buffer into
// this process (another GPU over NVLink, or another process on this GPU), NVSHMEM puts otherwise (any
// transport: P2P, IBGDA, IBRC, UCX, libfabric). Kernels call one interface and never ask which.
//
// Only generic NVSHMEM device calls are used (put-with-signal, signal_op, quiet). Signal words are
// uint64_t because that is what NVSHMEM's signal operations update; the values polled fit in the low 31
// bits, so a receiver polls the low 32-bit half (little-endian: the word's address). The high half can
// carry one extra int with a signal_add (the low-latency dispatch's report of a bad expert id).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "kernels/api.cuh"
#include "kernels/common/ptx.cuh"

namespace deep_ep::peer {

inline constexpr int kWarpSize = 32;

/// This rank's symmetric buffer and, per rank, where its copy is mapped here (0: reach it with puts).
struct SymmetricView {
    char* local_base;
    const uint64_t* mapped_bases;  // device array [num_ranks]

    __device__ __forceinline__ char* mapped(int rank) const {
        return reinterpret_cast<char*>(mapped_bases[rank]);
    }
    template <typename T = char>
    __device__ __forceinline__ T* local(int64_t offset) const {
        return reinterpret_cast<T*>(local_base + offset);
    }
    // Anything with local_base and mapped_bases (the Args of each NVSHMEM path).
    template <typename Peers>
    __device__ __forceinline__ static SymmetricView of(const Peers& peers) {
        return SymmetricView{static_cast<char*>(peers.local_base), peers.mapped_bases};
    }
};

enum class SignalOp { kSet, kAdd };

/// The warp copies `num_bytes` (a multiple of 16) from this process's memory at `src` to rank `dst_rank`'s
/// symmetric buffer at `dst_offset`, then updates the signal word at `signal_offset` there so that a
/// reader that sees the update also sees the bytes. `src` must lie in the symmetric heap when the rank is
/// reached by puts (NVSHMEM transports read registered memory only). All 32 lanes call this.
__device__ __forceinline__ void warp_send_with_signal(const SymmetricView& view, int dst_rank, int64_t dst_offset,
                                                      const void* src, int num_bytes, int64_t signal_offset,
                                                      int signal_value, SignalOp op, int lane) {
    char* mapped = view.mapped(dst_rank);
    if (mapped != nullptr) {
        auto* dst = reinterpret_cast<int4*>(mapped + dst_offset);
        const auto* src_vectors = static_cast<const int4*>(src);
        const int num_vectors = num_bytes / 16;
        constexpr int kUnroll = 8;  // 8 x 16 B in flight per lane: a 14 KB row in four rounds
        for (int base = lane; base < num_vectors; base += kUnroll * kWarpSize) {
            int4 values[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (base + u * kWarpSize < num_vectors)
                    values[u] = src_vectors[base + u * kWarpSize];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (base + u * kWarpSize < num_vectors)
                    ptx::st_global_L1_no_allocate(dst + base + u * kWarpSize, values[u]);
        }
        // __syncwarp orders the other lanes' stores before lane 0's; the system-scope fence makes them
        // visible to the peer process before the release of the signal.
        __syncwarp();
        if (lane == 0) {
            int* signal = reinterpret_cast<int*>(mapped + signal_offset);
            ptx::fence_acq_rel_sys();
            if (op == SignalOp::kAdd)
                ptx::atom_add_release_sys_global(signal, signal_value);
            else
                ptx::st_release_sys_global(signal, signal_value);
        }
        __syncwarp();
    } else {
        // Put-with-signal: NVSHMEM delivers the signal update after the data on every transport.
        nvshmemx_putmem_signal_nbi_warp(view.local_base + dst_offset, src, static_cast<size_t>(num_bytes),
                                        reinterpret_cast<uint64_t*>(view.local_base + signal_offset),
                                        static_cast<uint64_t>(signal_value),
                                        op == SignalOp::kAdd ? NVSHMEM_SIGNAL_ADD : NVSHMEM_SIGNAL_SET, dst_rank);
    }
}

/// The warp copies `num_bytes` (a multiple of 16) from `src` to rank `dst_rank`'s symmetric buffer at
/// `dst_offset`, without a signal: a later signal (after quiet() where puts were used) publishes it. `src`
/// must lie in the symmetric heap when the rank is reached by puts. All 32 lanes call this.
__device__ __forceinline__ void warp_put(const SymmetricView& view, int dst_rank, int64_t dst_offset, const void* src,
                                         int64_t num_bytes, int lane) {
    char* mapped = view.mapped(dst_rank);
    if (mapped != nullptr) {
        auto* dst = reinterpret_cast<int4*>(mapped + dst_offset);
        const auto* src_vectors = static_cast<const int4*>(src);
        const int64_t num_vectors = num_bytes / 16;
        for (int64_t i = lane; i < num_vectors; i += kWarpSize)
            ptx::st_global_L1_no_allocate(dst + i, src_vectors[i]);
    } else if (num_bytes > 0) {
        nvshmemx_putmem_nbi_warp(view.local_base + dst_offset, src, static_cast<size_t>(num_bytes), dst_rank);
    }
}

/// One thread sets rank `dst_rank`'s signal word at `signal_offset` to `value` (epochs: values only grow),
/// after everything this thread stored or (with quiet()) put before.
__device__ __forceinline__ void signal_set(const SymmetricView& view, int dst_rank, int64_t signal_offset, int value) {
    char* mapped = view.mapped(dst_rank);
    if (mapped != nullptr) {
        ptx::fence_acq_rel_sys();
        ptx::st_release_sys_global(reinterpret_cast<int*>(mapped + signal_offset), value);
    } else {
        nvshmem_fence();
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(view.local_base + signal_offset), static_cast<uint64_t>(value),
                           NVSHMEM_SIGNAL_SET, dst_rank);
    }
}

/// One thread adds `value` to rank `dst_rank`'s signal word at `signal_offset`; no data travels with it.
/// A nonzero `high_word` lands in the word's high half (which must be 0 before) no later than the add, so a
/// reader that observes the add reads it with load_signal_high_word.
__device__ __forceinline__ void signal_add(const SymmetricView& view, int dst_rank, int64_t signal_offset, int value,
                                           int high_word = 0) {
    char* mapped = view.mapped(dst_rank);
    if (mapped != nullptr) {
        auto* low = reinterpret_cast<int*>(mapped + signal_offset);
        if (high_word != 0)
            ptx::st_relaxed_sys_global(low + 1, high_word);  // ordered before the add by its release
        ptx::atom_add_release_sys_global(low, value);
    } else {
        // One 64-bit add: the low half never carries into the high one (its adds sum to at most 32 bits;
        // a value with bit 31 set is that bit, not a negative number).
        const uint64_t both = (static_cast<uint64_t>(static_cast<uint32_t>(high_word)) << 32) +
                              static_cast<uint64_t>(static_cast<uint32_t>(value));
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(view.local_base + signal_offset), both, NVSHMEM_SIGNAL_ADD,
                           dst_rank);
    }
}

/// Completes this thread's outstanding puts, so their source memory may be reused. A no-op cost when
/// every peer is mapped (the stores are already ordered by the signal releases).
__device__ __forceinline__ void quiet() { nvshmem_quiet(); }

/// The low 32 bits of a signal word in this rank's buffer, with acquire semantics: the bytes delivered
/// before the signal (stores or puts) are visible after it is observed.
__device__ __forceinline__ int load_signal_acquire(const uint64_t* word) {
    return ptx::ld_acquire_sys_global(reinterpret_cast<const int*>(word));
}

/// The high half signal_add may have stored; read after load_signal_acquire observed that add.
__device__ __forceinline__ int load_signal_high_word(const uint64_t* word) {
    return ptx::ld_relaxed_sys_global(reinterpret_cast<const int*>(word) + 1);
}

/// Zeroes the high half of a signal word in this rank's buffer that no writer touches before its next use.
__device__ __forceinline__ void clear_signal_high_word(uint64_t* word) {
    ptx::st_relaxed_sys_global(reinterpret_cast<int*>(word) + 1, 0);
}

}  // namespace deep_ep::peer
