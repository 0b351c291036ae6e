// Part of the host/device seam (kernels/api.cuh): low-latency dispatch/combine (NVSHMEM).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deep_ep {

inline constexpr int kLowLatencyMaxTopk = 32;              // one waiting thread per top-k entry
inline constexpr int kLowLatencyMaxTokensPerRank = 16383;  // the count field of a dispatch signal word
inline constexpr int kLowLatencyMaxExperts = 4096;         // shared-memory histogram of the send phase
// Hidden sizes low-latency ops accept (DeepEP V1's instantiations, kept for compatibility).
inline constexpr int kLowLatencySupportedHidden[] = {2048, 2560, 4096, 5120, 7168, 8192};

/// hidden's position among kLowLatencySupportedHidden, or -1 when low-latency ops do not support it.
inline int low_latency_hidden_index(int64_t hidden) {
    for (int i = 0; i < static_cast<int>(sizeof(kLowLatencySupportedHidden) / sizeof(int)); ++i)
        if (kLowLatencySupportedHidden[i] == hidden)
            return i;
    return -1;
}

/// Offsets in each rank's symmetric (NVSHMEM) buffer, for host and device, so that the size hint
/// (runtime/size_hints.cpp, asked by deep_ep.config), the host's checks and the kernels' addresses cannot
/// disagree.
///
/// Two sets; consecutive operations alternate between them (dispatch, combine, dispatch, ... as DeepEP
/// V1), so a combine never lands in the set whose dispatch rows its own round is still reading.
/// Per set:
///   signals         dispatch_words [L][R] uint64, per (local expert, source rank), written by the source:
///                   +1 per delivered row, + (count << 16) + (1 << 30) once with the row count; complete
///                   when bit 30 is set and the arrived rows equal the count; the (only) reader resets it.
///                   The high 32-bit half is 0, except in local expert 0's words: there it holds the
///                   first out-of-range expert id of the source's topk_idx (never 0: such an id is < -1
///                   or >= E), stored before the count; its reader resets it. Bit 31 of the low half:
///                   the source rejected the call (its argument checks failed; it sends no rows); the
///                   high half of its local expert 0 words then holds its rejection code. With two or
///                   more local experts, the high half of the last one's words holds the source's call
///                   signature (LowLatencySignature); its reader compares it with rank 0's and resets it.
///                   combine_counters [E] uint64, per global expert: +1 per row that expert's rank
///                   returns (bits 0-15); the receiver knows how many to expect from its own topk_idx; a
///                   rank that rejected the combine adds its rejection code << 16 once per (expert,
///                   receiver); the last block of the receiving kernel resets them.
///   send region     dispatch: [M] rows this rank casts once and sends to each selected expert;
///                   combine: [L][R*M] expert outputs staged for puts (the zero-copy buffer). Same bytes:
///                   a set serves one operation at a time.
///   receive region  dispatch: [L][R][M] rows, per (local expert, source) in the source's token order;
///                   combine: [E][M] bf16 rows, per (global expert, own token). Same bytes, likewise.
/// A dispatch row: a 16-byte header (int32 source token index), then bf16 [H], or fp8 [H] and float32
/// scales [H/128]; the stride (16 + 2H) fits the larger bf16 form.
struct LowLatencyLayout {
    int64_t num_max_tokens, hidden, num_ranks, num_experts;

    __host__ __device__ int64_t num_local_experts() const { return num_experts / num_ranks; }
    __host__ __device__ int64_t dispatch_header_bytes() const { return 16; }
    __host__ __device__ int64_t dispatch_row_bytes(bool fp8) const {
        return 16 + (fp8 ? hidden + hidden / kFp8GroupSize * 4 : hidden * 2);
    }
    __host__ __device__ int64_t dispatch_row_stride() const { return 16 + hidden * 2; }
    __host__ __device__ int64_t combine_row_bytes() const { return hidden * 2; }

    __host__ __device__ int64_t signal_bytes() const { return num_experts * 16; }
    __host__ __device__ int64_t send_bytes() const {
        const int64_t dispatch = num_max_tokens * dispatch_row_stride();
        const int64_t combine = num_experts * num_max_tokens * combine_row_bytes();
        return dispatch > combine ? dispatch : combine;
    }
    __host__ __device__ int64_t recv_bytes() const { return num_experts * num_max_tokens * dispatch_row_stride(); }
    __host__ __device__ int64_t set_bytes() const { return signal_bytes() + send_bytes() + recv_bytes(); }
    __host__ __device__ int64_t total_bytes() const { return 2 * set_bytes(); }

    __host__ __device__ int64_t set_offset(int set) const { return set * set_bytes(); }
    __host__ __device__ int64_t dispatch_word(int set, int64_t local_expert, int64_t src_rank) const {
        return set_offset(set) + (local_expert * num_ranks + src_rank) * 8;
    }
    __host__ __device__ int64_t combine_counter(int set, int64_t expert) const {
        return set_offset(set) + num_experts * 8 + expert * 8;
    }
    __host__ __device__ int64_t send_region(int set) const { return set_offset(set) + signal_bytes(); }
    __host__ __device__ int64_t recv_region(int set) const { return send_region(set) + send_bytes(); }
    __host__ __device__ int64_t dispatch_send_row(int set, int64_t token) const {
        return send_region(set) + token * dispatch_row_stride();
    }
    __host__ __device__ int64_t dispatch_recv_row(int set, int64_t local_expert, int64_t src_rank, int64_t slot) const {
        return recv_region(set) + ((local_expert * num_ranks + src_rank) * num_max_tokens + slot) * dispatch_row_stride();
    }
    __host__ __device__ int64_t combine_send_row(int set, int64_t row) const {
        return send_region(set) + row * combine_row_bytes();
    }
    __host__ __device__ int64_t combine_recv_row(int set, int64_t expert, int64_t token) const {
        return recv_region(set) + (expert * num_max_tokens + token) * combine_row_bytes();
    }
};

/// Where this rank's symmetric buffer lives and how each rank's copy is reached.
struct LowLatencySymmetricArgs {
    void* local_base;               // this rank's symmetric buffer (nvshmem_align)
    const uint64_t* mapped_bases;   // device [num_ranks]: each rank's buffer mapped here, 0 = use puts
    bool all_ranks_mapped;          // no puts at all: the kernels skip nvshmem_quiet
};

/// Dispatch: with do_send, each (token, expert) row goes to the expert's rank (FP8-cast once per token
/// when use_fp8); with do_recv, this rank waits for every (local expert, source) and packs what arrived.
/// Both set: one kernel; return_recv_hook: two launches, send now, receive when the hook runs.
struct LowLatencyDispatchArgs {
    LowLatencyLayout layout;
    int buffer_set;
    bool do_send, do_recv;
    // send side
    const void* x;  // bf16 [num_tokens, hidden]
    const void* topk_idx;  // [num_tokens, num_topk], int64 or int32, -1 = none
    bool topk_idx_is_int64;
    int num_tokens, num_topk;
    bool use_fp8, round_scale, use_ue8m0;
    // receive side, all [L, ...] with rows in the order of the packed layout
    void* recv_x;                 // fp8 or bf16 [L, R*M, H]
    void* recv_scales;            // float32 [L, H/128, R*M] or, with ue8m0, int32 [L, H/512, R*M]; null if bf16
    int* recv_count;              // [L]
    int* recv_src_info;           // [L, R*M]
    int64_t* recv_layout_range;   // [L, R]
    int* cumulative_local_expert_recv_stats;   // [L] or null: += rows received per local expert
    int64_t* dispatch_wait_recv_cost_stats;    // [R] or null: += nanoseconds waited per source rank
    LowLatencySymmetricArgs symmetric;
    WaitContext wait;
    // Ids outside [-1, num_experts) are sent nowhere; each sender's first one rides in its count words, and
    // every receiver records the lowest rank's in `invalid` (so every rank raises it).
    InvalidExpertIdWord* invalid;
    // Nonzero: this rank's argument checks failed (Buffer::rejection_code); it takes part with no tokens
    // and this code in its count words, and receives into no recv_x (nullptr: rows are only drained).
    int rejected_code;
    // Where a receiver reports the lowest rank that rejected the call, or whose signature differs from
    // rank 0's, or nullptr.
    RejectionReport* rejection;
    // What every rank of the call must agree on (LowLatencySignature::of), sent in the high half of the
    // count word to each rank's last local expert when a rank has two or more (the first carries bad ids).
    int signature;
    int rank;
    int num_blocks;
    bool conservative_loads;
    cudaStream_t stream;
};
void launch_low_latency_dispatch(const LowLatencyDispatchArgs& args);

/// A low-latency dispatch's call signature in 32 bits, nonzero: bit 31 set, use_fp8 (bit 30), the index of
/// hidden among kLowLatencySupportedHidden (bits 26-29), num_max_dispatch_tokens_per_rank (bits 12-25) and
/// num_experts - 1 (bits 0-11). Ranks whose dispatch layouts differ address different words, so the check
/// sees only what still lands where its receivers look; a differing use_fp8 (the same layout) always.
struct LowLatencySignature {
    enum Field : int { kUseFp8, kHidden, kNumMaxTokens, kNumExperts, kNumFields };
    static constexpr int kShift[kNumFields] = {30, 26, 12, 0};
    static constexpr int kMask[kNumFields] = {0x1, 0xf, 0x3fff, 0xfff};

    // hidden must be one of kLowLatencySupportedHidden.
    static int of(bool use_fp8, int64_t hidden, int64_t num_max_tokens, int64_t num_experts) {
        const int hidden_index = low_latency_hidden_index(hidden);
        const uint32_t value = (1u << 31) | (static_cast<uint32_t>(use_fp8) << kShift[kUseFp8]) |
                               (static_cast<uint32_t>(hidden_index) << kShift[kHidden]) |
                               (static_cast<uint32_t>(num_max_tokens) << kShift[kNumMaxTokens]) |
                               static_cast<uint32_t>(num_experts - 1);
        return static_cast<int>(value);
    }
    static int field(int signature, Field f) { return (signature >> kShift[f]) & kMask[f]; }
};
static_assert(kLowLatencyMaxTokensPerRank <= 0x3fff && kLowLatencyMaxExperts <= 0x1000,
              "the signature's fields must hold every supported value");

/// Combine: with do_send, each received row (expert output, bf16) returns to its source token's rank;
/// with do_recv, this rank waits for its tokens' rows and reduces sum_k w[t,k] * row in float32.
struct LowLatencyCombineArgs {
    LowLatencyLayout layout;
    int buffer_set;
    bool do_send, do_recv;
    // send side
    const void* x;                    // bf16 [L, R*M, H] expert outputs (ignored with zero_copy)
    bool zero_copy;                   // x already sits in this set's combine_send region
    const int* src_info;              // [L, R*M]
    const int64_t* layout_range;      // [L, R]
    // receive side
    const void* topk_idx;             // [num_tokens, num_topk]
    bool topk_idx_is_int64;
    const float* topk_weights;        // [num_tokens, num_topk]
    int num_tokens, num_topk;
    void* out;                        // bf16 [num_tokens, hidden]
    int* done_blocks;                 // local int, 0 between launches: the last receiving block resets
    int64_t* combine_wait_recv_cost_stats;  // [num_ranks] or null: += nanoseconds spent waiting per source rank
    LowLatencySymmetricArgs symmetric;
    WaitContext wait;
    // Ids outside [-1, num_experts) are combined as -1. Not flagged: the combine takes its dispatch's
    // topk_idx, whose bad ids that dispatch already reported to every rank.

    // Nonzero: this rank's argument checks failed (Buffer::rejection_code, below 1 << 15); it sends NaN rows
    // (zero copy from a 0xff-filled send region) and this code with the first row of each (expert, source)
    // range, and waits for its own tokens' rows only to leave the counters clean (topk_weights may be null).
    int rejected_code;
    // Where a receiver reports the lowest rank whose rows carried a rejection, or nullptr.
    RejectionReport* rejection;
    int rank;
    int num_blocks;
    bool conservative_loads;
    cudaStream_t stream;
};
void launch_low_latency_combine(const LowLatencyCombineArgs& args);

/// A device-side barrier over all NVSHMEM PEs, queued on a stream: benchmarks line the GPUs up with it so
/// that a timed kernel does not include the ranks' launch skew.
struct LowLatencyBarrierArgs {
    cudaStream_t stream;
};
void launch_low_latency_barrier(const LowLatencyBarrierArgs& args);

}  // namespace deep_ep
