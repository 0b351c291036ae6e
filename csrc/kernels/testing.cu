// Kernels that exist to test the primitives: the coherence producer/consumer of deep_ep.check, the peer
// read bandwidth probe, a wait that is meant to time out, and a one-thread run over every ptx.cuh wrapper.
#include "kernels/api.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/sync.cuh"
#include "runtime/errors.hpp"

namespace deep_ep {
namespace {

/// Coherence producer/consumer -------------------------------------------------------------------------

constexpr int kCoherenceThreads = 256;

// A word's value names the round that wrote it and its own index: value = seq * kSeqMultiplier + index
// (mod 2^32). The multiplier is odd, hence invertible, so a reader recovers the round of ANY word it
// sees, which is what tells "stale" (an older round) apart from garbage.
constexpr uint32_t kSeqMultiplier = 0x9E3779B1u;
constexpr uint32_t inverse_mod_2_32(uint32_t odd) {
    uint32_t x = odd;  // correct to 3 bits; each Newton step doubles that
    for (int i = 0; i < 5; ++i)
        x *= 2u - odd * x;
    return x;
}
constexpr uint32_t kSeqMultiplierInverse = inverse_mod_2_32(kSeqMultiplier);
static_assert(kSeqMultiplier * kSeqMultiplierInverse == 1u);

__device__ __forceinline__ int encode_word(int seq, int index) {
    return static_cast<int>(static_cast<uint32_t>(seq) * kSeqMultiplier + static_cast<uint32_t>(index));
}

__device__ __forceinline__ int decode_seq(int value, int index) {
    return static_cast<int>((static_cast<uint32_t>(value) - static_cast<uint32_t>(index)) * kSeqMultiplierInverse);
}

template <CoherenceVariant kVariant>
__device__ __forceinline__ int4 load_payload(const int4* address) {
    if constexpr (kVariant == CoherenceVariant::kAggressive)
        return ptx::ld_peer<ptx::LoadKind::kAggressive>(address);
    else if constexpr (kVariant == CoherenceVariant::kConservative)
        return ptx::ld_peer<ptx::LoadKind::kConservative>(address);
    else
        return ptx::ld_global_nc(address);
}

// The library's kernels acquire the flag before reading the payload; so do the variants under test. The
// relaxed wrong variant skips the acquire on purpose: on Hopper an acquire also invalidates L1, which
// would hide the stale lines the variant exists to show.
template <CoherenceVariant kVariant>
__device__ __forceinline__ bool wait_ready(const WaitContext& ctx, int producer_rank, const int* flag, int seq) {
    if constexpr (kVariant == CoherenceVariant::kNcAllocatingRelaxed)
        return wait_until(
            ctx, WaitSite::kCoherenceFlag, producer_rank, seq, [=] { return ptx::ld_relaxed_sys_global(flag); },
            [=](int v) { return v - seq >= 0; });
    else
        return wait_at_least(ctx, WaitSite::kCoherenceFlag, producer_rank, flag, seq);
}

__device__ __forceinline__ int* flag_at(uint8_t* buffer, int64_t offset) {
    return reinterpret_cast<int*>(buffer + offset);
}

__device__ void produce(const CoherenceArgs& args, int block) {
    const CoherenceLayout& layout = args.layout;
    uint8_t* payload_base = args.placement == CoherencePlacement::kPull
                                ? args.local_buffer + layout.outbox_offset()
                                : args.consumer_peer_buffer + layout.inbox_offset();
    auto* payload = reinterpret_cast<int4*>(payload_base + block * layout.slice_bytes);
    const int* ack = flag_at(args.local_buffer, layout.ack_flag_offset(block));
    int* ready = flag_at(args.consumer_peer_buffer, layout.ready_flag_offset(block));
    const int num_vectors = static_cast<int>(layout.slice_bytes / sizeof(int4));
    const int first_word = static_cast<int>(block * layout.slice_bytes / sizeof(int));
    __shared__ bool ok;

    for (int round = 0; round < args.num_rounds; ++round) {
        const int seq = args.seq_base + round + 1;
        // The consumer acks a round after reading all of it: overwriting earlier would create the very
        // "stale or torn" reads the test counts, through the test's own fault.
        if (threadIdx.x == 0)
            ok = wait_at_least(args.wait, WaitSite::kCoherenceFlag, args.consumer_rank, ack, seq - 1);
        __syncthreads();
        if (!ok)
            return;
        for (int i = threadIdx.x; i < num_vectors; i += blockDim.x) {
            const int word = first_word + 4 * i;
            ptx::st_global_L1_no_allocate(payload + i, make_int4(encode_word(seq, word), encode_word(seq, word + 1),
                                                                 encode_word(seq, word + 2),
                                                                 encode_word(seq, word + 3)));
        }
        // Every thread's stores happen before thread 0's fence (barrier), the fence orders them before the
        // release at system scope, so a consumer that acquires the flag sees the whole round.
        __syncthreads();
        if (threadIdx.x == 0) {
            ptx::fence_acq_rel_sys();
            ptx::st_release_sys_global(ready, seq);
        }
    }
}

template <CoherenceVariant kVariant>
__device__ void consume(const CoherenceArgs& args, int block) {
    const CoherenceLayout& layout = args.layout;
    const uint8_t* payload_base = args.placement == CoherencePlacement::kPull
                                      ? args.producer_peer_buffer + layout.outbox_offset()
                                      : args.local_buffer + layout.inbox_offset();
    const auto* payload = reinterpret_cast<const int4*>(payload_base + block * layout.slice_bytes);
    const int* ready = flag_at(args.local_buffer, layout.ready_flag_offset(block));
    int* ack = flag_at(args.producer_peer_buffer, layout.ack_flag_offset(block));
    const int num_vectors = static_cast<int>(layout.slice_bytes / sizeof(int4));
    const int first_word = static_cast<int>(block * layout.slice_bytes / sizeof(int));
    __shared__ bool ok;

    unsigned long long checked = 0, stale = 0, torn = 0, invalid = 0;
    int rounds_done = 0;
    for (int round = 0; round < args.num_rounds; ++round) {
        const int seq = args.seq_base + round + 1;
        if (threadIdx.x == 0)
            ok = wait_ready<kVariant>(args.wait, args.producer_rank, ready, seq);
        __syncthreads();
        if (!ok)
            break;
        for (int i = threadIdx.x; i < num_vectors; i += blockDim.x) {
            const int word = first_word + 4 * i;
            const int4 v = load_payload<kVariant>(payload + i);
            const int seqs[4] = {decode_seq(v.x, word), decode_seq(v.y, word + 1), decode_seq(v.z, word + 2),
                                 decode_seq(v.w, word + 3)};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int age = seq - seqs[k];  // wrap-safe: sequence numbers only move forward
                // An older round is at most seq_base + num_rounds back (flags start at 0 on every buffer);
                // anything else (a future round, zeros of a fresh buffer) is not a coherence miss.
                if (age > 0 && age <= seq)
                    ++stale;
                else if (age != 0)
                    ++invalid;
            }
            torn += (seqs[0] != seqs[1] || seqs[0] != seqs[2] || seqs[0] != seqs[3]) ? 1 : 0;
            ++checked;
        }
        // All threads have read the round (barrier) before thread 0 releases it back to the producer.
        __syncthreads();
        if (threadIdx.x == 0)
            ptx::st_release_sys_global(ack, seq);
        ++rounds_done;
    }
    if (checked != 0)
        atomicAdd(&args.counters[kCheckedVectors], checked);
    if (stale != 0)
        atomicAdd(&args.counters[kStaleWords], stale);
    if (torn != 0)
        atomicAdd(&args.counters[kTornVectors], torn);
    if (invalid != 0)
        atomicAdd(&args.counters[kInvalidWords], invalid);
    if (threadIdx.x == 0)
        atomicAdd(&args.counters[kCheckedRounds], static_cast<unsigned long long>(rounds_done));
}

// Producer and consumer blocks of one rank live in one launch, so a rank never needs two streams and one
// kernel per rank is resident at a time; each block is one side of one (producer, consumer) block pair.
template <CoherenceVariant kVariant>
__global__ void __launch_bounds__(kCoherenceThreads) coherence_kernel(CoherenceArgs args) {
    const int num_blocks = args.layout.num_blocks;
    if (static_cast<int>(blockIdx.x) < num_blocks)
        produce(args, blockIdx.x);
    else
        consume<kVariant>(args, blockIdx.x - num_blocks);
}

template <CoherenceVariant kVariant>
void launch_coherence_variant(const CoherenceArgs& args) {
    // The wrong variants use .nc loads as well: a build without aggressive loads has none of them.
    if constexpr (kVariant != CoherenceVariant::kConservative && !ptx::kAggressiveLoadsCompiled) {
        DEEP_EP_CHECK(false, "coherence variant " << static_cast<int>(kVariant)
                                                  << " needs the non-coherent loads, which this build compiled out "
                                                     "(DISABLE_AGGRESSIVE_PTX_INSTRS=1 or a non-Hopper arch)");
    } else {
        coherence_kernel<kVariant><<<2 * args.layout.num_blocks, kCoherenceThreads, 0, args.stream>>>(args);
        DEEP_EP_LAUNCH_CHECK();
    }
}

/// Peer read bandwidth ----------------------------------------------------------------------------------

template <ptx::LoadKind kKind>
__global__ void __launch_bounds__(kPeerReadThreads) peer_read_kernel(PeerReadBandwidthArgs args) {
    const auto* source = static_cast<const int4*>(static_cast<const void*>(args.source));
    const int64_t num_vectors = args.num_bytes / static_cast<int64_t>(sizeof(int4));
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    // Several independent loads in flight per thread: a peer read's latency is microseconds over NVLink.
    constexpr int kInFlight = 4;
    int folded = 0;
    int64_t i = thread;
    for (; i + (kInFlight - 1) * stride < num_vectors; i += kInFlight * stride) {
        int4 v[kInFlight];
#pragma unroll
        for (int k = 0; k < kInFlight; ++k)
            v[k] = ptx::ld_peer<kKind>(source + i + k * stride);
#pragma unroll
        for (int k = 0; k < kInFlight; ++k)
            folded ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    for (; i < num_vectors; i += stride) {
        const int4 v = ptx::ld_peer<kKind>(source + i);
        folded ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    args.sink[thread] = folded;
}

/// Wait probe --------------------------------------------------------------------------------------------

__global__ void wait_probe_kernel(WaitProbeArgs args) {
    // On timeout wait_at_least has filled the error word; nothing else to do but leave.
    wait_at_least(args.wait, WaitSite::kTestingWait, args.peer, args.flag, args.target);
}

/// PTX probe ---------------------------------------------------------------------------------------------

// Slot map (tests/test_primitives.py mirrors it): in = inputs, s = scratch, out = outputs.
__global__ void ptx_probe_kernel(PtxProbeArgs args) {
    const int* in = args.inputs;
    int* s = args.scratch;
    int* out = args.outputs;
    auto put4 = [&](int slot, int4 v) {
        out[slot] = v.x, out[slot + 1] = v.y, out[slot + 2] = v.z, out[slot + 3] = v.w;
    };
    const auto* in4 = reinterpret_cast<const int4*>(in);

    // Loads of host-written data: every kind must return exactly what is in memory.
    put4(0, ptx::ld_global_nc_L1_no_allocate_L2_256B(in4));                        // in[0..3]
    out[4] = ptx::ld_global_nc_L1_no_allocate_L2_256B(in + 4);                       // in[4]
    out[5] = ptx::ld_global_nc(in + 5);                                              // in[5]
    put4(6, ptx::ld_global_nc(in4 + 2));                                             // in[8..11]
    put4(10, ptx::ld_volatile_global(in4 + 1));                                      // in[4..7]
    out[14] = ptx::ld_volatile_global(in + 6);                                       // in[6]
    out[15] = ptx::ld_acquire_sys_global(in + 7);                                    // in[7]
    out[16] = ptx::ld_relaxed_sys_global(in + 12);                                   // in[12]
    put4(17, ptx::ld_peer<ptx::LoadKind::kAggressive>(in4 + 3));                     // in[12..15]
    put4(21, ptx::ld_peer<ptx::LoadKind::kConservative>(in4));                       // in[0..3]
    out[25] = ptx::ld_peer<ptx::LoadKind::kAggressive>(in + 13);                     // in[13]
    out[26] = ptx::ld_peer<ptx::LoadKind::kConservative>(in + 14);                   // in[14]

    // Stores, read back through a coherent load after a fence.
    auto* s4 = reinterpret_cast<int4*>(s);
    ptx::st_global_L1_no_allocate(s4, make_int4(in[0] + 1, in[1] + 1, in[2] + 1, in[3] + 1));
    ptx::st_volatile_global(s + 4, in[4] ^ 0x5a5a);
    ptx::st_release_sys_global(s + 5, in[5] * 3);
    ptx::st_relaxed_sys_global(s + 6, in[6] - 7);
    ptx::fence_acq_rel_gpu();
    put4(27, ptx::ld_volatile_global(s4));  // in[0..3] + 1
    out[31] = ptx::ld_volatile_global(s + 4);  // in[4] ^ 0x5a5a
    out[32] = ptx::ld_volatile_global(s + 5);  // in[5] * 3
    out[33] = ptx::ld_volatile_global(s + 6);  // in[6] - 7

    // Atomics: returned old value and the value left in memory.
    ptx::st_volatile_global(s + 8, in[8]);
    out[34] = ptx::atom_add_release_sys_global(s + 8, in[9]);  // in[8]
    out[35] = ptx::ld_acquire_sys_global(s + 8);               // in[8] + in[9]
    ptx::st_volatile_global(s + 9, in[10]);
    out[36] = ptx::atom_cas_relaxed_sys_global(s + 9, in[10], in[11]);  // in[10]: matched, swapped
    out[37] = ptx::ld_acquire_sys_global(s + 9);                         // in[11]
    out[38] = ptx::atom_cas_relaxed_sys_global(s + 9, in[10], in[12]);  // in[11]: no match (in[10] != in[11])
    out[39] = ptx::ld_acquire_sys_global(s + 9);                         // still in[11]

    // Fences have no value; reaching the next line is the result.
    ptx::fence_acq_rel_sys();
    out[40] = 1;

    // The global timer is shared by all SMs and counts nanoseconds: it must be nonzero and move forward.
    const uint64_t t0 = ptx::mov_u64_globaltimer();
    uint64_t t1 = t0;
    while (t1 == t0)
        t1 = ptx::mov_u64_globaltimer();
    out[41] = t0 != 0 ? 1 : 0;
    out[42] = (t1 > t0 && t1 - t0 < 1000000000ull) ? 1 : 0;
}

}  // namespace

void launch_coherence_round_trip(const CoherenceArgs& args) {
    DEEP_EP_CHECK(args.layout.num_blocks >= 1 && args.layout.num_blocks <= CoherenceLayout::kMaxBlocks,
                  "coherence num_blocks must be in 1.." << CoherenceLayout::kMaxBlocks);
    DEEP_EP_CHECK(args.layout.slice_bytes >= 16 && args.layout.slice_bytes % 16 == 0 &&
                      args.layout.num_blocks * args.layout.slice_bytes < (int64_t{1} << 31),
                  "coherence slice_bytes must be a positive multiple of 16 (got " << args.layout.slice_bytes << ")");
    DEEP_EP_CHECK(args.num_rounds >= 1, "num_rounds must be positive");
    switch (args.variant) {
        case CoherenceVariant::kAggressive: launch_coherence_variant<CoherenceVariant::kAggressive>(args); break;
        case CoherenceVariant::kConservative: launch_coherence_variant<CoherenceVariant::kConservative>(args); break;
        case CoherenceVariant::kNcAllocatingAcquire:
            launch_coherence_variant<CoherenceVariant::kNcAllocatingAcquire>(args);
            break;
        case CoherenceVariant::kNcAllocatingRelaxed:
            launch_coherence_variant<CoherenceVariant::kNcAllocatingRelaxed>(args);
            break;
        default: DEEP_EP_CHECK(false, "unknown coherence variant " << static_cast<int>(args.variant));
    }
}

// Same rule as every launcher: the aggressive instantiation exists only where the build compiled it (the
// default template argument makes the condition dependent, so the discarded branch is never instantiated).
template <bool kAggressiveCompiled = ptx::kAggressiveLoadsCompiled>
void launch_peer_read_kind(const PeerReadBandwidthArgs& args) {
    if constexpr (kAggressiveCompiled) {
        if (!args.conservative_loads) {
            peer_read_kernel<ptx::LoadKind::kAggressive><<<args.num_blocks, kPeerReadThreads, 0, args.stream>>>(args);
            return;
        }
    }
    peer_read_kernel<ptx::LoadKind::kConservative><<<args.num_blocks, kPeerReadThreads, 0, args.stream>>>(args);
}

void launch_peer_read_bandwidth(const PeerReadBandwidthArgs& args) {
    DEEP_EP_CHECK(args.num_bytes > 0 && args.num_bytes % 16 == 0, "num_bytes must be a positive multiple of 16");
    DEEP_EP_CHECK(args.num_blocks >= 1, "num_blocks must be positive");
    launch_peer_read_kind(args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_wait_probe(const WaitProbeArgs& args) {
    wait_probe_kernel<<<1, 1, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_ptx_probe(const PtxProbeArgs& args) {
    ptx_probe_kernel<<<1, 1, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
