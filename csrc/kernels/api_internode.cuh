// Part of the host/device seam (kernels/api.cuh): inter-node dispatch/combine (NVLink inside a node,
// NVSHMEM between nodes).
//
// A group of R ranks is split into N = R / L nodes of L consecutive ranks; rank g = n * L + l is local
// index l of node n. Its "forwarder" in node n' is rank n' * L + l. Everything lives in the symmetric
// (NVSHMEM) buffer; inside a node ranks read each other's copy through nvshmem_ptr mappings (NVLink),
// across nodes bytes travel only by NVSHMEM puts (any transport).
//
// Every op opens with an exchange among all ranks (notify kernel): each rank signals every rank with the
// op's epoch, a fresh dispatch sending its counts along. Passing it proves every rank finished its
// previous op, so the op may overwrite anything in any rank's buffer that the previous op used.
//
// Dispatch (source g = (m, l)):
//   plan:  per destination node n, the in-order list of g's tokens for n (a token's slot k there) and, per
//          rank j of node n, the list of what j reads; lists for another node are put into the forwarder
//          (n, l)'s region m, lists for g's own node written into g's own region m;
//   send:  each token with a destination is staged once into g's send rows; for every other node it
//          goes to, one put of the row into forwarder (n, l)'s region m at slot k (the deduplication:
//          once per node, however many ranks of that node want it); then the forwarders are signalled;
//   pull:  receiver (n, j) waits for the signals and, per source g = (m, l) in rank order, reads its rows
//          over NVLink: from forwarder (n, l)'s region m, or from g's send rows when m == n.
// Combine (the transpose): forwarder (n, l) sums, per token it landed for source (m, l), the rows its node's
// ranks hold for it and puts one BF16 partial sum back to (m, l); the source adds its own node's rows (read
// over NVLink) and the partials of the other nodes. The node's rows are read where the caller's tensors are
// (CUDA IPC, addresses exchanged per call on the host; the op closes with a node barrier so no rank's
// caller reuses its inputs while a peer still reads them), or, where that is not possible (CUDA graph
// capture, memory IPC cannot export), from a staged copy in each rank's symmetric buffer.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deep_ep {

// Local experts per rank the count messages carry (as the intra-node count exchange).
inline constexpr int kInternodeMaxLocalExperts = 2048;

__host__ __device__ constexpr int64_t internode_round_up(int64_t value, int64_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
}

/// The control region of the symmetric buffer: signal words (uint64, what NVSHMEM's signal operations
/// update; every value fits the low 31 bits), per-rank counters, and the count messages.
///   exchange word g   written by rank g: the epoch of the op it opened
///   region word m     written by source (m, l) (this rank's local index): its rows and lists are here
///   partial word n    written by forwarder (n, l): its combine partial sums are here
///   node word j       written by rank j of this node in a combine: its input is staged (staged reads), or
///                     it finished reading the node's inputs (direct reads)
///   epoch counter, kernel exit counter (int, this rank only), rows sent across nodes (int64, tests),
///                     rejected epoch (int: the last op some rank rejected, this rank's view)
///   messages          [2 parities][R] in, [R] out: every rank opens every op with one to every rank: the
///                     header (InternodeMessageHeader: the op's epoch, this rank's verdict, the call's
///                     signature), then, for a fresh dispatch, the counts: num_tokens_per_rank [R],
///                     num_tokens_per_rdma_rank [N], the receiver's slice of num_tokens_per_expert, the
///                     sender's num_worst_tokens
struct InternodeControl {
    int num_ranks, num_nvl_ranks;

    static constexpr int kHeaderInts = 16;
    __host__ __device__ int num_nodes() const { return num_ranks / num_nvl_ranks; }
    __host__ __device__ int64_t message_ints() const {
        return kHeaderInts + internode_round_up(num_ranks + num_nodes() + kInternodeMaxLocalExperts + 1, 4);
    }
    __host__ __device__ int64_t exchange_word(int rank) const { return int64_t{rank} * 8; }
    __host__ __device__ int64_t region_word(int node) const { return (int64_t{num_ranks} + node) * 8; }
    __host__ __device__ int64_t partial_word(int node) const { return (int64_t{num_ranks} + num_nodes() + node) * 8; }
    __host__ __device__ int64_t node_word(int local) const {
        return (int64_t{num_ranks} + 2 * num_nodes() + local) * 8;
    }
    __host__ __device__ int64_t counters_offset() const {
        return (int64_t{num_ranks} + 2 * num_nodes() + num_nvl_ranks) * 8;
    }
    __host__ __device__ int64_t epoch_counter() const { return counters_offset(); }
    __host__ __device__ int64_t kernel_exits() const { return counters_offset() + 4; }
    __host__ __device__ int64_t rows_sent_counter() const { return counters_offset() + 8; }
    __host__ __device__ int64_t rejected_epoch() const { return counters_offset() + 16; }
    __host__ __device__ int64_t signal_bytes() const { return internode_round_up(counters_offset() + 64, 4096); }
    __host__ __device__ int64_t message_in(int parity, int src) const {
        return signal_bytes() + (int64_t{parity} * num_ranks + src) * message_ints() * 4;
    }
    __host__ __device__ int64_t message_out(int dst) const {
        return signal_bytes() + (2 * int64_t{num_ranks} + dst) * message_ints() * 4;
    }
    // The counts after a message's header.
    __host__ __device__ int64_t count_in(int parity, int src) const {
        return message_in(parity, src) + kHeaderInts * 4;
    }
    __host__ __device__ int64_t count_out(int dst) const { return message_out(dst) + kHeaderInts * 4; }
    __host__ __device__ int64_t bytes() const {
        return internode_round_up(signal_bytes() + 3 * int64_t{num_ranks} * message_ints() * 4, 4096);
    }
};

/// What every rank must agree on for an inter-node op, compared field by field in the op's exchange (as
/// the intra-node host exchange compares its signature, runtime/call_agreement.hpp): the operation, then
/// the fields that depend on it (0 where the op has none). handle_seq -1: a handle without identity, which
/// matches any.
struct InternodeCallSignature {
    enum Op : int { kFreshDispatch = 1, kCachedDispatch = 2, kCombine = 3, kBarrier = 4 };
    enum XDtype : int { kBFloat16 = 1, kFloat8 = 2 };
    static constexpr int kNumFields = 6;
    int op, x_dtype, hidden, num_topk, num_experts, handle_seq;

    __host__ __device__ int field(int f) const {
        const int fields[kNumFields] = {op, x_dtype, hidden, num_topk, num_experts, handle_seq};
        return fields[f];
    }
    // Field names as the intra-node signature and the reference backend print them.
    __host__ static const char* field_name(int f, int op) {
        switch (f) {
            case 0: return "operation";
            case 1: return "x.dtype";
            case 2: return "x.size(1)";
            case 3: return op == kCombine ? "topk_weights.size(1)" : "topk_idx.size(1)";
            case 4: return "num_tokens_per_expert.size(0)";
            default: return "handle";
        }
    }
};

/// The first InternodeControl::kHeaderInts ints of every exchange message.
struct InternodeMessageHeader {
    int epoch;
    int code;    // 0: this rank accepts the op; else its verdict (host argument code or a GpuVerdict)
    int blamed;  // with a verdict: the rank whose error it is (a node peer whose failed checks the node agreed on)
    int value, limit;  // with a GpuVerdict: what was found and what was allowed
    InternodeCallSignature signature;
};
static_assert(sizeof(InternodeMessageHeader) <= InternodeControl::kHeaderInts * 4);

/// The data region during a dispatch, for rows of one shape and `capacity` tokens per rank:
///   send rows       [C] rows: this rank's tokens, staged once (read by its own node, put to the others)
///   list staging    [N][L][C] int32: lists bound for other nodes, put from here
///   region m        [C] rows landed from source (m, l), then [L][C] int32 lists (what rank j of this
///                   node reads of source (m, l): slots in this region, or token indices when m is this
///                   node: then the rows stay in the source's send rows)
/// A row: 16-byte header (int32 source token index), x, float32 scales, int32 top-k ids, float32 weights.
struct InternodeDispatchLayout {
    InternodeControl control{};
    int64_t capacity = 0;
    int64_t x_offset = 0, scales_offset = 0, topk_idx_offset = 0, topk_weights_offset = 0, stride = 0;

    InternodeDispatchLayout() = default;

    __host__ __device__ static int64_t row_stride(int64_t hidden_bytes, int64_t num_scales, int64_t num_topk) {
        return internode_round_up(16 + internode_round_up(hidden_bytes, 16) + num_scales * 4 + num_topk * 8, 16);
    }
    __host__ __device__ static int64_t bytes_per_token(const InternodeControl& control, int64_t stride) {
        return stride + control.num_nodes() * (stride + 8 * int64_t{control.num_nvl_ranks});
    }

    __host__ __device__ InternodeDispatchLayout(const InternodeControl& c, int64_t num_bytes, int64_t hidden_bytes,
                                                int64_t num_scales, int64_t num_topk)
        : control(c) {
        x_offset = 16;
        scales_offset = x_offset + internode_round_up(hidden_bytes, 16);
        topk_idx_offset = scales_offset + num_scales * 4;
        topk_weights_offset = topk_idx_offset + num_topk * 4;
        stride = row_stride(hidden_bytes, num_scales, num_topk);
        const int64_t data = num_bytes - control.bytes();
        // A multiple of kTokenSlotGranularity, so that the int32 list areas keep the rows after them aligned.
        capacity = data > 0 ? data / bytes_per_token(control, stride) / kTokenSlotGranularity * kTokenSlotGranularity : 0;
    }
    static constexpr int64_t kTokenSlotGranularity = 4;
    __host__ __device__ int64_t send_row(int64_t token) const { return control.bytes() + token * stride; }
    __host__ __device__ int64_t list_staging(int node, int local) const {
        return control.bytes() + capacity * stride + ((int64_t{node} * control.num_nvl_ranks + local) * capacity) * 4;
    }
    __host__ __device__ int64_t region(int node) const {
        return control.bytes() + capacity * stride + int64_t{control.num_nodes()} * control.num_nvl_ranks * capacity * 4 +
               node * (capacity * stride + int64_t{control.num_nvl_ranks} * capacity * 4);
    }
    __host__ __device__ int64_t region_row(int node, int64_t slot) const { return region(node) + slot * stride; }
    __host__ __device__ int64_t region_list(int node, int local) const {
        return region(node) + capacity * stride + int64_t{local} * capacity * 4;
    }
};

/// The data region during a combine, rows of one shape (bf16 [hidden], then float32 top-k weights):
///   from the front: staged rows [num_rows] (staged reads only: this rank's combine input, row i = the i-th
///                   row it received), then partial send [F]: the partial sums this rank computes as
///                   forwarder, row f = forwarded row f (forward_offsets), put from here;
///   from the back:  partial recv: the partial sum forwarder (n, l) computed for slot k of this rank's tokens
///                   bound for node n is row (k * (N - 1) + i) counted from the end, i = n's index among the
///                   other nodes.
/// Only the back is written by other nodes, and its offsets depend on nothing but the buffer's size (the
/// same on every rank), so every rank addresses it alike whichever path (staged or direct) each node took
/// and however many tokens each rank has. A call needs rows_needed() rows; the hint sizes for the worst case.
struct InternodeCombineLayout {
    InternodeControl control{};
    int64_t num_row_slots = 0;
    int64_t topk_weights_offset = 0, stride = 0;

    InternodeCombineLayout() = default;

    __host__ __device__ static int64_t row_stride(int64_t hidden, int64_t num_topk) {
        return internode_round_up(hidden * 2, 16) + internode_round_up(num_topk * 4, 16);
    }
    /// Rows a rank with `num_tokens` tokens uses: its staged input (0 with direct reads), the rows it
    /// forwards, and a partial sum per token and other node.
    __host__ __device__ static int64_t rows_needed(int num_nodes, int64_t num_staged_rows, int64_t num_forwarded,
                                                   int64_t num_tokens) {
        return num_staged_rows + num_forwarded + int64_t{num_nodes - 1} * num_tokens;
    }
    __host__ __device__ InternodeCombineLayout(const InternodeControl& c, int64_t num_bytes, int64_t hidden,
                                               int64_t num_topk)
        : control(c) {
        topk_weights_offset = internode_round_up(hidden * 2, 16);
        stride = row_stride(hidden, num_topk);
        const int64_t data = num_bytes - control.bytes();
        num_row_slots = data > 0 ? data / stride : 0;
    }
    __host__ __device__ int64_t staged_row(int64_t row) const { return control.bytes() + row * stride; }
    __host__ __device__ int64_t partial_send_row(int64_t num_staged_rows, int64_t forwarded_row) const {
        return control.bytes() + (num_staged_rows + forwarded_row) * stride;
    }
    /// Where forwarder node `node` puts the partial sum of `slot` into the buffer of a rank of `dst_node`.
    __host__ __device__ int64_t partial_recv_row(int node, int dst_node, int64_t slot) const {
        const int64_t other = node < dst_node ? node : node - 1;
        return control.bytes() + (num_row_slots - 1 - (slot * (control.num_nodes() - 1) + other)) * stride;
    }
};

/// This rank's symmetric buffer and where each rank's copy is mapped here: the ranks of this node only
/// (0 elsewhere, so every byte bound for another node is an NVSHMEM put).
struct InternodePeers {
    void* local_base;
    const uint64_t* mapped_bases;  // device [num_ranks]
    int rank;
    WaitContext wait;
};

/// Opens every inter-node op: sends every rank a message (InternodeMessageHeader, with the op's epoch, the
/// next value of this rank's epoch counter) and waits for all of them. A fresh dispatch sends its counts
/// along and derives the matrices. A rank whose argument checks failed opens the op anyway with a nonzero
/// rejected_code (no counts), as does a combine whose forwarded rows exceed max_forwarded_rows; every rank
/// rejects alike an op whose ranks' signatures differ, and a fresh dispatch that would give some rank more
/// rows than its num_worst_tokens. Every rank then records the op as rejected, its other kernels skip their
/// work (the receiving ones poison their outputs) and every rank whose host did not raise already reports
/// the lowest rejecting rank in `rejection`.
struct InternodeNotifyArgs {
    InternodePeers peers;
    InternodeControl control;
    bool with_counts;
    int rejected_code;                // 0: this rank's host checks passed
    int rejected_rank;                // with rejected_code: the rank whose error it is (a node peer's, agreed)
    InternodeCallSignature signature; // this rank's call (ignored when it rejects the op)
    RejectionReport* rejection;    // host-mapped report, or nullptr
    // A combine: its dispatch's forward offsets ([N + 1], the last entry the rows this rank forwards, on the
    // GPU only) and the rows its buffer has left for them; nullptr: nothing to check.
    const int* forward_offsets_to_check;
    int64_t max_forwarded_rows;
    int num_worst_tokens;             // a fresh dispatch: 0, or the rows this rank's outputs hold
    const int* num_tokens_per_rank;       // [R]
    const int* num_tokens_per_rdma_rank;  // [N], or nullptr: counted here from is_token_in_rank
    const bool* is_token_in_rank;         // [num_tokens, R]
    int num_tokens;
    const int* num_tokens_per_expert;     // [E]
    int num_experts;
    int expert_alignment;
    int* rank_prefix_matrix;          // [R, R] written: [i][j] = rows rank j receives from ranks 0..i
    int* node_count_matrix;           // [R, N] written: tokens rank g sends to node n
    int* recv_first_row;              // [R] written: first recv_x row of each source rank
    int* recv_rank_prefix_sum;        // [R] written: rows received from ranks 0..i
    int* num_recv_tokens_per_expert;  // [E / R] written (aligned)
    int* forward_offsets;             // [N + 1] written: rows this rank forwards, per source node, prefix
    // Host-mapped counters or nullptr: [0] tag (last), [1] received rows, [2 + e] aligned count of local
    // expert e, [2 + E/R] rows this rank forwards.
    int* mapped_counters;
    int mapped_tag;
    cudaStream_t stream;
};
void launch_internode_notify(const InternodeNotifyArgs& args);

/// Dispatch step 1 (one block per destination node): the lists, send_head and send_node_head; a fresh
/// dispatch also sets the forward map's used rows to -1 (the pull fills what the node received).
struct InternodeDispatchPlanArgs {
    InternodePeers peers;
    InternodeDispatchLayout layout;
    int num_tokens;
    const bool* is_token_in_rank;    // [T, R]
    const int* rank_prefix_matrix;   // [R, R]
    int* send_head;                  // [T, R] written, or nullptr (cached dispatch)
    int* send_node_head;             // [T, N] written, or nullptr (cached dispatch)
    const int* forward_offsets;      // [N + 1]
    int* forward_map;                // [>= F, L] written (rows below F), or nullptr (cached dispatch)
    cudaStream_t stream;
};
void launch_internode_dispatch_plan(const InternodeDispatchPlanArgs& args);

/// Dispatch step 2: stage each token once, put it to each other node it goes to, signal the forwarders.
struct InternodeDispatchSendArgs {
    InternodePeers peers;
    InternodeDispatchLayout layout;
    int num_tokens;
    int hidden_bytes, num_scales, num_topk;
    const void* x;                 // [T, hidden_bytes]
    const float* x_scales;         // [T, num_scales] or nullptr
    const void* topk_idx;          // [T, num_topk] int64 or int32, or nullptr
    bool topk_idx_is_int64;
    const float* topk_weights;     // [T, num_topk] or nullptr
    const bool* is_token_in_rank;  // [T, R]
    const int* send_node_head;     // [T, N]
    int num_blocks;
    cudaStream_t stream;
};
void launch_internode_dispatch_send(const InternodeDispatchSendArgs& args);

/// Dispatch step 3: wait for the rows, read them over NVLink into the outputs; fill the forward map.
struct InternodeDispatchPullArgs {
    InternodePeers peers;
    InternodeDispatchLayout layout;
    int hidden_bytes, num_scales, num_topk;
    int num_experts;
    const int* rank_prefix_matrix;   // [R, R]
    const int* recv_first_row;       // [R]
    const int* forward_offsets;      // [N + 1]
    const int* recv_rank_prefix_sum; // [R]: its last entry is the rows received
    int num_recv_capacity;           // rows allocated (rows received, or num_worst_tokens)
    void* recv_x;
    float* recv_x_scales;
    int64_t* recv_topk_idx;
    float* recv_topk_weights;
    int* recv_src_idx;
    int* forward_map;                // [>= F, L], -1 where unset, or nullptr (cached dispatch: the handle has it)
    int num_blocks;
    bool conservative_loads;
    cudaStream_t stream;
};
void launch_internode_dispatch_pull(const InternodeDispatchPullArgs& args);

/// Combine: stage this rank's rows (step 1, staged reads only), forwarders reduce and put partial sums
/// (step 2), sources sum their own node's rows and the partials (step 3).
struct InternodeCombineArgs {
    InternodePeers peers;
    InternodeCombineLayout layout;
    int hidden, num_topk;
    int num_rows;                   // rows this rank received in the dispatch
    int num_tokens;                 // this rank's tokens
    const void* x;                  // [num_rows, hidden] bf16
    const float* topk_weights;      // [num_rows, num_topk] or nullptr
    bool direct_reads;              // read the node's inputs in place, at node_inputs (index: local rank)
    CombineSources node_inputs;
    const int* send_head;           // [T, R]
    const int* send_node_head;      // [T, N]
    const int* forward_offsets;     // [N + 1]: rows F = forward_offsets[N] (checked by the opening exchange)
    const int* forward_map;         // [>= F, L]
    const void* bias_0;             // [T, hidden] bf16 or nullptr
    const void* bias_1;
    void* combined_x;               // [T, hidden] bf16
    float* combined_topk_weights;   // [T, num_topk] or nullptr
    int num_blocks;
    bool conservative_loads;
    cudaStream_t stream;
};
void launch_internode_combine(const InternodeCombineArgs& args);

}  // namespace deep_ep
