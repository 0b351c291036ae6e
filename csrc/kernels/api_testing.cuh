// Part of the host/device seam (kernels/api.cuh): Tiny kernels that drive the primitives for tests and deep_ep.check.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deep_ep {

/// How the coherence consumer reads the payload. The first two are the library's two load kinds; the
/// last two are deliberately wrong, so that deep_ep.check can show its detector sees stale data.
enum class CoherenceVariant : int {
    kAggressive = 0,    // ptx::ld_peer<kAggressive> after an acquiring flag wait (what the kernels do)
    kConservative = 1,  // ptx::ld_peer<kConservative> after an acquiring flag wait
    // Plain ld.global.nc, which allocates in L1, after an acquiring flag wait. The acquire may invalidate
    // L1 (on Hopper it does), so this variant can come out clean; the next one cannot rely on that.
    kNcAllocatingAcquire = 2,
    // Plain ld.global.nc after a relaxed (non-acquiring) flag wait: lines cached by the previous round's
    // reads are served again. Wrong by construction; the variant that shows staleness is detectable.
    kNcAllocatingRelaxed = 3,
};
inline constexpr int kNumCoherenceVariants = 4;

/// Counters one consumer accumulates (int64 each, atomically added by every consumer block).
enum CoherenceCounter : int {
    kCheckedVectors = 0,  // 16-byte loads checked
    kStaleWords = 1,      // 4-byte words holding an older round's value
    kTornVectors = 2,     // 16-byte loads mixing words of different rounds
    kInvalidWords = 3,    // words that decode to no round at all (neither current nor older)
    kCheckedRounds = 4,   // rounds completed by consumer blocks (sum over blocks)
    kNumCoherenceCounters = 5,
};

/// Byte offsets of the coherence regions inside each rank's RuntimeBuffer, shared by host and device.
/// Every rank is producer for one peer and consumer of another in the same kernel, so the flags it polls
/// (ready: written by its producer peer; ack: written by its consumer peer) live in its own buffer, and
/// the payload has two homes: the outbox (the producer's memory, consumer pulls over NVLink/IPC) and the
/// inbox (the consumer's memory, the producer pushes into it).
struct CoherenceLayout {
    static constexpr int kMaxBlocks = 64;
    static constexpr int64_t kFlagStrideBytes = 128;  // one cache line per flag: no false sharing
    int num_blocks;
    int64_t slice_bytes;  // payload per block, a multiple of 16 bytes

    __host__ __device__ int64_t ready_flag_offset(int block) const { return block * kFlagStrideBytes; }
    __host__ __device__ int64_t ack_flag_offset(int block) const { return (kMaxBlocks + block) * kFlagStrideBytes; }
    __host__ __device__ int64_t outbox_offset() const { return 2 * kMaxBlocks * kFlagStrideBytes; }
    __host__ __device__ int64_t inbox_offset() const { return outbox_offset() + num_blocks * slice_bytes; }
    __host__ __device__ int64_t total_bytes() const { return inbox_offset() + num_blocks * slice_bytes; }
};

/// Where the payload lives: pull mirrors the intra-node path (the reader fetches rows from the writer's
/// buffer), push mirrors a writer storing into the reader's buffer (the reader's loads are then local).
enum class CoherencePlacement : int { kPull = 0, kPush = 1 };

/// One launch runs num_rounds producer/consumer rounds in both roles at once: blocks [0, num_blocks)
/// produce for consumer_rank, blocks [num_blocks, 2*num_blocks) consume from producer_rank. Round r
/// writes and expects sequence number seq_base + r + 1; flags carry it, so successive launches (same
/// seq_base on every rank, advanced by num_rounds each time) reuse the buffers without resets.
struct CoherenceArgs {
    CoherenceVariant variant;
    CoherencePlacement placement;
    CoherenceLayout layout;
    int num_rounds;
    int seq_base;
    uint8_t* local_buffer;          // this rank's RuntimeBuffer
    uint8_t* producer_peer_buffer;  // mapping of producer_rank's buffer (the rank this one consumes from)
    uint8_t* consumer_peer_buffer;  // mapping of consumer_rank's buffer (the rank this one produces for)
    int producer_rank;
    int consumer_rank;
    unsigned long long* counters;  // [kNumCoherenceCounters], device memory of this rank, accumulated
    WaitContext wait;
    cudaStream_t stream;
};
void launch_coherence_round_trip(const CoherenceArgs& args);

/// How the inter-node producer delivers a round into its consumer's symmetric buffer: NVSHMEM device calls
/// only (the consumer is on another node, so the SymmetricView maps it to nothing), the two patterns the
/// inter-node and low-latency kernels use.
enum class CoherenceDelivery : int {
    // Every warp puts its share of the slice (peer::warp_put) and completes it (peer::quiet); then one thread
    // sets the ready signal (peer::signal_set, NVSHMEM_SIGNAL_SET): inter-node dispatch and combine.
    kPutThenSignal = 0,
    // One warp puts the whole slice with the signal attached (peer::warp_send_with_signal, SET), which
    // NVSHMEM delivers after the data: the inter-node notify and the low-latency kernels.
    kPutWithSignal = 1,
};

/// The inter-node variant of the coherence round trip, in the NVSHMEM symmetric buffer laid out by
/// CoherenceLayout on every rank: the producer stages each round in its own outbox and puts it into the
/// consumer's inbox, the ready and ack flags are NVSHMEM signal words (uint64; sequence numbers live in the
/// low half) and the consumer reads the payload from its OWN symmetric buffer with the variant's load,
/// which is how an inter-node receiver reads what landed there. Rounds, sequence numbers and counters as
/// CoherenceArgs.
struct InternodeCoherenceArgs {
    CoherenceVariant variant;
    CoherenceDelivery delivery;
    CoherenceLayout layout;
    int num_rounds;
    int seq_base;
    void* local_base;              // this rank's symmetric buffer (peer::SymmetricView)
    const uint64_t* mapped_bases;  // device [num_ranks]; 0 for producer_rank and consumer_rank (put-reached)
    int producer_rank;
    int consumer_rank;
    unsigned long long* counters;  // [kNumCoherenceCounters], accumulated
    WaitContext wait;
    cudaStream_t stream;
};
void launch_internode_coherence_round_trip(const InternodeCoherenceArgs& args);

/// Puts num_bytes from this rank's symmetric buffer at `offset` into dst_rank's at the same offset with
/// NVSHMEM (every warp one contiguous share, then quiet), so that the kernel's time is the put's until
/// the bytes are delivered. Timed by the host with CUDA events.
struct PutBandwidthArgs {
    void* local_base;
    const uint64_t* mapped_bases;  // device [num_ranks]; 0 for dst_rank (put-reached)
    int dst_rank;
    int64_t offset;
    int64_t num_bytes;  // multiple of 16
    int num_blocks;
    cudaStream_t stream;
};
inline constexpr int kPutBandwidthThreads = 256;
void launch_put_bandwidth(const PutBandwidthArgs& args);

/// Reads num_bytes from source (a peer's buffer) with one load kind, as fast as it can; each thread
/// folds what it read into one int of sink so the loads are live. Timed by the host with CUDA events.
struct PeerReadBandwidthArgs {
    const int* source;
    int64_t num_bytes;  // multiple of 16
    bool conservative_loads;
    int num_blocks;
    int* sink;  // [num_blocks * kPeerReadThreads]
    cudaStream_t stream;
};
inline constexpr int kPeerReadThreads = 512;
void launch_peer_read_bandwidth(const PeerReadBandwidthArgs& args);

/// One thread waits (wait_at_least, WaitSite::kTestingWait) for *flag >= target: with nobody writing
/// the flag, this is how tests/test_primitives.py checks that a timeout becomes an exception.
struct WaitProbeArgs {
    const int* flag;
    int target;
    int peer;  // reported as the rank the wait was on
    WaitContext wait;
    cudaStream_t stream;
};
void launch_wait_probe(const WaitProbeArgs& args);

/// One thread calls every ptx.cuh wrapper the kernels use once, on scratch memory, and writes what each
/// returned into outputs; tests/test_primitives.py holds the matching host answers, slot by slot.
/// inputs: [kPtxProbeInputs] ints chosen by the host; scratch: [kPtxProbeScratch] ints, overwritten.
struct PtxProbeArgs {
    const int* inputs;
    int* scratch;
    int* outputs;  // [kPtxProbeOutputs]
    cudaStream_t stream;
};
inline constexpr int kPtxProbeInputs = 16;
inline constexpr int kPtxProbeScratch = 64;
inline constexpr int kPtxProbeOutputs = 48;
void launch_ptx_probe(const PtxProbeArgs& args);

}  // namespace deep_ep
