// The seam between host and device: Args structs and launcher declarations. This is the only kernel
// header host code includes; kernels include it too, so both sides agree on every field.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deep_ep {

inline constexpr int kMaxNvlRanks = 8;
// FP8 data carries one float32 scale per this many consecutive values of a row (normal and low-latency).
inline constexpr int kFp8GroupSize = 128;

/// What a spin-wait was waiting for when it timed out; the host turns it into the exception message.
enum class WaitSite : int {
    kNone = 0,
    kBarrier = 1,           // a peer's barrier signal (peer = the rank that did not arrive)
    kCoherenceFlag = 2,     // deep_ep.check's producer/consumer flag
    kLowLatencyCount = 3,   // a low-latency receive count from a source rank
    kLowLatencyFlag = 4,    // a low-latency combine arrival flag
    kTestingWait = 5,       // tests/test_primitives.py's deliberate timeout
    kInternodeExchange = 6, // the inter-node op-opening signal of a rank
    kInternodeRows = 7,     // an inter-node dispatch's rows from a source rank (peer = the source)
    kInternodeStaged = 8,   // a node peer's staged combine input (peer = that rank)
    kInternodePartial = 9,  // the combine partial sums of a node (peer = the node)
    kInternodeClose = 10,   // a node peer's end of reading the node's combine inputs (peer = that rank)
};

/// One per Buffer, in host-mapped pinned memory: kernels write it when a wait times out, the host reads
/// it after each synchronisation. status != 0 also tells every other waiting thread to give up at once.
struct DeviceErrorWord {
    int status;    // 0: fine, 1: a wait timed out
    int rank;      // the rank whose kernel timed out
    int site;      // WaitSite
    int peer;      // the peer or channel it waited on
    int expected;  // the value it waited for
    int observed;  // the last value it read
};

/// Passed by value into every kernel that waits on another rank.
struct WaitContext {
    DeviceErrorWord* error;  // device view of the host-mapped error word
    int rank;
    uint64_t timeout_ns;
};

/// Host-mapped, one per Buffer: the first out-of-range expert id a kernel met. Unlike DeviceErrorWord it
/// aborts nothing (the kernels treat such an id as -1); the host raises it as a ValueError and clears it.
/// The host reads it without synchronising with the GPU, so `found` is written last: the kernel that claims
/// the word writes the other fields, fences, then sets found; the host reads found first.
struct InvalidExpertIdWord {
    int claimed;      // 0 or 1: a kernel took the word (compare-and-swap)
    int value;        // the id
    int num_experts;  // the bound it broke
    int rank;         // the rank whose topk_idx held it, as a low-latency dispatch reports it to every rank;
                      // -1: found by this rank's own kernel
    int found;        // 0 or 1: the fields above are complete
};

/// Verdicts a notify kernel reaches on the GPU (RejectionReport::code; the codes of host argument checks,
/// which inter-node ranks send in their verdicts, stay below 1 << 16).
enum GpuVerdict : int {
    // Found alike by every rank from the exchanged counts: rank `rank` would receive `value` rows, more than
    // the num_worst_tokens (`limit`) it passed.
    kTooFewWorstTokens = 1 << 16,
    // An inter-node combine whose forwarded rows (`value`, known only on the GPU) exceed the `limit` rows of
    // its symmetric buffer left after its staged rows and the partial sums other nodes put.
    kForwardedRowsExceedBuffer = 2 << 16,
    // Inter-node ranks that disagree on the call, found alike by every rank from the exchanged signatures:
    // code kSignatureDiffers + (the first rank's op << 24) + (field << 8) + the first rank that passed a
    // value (its `limit`); `rank` is the lowest one that passed another (`value`). Fields:
    // InternodeCallSignature.
    kSignatureDiffers = 3 << 16,
    // Low-latency ranks that disagree on the dispatch (LowLatencySignature), found alike by every rank from
    // the signatures in its count words: code kLowLatencySignatureDiffers + the lowest rank that sent one
    // (the reference, whose signature is `limit`); `rank` is the lowest one that sent another (`value`).
    kLowLatencySignatureDiffers = 4 << 16,
};
inline constexpr int kGpuVerdictMask = 0xff << 16;

/// Host-mapped, one per Buffer: an op that every rank skipped because some rank rejected it (an inter-node
/// rank's failed argument checks, or a GpuVerdict), the lowest such rank, the code and the verdict's values.
/// Written like InvalidExpertIdWord (`found`: 0 clear, 2 being written, 1 complete); the host raises it and
/// clears it.
struct RejectionReport {
    int rank;
    int code;
    int value;
    int limit;
    int found;
};

/// Flags the first id outside [-1, num_experts) of topk_idx in `invalid`; the host checks after a sync.
struct CheckExpertIdsArgs {
    const void* topk_idx;  // [numel], int64 or int32
    bool topk_idx_is_int64;
    int64_t numel;
    int num_experts;
    InvalidExpertIdWord* invalid;
    cudaStream_t stream;
};
void launch_check_expert_ids(const CheckExpertIdsArgs& args);

/// The layout kernel: per-rank and per-expert token counts and token-to-rank membership.
struct DispatchLayoutArgs {
    const void* topk_idx;  // [num_tokens, num_topk], int64 or int32, -1 = no expert
    bool topk_idx_is_int64;
    int num_tokens;
    int num_topk;
    int num_experts;
    int num_ranks;
    int num_nvl_ranks;           // ranks per node: counts per node too when fewer than num_ranks
    int* num_tokens_per_rank;    // [num_ranks], written
    int* num_tokens_per_node;    // [num_ranks / num_nvl_ranks], written, or nullptr (one node)
    int* num_tokens_per_expert;  // [num_experts], written
    bool* is_token_in_rank;      // [num_tokens, num_ranks], written
    // With more than one block: each block's counts [blocks, num_ranks + num_experts + nodes] (scratch),
    // and the number of blocks done so far (0 between calls: the last block resets it).
    int* block_counts;
    int* done_blocks;
    InvalidExpertIdWord* invalid;  // flagged on an id outside [-1, num_experts) (skipped then); or nullptr
    cudaStream_t stream;
};
// Blocks of the layout kernel for num_tokens (rows of DispatchLayoutArgs::block_counts when more than one).
int dispatch_layout_blocks(int num_tokens);
void launch_dispatch_layout(const DispatchLayoutArgs& args);

}  // namespace deep_ep

// Each path keeps its Args structs in its own part of the seam.
#include "kernels/api_intranode.cuh"
#include "kernels/api_internode.cuh"
#include "kernels/api_low_latency.cuh"
#include "kernels/api_testing.cuh"
