// Kernels that exist to test the primitives: the coherence producer/consumer of deep_ep.check (between
// mapped buffers, and between nodes over NVSHMEM), the peer read and put bandwidth probes, a wait that is
// meant to time out, and a one-thread run over every ptx.cuh wrapper.
#include "kernels/api.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/sync.cuh"
#include "runtime/errors.hpp"
#ifdef DEEP_EP_WITH_NVSHMEM
#include "kernels/common/peer.cuh"
#endif

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

// Block `block`'s slice of a payload region: its 16-byte vectors and the index of its first word.
struct CoherenceSlice {
    int64_t offset;  // from the region's start
    int num_vectors;
    int first_word;

    __device__ __forceinline__ static CoherenceSlice of(const CoherenceLayout& layout, int block) {
        return CoherenceSlice{block * layout.slice_bytes, static_cast<int>(layout.slice_bytes / sizeof(int4)),
                              static_cast<int>(block * layout.slice_bytes / sizeof(int))};
    }
};

// The block writes round `seq` into its slice at `payload`.
__device__ __forceinline__ void write_slice(int4* payload, const CoherenceSlice& slice, int seq) {
    for (int i = threadIdx.x; i < slice.num_vectors; i += blockDim.x) {
        const int word = slice.first_word + 4 * i;
        ptx::st_global_L1_no_allocate(payload + i, make_int4(encode_word(seq, word), encode_word(seq, word + 1),
                                                             encode_word(seq, word + 2), encode_word(seq, word + 3)));
    }
}

// What one consumer thread found over its rounds, added to the launch's counters once, at the end.
struct CoherenceTally {
    unsigned long long checked = 0, stale = 0, torn = 0, invalid = 0;

    // The block reads its slice of round `seq` at `payload` with the variant's load and classifies each word.
    template <CoherenceVariant kVariant>
    __device__ __forceinline__ void check_slice(const int4* payload, const CoherenceSlice& slice, int seq) {
        for (int i = threadIdx.x; i < slice.num_vectors; i += blockDim.x) {
            const int word = slice.first_word + 4 * i;
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
    }

    __device__ __forceinline__ void add_to(unsigned long long* counters, int rounds_done) const {
        if (checked != 0)
            atomicAdd(&counters[kCheckedVectors], checked);
        if (stale != 0)
            atomicAdd(&counters[kStaleWords], stale);
        if (torn != 0)
            atomicAdd(&counters[kTornVectors], torn);
        if (invalid != 0)
            atomicAdd(&counters[kInvalidWords], invalid);
        if (threadIdx.x == 0)
            atomicAdd(&counters[kCheckedRounds], static_cast<unsigned long long>(rounds_done));
    }
};

// The rounds of one producer block, whatever carries the bytes (Args: CoherenceArgs or
// InternodeCoherenceArgs). `deliver(seq)` writes round seq and publishes it on the consumer's ready flag.
template <typename Args, typename Deliver>
__device__ __forceinline__ void produce_rounds(const Args& args, const int* ack, Deliver&& deliver) {
    for (int round = 0; round < args.num_rounds; ++round) {
        const int seq = args.seq_base + round + 1;
        // The consumer acks a round after reading all of it: overwriting earlier would create the very
        // "stale or torn" reads the test counts, through the test's own fault.
        const bool acked = threadIdx.x != 0 ||
                           wait_at_least(args.wait, WaitSite::kCoherenceFlag, args.consumer_rank, ack, seq - 1);
        if (__syncthreads_and(acked) == 0)
            return;
        deliver(seq);
    }
}

// The rounds of one consumer block: wait for round seq on `ready`, check the slice at `payload`, then
// `ack(seq)` (thread 0) hands the round back to the producer.
template <CoherenceVariant kVariant, typename Args, typename Ack>
__device__ __forceinline__ void consume_rounds(const Args& args, const int4* payload, const int* ready,
                                               const CoherenceSlice& slice, Ack&& ack) {
    CoherenceTally tally;
    int rounds_done = 0;
    for (int round = 0; round < args.num_rounds; ++round) {
        const int seq = args.seq_base + round + 1;
        const bool ready_seen = threadIdx.x != 0 || wait_ready<kVariant>(args.wait, args.producer_rank, ready, seq);
        if (__syncthreads_and(ready_seen) == 0)
            break;
        tally.check_slice<kVariant>(payload, slice, seq);
        // All threads have read the round (barrier) before thread 0 releases it back to the producer.
        __syncthreads();
        if (threadIdx.x == 0)
            ack(seq);
        ++rounds_done;
    }
    tally.add_to(args.counters, rounds_done);
}

__device__ __forceinline__ int* flag_at(uint8_t* buffer, int64_t offset) {
    return reinterpret_cast<int*>(buffer + offset);
}

__device__ void produce(const CoherenceArgs& args, int block) {
    const CoherenceLayout& layout = args.layout;
    const CoherenceSlice slice = CoherenceSlice::of(layout, block);
    uint8_t* payload_base = args.placement == CoherencePlacement::kPull
                                ? args.local_buffer + layout.outbox_offset()
                                : args.consumer_peer_buffer + layout.inbox_offset();
    auto* payload = reinterpret_cast<int4*>(payload_base + slice.offset);
    int* ready = flag_at(args.consumer_peer_buffer, layout.ready_flag_offset(block));
    produce_rounds(args, flag_at(args.local_buffer, layout.ack_flag_offset(block)), [&](int seq) {
        write_slice(payload, slice, seq);
        // Every thread's stores happen before thread 0's fence (barrier), the fence orders them before the
        // release at system scope, so a consumer that acquires the flag sees the whole round.
        __syncthreads();
        if (threadIdx.x == 0) {
            ptx::fence_acq_rel_sys();
            ptx::st_release_sys_global(ready, seq);
        }
    });
}

template <CoherenceVariant kVariant>
__device__ void consume(const CoherenceArgs& args, int block) {
    const CoherenceLayout& layout = args.layout;
    const CoherenceSlice slice = CoherenceSlice::of(layout, block);
    const uint8_t* payload_base = args.placement == CoherencePlacement::kPull
                                      ? args.producer_peer_buffer + layout.outbox_offset()
                                      : args.local_buffer + layout.inbox_offset();
    int* ack = flag_at(args.producer_peer_buffer, layout.ack_flag_offset(block));
    consume_rounds<kVariant>(args, reinterpret_cast<const int4*>(payload_base + slice.offset),
                             flag_at(args.local_buffer, layout.ready_flag_offset(block)), slice,
                             [=](int seq) { ptx::st_release_sys_global(ack, seq); });
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

#ifdef DEEP_EP_WITH_NVSHMEM
/// Inter-node coherence producer/consumer (NVSHMEM) -----------------------------------------------------

// The producer stages round seq in its own outbox (NVSHMEM transports read registered memory only, as the
// inter-node kernels stage their rows) and puts it into the consumer's inbox at the same offset.
__device__ void deliver_by_puts(const InternodeCoherenceArgs& args, const peer::SymmetricView& view, int block,
                                int seq) {
    const CoherenceLayout& layout = args.layout;
    const CoherenceSlice slice = CoherenceSlice::of(layout, block);
    auto* staged = view.local<int4>(layout.outbox_offset() + slice.offset);
    write_slice(staged, slice, seq);
    // The puts read the staged slice through the memory system (other lanes' loads on the P2P transport, a
    // NIC otherwise): the barrier orders every thread's stores before each thread's fence, which orders
    // them at system scope before the puts that thread takes part in.
    __syncthreads();
    ptx::fence_acq_rel_sys();
    const int warp = threadIdx.x / peer::kWarpSize, lane = threadIdx.x % peer::kWarpSize;
    const int64_t inbox = layout.inbox_offset() + slice.offset;
    const int64_t ready = layout.ready_flag_offset(block);
    if (args.delivery == CoherenceDelivery::kPutWithSignal) {
        if (warp == 0) {
            peer::warp_send_with_signal(view, args.consumer_rank, inbox, staged, static_cast<int>(layout.slice_bytes),
                                        ready, seq, peer::SignalOp::kSet, lane);
            // The next round rewrites the staged slice: completing the put is what allows reusing its source.
            peer::quiet();
        }
    } else {
        const int num_warps = static_cast<int>(blockDim.x) / peer::kWarpSize;
        const int64_t share = int64_t{(slice.num_vectors + num_warps - 1) / num_warps} * 16;
        const int64_t begin = warp * share < layout.slice_bytes ? warp * share : layout.slice_bytes;
        const int64_t end = begin + share < layout.slice_bytes ? begin + share : layout.slice_bytes;
        peer::warp_put(view, args.consumer_rank, inbox + begin, reinterpret_cast<const char*>(staged) + begin,
                       end - begin, lane);
        // Each thread completes its own puts, the barrier orders all of them before the signal: the
        // dispatch's and the combine's "puts, quiet, then signal_set".
        peer::quiet();
        __syncthreads();
        if (threadIdx.x == 0)
            peer::signal_set(view, args.consumer_rank, ready, seq);
    }
}

// As coherence_kernel, in the symmetric buffer: the flags are NVSHMEM signal words whose low half carries
// the sequence number (peer.cuh), the consumer reads its own inbox and acks with an NVSHMEM signal, since
// its producer may sit on another host where no store of this GPU reaches.
template <CoherenceVariant kVariant>
__global__ void __launch_bounds__(kCoherenceThreads) internode_coherence_kernel(InternodeCoherenceArgs args) {
    const peer::SymmetricView view = peer::SymmetricView::of(args);
    const CoherenceLayout& layout = args.layout;
    if (static_cast<int>(blockIdx.x) < layout.num_blocks) {
        const int block = blockIdx.x;
        produce_rounds(args, view.local<const int>(layout.ack_flag_offset(block)),
                       [&](int seq) { deliver_by_puts(args, view, block, seq); });
    } else {
        const int block = blockIdx.x - layout.num_blocks;
        const CoherenceSlice slice = CoherenceSlice::of(layout, block);
        consume_rounds<kVariant>(
            args, view.local<const int4>(layout.inbox_offset() + slice.offset),
            view.local<const int>(layout.ready_flag_offset(block)), slice,
            [&](int seq) { peer::signal_set(view, args.producer_rank, layout.ack_flag_offset(block), seq); });
    }
}

/// Put bandwidth -----------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kPutBandwidthThreads) put_bandwidth_kernel(PutBandwidthArgs args) {
    const peer::SymmetricView view = peer::SymmetricView::of(args);
    constexpr int kWarpsPerBlock = kPutBandwidthThreads / peer::kWarpSize;
    const int64_t num_warps = int64_t{gridDim.x} * kWarpsPerBlock;
    const int64_t warp = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / peer::kWarpSize;
    // One contiguous share a warp: as few, as large puts as the warps allow (a put's fixed cost is the
    // transport's, a NIC doorbell or a proxy request).
    const int64_t share = (args.num_bytes / 16 + num_warps - 1) / num_warps * 16;
    const int64_t begin = warp * share < args.num_bytes ? warp * share : args.num_bytes;
    const int64_t end = begin + share < args.num_bytes ? begin + share : args.num_bytes;
    peer::warp_put(view, args.dst_rank, args.offset + begin, view.local(args.offset + begin), end - begin,
                   threadIdx.x % peer::kWarpSize);
    // The kernel ends when its bytes are delivered, so the host's event pair times the transfer.
    peer::quiet();
}
#endif  // DEEP_EP_WITH_NVSHMEM

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

/// Launch helpers ----------------------------------------------------------------------------------------

// The wrong variants use .nc loads as well: a build without aggressive loads has none of them. The
// condition depends on kVariant, so the discarded launch is never instantiated.
template <CoherenceVariant kVariant, typename Launch>
void launch_coherence_variant(Launch& launch) {
    if constexpr (kVariant != CoherenceVariant::kConservative && !ptx::kAggressiveLoadsCompiled) {
        DEEP_EP_CHECK(false, "coherence variant " << static_cast<int>(kVariant)
                                                  << " needs the non-coherent loads, which this build compiled out "
                                                     "(DISABLE_AGGRESSIVE_PTX_INSTRS=1 or a non-Hopper arch)");
    } else {
        launch.template operator()<kVariant>();
        DEEP_EP_LAUNCH_CHECK();
    }
}

// What both coherence round trips check, then `launch.template operator()<kVariant>()` for the variant.
template <typename Launch>
void launch_coherence(CoherenceVariant variant, const CoherenceLayout& layout, int num_rounds, Launch&& launch) {
    DEEP_EP_CHECK(layout.num_blocks >= 1 && layout.num_blocks <= CoherenceLayout::kMaxBlocks,
                  "coherence num_blocks must be in 1.." << CoherenceLayout::kMaxBlocks);
    DEEP_EP_CHECK(layout.slice_bytes >= 16 && layout.slice_bytes % 16 == 0 &&
                      layout.num_blocks * layout.slice_bytes < (int64_t{1} << 31),
                  "coherence slice_bytes must be a positive multiple of 16 (got " << layout.slice_bytes << ")");
    DEEP_EP_CHECK(num_rounds >= 1, "num_rounds must be positive");
    switch (variant) {
        case CoherenceVariant::kAggressive: launch_coherence_variant<CoherenceVariant::kAggressive>(launch); break;
        case CoherenceVariant::kConservative: launch_coherence_variant<CoherenceVariant::kConservative>(launch); break;
        case CoherenceVariant::kNcAllocatingAcquire:
            launch_coherence_variant<CoherenceVariant::kNcAllocatingAcquire>(launch);
            break;
        case CoherenceVariant::kNcAllocatingRelaxed:
            launch_coherence_variant<CoherenceVariant::kNcAllocatingRelaxed>(launch);
            break;
        default: DEEP_EP_CHECK(false, "unknown coherence variant " << static_cast<int>(variant));
    }
}

}  // namespace

void launch_coherence_round_trip(const CoherenceArgs& args) {
    launch_coherence(args.variant, args.layout, args.num_rounds, [&]<CoherenceVariant kVariant>() {
        coherence_kernel<kVariant><<<2 * args.layout.num_blocks, kCoherenceThreads, 0, args.stream>>>(args);
    });
}

#ifdef DEEP_EP_WITH_NVSHMEM
void launch_internode_coherence_round_trip(const InternodeCoherenceArgs& args) {
    DEEP_EP_CHECK(args.delivery == CoherenceDelivery::kPutThenSignal ||
                      args.delivery == CoherenceDelivery::kPutWithSignal,
                  "unknown coherence delivery " << static_cast<int>(args.delivery));
    launch_coherence(args.variant, args.layout, args.num_rounds, [&]<CoherenceVariant kVariant>() {
        internode_coherence_kernel<kVariant><<<2 * args.layout.num_blocks, kCoherenceThreads, 0, args.stream>>>(args);
    });
}

void launch_put_bandwidth(const PutBandwidthArgs& args) {
    DEEP_EP_CHECK(args.num_bytes > 0 && args.num_bytes % 16 == 0 && args.offset % 16 == 0,
                  "num_bytes and offset must be multiples of 16, num_bytes positive");
    DEEP_EP_CHECK(args.num_blocks >= 1, "num_blocks must be positive");
    put_bandwidth_kernel<<<args.num_blocks, kPutBandwidthThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}
#endif  // DEEP_EP_WITH_NVSHMEM

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
