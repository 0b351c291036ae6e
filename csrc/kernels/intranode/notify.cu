// Dispatch step 0: every rank tells every other rank how many tokens it sends there (per rank and per
// the receiver's local experts), then each rank derives rank_prefix_matrix and its receive counts, and
// range-checks its own topk_idx. One block; its barrier is also the one that opens the dispatch.
#include <climits>

#include "kernels/api.cuh"
#include "kernels/common/barrier.cuh"
#include "kernels/common/buffer_layout.cuh"
#include "kernels/common/expert_ids.cuh"
#include "kernels/common/receive_counts.cuh"
#include "kernels/common/rejection.cuh"
#include "runtime/errors.hpp"

namespace deep_ep {
namespace {

constexpr int kNotifyThreads = 256;

}  // namespace

namespace intranode {

__global__ void __launch_bounds__(kNotifyThreads, 1) notify(IntranodeNotifyArgs args) {
    const int num_ranks = args.peers.num_ranks, rank = args.peers.rank;
    const int num_local_experts = args.num_experts / num_ranks;

    // Our row of the count matrix, and each receiver's slice of our expert counts, into the receivers'
    // count areas at slot [rank]. Nobody reads these slots until the barrier below, and the previous
    // dispatch's readers are done: they passed that op's pull barrier, which needed our arrival, and we
    // arrive there only after this kernel of the previous op finished.
    for (int i = threadIdx.x; i < num_ranks * num_ranks; i += blockDim.x) {
        const int dst = i / num_ranks, j = i % num_ranks;
        layout::CountArea::tokens_per_rank(args.peers.buffers[dst], rank)[j] = args.num_tokens_per_rank[j];
    }
    for (int i = threadIdx.x; i < num_ranks * num_local_experts; i += blockDim.x) {
        const int dst = i / num_local_experts, e = i % num_local_experts;
        layout::CountArea::tokens_per_local_expert(args.peers.buffers[dst], rank)[e] =
            args.num_tokens_per_expert[dst * num_local_experts + e];
    }
    for (int dst = threadIdx.x; dst < num_ranks; dst += blockDim.x)
        *layout::CountArea::num_worst_tokens(args.peers.buffers[dst], rank) = args.num_worst_tokens;
    __syncthreads();
    const NvlKernelBarrier barrier(args.peers, args.barrier);
    if (!barrier.passed())
        return;

    void* own = args.peers.buffers[rank];
    __shared__ int num_recv_tokens, first_overflowing;
    if (threadIdx.x == 0)
        first_overflowing = INT_MAX;
    __syncthreads();
    // Column j of the prefix matrix: rows j receives from ranks 0..i, accumulated down the sources.
    if (threadIdx.x < num_ranks) {
        const int j = threadIdx.x;
        int running = 0;
        for (int i = 0; i < num_ranks; ++i) {
            running += ptx::ld_volatile_global(layout::CountArea::tokens_per_rank(own, i) + j);
            args.rank_prefix_matrix[i * num_ranks + j] = running;
        }
        if (j == rank)
            num_recv_tokens = running;
        // Every rank checks every rank's num_worst_tokens, so all reach the same verdict.
        const int worst_tokens = ptx::ld_volatile_global(layout::CountArea::num_worst_tokens(own, j));
        if (rejection::exceeds_worst_tokens(running, worst_tokens))
            atomicMin(&first_overflowing, j);
        args.send_counts[j] = ptx::ld_volatile_global(layout::CountArea::tokens_per_rank(own, rank) + j);
        // Rows from source j start after everything sources 0..j-1 send us.
        int before = 0;
        for (int i = 0; i < j; ++i)
            before += ptx::ld_volatile_global(layout::CountArea::tokens_per_rank(own, i) + rank);
        args.recv_first_row[j] = before;
    }
    if (args.topk_idx != nullptr)
        expert_ids::check_range(args.topk_idx, args.topk_idx_is_int64, args.num_topk_entries, args.num_experts,
                                args.invalid);
    store_expert_counts(
        num_local_experts, num_ranks, args.expert_alignment,
        [&](int src, int e) { return ptx::ld_volatile_global(layout::CountArea::tokens_per_local_expert(own, src) + e); },
        args.num_recv_tokens_per_expert, args.mapped_counters);
    __syncthreads();
    if (threadIdx.x == 0) {
        const int j = first_overflowing;
        const bool rejected = j != INT_MAX;
        // Read by this op's pull on this rank, later on the stream.
        *layout::dispatch_verdict(own) = rejected ? j + 1 : 0;
        // Before the counts: a host waiting for them finds the report already there.
        if (rejected)
            rejection::report(args.rejection, j, kTooFewWorstTokens,
                              args.rank_prefix_matrix[(num_ranks - 1) * num_ranks + j],
                              ptx::ld_volatile_global(layout::CountArea::num_worst_tokens(own, j)));
    }
    publish_receive_counts(args.mapped_counters, num_recv_tokens, args.mapped_tag);
}

__global__ void barrier(IntranodeBarrierArgs args) {
    const NvlKernelBarrier barrier(args.peers, args.barrier);
}

}  // namespace intranode

void launch_intranode_barrier(const IntranodeBarrierArgs& args) {
    intranode::barrier<<<1, kMaxNvlRanks, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_intranode_notify(const IntranodeNotifyArgs& args) {
    DEEP_EP_CHECK(args.num_experts % args.peers.num_ranks == 0, "num_experts must divide evenly over the ranks");
    DEEP_EP_CHECK(args.num_experts / args.peers.num_ranks <= layout::kMaxLocalExperts,
                  "at most " << layout::kMaxLocalExperts << " local experts per rank");
    DEEP_EP_CHECK(args.expert_alignment >= 1, "expert_alignment must be >= 1");
    intranode::notify<<<1, kNotifyThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
