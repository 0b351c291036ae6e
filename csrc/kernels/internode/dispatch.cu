// Inter-node dispatch after notify (kernels/api_internode.cuh has the data flow and the buffer layout):
// plan (lists), send (stage once, one put per token per other node, signal the forwarders) and pull
// (receivers read their rows over NVLink in source-rank order).
#include "kernels/api.cuh"
#include "kernels/common/peer.cuh"
#include "kernels/common/poison.cuh"
#include "kernels/common/sync.cuh"
#include "kernels/common/token.cuh"
#include "kernels/internode/op_state.cuh"
#include "runtime/errors.hpp"

namespace deep_ep {
namespace {

constexpr int kPlanThreads = 1024;
constexpr int kSendThreads = 512;
constexpr int kPullThreads = 1024;
constexpr int kRowUnroll = 8;
constexpr int kMaxNvlFlags = kMaxNvlRanks + 1;  // one membership flag per rank of a node, plus the node


}  // namespace

namespace internode {

// Block n: the tokens bound for node n, in token order. Thread t of a chunk holds L + 1 membership flags
// (each rank of node n, and the node itself); one block-wide ballot scan per flag gives each token its
// position in each list.
__global__ void __launch_bounds__(kPlanThreads, 1) dispatch_plan(InternodeDispatchPlanArgs args) {
    if (block_sees_abort(args.peers.wait))
        return;  // this op's opening exchange (or a wait before) failed
    if (block_sees_rejection(peer::SymmetricView::of(args.peers), args.layout.control))
        return;  // a rank's argument checks failed: every rank skips the op
    const InternodeDispatchLayout& layout = args.layout;
    const InternodeControl& control = layout.control;
    const int num_ranks = control.num_ranks, num_nvl_ranks = control.num_nvl_ranks, num_nodes = control.num_nodes();
    const int rank = args.peers.rank, own_node = rank / num_nvl_ranks, local = rank % num_nvl_ranks;
    const peer::SymmetricView view = peer::SymmetricView::of(args.peers);
    const int node = blockIdx.x;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, num_warps = blockDim.x / kWarpSize;
    if (args.forward_map != nullptr) {
        // The map may be sized for the most rows this rank can forward (the host did not wait for the count).
        const int64_t num_entries = int64_t{args.forward_offsets[num_nodes]} * num_nvl_ranks;
        const int64_t stride = int64_t{gridDim.x} * blockDim.x;
        for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < num_entries; i += stride)
            args.forward_map[i] = -1;
    }
    __shared__ int warp_counts[kMaxNvlFlags][kPlanThreads / kWarpSize];
    __shared__ int totals[kMaxNvlFlags];
    __shared__ int first_recv_row[kMaxNvlRanks];
    const int num_flags = num_nvl_ranks + 1;  // flag num_nvl_ranks: the node
    if (threadIdx.x < num_flags)
        totals[threadIdx.x] = 0;
    if (threadIdx.x < num_nvl_ranks) {
        // Row of our first token in destination d's recv_x: after everything ranks 0..rank-1 send it.
        const int dst = node * num_nvl_ranks + threadIdx.x;
        first_recv_row[threadIdx.x] = rank == 0 ? 0 : args.rank_prefix_matrix[(rank - 1) * num_ranks + dst];
    }
    // Lists for our own node stay here (region own_node); the others are staged, then put to the forwarder.
    auto list = [&](int j) -> int* {
        return node == own_node ? view.local<int>(layout.region_list(own_node, j))
                                : view.local<int>(layout.list_staging(node, j));
    };
    __syncthreads();

    for (int chunk = 0; chunk < args.num_tokens; chunk += blockDim.x) {
        const int token = chunk + threadIdx.x;
        const bool valid = token < args.num_tokens;
        bool flags[kMaxNvlFlags];
        bool in_node = false;
#pragma unroll
        for (int j = 0; j < kMaxNvlRanks; ++j) {
            flags[j] = valid && j < num_nvl_ranks &&
                       args.is_token_in_rank[int64_t{token} * num_ranks + node * num_nvl_ranks + j];
            in_node |= flags[j];
        }
        flags[kMaxNvlRanks] = in_node;
        unsigned ballots[kMaxNvlFlags];
#pragma unroll
        for (int f = 0; f < kMaxNvlFlags; ++f) {
            const int flag = f == kMaxNvlRanks ? num_nvl_ranks : f;
            ballots[f] = __ballot_sync(0xffffffffu, flags[f]);
            if (lane == 0 && (f == kMaxNvlRanks || f < num_nvl_ranks))
                warp_counts[flag][warp] = __popc(ballots[f]);
        }
        __syncthreads();
        int positions[kMaxNvlFlags];
#pragma unroll
        for (int f = 0; f < kMaxNvlFlags; ++f) {
            const int flag = f == kMaxNvlRanks ? num_nvl_ranks : f;
            positions[f] = -1;
            if (f != kMaxNvlRanks && f >= num_nvl_ranks)
                continue;
            int before = totals[flag];
            for (int w = 0; w < warp; ++w)
                before += warp_counts[flag][w];
            positions[f] = before + __popc(ballots[f] & ((1u << lane) - 1));
        }
        if (valid) {
            const int slot = flags[kMaxNvlRanks] ? positions[kMaxNvlRanks] : -1;
            if (args.send_node_head != nullptr)
                args.send_node_head[int64_t{token} * num_nodes + node] = slot;
#pragma unroll
            for (int j = 0; j < kMaxNvlRanks; ++j) {
                if (j >= num_nvl_ranks)
                    break;
                if (args.send_head != nullptr)
                    args.send_head[int64_t{token} * num_ranks + node * num_nvl_ranks + j] =
                        flags[j] ? first_recv_row[j] + positions[j] : -1;
                // Receivers in our own node read our send rows by token; elsewhere the forwarder's by slot.
                if (flags[j])
                    list(j)[positions[j]] = node == own_node ? token : slot;
            }
        }
        __syncthreads();
        if (threadIdx.x < num_flags) {
            int sum = 0;
            for (int w = 0; w < num_warps; ++w)
                sum += warp_counts[threadIdx.x][w];
            totals[threadIdx.x] += sum;
        }
        __syncthreads();
    }
    if (node == own_node)
        return;
    // Each list of another node to its forwarder (n, our local index), into region own_node there.
    __threadfence();
    __syncthreads();
    const int forwarder = node * num_nvl_ranks + local;
    for (int j = warp; j < num_nvl_ranks; j += num_warps)
        peer::warp_put(view, forwarder, layout.region_list(own_node, j), list(j), int64_t{totals[j]} * 4, lane);
    // The send kernel's signal publishes these lists; puts must be complete before it.
    peer::quiet();
}

// Warp per token: stage the row once into our send rows, then one put per other node it goes to.
__global__ void __launch_bounds__(kSendThreads, 1) dispatch_send(InternodeDispatchSendArgs args) {
    if (block_sees_abort(args.peers.wait))
        return;  // this op's opening exchange (or a wait before) failed
    if (block_sees_rejection(peer::SymmetricView::of(args.peers), args.layout.control))
        return;  // a rank's argument checks failed: every rank skips the op
    const InternodeDispatchLayout& layout = args.layout;
    const InternodeControl& control = layout.control;
    const int num_ranks = control.num_ranks, num_nvl_ranks = control.num_nvl_ranks, num_nodes = control.num_nodes();
    const int rank = args.peers.rank, own_node = rank / num_nvl_ranks, local = rank % num_nvl_ranks;
    const peer::SymmetricView view = peer::SymmetricView::of(args.peers);
    const int lane = threadIdx.x % kWarpSize;
    int rows_sent = 0;
    for (int token = global_warp_id(); token < args.num_tokens; token += num_global_warps()) {
        bool any = false;
        for (int r = lane; r < num_ranks; r += kWarpSize)
            any |= args.is_token_in_rank[int64_t{token} * num_ranks + r];
        if (!__any_sync(0xffffffffu, any))
            continue;
        char* row = view.local(layout.send_row(token));
        if (lane == 0)
            *reinterpret_cast<int*>(row) = token;
        warp_copy_own_vectors<kRowUnroll>(
            reinterpret_cast<int4*>(row + layout.x_offset),
            reinterpret_cast<const int4*>(static_cast<const char*>(args.x) + int64_t{token} * args.hidden_bytes),
            args.hidden_bytes / 16, lane);
        if (args.x_scales != nullptr)
            warp_copy_own_words(reinterpret_cast<int*>(row + layout.scales_offset),
                                reinterpret_cast<const int*>(args.x_scales + int64_t{token} * args.num_scales),
                                args.num_scales, lane);
        if (args.topk_idx != nullptr && lane < args.num_topk) {
            const int64_t i = int64_t{token} * args.num_topk + lane;
            // As int32: expert ids are small, and receivers read 4 bytes per entry.
            reinterpret_cast<int*>(row + layout.topk_idx_offset)[lane] =
                args.topk_idx_is_int64 ? static_cast<int>(__ldg(static_cast<const int64_t*>(args.topk_idx) + i))
                                       : __ldg(static_cast<const int*>(args.topk_idx) + i);
            reinterpret_cast<float*>(row + layout.topk_weights_offset)[lane] = __ldg(args.topk_weights + i);
        }
        // The put reads the row through the memory system (a NIC, or another SM's copy engine path).
        __syncwarp();
        ptx::fence_acq_rel_sys();
        __syncwarp();
        for (int node = 0; node < num_nodes; ++node) {
            const int slot = node == own_node ? -1 : __ldg(args.send_node_head + int64_t{token} * num_nodes + node);
            if (slot < 0)
                continue;
            peer::warp_put(view, node * num_nvl_ranks + local, layout.region_row(own_node, slot), row, layout.stride,
                           lane);
            ++rows_sent;
        }
    }
    peer::quiet();
    if (lane == 0 && rows_sent > 0)
        atomicAdd(reinterpret_cast<unsigned long long*>(view.local(control.rows_sent_counter())),
                  static_cast<unsigned long long>(rows_sent));
    if (!is_last_block_to_finish(view.local<int>(control.kernel_exits())))
        return;
    // Every block's rows (and the plan's lists) are complete: tell each node's forwarder, ours included.
    const int epoch = read_epoch(view, control);
    for (int node = threadIdx.x; node < num_nodes; node += blockDim.x)
        peer::signal_set(view, node * num_nvl_ranks + local, control.region_word(own_node), epoch);
}

// The source rank of recv_x row `row`: the last src with first_row[src] <= row (binary search).
__device__ __forceinline__ int source_of_row(const int* first_row, int num_ranks, int row) {
    int low = 0, high = num_ranks - 1;
    while (low < high) {
        const int mid = (low + high + 1) / 2;
        if (first_row[mid] <= row)
            low = mid;
        else
            high = mid - 1;
    }
    return low;
}

// Named deep_ep::internode::dispatch: profiler-based tools find the op's kernel by "::dispatch".
template <ptx::LoadKind kKind>
__global__ void __launch_bounds__(kPullThreads, 1) dispatch(InternodeDispatchPullArgs args) {
    // A peer never arrived (the Buffer reports it): poison what the call returns instead.
    const auto poison_outputs = [&] {
        poison::poison_dispatch_rows({args.recv_x, args.recv_x_scales, args.recv_topk_idx, args.recv_topk_weights,
                                      args.recv_src_idx, args.hidden_bytes, args.num_scales, args.num_topk},
                                     args.num_recv_capacity);
    };
    if (block_sees_abort(args.peers.wait))
        return poison_outputs();  // this op's opening exchange (or a wait before) failed
    if (block_sees_rejection(peer::SymmetricView::of(args.peers), args.layout.control))
        return poison_outputs();  // a rank's argument checks failed: every rank skips the op
    const InternodeDispatchLayout& layout = args.layout;
    const InternodeControl& control = layout.control;
    const int num_ranks = control.num_ranks, num_nvl_ranks = control.num_nvl_ranks, num_nodes = control.num_nodes();
    const int rank = args.peers.rank, own_node = rank / num_nvl_ranks, local = rank % num_nvl_ranks;
    const peer::SymmetricView view = peer::SymmetricView::of(args.peers);
    const int epoch = read_epoch(view, control);

    // Source g = (m, l) is ready once forwarder (own_node, l) has its region m.
    bool arrived = true;
    for (int src = threadIdx.x; src < num_ranks; src += blockDim.x) {
        const int forwarder = own_node * num_nvl_ranks + src % num_nvl_ranks;
        arrived &= wait_at_least(args.peers.wait, WaitSite::kInternodeRows, src,
                                 reinterpret_cast<const int*>(view.mapped(forwarder) + control.region_word(src / num_nvl_ranks)),
                                 epoch);
    }
    if (__syncthreads_and(arrived) == 0)
        return poison_outputs();

    const int lane = threadIdx.x % kWarpSize;
    const int num_local_experts = args.num_experts / num_ranks;
    const int first_local_expert = rank * num_local_experts;
    // Read here, not passed by the host: a cached dispatch's host knows only the padded row count.
    const int num_recv = min(__ldg(args.recv_rank_prefix_sum + num_ranks - 1), args.num_recv_capacity);
    for (int row = global_warp_id(); row < args.num_recv_capacity; row += num_global_warps()) {
        char* x_out = static_cast<char*>(args.recv_x) + int64_t{row} * args.hidden_bytes;
        if (row >= num_recv) {  // num_worst_tokens padding, as the reference defines it
            for (int i = lane; i < args.hidden_bytes / 16; i += kWarpSize)
                ptx::st_global_L1_no_allocate(reinterpret_cast<int4*>(x_out) + i, make_int4(0, 0, 0, 0));
            for (int i = lane; i < args.num_scales && args.recv_x_scales != nullptr; i += kWarpSize)
                args.recv_x_scales[int64_t{row} * args.num_scales + i] = 0.0f;
            if (args.recv_topk_idx != nullptr && lane < args.num_topk) {
                args.recv_topk_idx[int64_t{row} * args.num_topk + lane] = -1;
                args.recv_topk_weights[int64_t{row} * args.num_topk + lane] = 0.0f;
            }
            if (lane == 0)
                args.recv_src_idx[row] = -1;
            continue;
        }
        const int src = source_of_row(args.recv_first_row, num_ranks, row);
        const int src_node = src / num_nvl_ranks;
        const int forwarder = own_node * num_nvl_ranks + src % num_nvl_ranks;
        const int position = row - args.recv_first_row[src];
        const int slot = ptx::ld_peer<kKind>(
            reinterpret_cast<const int*>(view.mapped(forwarder) + layout.region_list(src_node, local)) + position);
        const char* from = src_node == own_node ? view.mapped(src) + layout.send_row(slot)
                                                : view.mapped(forwarder) + layout.region_row(src_node, slot);
        int expert = -1, weight_bits = 0, source_token = 0;
        if (args.recv_topk_idx != nullptr && lane < args.num_topk) {
            expert = ptx::ld_peer<kKind>(reinterpret_cast<const int*>(from + layout.topk_idx_offset) + lane);
            weight_bits = ptx::ld_peer<kKind>(reinterpret_cast<const int*>(from + layout.topk_weights_offset) + lane);
        }
        if (lane == 0)
            source_token = ptx::ld_peer<kKind>(reinterpret_cast<const int*>(from));
        warp_copy_peer_vectors<kKind, kRowUnroll>(reinterpret_cast<int4*>(x_out),
                                                  reinterpret_cast<const int4*>(from + layout.x_offset),
                                                  args.hidden_bytes / 16, lane);
        if (args.recv_x_scales != nullptr)
            warp_copy_peer_words<kKind>(reinterpret_cast<int*>(args.recv_x_scales + int64_t{row} * args.num_scales),
                                        reinterpret_cast<const int*>(from + layout.scales_offset), args.num_scales, lane);
        if (args.recv_topk_idx != nullptr && lane < args.num_topk) {
            const int local_expert = expert - first_local_expert;
            const bool is_local = expert >= 0 && local_expert >= 0 && local_expert < num_local_experts;
            args.recv_topk_idx[int64_t{row} * args.num_topk + lane] = is_local ? local_expert : -1;
            args.recv_topk_weights[int64_t{row} * args.num_topk + lane] = is_local ? __int_as_float(weight_bits) : 0.0f;
        }
        if (lane == 0)
            args.recv_src_idx[row] = source_token;
    }

    // As forwarder: for each row landed from source (m, local) and each rank j of our node, the row of j's
    // recv_x that holds it (the combine reduces them here). The plan set the map to -1.
    if (args.forward_map == nullptr)
        return;
    for (int src_node = 0; src_node < num_nodes; ++src_node) {
        if (src_node == own_node)
            continue;
        const int src = src_node * num_nvl_ranks + local;
        for (int j = 0; j < num_nvl_ranks; ++j) {
            const int dst = own_node * num_nvl_ranks + j;
            const int before = src == 0 ? 0 : args.rank_prefix_matrix[(src - 1) * num_ranks + dst];
            const int count = args.rank_prefix_matrix[src * num_ranks + dst] - before;
            const int* list = view.local<int>(layout.region_list(src_node, j));
            for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < count; p += gridDim.x * blockDim.x) {
                const int slot = ptx::ld_volatile_global(list + p);
                args.forward_map[int64_t{args.forward_offsets[src_node] + slot} * num_nvl_ranks + j] = before + p;
            }
        }
    }
}

}  // namespace internode

namespace {
int clamp_blocks(int num_blocks) { return num_blocks < 1 ? 1 : num_blocks; }
}  // namespace

void launch_internode_dispatch_plan(const InternodeDispatchPlanArgs& args) {
    DEEP_EP_CHECK(args.layout.control.num_nvl_ranks <= kMaxNvlRanks, "at most " << kMaxNvlRanks << " ranks per node");
    DEEP_EP_CHECK(args.num_tokens <= args.layout.capacity, "more tokens than the inter-node buffer holds");
    internode::dispatch_plan<<<args.layout.control.num_nodes(), kPlanThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_internode_dispatch_send(const InternodeDispatchSendArgs& args) {
    DEEP_EP_CHECK(args.num_topk <= kWarpSize, "at most " << kWarpSize << " top-k entries per token");
    DEEP_EP_CHECK(args.hidden_bytes % 16 == 0, "the bytes of one x row must be a multiple of 16");
    internode::dispatch_send<<<clamp_blocks(args.num_blocks), kSendThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_internode_dispatch_pull(const InternodeDispatchPullArgs& args) {
    DEEP_EP_CHECK(args.hidden_bytes % 16 == 0, "the bytes of one x row must be a multiple of 16");
    auto kernel = internode::dispatch<ptx::LoadKind::kConservative>;
    if constexpr (ptx::kAggressiveLoadsCompiled) {
        if (!args.conservative_loads)
            kernel = internode::dispatch<ptx::LoadKind::kAggressive>;
    }
    kernel<<<clamp_blocks(args.num_blocks), kPullThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
