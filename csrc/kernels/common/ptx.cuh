// Every inline-PTX instruction deep_ep uses, one function each, named after the instruction.
// Kernels never write asm themselves; a reviewer checks memory-ordering arguments here, in one place.
#pragma once

#include <cstdint>

namespace deep_ep::ptx {

/// Which instruction reads data that another GPU, or another process on this GPU, writes while the
/// kernel runs. Both kinds are compiled in; the launcher picks one per call (Buffer's conservative_loads).
enum class LoadKind : int {
    // ld.global.nc.L1::no_allocate.L2::256B: the read-only (texture) path, skipping L1 allocation and
    // prefetching 256 B into L2. Fast, but the PTX memory model does not promise it observes writes
    // made after the kernel started; deep_ep.check measures whether it does on the user's machine.
    kAggressive = 0,
    // ld.volatile.global: bypasses the non-coherent path, always observes the latest value in L2/memory.
    kConservative = 1,
};

#if defined(DEEP_EP_DISABLE_AGGRESSIVE_PTX_INSTRS) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900)
#define DEEP_EP_NC_LOADS_COMPILED_OUT 1
inline constexpr bool kAggressiveLoadsCompiled = false;
#else
inline constexpr bool kAggressiveLoadsCompiled = true;
#endif

/// Timer ---------------------------------------------------------------------------------------------

// Nanoseconds, shared by all SMs of the GPU (unlike clock64), so timeouts mean wall time.
__device__ __forceinline__ uint64_t mov_u64_globaltimer() {
    uint64_t ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    return ns;
}

/// Loads ---------------------------------------------------------------------------------------------

__device__ __forceinline__ int4 ld_volatile_global(const int4* address) {
    int4 v;
    asm volatile("ld.volatile.global.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(address));
    return v;
}

__device__ __forceinline__ int ld_volatile_global(const int* address) {
    int v;
    asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(v) : "l"(address));
    return v;
}

// Under DEEP_EP_NC_LOADS_COMPILED_OUT (see kAggressiveLoadsCompiled) the .nc wrappers keep their names, so
// the templates that use them still instantiate, but they emit ld.volatile.global instead.
__device__ __forceinline__ int4 ld_global_nc_L1_no_allocate_L2_256B(const int4* address) {
#ifdef DEEP_EP_NC_LOADS_COMPILED_OUT
    return ld_volatile_global(address);
#else
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(address));
    return v;
#endif
}

__device__ __forceinline__ int ld_global_nc_L1_no_allocate_L2_256B(const int* address) {
#ifdef DEEP_EP_NC_LOADS_COMPILED_OUT
    return ld_volatile_global(address);
#else
    int v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.s32 %0, [%1];" : "=r"(v) : "l"(address));
    return v;
#endif
}

// Plain non-coherent load that DOES allocate in L1: the deliberately unsafe variant the coherence check
// uses to show it can detect stale data (lines cached earlier in the same kernel are served again).
__device__ __forceinline__ int ld_global_nc(const int* address) {
#ifdef DEEP_EP_NC_LOADS_COMPILED_OUT
    return ld_volatile_global(address);
#else
    int v;
    asm volatile("ld.global.nc.s32 %0, [%1];" : "=r"(v) : "l"(address));
    return v;
#endif
}

__device__ __forceinline__ int4 ld_global_nc(const int4* address) {
#ifdef DEEP_EP_NC_LOADS_COMPILED_OUT
    return ld_volatile_global(address);
#else
    int4 v;
    asm volatile("ld.global.nc.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(address));
    return v;
#endif
}

// Pairs with st_release_sys_global: everything the writer stored before its release is visible to
// this thread after it reads the released value, across GPUs and processes.
__device__ __forceinline__ int ld_acquire_sys_global(const int* address) {
    int v;
    asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(address) : "memory");
    return v;
}

__device__ __forceinline__ int ld_relaxed_sys_global(const int* address) {
    int v;
    asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(address) : "memory");
    return v;
}

/// Peer load with the policy as a template parameter: the one switch between the two kinds above.
template <LoadKind kKind, typename T>
__device__ __forceinline__ T ld_peer(const T* address) {
    if constexpr (kKind == LoadKind::kAggressive && kAggressiveLoadsCompiled)
        return ld_global_nc_L1_no_allocate_L2_256B(address);
    else
        return ld_volatile_global(address);
}

/// Stores --------------------------------------------------------------------------------------------

// Payload stores that the writer never reads back: no L1 allocation keeps L1 for the loads.
__device__ __forceinline__ void st_global_L1_no_allocate(int4* address, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};"
                 :
                 : "l"(address), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

__device__ __forceinline__ void st_volatile_global(int* address, int v) {
    asm volatile("st.volatile.global.s32 [%0], %1;" : : "l"(address), "r"(v) : "memory");
}

// Publishes a flag: every store this thread made before it is visible to a reader that acquires it.
__device__ __forceinline__ void st_release_sys_global(int* address, int v) {
    asm volatile("st.release.sys.global.s32 [%0], %1;" : : "l"(address), "r"(v) : "memory");
}

__device__ __forceinline__ void st_relaxed_sys_global(int* address, int v) {
    asm volatile("st.relaxed.sys.global.s32 [%0], %1;" : : "l"(address), "r"(v) : "memory");
}

/// Atomics -------------------------------------------------------------------------------------------

__device__ __forceinline__ int atom_add_release_sys_global(int* address, int v) {
    int old;
    asm volatile("atom.add.release.sys.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(address), "r"(v) : "memory");
    return old;
}

__device__ __forceinline__ int atom_cas_relaxed_sys_global(int* address, int expected, int desired) {
    int old;
    asm volatile("atom.cas.relaxed.sys.global.b32 %0, [%1], %2, %3;"
                 : "=r"(old)
                 : "l"(address), "r"(expected), "r"(desired)
                 : "memory");
    return old;
}

/// Fences --------------------------------------------------------------------------------------------

// Orders this thread's earlier memory operations before later ones as seen by any observer in the
// system (other GPUs, other processes, the host). Used before releasing data written by other threads
// of the block after a __syncthreads().
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" : : : "memory"); }

__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" : : : "memory"); }

}  // namespace deep_ep::ptx
