// Inter-node combine after notify, up to three kernels (kernels/api_internode.cuh has the data flow):
//   stage:   (staged reads only) copy this rank's rows (bf16 + top-k weights) into its symmetric buffer,
//            tell the node;
//   forward: as forwarder for source (m, l), sum per landed token the rows the node's ranks hold for it
//            (in local-rank order, float32), round to bf16 and put the partial sum back to (m, l);
//   combine: per token, sum the rows this node's ranks hold (local-rank order) and the partial sums of
//            the other nodes (node order) in float32, add the biases, store bf16; with direct reads, close
//            with a node barrier (peers read this rank's inputs until then).
#include "kernels/api.cuh"
#include "kernels/common/peer.cuh"
#include "kernels/common/poison.cuh"
#include "kernels/common/reduce.cuh"
#include "kernels/common/sync.cuh"
#include "kernels/common/token.cuh"
#include "kernels/internode/op_state.cuh"
#include "runtime/errors.hpp"

namespace deep_ep {
namespace {

constexpr int kStageThreads = 1024;
constexpr int kStageUnroll = 8;
// Loads in flight per lane in a reduction, whatever the number of rows summed (as the intra-node combine).
constexpr int kReduceVectorsInFlight = 8;
// A warp sums at most this many rows per output row: the ranks of a node, plus a partial per other node.
constexpr int kMaxReduceSources = 32;
template <int kMaxSources>
constexpr int kReduceThreads = kMaxSources <= 8 ? 512 : 256;

// The rows one warp sums for one output row, in summation order, and their top-k weights (nullptr: none),
// held in registers (static indices only).
template <int kMaxSources>
struct ReduceSources {
    const int4* rows[kMaxSources];
    const int* weights[kMaxSources];
    int count = 0;
    __device__ __forceinline__ void add(const char* row, const char* row_weights) {
#pragma unroll
        for (int j = 0; j < kMaxSources; ++j)
            if (j == count) {
                rows[j] = reinterpret_cast<const int4*>(row);
                weights[j] = reinterpret_cast<const int*>(row_weights);
            }
        ++count;
    }
    __device__ __forceinline__ void finish() {
#pragma unroll
        for (int j = 0; j < kMaxSources; ++j)
            if (j >= count)
                rows[j] = nullptr;
    }
};

/// dst = the rows' bf16 sum (float32, in order, then the biases), the shared combine reduction; the rows'
/// float32 top-k weights summed likewise into dst_weights when given.
template <ptx::LoadKind kKind, int kMaxSources>
__device__ __forceinline__ void warp_reduce_rows(ReduceSources<kMaxSources>& sources, int hidden, int num_topk,
                                                 char* dst, float* dst_weights, const int4* bias_0,
                                                 const int4* bias_1, int lane) {
    constexpr int kUnroll = kReduceVectorsInFlight / kMaxSources > 0 ? kReduceVectorsInFlight / kMaxSources : 1;
    sources.finish();
    float weights[kMaxSources];
    const bool sums_weight = dst_weights != nullptr && lane < num_topk;
#pragma unroll
    for (int j = 0; j < kMaxSources; ++j)
        if (sums_weight && j < sources.count)
            weights[j] =
                sources.weights[j] == nullptr ? 0.0f : __int_as_float(ptx::ld_peer<kKind>(sources.weights[j] + lane));
    warp_reduce_bf16_rows<kKind, kMaxSources, kUnroll>(reinterpret_cast<int4*>(dst), sources.rows, sources.count,
                                                       bias_0, bias_1, hidden / kBf16PerVector, lane);
    if (sums_weight) {
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxSources; ++j)
            if (j < sources.count)
                sum += weights[j];
        dst_weights[lane] = sum;
    }
}

/// Where local rank j of this node holds its row `row` of the combine input, and that row's top-k weights:
/// in the caller's tensors (direct reads) or staged in j's symmetric buffer.
template <int kMaxSources>
__device__ __forceinline__ void add_node_row(ReduceSources<kMaxSources>& sources, const InternodeCombineArgs& args,
                                             const peer::SymmetricView& view, int own_node, int j, int row) {
    if (args.direct_reads) {
        const CombineSources& inputs = args.node_inputs;
        const char* weights = inputs.topk_weights[j];
        sources.add(inputs.x[j] + row * inputs.x_stride,
                    weights == nullptr ? nullptr : weights + row * inputs.topk_weights_stride);
    } else {
        const char* staged = view.mapped(own_node * args.layout.control.num_nvl_ranks + j) + args.layout.staged_row(row);
        sources.add(staged, staged + args.layout.topk_weights_offset);
    }
}

}  // namespace

namespace internode {

__global__ void __launch_bounds__(kStageThreads, 1) stage_combine_input(InternodeCombineArgs args) {
    if (block_sees_abort(args.peers.wait))
        return;  // this op's opening exchange (or a wait before) failed
    if (block_sees_rejection(peer::SymmetricView::of(args.peers), args.layout.control))
        return;  // a rank's argument checks failed: every rank skips the op
    const InternodeCombineLayout& layout = args.layout;
    const InternodeControl& control = layout.control;
    const peer::SymmetricView view = peer::SymmetricView::of(args.peers);
    const int lane = threadIdx.x % kWarpSize;
    for (int row = global_warp_id(); row < args.num_rows; row += num_global_warps()) {
        char* slot = view.local(layout.staged_row(row));
        warp_copy_own_vectors<kStageUnroll>(
            reinterpret_cast<int4*>(slot),
            reinterpret_cast<const int4*>(static_cast<const char*>(args.x) + int64_t{row} * args.hidden * 2),
            args.hidden / kBf16PerVector, lane);
        if (args.topk_weights != nullptr && lane < args.num_topk)
            reinterpret_cast<float*>(slot + layout.topk_weights_offset)[lane] =
                __ldg(args.topk_weights + int64_t{row} * args.num_topk + lane);
    }
    if (!is_last_block_to_finish(view.local<int>(control.kernel_exits())))
        return;
    const int num_nvl_ranks = control.num_nvl_ranks, rank = args.peers.rank;
    const int epoch = read_epoch(view, control);
    for (int j = threadIdx.x; j < num_nvl_ranks; j += blockDim.x)
        peer::signal_set(view, rank / num_nvl_ranks * num_nvl_ranks + j, control.node_word(rank % num_nvl_ranks),
                         epoch);
}

template <ptx::LoadKind kKind, int kMaxSources>
__global__ void __launch_bounds__(kReduceThreads<kMaxSources>, 1) forward_combine(InternodeCombineArgs args) {
    if (block_sees_abort(args.peers.wait))
        return;  // this op's opening exchange (or a wait before) failed
    if (block_sees_rejection(peer::SymmetricView::of(args.peers), args.layout.control))
        return;  // a rank's argument checks failed: every rank skips the op
    const InternodeCombineLayout& layout = args.layout;
    const InternodeControl& control = layout.control;
    const int num_nvl_ranks = control.num_nvl_ranks, num_nodes = control.num_nodes();
    const int rank = args.peers.rank, own_node = rank / num_nvl_ranks, local = rank % num_nvl_ranks;
    const peer::SymmetricView view = peer::SymmetricView::of(args.peers);
    const int epoch = read_epoch(view, control);
    // Direct reads need no wait: the op-opening exchange already proved every rank's inputs are written.
    bool arrived = true;
    for (int j = threadIdx.x; j < num_nvl_ranks && !args.direct_reads; j += blockDim.x)
        arrived &= wait_at_least(args.peers.wait, WaitSite::kInternodeStaged, own_node * num_nvl_ranks + j,
                                 view.local<int>(control.node_word(j)), epoch);
    if (__syncthreads_and(arrived) == 0)
        return;

    const int lane = threadIdx.x % kWarpSize;
    const int num_forwarded = args.forward_offsets[num_nodes];
    for (int f = global_warp_id(); f < num_forwarded; f += num_global_warps()) {
        int src_node = 0;
        while (args.forward_offsets[src_node + 1] <= f)
            ++src_node;
        const int slot = f - args.forward_offsets[src_node];
        ReduceSources<kMaxSources> sources;
        for (int j = 0; j < num_nvl_ranks; ++j) {
            const int row = __ldg(args.forward_map + int64_t{f} * num_nvl_ranks + j);
            if (row >= 0)
                add_node_row(sources, args, view, own_node, j, row);
        }
        char* partial = view.local(layout.partial_send_row(args.direct_reads ? 0 : args.num_rows, f));
        // By the op's shape, not this rank's pointer: a forwarder that received no rows itself (an empty
        // topk_weights) still sums its node's weights.
        float* partial_weights =
            args.num_topk > 0 ? reinterpret_cast<float*>(partial + layout.topk_weights_offset) : nullptr;
        warp_reduce_rows<kKind, kMaxSources>(sources, args.hidden, args.num_topk, partial, partial_weights, nullptr,
                                             nullptr, lane);
        __syncwarp();
        ptx::fence_acq_rel_sys();
        __syncwarp();
        peer::warp_put(view, src_node * num_nvl_ranks + local, layout.partial_recv_row(own_node, src_node, slot),
                       partial, layout.stride, lane);
    }
    peer::quiet();
    if (!is_last_block_to_finish(view.local<int>(control.kernel_exits())))
        return;
    for (int node = threadIdx.x; node < num_nodes; node += blockDim.x)
        if (node != own_node)
            peer::signal_set(view, node * num_nvl_ranks + local, control.partial_word(own_node), epoch);
}

// Named deep_ep::internode::combine: profiler-based tools find the op's kernel by "::combine".
template <ptx::LoadKind kKind, int kMaxSources>
__global__ void __launch_bounds__(kReduceThreads<kMaxSources>, 1) combine(InternodeCombineArgs args) {
    // A peer never arrived (the Buffer reports it): poison what the call returns instead.
    const auto poison_outputs = [&] {
        poison::poison_combined_tokens(args.combined_x, args.hidden, args.combined_topk_weights, args.num_topk,
                                       args.num_tokens);
    };
    if (block_sees_abort(args.peers.wait))
        return poison_outputs();  // this op's opening exchange (or a wait before) failed
    if (block_sees_rejection(peer::SymmetricView::of(args.peers), args.layout.control))
        return poison_outputs();  // a rank's argument checks failed: every rank skips the op
    const InternodeCombineLayout& layout = args.layout;
    const InternodeControl& control = layout.control;
    const int num_ranks = control.num_ranks, num_nvl_ranks = control.num_nvl_ranks, num_nodes = control.num_nodes();
    const int rank = args.peers.rank, own_node = rank / num_nvl_ranks;
    const peer::SymmetricView view = peer::SymmetricView::of(args.peers);
    const int epoch = read_epoch(view, control);
    bool arrived = true;
    for (int node = threadIdx.x; node < num_nodes; node += blockDim.x)
        if (node != own_node)
            arrived &= wait_at_least(args.peers.wait, WaitSite::kInternodePartial, node,
                                     view.local<int>(control.partial_word(node)), epoch);
    if (__syncthreads_and(arrived) == 0)
        return poison_outputs();

    const int lane = threadIdx.x % kWarpSize;
    for (int token = global_warp_id(); token < args.num_tokens; token += num_global_warps()) {
        ReduceSources<kMaxSources> sources;
        for (int j = 0; j < num_nvl_ranks; ++j) {
            const int row = __ldg(args.send_head + int64_t{token} * num_ranks + own_node * num_nvl_ranks + j);
            if (row >= 0)
                add_node_row(sources, args, view, own_node, j, row);
        }
        for (int node = 0; node < num_nodes; ++node) {
            if (node == own_node)
                continue;
            const int slot = __ldg(args.send_node_head + int64_t{token} * num_nodes + node);
            if (slot >= 0) {
                const char* partial = view.local(layout.partial_recv_row(node, own_node, slot));
                sources.add(partial, partial + layout.topk_weights_offset);
            }
        }
        const int64_t row_offset = int64_t{token} * (args.hidden / kBf16PerVector);
        const auto* bias_0 = static_cast<const int4*>(args.bias_0);
        const auto* bias_1 = static_cast<const int4*>(args.bias_1);
        warp_reduce_rows<kKind, kMaxSources>(
            sources, args.hidden, args.num_topk, static_cast<char*>(args.combined_x) + int64_t{token} * args.hidden * 2,
            args.combined_topk_weights != nullptr ? args.combined_topk_weights + int64_t{token} * args.num_topk : nullptr,
            bias_0 == nullptr ? nullptr : bias_0 + row_offset, bias_1 == nullptr ? nullptr : bias_1 + row_offset, lane);
    }
    if (!args.direct_reads || !is_last_block_to_finish(view.local<int>(control.kernel_exits())))
        return;
    // Closing node barrier: this rank's forward and combine kernels are done reading the node's inputs; once
    // every rank of the node says so, each caller may reuse or free its own.
    const int local = rank % num_nvl_ranks;
    for (int j = threadIdx.x; j < num_nvl_ranks; j += blockDim.x)
        peer::signal_set(view, own_node * num_nvl_ranks + j, control.node_word(local), epoch);
    for (int j = threadIdx.x; j < num_nvl_ranks; j += blockDim.x)
        wait_at_least(args.peers.wait, WaitSite::kInternodeClose, own_node * num_nvl_ranks + j,
                      view.local<int>(control.node_word(j)), epoch);
}

}  // namespace internode

namespace {

// Source arrays sized by the rows summed, rounded up to a power of two (registers, static indices).
template <ptx::LoadKind kKind, int kMaxSources>
void launch_reduce(const InternodeCombineArgs& args, int num_blocks, bool forward) {
    if (forward)
        internode::forward_combine<kKind, kMaxSources><<<num_blocks, kReduceThreads<kMaxSources>, 0, args.stream>>>(args);
    else
        internode::combine<kKind, kMaxSources><<<num_blocks, kReduceThreads<kMaxSources>, 0, args.stream>>>(args);
}

template <ptx::LoadKind kKind>
void launch_reduce_for(const InternodeCombineArgs& args, int num_blocks, bool forward, int num_sources) {
    if (num_sources <= 2)
        launch_reduce<kKind, 2>(args, num_blocks, forward);
    else if (num_sources <= 4)
        launch_reduce<kKind, 4>(args, num_blocks, forward);
    else if (num_sources <= 8)
        launch_reduce<kKind, 8>(args, num_blocks, forward);
    else if (num_sources <= 16)
        launch_reduce<kKind, 16>(args, num_blocks, forward);
    else
        launch_reduce<kKind, 32>(args, num_blocks, forward);
}

}  // namespace

void launch_internode_combine(const InternodeCombineArgs& args) {
    const int num_nvl_ranks = args.layout.control.num_nvl_ranks, num_nodes = args.layout.control.num_nodes();
    DEEP_EP_CHECK(args.hidden % kBf16PerVector == 0, "hidden must be a multiple of 8");
    DEEP_EP_CHECK(args.num_topk <= kWarpSize, "at most " << kWarpSize << " top-k weights per row");
    DEEP_EP_CHECK(num_nvl_ranks + num_nodes - 1 <= kMaxReduceSources,
                  "at most " << kMaxReduceSources << " rows per combined token (ranks per node + other nodes)");
    // The forwarded rows are known on the GPU only: the op's opening exchange checks them.
    const int64_t rows_needed =
        InternodeCombineLayout::rows_needed(num_nodes, args.direct_reads ? 0 : args.num_rows, 0, args.num_tokens);
    DEEP_EP_CHECK(rows_needed <= args.layout.num_row_slots,
                  "the combine needs " << rows_needed << " rows of the inter-node buffer, which holds "
                                       << args.layout.num_row_slots);
    const int num_blocks = args.num_blocks < 1 ? 1 : args.num_blocks;
    if (!args.direct_reads) {
        internode::stage_combine_input<<<num_blocks, kStageThreads, 0, args.stream>>>(args);
        DEEP_EP_LAUNCH_CHECK();
    }
    // Forwarders sum a node's rows; sources add the partials of the other nodes to their own node's rows.
    for (const bool forward : {true, false}) {
        const int num_sources = forward ? num_nvl_ranks : num_nvl_ranks + num_nodes - 1;
        if (ptx::kAggressiveLoadsCompiled && !args.conservative_loads)
            launch_reduce_for<ptx::LoadKind::kAggressive>(args, num_blocks, forward, num_sources);
        else
            launch_reduce_for<ptx::LoadKind::kConservative>(args, num_blocks, forward, num_sources);
        DEEP_EP_LAUNCH_CHECK();
    }
}

}  // namespace deep_ep
