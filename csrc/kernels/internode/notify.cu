// The exchange that opens every inter-node op (one block): each rank signals every rank with the op's
// epoch, a fresh dispatch sending its count message along (put-with-signal: the counts arrive before the
// signal on every transport), then waits until every rank has signalled. A rank signals only once its
// stream reached this op, so passing the wait proves every rank finished its previous op.
//
// Count messages alternate between two parities by epoch: a source writes parity e & 1 of op e, and can
// write that parity again only in op e + 2, which it opens after every rank signalled op e + 1, i.e. after
// every reader finished op e. Verdicts (a rank whose checks failed sends (e, code) instead of counts) use
// the same parities, so a verdict read here is this op's. A verdict the counts imply (a rank receiving more
// rows than its num_worst_tokens) is reached by every rank alike, without a message.
#include <climits>

#include "kernels/api.cuh"
#include "kernels/common/peer.cuh"
#include "kernels/common/receive_counts.cuh"
#include "kernels/common/rejection.cuh"
#include "kernels/common/sync.cuh"
#include "runtime/errors.hpp"

namespace deep_ep {
namespace {

constexpr int kNotifyThreads = 512;
constexpr int kMaxNodes = 256;

__device__ __forceinline__ int ld_count(const char* base, int64_t offset, int index) {
    return ptx::ld_volatile_global(reinterpret_cast<const int*>(base + offset) + index);
}

}  // namespace

namespace internode {

// Thread 0 of the exchange, once it found the op rejected: records it for the op's later kernels, reports
// it to the host (unless the host raised already: a rank whose checks failed), releases a waiting host
// (-1 rows) and closes the exchange.
__device__ void reject_op(const InternodeNotifyArgs& args, const peer::SymmetricView& view, int epoch, int rank,
                          int code, int value, int limit, bool rejected_on_host) {
    ptx::st_volatile_global(view.local<int>(args.control.rejected_epoch()), epoch);
    if (!rejected_on_host)
        rejection::report(args.rejection, rank, code, value, limit);
    if (args.with_counts)
        publish_receive_counts(args.mapped_counters, -1, args.mapped_tag);
    ptx::st_volatile_global(view.local<int>(args.control.epoch_counter()), epoch);
}

__global__ void __launch_bounds__(kNotifyThreads, 1) notify(InternodeNotifyArgs args) {
    const InternodeControl& control = args.control;
    const int num_ranks = control.num_ranks, num_nodes = control.num_nodes(), num_nvl_ranks = control.num_nvl_ranks;
    const int rank = args.peers.rank;
    const peer::SymmetricView view = peer::SymmetricView::of(args.peers);
    int* epoch_counter = view.local<int>(control.epoch_counter());
    __shared__ int epoch;
    if (threadIdx.x == 0)
        epoch = ptx::ld_volatile_global(epoch_counter) + 1;
    __syncthreads();
    const int parity = epoch & 1;
    const int64_t message_ints = control.message_ints();
    const int num_local_experts = args.num_experts / num_ranks;

    __shared__ int tokens_per_node[kMaxNodes];
    if (args.with_counts && args.num_tokens_per_rdma_rank == nullptr) {
        // Not given (V1 requires it, we do not): a token counts once per node however many ranks there get it.
        for (int n = threadIdx.x; n < num_nodes; n += blockDim.x)
            tokens_per_node[n] = 0;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < int64_t{args.num_tokens} * num_nodes; i += blockDim.x) {
            const bool* ranks = args.is_token_in_rank + (i / num_nodes) * num_ranks + (i % num_nodes) * num_nvl_ranks;
            bool any = false;
            for (int j = 0; j < num_nvl_ranks; ++j)
                any |= ranks[j];
            if (any)
                atomicAdd(&tokens_per_node[i % num_nodes], 1);
        }
        __syncthreads();
    }
    // This rank rejects the op: its host checks failed, or a combine's forwarded rows (known only here) do
    // not fit its buffer.
    const bool rejected_on_host = args.rejected_code != 0;
    __shared__ bool rejecting;
    if (threadIdx.x == 0) {
        int code = args.rejected_code, blamed = args.rejected_rank, value = 0, limit = 0;
        if (!rejected_on_host && args.forward_offsets_to_check != nullptr) {
            const int num_forwarded = args.forward_offsets_to_check[num_nodes];
            if (num_forwarded > args.max_forwarded_rows) {
                code = kForwardedRowsExceedBuffer;
                blamed = rank;
                value = num_forwarded;
                limit = static_cast<int>(args.max_forwarded_rows);
            }
        }
        rejecting = code != 0;
        if (rejecting) {
            int* verdict = view.local<int>(control.verdict_out());
            verdict[0] = epoch;
            verdict[1] = code;
            verdict[2] = blamed;
            verdict[3] = value;
            verdict[4] = limit;
        }
    }
    __syncthreads();
    if (args.with_counts && !rejecting) {
        // One message per destination: our whole count rows (so every rank can build the full matrices),
        // then the destination's slice of our per-expert counts.
        for (int64_t i = threadIdx.x; i < int64_t{num_ranks} * message_ints; i += blockDim.x) {
            const int dst = static_cast<int>(i / message_ints), j = static_cast<int>(i % message_ints);
            int value = 0;
            if (j < num_ranks)
                value = args.num_tokens_per_rank[j];
            else if (j < num_ranks + num_nodes)
                value = args.num_tokens_per_rdma_rank != nullptr ? args.num_tokens_per_rdma_rank[j - num_ranks]
                                                                 : tokens_per_node[j - num_ranks];
            else if (j < num_ranks + num_nodes + num_local_experts)
                value = args.num_tokens_per_expert[dst * num_local_experts + (j - num_ranks - num_nodes)];
            else if (j == num_ranks + num_nodes + num_local_experts)
                value = args.num_worst_tokens;
            view.local<int>(control.count_out(dst))[j] = value;
        }
        __syncthreads();
    }
    const int warp = threadIdx.x / peer::kWarpSize, lane = threadIdx.x % peer::kWarpSize;
    const int num_warps = blockDim.x / peer::kWarpSize;
    const int worst_tokens_index = num_ranks + num_nodes + num_local_experts;
    const int message_bytes = static_cast<int>((worst_tokens_index + 1 + 3) / 4 * 16);
    for (int dst = warp; dst < num_ranks; dst += num_warps) {
        if (rejecting) {
            peer::warp_send_with_signal(view, dst, control.verdict_in(parity, rank), view.local(control.verdict_out()),
                                        InternodeControl::kVerdictBytes, control.exchange_word(rank), epoch,
                                        peer::SignalOp::kSet, lane);
        } else if (args.with_counts) {
            peer::warp_send_with_signal(view, dst, control.count_in(parity, rank), view.local(control.count_out(dst)),
                                        message_bytes, control.exchange_word(rank), epoch, peer::SignalOp::kSet, lane);
        } else if (lane == 0) {
            peer::signal_set(view, dst, control.exchange_word(rank), epoch);
        }
    }
    // The out messages are rewritten by the next op: complete our puts first.
    peer::quiet();

    bool arrived = true;
    for (int src = threadIdx.x; src < num_ranks; src += blockDim.x)
        arrived &= wait_at_least(args.peers.wait, WaitSite::kInternodeExchange, src,
                                 view.local<int>(control.exchange_word(src)), epoch);
    if (__syncthreads_and(arrived) == 0)
        return;

    // A rejected op: every rank records it (the op's later kernels skip) and the host learns of it (a
    // fresh dispatch's host from its counts: -1 rows); ranks whose host checks failed raise their own errors.
    __shared__ int first_rejecting;
    if (threadIdx.x == 0)
        first_rejecting = INT_MAX;
    __syncthreads();
    for (int src = threadIdx.x; src < num_ranks; src += blockDim.x)
        if (ld_count(view.local_base, control.verdict_in(parity, src), 0) == epoch)
            atomicMin(&first_rejecting, src);
    __syncthreads();
    if (first_rejecting != INT_MAX) {
        if (threadIdx.x == 0) {
            // The lowest rank that rejected the op names the rank to blame (itself, or a node peer whose error
            // its node agreed on).
            const char* verdict = view.local_base + control.verdict_in(parity, first_rejecting);
            reject_op(args, view, epoch, ld_count(verdict, 0, 2), ld_count(verdict, 0, 1), ld_count(verdict, 0, 3),
                      ld_count(verdict, 0, 4), rejected_on_host);
        }
        return;
    }

    if (args.with_counts) {
        const char* own = view.local_base;
        __shared__ int num_recv_tokens, first_overflowing;
        if (threadIdx.x == 0)
            first_overflowing = INT_MAX;
        __syncthreads();
        // Column j of the prefix matrix; row `rank` of the receive side. Every rank checks every rank's
        // num_worst_tokens against what it receives, so all reach the same verdict.
        for (int j = threadIdx.x; j < num_ranks; j += blockDim.x) {
            int running = 0;
            for (int i = 0; i < num_ranks; ++i) {
                running += ld_count(own, control.count_in(parity, i), j);
                args.rank_prefix_matrix[i * num_ranks + j] = running;
            }
            const int worst_tokens = ld_count(own, control.count_in(parity, j), worst_tokens_index);
            if (rejection::exceeds_worst_tokens(running, worst_tokens))
                atomicMin(&first_overflowing, j);
        }
        __syncthreads();
        if (first_overflowing != INT_MAX) {
            if (threadIdx.x == 0) {
                const int j = first_overflowing;
                reject_op(args, view, epoch, j, kTooFewWorstTokens,
                          args.rank_prefix_matrix[(num_ranks - 1) * num_ranks + j],
                          ld_count(own, control.count_in(parity, j), worst_tokens_index), false);
            }
            return;
        }
        for (int i = threadIdx.x; i < num_ranks * num_nodes; i += blockDim.x)
            args.node_count_matrix[i] = ld_count(own, control.count_in(parity, i / num_nodes), num_ranks + i % num_nodes);
        if (threadIdx.x == 0) {
            int running = 0;
            for (int src = 0; src < num_ranks; ++src) {
                args.recv_first_row[src] = running;
                running += ld_count(own, control.count_in(parity, src), rank);
                args.recv_rank_prefix_sum[src] = running;
            }
            num_recv_tokens = running;
            // As forwarder, this rank lands the rows source (m, our local index) sends to our node.
            const int node = rank / num_nvl_ranks, local = rank % num_nvl_ranks;
            int forwarded = 0;
            for (int m = 0; m < num_nodes; ++m) {
                args.forward_offsets[m] = forwarded;
                if (m != node)
                    forwarded += ld_count(own, control.count_in(parity, m * num_nvl_ranks + local), num_ranks + node);
            }
            args.forward_offsets[num_nodes] = forwarded;
            if (args.mapped_counters != nullptr)
                ptx::st_volatile_global(args.mapped_counters + 2 + num_local_experts, forwarded);
        }
        store_expert_counts(
            num_local_experts, num_ranks, args.expert_alignment,
            [&](int src, int e) { return ld_count(own, control.count_in(parity, src), num_ranks + num_nodes + e); },
            args.num_recv_tokens_per_expert, args.mapped_counters);
        __syncthreads();
        publish_receive_counts(args.mapped_counters, num_recv_tokens, args.mapped_tag);
    }
    if (threadIdx.x == 0)
        ptx::st_volatile_global(epoch_counter, epoch);
}

}  // namespace internode

void launch_internode_notify(const InternodeNotifyArgs& args) {
    const int num_ranks = args.control.num_ranks;
    DEEP_EP_CHECK(num_ranks % args.control.num_nvl_ranks == 0, "num_nvl_ranks must divide the rank count");
    DEEP_EP_CHECK(args.control.num_nodes() <= kMaxNodes, "at most " << kMaxNodes << " nodes");
    if (args.with_counts) {
        DEEP_EP_CHECK(args.num_experts % num_ranks == 0, "num_experts must divide evenly over the ranks");
        DEEP_EP_CHECK(args.num_experts / num_ranks <= kInternodeMaxLocalExperts,
                      "at most " << kInternodeMaxLocalExperts << " local experts per rank");
        DEEP_EP_CHECK(args.expert_alignment >= 1, "expert_alignment must be >= 1");
    }
    internode::notify<<<1, kNotifyThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
