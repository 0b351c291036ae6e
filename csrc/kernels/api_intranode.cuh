// Part of the host/device seam (kernels/api.cuh): Intra-node dispatch/combine (NVLink, CUDA IPC).
//
// Pull-based, no ring buffers. Every op is: barrier (+ count exchange) -> stage -> barrier -> pull (each
// rank reads the rows it receives from its peers and writes the final outputs). Rows are read from one of
// two places, described to the pull kernels by DispatchSources / CombineSources:
//   staged: the stage kernel first copies each rank's rows into its own NVLink buffer; the barrier that
//     opens the next op proves every peer finished pulling, so staging may overwrite them.
//   direct: peers read the rows straight out of the owner's input tensors, opened through CUDA IPC (the
//     host exchanges their handles each call); stage only builds the send lists, and a closing barrier
//     keeps the inputs untouched until every peer is done. Each row then crosses memory once, not twice.
// Buffer offsets live in kernels/common/buffer_layout.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deep_ep {

/// The intra-node group as kernels see it: every rank's NVLink buffer mapped into this process (the own
/// one included, at index rank), plus who we are.
struct NvlPeers {
    void* buffers[kMaxNvlRanks];
    int rank;
    int num_ranks;
};

/// One cross-rank barrier at the start of a kernel (or none: active = false). Its epoch is counted on the
/// GPU (kernels/common/barrier.cuh), so captured kernels stay correct on CUDA-graph replay.
struct NvlBarrier {
    WaitContext wait;
    bool active;
    // The kernel also ends with a barrier (NvlKernelBarrier::close): with direct reads, no rank's stream may
    // move past the op while a peer still reads its inputs.
    bool closes;
};

/// A bare group barrier on a stream: one block. Benchmarks use it to line the ranks up on the GPU itself.
struct IntranodeBarrierArgs {
    NvlPeers peers;
    NvlBarrier barrier;
    cudaStream_t stream;
};
void launch_intranode_barrier(const IntranodeBarrierArgs& args);

/// Count exchange of a (non-cached) dispatch: one block. Also opens the op (its barrier is the op's first).
inline constexpr int64_t kNotifyCheckedTopkEntries = 4096;

struct IntranodeNotifyArgs {
    NvlPeers peers;
    NvlBarrier barrier;
    const int* num_tokens_per_rank;    // [num_ranks]: tokens this rank sends to each rank
    const int* num_tokens_per_expert;  // [num_experts]: this rank's tokens per global expert
    int num_experts;
    int expert_alignment;               // each per-expert receive count is rounded up to this
    int* rank_prefix_matrix;            // [num_ranks, num_ranks], written: [i][j] = rows j gets from 0..i
    int* num_recv_tokens_per_expert;    // [num_experts / num_ranks], written (aligned counts)
    int* send_counts;                   // [num_ranks], written: tokens this rank sends to each rank
    int* recv_first_row;                // [num_ranks], written: first recv_x row of each source rank
    // Sent to every rank, each of which checks every rank's against its receive count: a rank that would
    // receive more rows makes every rank reject the dispatch alike (layout::dispatch_verdict), reported here.
    int num_worst_tokens;               // 0: none
    RejectionReport* rejection;         // host-mapped, or nullptr
    // The dispatch's topk_idx [num_topk_entries] (int64 or int32), or nullptr: range-checked here, one
    // launch fewer than a kernel of its own, and flagged in `invalid` before the counts are published, so
    // that a host waiting for them raises a bad id in the same call. Only up to kNotifyCheckedTopkEntries:
    // one block checks them in about a memory round trip; larger batches, whose time is the GPU's rather
    // than the launches', are checked by launch_check_expert_ids' wider grid before the notify.
    const void* topk_idx;
    bool topk_idx_is_int64;
    int64_t num_topk_entries;
    InvalidExpertIdWord* invalid;
    // Host-mapped counters, or nullptr (num_worst_tokens mode: the host does not wait). Layout:
    // [0] = mapped_tag written last, [1] = received rows, [2 + e] = aligned count of local expert e.
    int* mapped_counters;
    int mapped_tag;
    cudaStream_t stream;
};
void launch_intranode_notify(const IntranodeNotifyArgs& args);

/// The shapes of one dispatched row; identical on every rank, so each rank can locate rows in a peer's
/// staging area without asking. See DispatchRowLayout in common/buffer_layout.cuh for the offsets.
struct DispatchRowShape {
    int hidden_bytes;  // bytes of one x row (bf16 or fp8), a multiple of 16
    int num_scales;    // float32 scales per row (0 for bf16)
    int num_topk;      // 0 when no top-k is dispatched
    int num_ranks;
};

/// Where the rows a pull reads lie, as this process maps them: row t of rank r's x is at
/// x[r] + t * x_stride, and likewise for the other parts (nullptr where the op has no such part).
struct DispatchSources {
    const char* x[kMaxNvlRanks];
    const char* scales[kMaxNvlRanks];
    const char* topk_idx[kMaxNvlRanks];
    const char* topk_weights[kMaxNvlRanks];
    int64_t x_stride, scales_stride, topk_idx_stride, topk_weights_stride;
    bool topk_idx_is_int64;  // direct reads of int64 ids take the low word (ids < 2^31, -1 stays -1)
};

struct CombineSources {
    const char* x[kMaxNvlRanks];
    const char* topk_weights[kMaxNvlRanks];
    int64_t x_stride, topk_weights_stride;
};

/// Dispatch step 1, on this rank only: stage x / scales / top-k rows (once per token however many ranks
/// receive it), build the per-destination send lists, and write send_head.
struct IntranodeDispatchStageArgs {
    NvlPeers peers;
    NvlBarrier barrier;  // epoch 0 after notify (it opened the op); a cached dispatch opens it here
    DispatchRowShape shape;
    int num_tokens;
    const void* x;                 // [num_tokens, hidden_bytes]
    const float* x_scales;         // [num_tokens, num_scales] or nullptr
    const void* topk_idx;          // [num_tokens, num_topk], int64 or int32, or nullptr
    bool topk_idx_is_int64;
    const float* topk_weights;     // [num_tokens, num_topk] or nullptr
    const bool* is_token_in_rank;  // [num_tokens, num_ranks]
    const int* rank_prefix_matrix; // [num_ranks, num_ranks]
    int* send_head;                // [num_tokens, num_ranks], written (row in the receiver's recv_x or -1); or nullptr
    bool stage_rows;               // false with direct reads: only the send lists and send_head
    int num_blocks;
    cudaStream_t stream;
};
void launch_intranode_dispatch_stage(const IntranodeDispatchStageArgs& args);

/// Dispatch step 2: barrier, then this rank pulls its rows from every peer's staging area.
struct IntranodeDispatchPullArgs {
    NvlPeers peers;
    NvlBarrier barrier;
    DispatchRowShape shape;
    DispatchSources sources;
    int num_experts;                // local expert range of this rank: [rank * E/R, (rank + 1) * E/R)
    const int* rank_prefix_matrix;  // [num_ranks, num_ranks]
    int num_recv_capacity;          // rows allocated in the outputs (exact count, or num_worst_tokens)
    void* recv_x;                   // [capacity, hidden_bytes]
    float* recv_x_scales;           // [capacity, num_scales] or nullptr
    int64_t* recv_topk_idx;         // [capacity, num_topk] local expert ids, -1 elsewhere; or nullptr
    float* recv_topk_weights;       // [capacity, num_topk], 0 where the expert is elsewhere; or nullptr
    int* recv_src_idx;              // [capacity]: source token index of each row (-1 in padding rows)
    // A fresh dispatch: its notify's verdict (layout::dispatch_verdict) decides; rejected, it poisons the rows.
    bool check_verdict;
    int num_blocks;
    bool conservative_loads;
    cudaStream_t stream;
};
void launch_intranode_dispatch_pull(const IntranodeDispatchPullArgs& args);

/// Combine step 1: barrier (opens the op), then stage this rank's combine input rows in its own buffer.
struct IntranodeCombineStageArgs {
    NvlPeers peers;
    NvlBarrier barrier;
    int hidden;
    int num_topk;  // 0 when no weights are combined
    int num_rows;
    const void* x;               // [num_rows, hidden] bf16
    const float* topk_weights;   // [num_rows, num_topk] or nullptr
    int num_blocks;
    cudaStream_t stream;
};
void launch_intranode_combine_stage(const IntranodeCombineStageArgs& args);

/// Combine step 2: barrier, then every token of this rank sums its rows from every receiver (fp32,
/// destination rank order 0..R-1), adds the biases and stores bf16.
struct IntranodeCombinePullArgs {
    NvlPeers peers;
    NvlBarrier barrier;
    int hidden;
    int num_topk;
    int num_tokens;
    CombineSources sources;
    const int* send_head;        // [num_tokens, num_ranks]: the row on each rank, or -1
    const void* bias_0;          // [num_tokens, hidden] bf16 or nullptr
    const void* bias_1;          // [num_tokens, hidden] bf16 or nullptr
    void* combined_x;            // [num_tokens, hidden] bf16
    float* combined_topk_weights;  // [num_tokens, num_topk] or nullptr
    int num_blocks;
    bool conservative_loads;
    cudaStream_t stream;
};
void launch_intranode_combine_pull(const IntranodeCombinePullArgs& args);

}  // namespace deep_ep
