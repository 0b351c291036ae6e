// Low-latency combine: the transpose of dispatch.
//
// Send phase (expert rank): each received row (expert output, bf16) goes back, unweighted, to its source
// rank's receive slot [global expert][source token] and sets that slot's flag. One block per local
// expert at a time; its warps share the expert's rows (the packed layout's ranges say which source each
// row belongs to, the handle's src_info which token).
// Receive phase (source rank): one block per token at a time; one thread per top-k entry waits for the
// slot's flag and resets it, then all threads reduce sum_k w[t,k] * row(e_k, t) in float32 and store bf16.
// A rank whose combine checks failed still sends (NaN rows) and receives, so nobody waits; the rejection
// code rides in its counters' high bits, and each receiver that got its rows records it (RejectionReport).
#include <cuda_bf16.h>

#include "kernels/api.cuh"
#include "kernels/common/expert_ids.cuh"
#include "kernels/common/peer.cuh"
#include "kernels/common/poison.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/rejection.cuh"
#include "kernels/common/sync.cuh"
#include "runtime/errors.hpp"

namespace deep_ep {
namespace {

constexpr int kNumThreads = 512;
constexpr int kNumWarps = kNumThreads / 32;
constexpr int kMaxRanks = 1024;
// A combine counter's low 16 bits count rows (at most kLowLatencyMaxTokensPerRank); a rejecting sender adds
// its rejection code above them once per (expert, source) range, with that range's first row.
constexpr int kRowCountBits = 16;
constexpr int kRowCountMask = (1 << kRowCountBits) - 1;
static_assert(kLowLatencyMaxTokensPerRank <= kRowCountMask, "rows per combine counter must fit its count bits");

/// All warps of the grid share all rows: flat row f of this rank's [L][rows of l] maps to (l, r) through
/// a prefix over the experts' row totals that every block computes from the handle's ranges. Consecutive
/// rows go to different blocks, so every block sends a share. Handing each block a run of rows instead left
/// half the blocks of a decode-sized combine without rows; they polled their flags while the others still
/// sent, and those sends ran ~9x slower when the peer was another GPU (two H200s, 128 tokens: 400 us
/// against 42 us now; ranks sharing a GPU did not show it).
__device__ void send_phase(const LowLatencyCombineArgs& args, const peer::SymmetricView& view, int* expert_row_start) {
    const auto& layout = args.layout;
    const int num_ranks = static_cast<int>(layout.num_ranks);
    const int num_local_experts = static_cast<int>(layout.num_local_experts());
    const int64_t rows_per_expert = layout.num_ranks * layout.num_max_tokens;
    const int row_bytes = static_cast<int>(layout.combine_row_bytes());
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    char* staged = view.local(layout.send_region(args.buffer_set));

    // Rows of expert l = end of its last source's range (sources are laid out in rank order).
    if (warp == 0) {
        int carry = 0;
        for (int base = 0; base < num_local_experts; base += 32) {
            const int l = base + lane;
            int rows = 0;
            if (l < num_local_experts) {
                const int64_t last = args.layout_range[int64_t{l} * num_ranks + num_ranks - 1];
                rows = static_cast<int>(last >> 32) + static_cast<int>(last & 0xffffffff);
            }
            int inclusive = rows;
#pragma unroll
            for (int offset = 1; offset < 32; offset *= 2) {
                const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
                if (lane >= offset)
                    inclusive += other;
            }
            if (l < num_local_experts)
                expert_row_start[l + 1] = carry + inclusive;
            carry += __shfl_sync(0xffffffffu, inclusive, 31);
        }
        if (lane == 0)
            expert_row_start[0] = 0;
    }
    __syncthreads();

    const int total = expert_row_start[num_local_experts];
    for (int f = warp * gridDim.x + blockIdx.x; f < total; f += gridDim.x * kNumWarps) {
        int lo = 0, hi = num_local_experts - 1;  // the last expert whose rows start at or before f
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (expert_row_start[mid] <= f)
                lo = mid;
            else
                hi = mid - 1;
        }
        const int local_expert = lo, r = f - expert_row_start[lo];
        int src = num_ranks - 1;  // the last source whose range begins at or before r
        while (static_cast<int>(args.layout_range[int64_t{local_expert} * num_ranks + src] >> 32) > r)
            --src;
        const int64_t row = local_expert * rows_per_expert + r;
        const int token = args.src_info[row];
        // A rejection code rides with the first row of each (expert, source) range only.
        const bool carries_code =
            args.rejected_code != 0 &&
            static_cast<int>(args.layout_range[int64_t{local_expert} * num_ranks + src] >> 32) == r;
        const int signal = 1 + (carries_code ? args.rejected_code << kRowCountBits : 0);
        const int expert = args.rank * num_local_experts + local_expert;
        const char* staged_row = staged + row * row_bytes;
        const void* source = args.zero_copy ? static_cast<const void*>(staged_row)
                                            : static_cast<const char*>(args.x) + row * row_bytes;
        if (!args.zero_copy && view.mapped(src) == nullptr) {
            // Puts read registered memory only: stage the row in the symmetric buffer first.
            const auto* in = reinterpret_cast<const int4*>(source);
            auto* out = reinterpret_cast<int4*>(const_cast<char*>(staged_row));
            for (int v = lane; v < row_bytes / 16; v += 32)
                out[v] = __ldg(in + v);
            __syncwarp();
            source = staged_row;
        }
        peer::warp_send_with_signal(view, src, layout.combine_recv_row(args.buffer_set, expert, token), source,
                                    row_bytes, layout.combine_counter(args.buffer_set, expert), signal,
                                    peer::SignalOp::kAdd, lane);
    }
    if (!args.symmetric.all_ranks_mapped && lane == 0)
        peer::quiet();
}

// Out-of-range ids read as -1, as in the dispatch that sent the rows (which reported them).
__device__ __forceinline__ int load_topk(const LowLatencyCombineArgs& args, int64_t index) {
    return expert_ids::load(args.topk_idx, args.topk_idx_is_int64, index, static_cast<int>(args.layout.num_experts),
                            nullptr);
}

template <ptx::LoadKind kLoadKind>
__device__ void recv_phase(const LowLatencyCombineArgs& args, const peer::SymmetricView& view, int* histogram,
                           int* experts, float* weights, int* failed) {
    const auto& layout = args.layout;
    const int num_experts = static_cast<int>(layout.num_experts);
    const int hidden = static_cast<int>(layout.hidden);
    const int num_vectors = hidden / 8;  // 8 bf16 per 16-byte vector
    const int num_pairs = args.num_tokens * args.num_topk;

    // Rows to expect per expert: this rank's own (token, expert) pairs. Every block counts all of them.
    for (int e = threadIdx.x; e < num_experts; e += kNumThreads)
        histogram[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < num_pairs; p += kNumThreads) {
        const int e = load_topk(args, p);
        if (e < 0)
            continue;
        bool first = true;  // a token listing an expert twice received it once (see dispatch)
        for (int q = p - p % args.num_topk; q < p; ++q)
            first &= load_topk(args, q) != e;
        if (first)
            atomicAdd(&histogram[e], 1);
    }
    __syncthreads();

    for (int token = blockIdx.x; token < args.num_tokens; token += gridDim.x) {
        if (threadIdx.x < args.num_topk) {
            const int64_t pair = int64_t{token} * args.num_topk + threadIdx.x;
            const int expert = load_topk(args, pair);
            experts[threadIdx.x] = expert;
            weights[threadIdx.x] = args.topk_weights != nullptr ? args.topk_weights[pair] : 0.0f;
            if (expert >= 0) {
                // All of the expert's rows for this rank, not only this token's: one counter per expert
                // keeps the signal region at two words per expert.
                const auto* counter = view.local<uint64_t>(layout.combine_counter(args.buffer_set, expert));
                const int expected = histogram[expert];
                const uint64_t wait_start_ns =
                    args.combine_wait_recv_cost_stats != nullptr ? ptx::mov_u64_globaltimer() : 0;
                int value = 0;
                if (!wait_until(
                        args.wait, WaitSite::kLowLatencyFlag, expert, expected,
                        [&] { return value = peer::load_signal_acquire(counter); },
                        [=](int v) { return (v & kRowCountMask) == expected; }))
                    *failed = 1;
                else if ((value >> kRowCountBits) != 0)  // the expert's rank rejected this combine
                    rejection::report(args.rejection, expert / static_cast<int>(layout.num_local_experts()),
                                      value >> kRowCountBits, 0, 0);
                if (args.combine_wait_recv_cost_stats != nullptr) {
                    const int src_rank = expert / static_cast<int>(layout.num_local_experts());
                    atomicAdd(reinterpret_cast<unsigned long long*>(args.combine_wait_recv_cost_stats + src_rank),
                              static_cast<unsigned long long>(ptx::mov_u64_globaltimer() - wait_start_ns));
                }
            }
        }
        __syncthreads();
        if (*failed) {  // uniform: every thread read the flag after the barrier
            for (int t = token; t < args.num_tokens; t += gridDim.x)
                poison::fill(static_cast<__nv_bfloat16*>(args.out) + int64_t{t} * hidden, int64_t{hidden} * 2,
                             poison::kBf16NaNs);
            break;
        }
        for (int v = threadIdx.x; v < num_vectors; v += kNumThreads) {
            float sum[8] = {};
            // Loads of a batch of top-k rows are issued together; the sum keeps the reference's k order.
            constexpr int kBatch = 4;
            for (int k0 = 0; k0 < args.num_topk; k0 += kBatch) {
                int4 packed[kBatch];
#pragma unroll
                for (int b = 0; b < kBatch; ++b) {
                    const int k = k0 + b;
                    if (k < args.num_topk && experts[k] >= 0)
                        packed[b] = ptx::ld_peer<kLoadKind>(reinterpret_cast<const int4*>(view.local(
                                                                layout.combine_recv_row(args.buffer_set, experts[k], token))) +
                                                            v);
                }
#pragma unroll
                for (int b = 0; b < kBatch; ++b) {
                    const int k = k0 + b;
                    if (k >= args.num_topk || experts[k] < 0)
                        continue;
                    const auto* values = reinterpret_cast<const __nv_bfloat16*>(&packed[b]);
                    const float w = weights[k];
#pragma unroll
                    for (int i = 0; i < 8; ++i)  // unfused, as the reference: acc + float32(w * x)
                        sum[i] = __fadd_rn(sum[i], __fmul_rn(w, __bfloat162float(values[i])));
                }
            }
            int4 out;
            auto* out_values = reinterpret_cast<__nv_bfloat16*>(&out);
#pragma unroll
            for (int i = 0; i < 8; ++i)
                out_values[i] = __float2bfloat16_rn(sum[i]);
            reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(args.out) + int64_t{token} * hidden)[v] = out;
        }
        __syncthreads();  // experts/weights are rewritten for the next token
    }
    if (*failed)
        return;  // leave the counters: the Buffer is unusable after a timeout anyway

    // The last block to finish resets the counters: only then has every block seen their final values.
    // Peers write them again only in this set's next combine, which depends causally on this kernel.
    __shared__ bool is_last_block;
    if (threadIdx.x == 0) {
        __threadfence();
        is_last_block = atomicAdd(args.done_blocks, 1) == static_cast<int>(gridDim.x) - 1;
    }
    __syncthreads();
    if (is_last_block) {
        for (int e = threadIdx.x; e < num_experts; e += kNumThreads)
            ptx::st_relaxed_sys_global(view.local<int>(layout.combine_counter(args.buffer_set, e)), 0);
        if (threadIdx.x == 0)
            *args.done_blocks = 0;
    }
}

}  // namespace

// Named deep_ep::low_latency::combine: profiler-based tools find a combine kernel by "::combine".
namespace low_latency {

template <ptx::LoadKind kLoadKind>
__global__ void __launch_bounds__(kNumThreads, 1) combine(const LowLatencyCombineArgs args) {
    __shared__ int histogram[kLowLatencyMaxExperts + 1];  // also the send phase's expert_row_start
    __shared__ int experts[kLowLatencyMaxTopk];
    __shared__ float weights[kLowLatencyMaxTopk];
    __shared__ int failed;
    const peer::SymmetricView view{static_cast<char*>(args.symmetric.local_base), args.symmetric.mapped_bases};
    if (threadIdx.x == 0)
        failed = 0;
    __syncthreads();
    if (args.do_send)
        send_phase(args, view, histogram);
    __syncthreads();
    if (args.do_recv)
        recv_phase<kLoadKind>(args, view, histogram, experts, weights, &failed);
}

__global__ void barrier() { nvshmem_barrier_all(); }

}  // namespace low_latency

void launch_low_latency_barrier(const LowLatencyBarrierArgs& args) {
    low_latency::barrier<<<1, 1, 0, args.stream>>>();
    DEEP_EP_LAUNCH_CHECK();
}

void launch_low_latency_combine(const LowLatencyCombineArgs& args) {
    DEEP_EP_CHECK(args.layout.num_ranks <= kMaxRanks, "low-latency combine supports up to " << kMaxRanks << " ranks");
    DEEP_EP_CHECK(args.layout.num_experts <= kLowLatencyMaxExperts,
                  "low-latency combine supports up to " << kLowLatencyMaxExperts << " experts");
    DEEP_EP_CHECK(args.num_topk <= kLowLatencyMaxTopk, "low-latency combine supports top-k up to " << kLowLatencyMaxTopk);
    const dim3 grid(args.num_blocks), block(kNumThreads);
    if (args.conservative_loads || !ptx::kAggressiveLoadsCompiled)
        low_latency::combine<ptx::LoadKind::kConservative><<<grid, block, 0, args.stream>>>(args);
    else
        low_latency::combine<ptx::LoadKind::kAggressive><<<grid, block, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
