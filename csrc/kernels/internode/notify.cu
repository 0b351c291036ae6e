// The exchange that opens every inter-node op (one block): each rank sends every rank a message (a header
// with the op's epoch, its verdict and its call's signature; a fresh dispatch's counts after it) with the
// epoch as signal (put-with-signal: the message arrives before the signal on every transport), then waits
// until every rank has signalled. A rank signals only once its stream reached this op, so passing the wait
// proves every rank finished its previous op.
//
// Messages alternate between two parities by epoch: a source writes parity e & 1 of op e, and can write
// that parity again only in op e + 2, which it opens after every rank signalled op e + 1, i.e. after every
// reader finished op e. So every header read here is this op's, and every rank decides from the same
// headers (and counts): a rank's verdict (its checks failed), ranks whose signatures differ, a rank that
// would receive more rows than its num_worst_tokens all make every rank reject the op alike.
#include <climits>
#include <cstddef>

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
    // This rank's header: its verdict (its host checks failed, or a combine's forwarded rows, known only
    // here, do not fit its buffer) and its call's signature; the same for every destination.
    __shared__ InternodeMessageHeader header;
    if (threadIdx.x == 0) {
        header = InternodeMessageHeader{epoch, args.rejected_code, args.rejected_rank, 0, 0, args.signature};
        if (header.code == 0 && args.forward_offsets_to_check != nullptr) {
            const int num_forwarded = args.forward_offsets_to_check[num_nodes];
            if (num_forwarded > args.max_forwarded_rows) {
                header.code = kForwardedRowsExceedBuffer;
                header.blamed = rank;
                header.value = num_forwarded;
                header.limit = static_cast<int>(args.max_forwarded_rows);
            }
        }
    }
    __syncthreads();
    const bool rejected_on_host = args.rejected_code != 0;
    const bool send_counts = args.with_counts && header.code == 0;
    constexpr int kHeaderInts = InternodeControl::kHeaderInts;
    const int worst_tokens_index = num_ranks + num_nodes + num_local_experts;
    // One message per destination: the header, then for a fresh dispatch our whole count rows (so every
    // rank can build the full matrices), the destination's slice of our per-expert counts and our
    // num_worst_tokens.
    const int message_ints_used = send_counts ? kHeaderInts + worst_tokens_index + 1 : kHeaderInts;
    const int message_bytes = (message_ints_used + 3) / 4 * 16;
    for (int64_t i = threadIdx.x; i < int64_t{num_ranks} * message_ints_used; i += blockDim.x) {
        const int dst = static_cast<int>(i / message_ints_used), j = static_cast<int>(i % message_ints_used);
        int value = 0;
        if (j < kHeaderInts) {
            if (j < static_cast<int>(sizeof(InternodeMessageHeader) / 4))
                value = reinterpret_cast<const int*>(&header)[j];
        } else if (const int c = j - kHeaderInts; c < num_ranks) {
            value = args.num_tokens_per_rank[c];
        } else if (c < num_ranks + num_nodes) {
            value = args.num_tokens_per_rdma_rank != nullptr ? args.num_tokens_per_rdma_rank[c - num_ranks]
                                                             : tokens_per_node[c - num_ranks];
        } else if (c < worst_tokens_index) {
            value = args.num_tokens_per_expert[dst * num_local_experts + (c - num_ranks - num_nodes)];
        } else {
            value = args.num_worst_tokens;
        }
        view.local<int>(control.message_out(dst))[j] = value;
    }
    __syncthreads();
    const int warp = threadIdx.x / peer::kWarpSize, lane = threadIdx.x % peer::kWarpSize;
    const int num_warps = blockDim.x / peer::kWarpSize;
    for (int dst = warp; dst < num_ranks; dst += num_warps)
        peer::warp_send_with_signal(view, dst, control.message_in(parity, rank), view.local(control.message_out(dst)),
                                    message_bytes, control.exchange_word(rank), epoch, peer::SignalOp::kSet, lane);
    // The out messages are rewritten by the next op: complete our puts first.
    peer::quiet();

    bool arrived = true;
    for (int src = threadIdx.x; src < num_ranks; src += blockDim.x)
        arrived &= wait_at_least(args.peers.wait, WaitSite::kInternodeExchange, src,
                                 view.local<int>(control.exchange_word(src)), epoch);
    if (__syncthreads_and(arrived) == 0)
        return;

    // Every rank's header arrived with its signal. A rejected op: every rank records it (the op's later
    // kernels skip) and the host learns of it (a fresh dispatch's host from its counts: -1 rows); ranks whose
    // host checks failed raise their own errors. The lowest rank that rejected names the rank to blame.
    constexpr int kCode = offsetof(InternodeMessageHeader, code) / 4;
    constexpr int kSignature = offsetof(InternodeMessageHeader, signature) / 4;
    __shared__ int first_rejecting, first_differing, reference_rank[InternodeCallSignature::kNumFields];
    if (threadIdx.x == 0)
        first_rejecting = first_differing = INT_MAX;
    if (threadIdx.x < InternodeCallSignature::kNumFields)
        reference_rank[threadIdx.x] = INT_MAX;
    __syncthreads();
    const auto header_of = [&](int src) { return view.local_base + control.message_in(parity, src); };
    // A handle without identity (-1) matches any; every other field must equal the first rank's.
    const auto known = [](int field, int value) { return field != InternodeCallSignature::kNumFields - 1 || value >= 0; };
    for (int src = threadIdx.x; src < num_ranks; src += blockDim.x) {
        if (ld_count(header_of(src), 0, kCode) != 0)
            atomicMin(&first_rejecting, src);
        for (int f = 0; f < InternodeCallSignature::kNumFields; ++f)
            if (known(f, ld_count(header_of(src), 0, kSignature + f)))
                atomicMin(&reference_rank[f], src);
    }
    __syncthreads();
    if (first_rejecting == INT_MAX) {
        for (int src = threadIdx.x; src < num_ranks; src += blockDim.x)
            for (int f = 0; f < InternodeCallSignature::kNumFields; ++f) {
                const int value = ld_count(header_of(src), 0, kSignature + f);
                if (known(f, value) && value != ld_count(header_of(reference_rank[f]), 0, kSignature + f))
                    atomicMin(&first_differing, (f << 16) | src);  // the first field, then the lowest rank
            }
        __syncthreads();
    }
    if (first_rejecting != INT_MAX || first_differing != INT_MAX) {
        if (threadIdx.x == 0) {
            if (first_rejecting != INT_MAX) {
                const char* verdict = header_of(first_rejecting);
                reject_op(args, view, epoch, ld_count(verdict, 0, offsetof(InternodeMessageHeader, blamed) / 4),
                          ld_count(verdict, 0, kCode), ld_count(verdict, 0, offsetof(InternodeMessageHeader, value) / 4),
                          ld_count(verdict, 0, offsetof(InternodeMessageHeader, limit) / 4), rejected_on_host);
            } else {
                const int f = first_differing >> 16, src = first_differing & 0xffff, reference = reference_rank[f];
                const int op = ld_count(header_of(reference_rank[0]), 0, kSignature);
                reject_op(args, view, epoch, src, kSignatureDiffers + (op << 24) + (f << 8) + min(reference, 255),
                          ld_count(header_of(src), 0, kSignature + f), ld_count(header_of(reference), 0, kSignature + f),
                          false);
            }
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
