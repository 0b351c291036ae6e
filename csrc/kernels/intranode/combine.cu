// Intra-node combine, the transpose of dispatch: stage (each rank copies its combine input, row i = the
// i-th row it received, into its own NVLink buffer; skipped with direct reads, which read the input
// itself) and pull (each rank, for every one of its tokens, sums the rows the receivers hold for it,
// found through send_head, in float32 and stores bf16).
#include "kernels/api.cuh"
#include "kernels/common/barrier.cuh"
#include "kernels/common/buffer_layout.cuh"
#include "kernels/common/poison.cuh"
#include "kernels/common/reduce.cuh"
#include "kernels/common/token.cuh"
#include "runtime/errors.hpp"

namespace deep_ep {
namespace {

constexpr int kStageThreads = 1024;
constexpr int kStageUnroll = 8;
// The reduction holds kMaxSources x kUnroll loaded vectors plus 8 float accumulators per lane. With up to
// two sources 768 threads fit (80 registers); more sources need the 128 registers 512 threads leave.
template <int kMaxSources>
constexpr int kPullThreads = kMaxSources <= 2 ? 768 : 512;
// Loads in flight per lane in the reduction, whatever the number of ranks.
constexpr int kReduceVectorsInFlight = 8;

}  // namespace

namespace intranode {

__global__ void __launch_bounds__(kStageThreads, 1) stage_expert_outputs(IntranodeCombineStageArgs args) {
    // Opens the op: after it, every peer has finished pulling whatever the previous op left in our buffer.
    const NvlKernelBarrier barrier(args.peers, args.barrier);
    if (!barrier.passed())
        return;
    const layout::CombineRowLayout rows(args.hidden, args.num_topk);
    void* own = args.peers.buffers[args.peers.rank];
    const int lane = threadIdx.x % kWarpSize;
    for (int row = global_warp_id(); row < args.num_rows; row += num_global_warps()) {
        char* slot = rows.row(own, row);
        const int* weights_row = reinterpret_cast<const int*>(args.topk_weights + int64_t{row} * args.num_topk);
        const bool has_weight = args.topk_weights != nullptr && lane < args.num_topk;
        const int weight_bits = has_weight ? __ldg(weights_row + lane) : 0;
        warp_copy_own_vectors<kStageUnroll>(
            reinterpret_cast<int4*>(slot + rows.x_offset),
            reinterpret_cast<const int4*>(static_cast<const char*>(args.x) + int64_t{row} * args.hidden * 2),
            args.hidden / kBf16PerVector, lane);
        if (has_weight)
            reinterpret_cast<int*>(slot + rows.topk_weights_offset)[lane] = weight_bits;
    }
}

}  // namespace intranode

// Named deep_ep::intranode::combine: profiler-based tools (DeepEP's test scripts among them) find this
// op's kernel by the substring "::combine", which no other kernel of ours contains.
namespace intranode {

template <ptx::LoadKind kKind, int kMaxSources>
__global__ void __launch_bounds__(kPullThreads<kMaxSources>, 1) combine(IntranodeCombinePullArgs args) {
    NvlKernelBarrier barrier(args.peers, args.barrier);
    if (!barrier.passed()) {
        // A peer never arrived (the Buffer reports it): poison what the call returns instead.
        poison::poison_combined_tokens(args.combined_x, args.hidden, args.combined_topk_weights, args.num_topk,
                                       args.num_tokens);
        return;
    }
    constexpr int kUnroll = kReduceVectorsInFlight / kMaxSources > 0 ? kReduceVectorsInFlight / kMaxSources : 1;
    const int num_ranks = args.peers.num_ranks;
    const int lane = threadIdx.x % kWarpSize;
    const int num_vectors = args.hidden / kBf16PerVector;

    // Lane d holds the row rank d staged for the token (or -1). The next token's heads are loaded while
    // this one is reduced, so no token starts with a dependent round trip to memory.
    auto load_heads = [&](int token) {
        return lane < num_ranks && token < args.num_tokens ? __ldg(args.send_head + int64_t{token} * num_ranks + lane)
                                                           : -1;
    };
    int next_head = load_heads(global_warp_id());
    for (int token = global_warp_id(); token < args.num_tokens; token += num_global_warps()) {
        // The sources keep rank order 0..R-1, the summation order the reference defines.
        const int head = next_head;
        next_head = load_heads(token + num_global_warps());
        const unsigned has_row = __ballot_sync(0xffffffffu, head >= 0);
        const CombineSources& from = args.sources;
        const int4* sources[kMaxSources];
        const int* weight_words[kMaxSources];
        int num_sources = 0;
#pragma unroll
        for (int d = 0; d < kMaxSources; ++d) {
            const int row = __shfl_sync(0xffffffffu, head, d);
            if (d < num_ranks && ((has_row >> d) & 1)) {
                const auto* x_row = reinterpret_cast<const int4*>(from.x[d] + row * from.x_stride);
                const auto* w_row = reinterpret_cast<const int*>(from.topk_weights[d] + row * from.topk_weights_stride);
                // Static indices only, so the arrays stay in registers.
#pragma unroll
                for (int j = 0; j < kMaxSources; ++j)
                    if (j == num_sources) {
                        sources[j] = x_row;
                        weight_words[j] = w_row;
                    }
                ++num_sources;
            }
        }
#pragma unroll
        for (int j = 0; j < kMaxSources; ++j)
            if (j >= num_sources)
                sources[j] = nullptr;

        // The weights' loads go first so that they fly with the hidden vectors'.
        float staged_weights[kMaxSources];
        const bool sums_weight = args.combined_topk_weights != nullptr && lane < args.num_topk;
#pragma unroll
        for (int j = 0; j < kMaxSources; ++j)
            if (sums_weight && j < num_sources)
                staged_weights[j] = __int_as_float(ptx::ld_peer<kKind>(weight_words[j] + lane));

        const int64_t row_offset = int64_t{token} * num_vectors;
        const auto* bias_0 = static_cast<const int4*>(args.bias_0);
        const auto* bias_1 = static_cast<const int4*>(args.bias_1);
        warp_reduce_bf16_rows<kKind, kMaxSources, kUnroll>(
            static_cast<int4*>(args.combined_x) + row_offset, sources, num_sources,
            bias_0 == nullptr ? nullptr : bias_0 + row_offset, bias_1 == nullptr ? nullptr : bias_1 + row_offset,
            num_vectors, lane);

        if (sums_weight) {
            // Rank order from +0.0 in float32, as the reference's index_add_ sums.
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < kMaxSources; ++j)
                if (j < num_sources)
                    sum += staged_weights[j];
            args.combined_topk_weights[int64_t{token} * args.num_topk + lane] = sum;
        }
    }
    barrier.close(args.peers, args.barrier);
}

}  // namespace intranode

namespace {

template <ptx::LoadKind kKind>
void launch_combine_pull_for_kind(const IntranodeCombinePullArgs& args, int num_blocks) {
    // Source arrays sized by the rank count rounded up to a power of two keep 8 loads in flight per lane.
    auto kernel = intranode::combine<kKind, 8>;
    if (args.peers.num_ranks <= 1)
        kernel = intranode::combine<kKind, 1>;
    else if (args.peers.num_ranks <= 2)
        kernel = intranode::combine<kKind, 2>;
    else if (args.peers.num_ranks <= 4)
        kernel = intranode::combine<kKind, 4>;
    int threads = kPullThreads<8>;
    if (args.peers.num_ranks <= 2)
        threads = kPullThreads<2>;
    kernel<<<num_blocks, threads, 0, args.stream>>>(args);
}

int clamp_blocks(int num_blocks) { return num_blocks < 1 ? 1 : num_blocks; }

}  // namespace

void launch_intranode_combine_stage(const IntranodeCombineStageArgs& args) {
    DEEP_EP_CHECK(args.hidden % kBf16PerVector == 0, "combine needs hidden % 8 == 0");
    DEEP_EP_CHECK(args.num_topk <= kWarpSize, "at most " << kWarpSize << " top-k weights per row");
    intranode::stage_expert_outputs<<<clamp_blocks(args.num_blocks), kStageThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_intranode_combine_pull(const IntranodeCombinePullArgs& args) {
    DEEP_EP_CHECK(args.hidden % kBf16PerVector == 0, "combine needs hidden % 8 == 0");
    DEEP_EP_CHECK(args.peers.num_ranks <= kMaxNvlRanks, "combine handles at most " << kMaxNvlRanks << " ranks");
    DEEP_EP_CHECK(args.num_topk <= kWarpSize, "at most " << kWarpSize << " top-k weights per row");
    const int num_blocks = clamp_blocks(args.num_blocks);
    if constexpr (ptx::kAggressiveLoadsCompiled) {
        if (!args.conservative_loads) {
            launch_combine_pull_for_kind<ptx::LoadKind::kAggressive>(args, num_blocks);
            DEEP_EP_LAUNCH_CHECK();
            return;
        }
    }
    launch_combine_pull_for_kind<ptx::LoadKind::kConservative>(args, num_blocks);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
