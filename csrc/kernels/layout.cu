// get_dispatch_layout: which ranks and experts each token goes to, counted.
#include <algorithm>

#include "kernels/api.cuh"
#include "kernels/common/expert_ids.cuh"
#include "runtime/errors.hpp"

namespace deep_ep {
namespace {

constexpr int kLayoutThreads = 256;
constexpr int kCheckThreads = 256;

}  // namespace

// Kernels have named namespaces, never anonymous ones: a kernel in an anonymous namespace shows in profiler
// tables under a mangled name that contains its file's name, and tools look kernels up by name.
namespace routing {

__global__ void __launch_bounds__(kCheckThreads) check_expert_ids(CheckExpertIdsArgs args) {
    expert_ids::check_range(args.topk_idx, args.topk_idx_is_int64, args.numel, args.num_experts, args.invalid);
}

// One thread per token. Counts go to shared-memory histograms first, so each block touches global memory
// once per expert and rank instead of once per token (8 topk x 4096 tokens would serialise on atomics).
// Nothing needs zeroing before the launch (a memset would be a second launch, and launches are most of a
// small call's host time): one block writes its counts directly; several blocks each publish theirs in a
// row of block_counts, and the last block to finish sums the rows.
template <typename IndexT>
__global__ void __launch_bounds__(kLayoutThreads) count_tokens(DispatchLayoutArgs args) {
    extern __shared__ int shared_counts[];
    const int num_nodes = args.num_tokens_per_node != nullptr ? args.num_ranks / args.num_nvl_ranks : 0;
    const int num_counts = args.num_ranks + args.num_experts + num_nodes;
    int* block_tokens_per_rank = shared_counts;
    int* block_tokens_per_expert = shared_counts + args.num_ranks;
    int* block_tokens_per_node = block_tokens_per_expert + args.num_experts;
    for (int i = threadIdx.x; i < num_counts; i += blockDim.x)
        shared_counts[i] = 0;
    __syncthreads();

    const int experts_per_rank = args.num_experts / args.num_ranks;
    const auto* topk_idx = static_cast<const IndexT*>(args.topk_idx);
    const int token = blockIdx.x * blockDim.x + threadIdx.x;
    if (token < args.num_tokens) {
        // A token is counted once per rank however many of its experts live there; ranks <= 64 fit a mask.
        uint64_t rank_mask = 0;
        for (int k = 0; k < args.num_topk; ++k) {
            const int64_t id = static_cast<int64_t>(topk_idx[static_cast<int64_t>(token) * args.num_topk + k]);
            if (id == -1 || !expert_ids::is_valid(id, args.num_experts, args.invalid))
                continue;
            const int expert = static_cast<int>(id);
            atomicAdd(&block_tokens_per_expert[expert], 1);
            rank_mask |= 1ull << (expert / experts_per_rank);
        }
        bool* row = args.is_token_in_rank + static_cast<int64_t>(token) * args.num_ranks;
        for (int r = 0; r < args.num_ranks; ++r) {
            const bool in_rank = (rank_mask >> r) & 1;
            row[r] = in_rank;
            if (in_rank)
                atomicAdd(&block_tokens_per_rank[r], 1);
        }
        // Once per node however many of its ranks get the token: what crosses to that node.
        for (int n = 0; n < num_nodes; ++n)
            if ((rank_mask >> (n * args.num_nvl_ranks)) & ((1ull << args.num_nvl_ranks) - 1))
                atomicAdd(&block_tokens_per_node[n], 1);
    }
    __syncthreads();

    auto store_count = [&](int i, int value) {
        if (i < args.num_ranks)
            args.num_tokens_per_rank[i] = value;
        else if (i < args.num_ranks + args.num_experts)
            args.num_tokens_per_expert[i - args.num_ranks] = value;
        else
            args.num_tokens_per_node[i - args.num_ranks - args.num_experts] = value;
    };
    if (gridDim.x == 1) {
        for (int i = threadIdx.x; i < num_counts; i += blockDim.x)
            store_count(i, shared_counts[i]);
        return;
    }
    int* own_row = args.block_counts + static_cast<int64_t>(blockIdx.x) * num_counts;
    for (int i = threadIdx.x; i < num_counts; i += blockDim.x)
        own_row[i] = shared_counts[i];
    // Release: the row is visible GPU-wide before this block is counted as done.
    __threadfence();
    __syncthreads();
    __shared__ bool is_last_block;
    if (threadIdx.x == 0)
        is_last_block = atomicAdd(args.done_blocks, 1) == static_cast<int>(gridDim.x) - 1;
    __syncthreads();
    if (!is_last_block)
        return;
    // Acquire: every other block's row was published before its increment; read them from L2 (__ldcg),
    // never from a stale L1 line.
    __threadfence();
    for (int i = threadIdx.x; i < num_counts; i += blockDim.x) {
        int sum = 0;
        for (int b = 0; b < static_cast<int>(gridDim.x); ++b)
            sum += __ldcg(args.block_counts + static_cast<int64_t>(b) * num_counts + i);
        store_count(i, sum);
    }
    // The ops of a Buffer run one after another, so the next layout call finds the counter at 0 again.
    if (threadIdx.x == 0)
        *args.done_blocks = 0;
}

}  // namespace routing

void launch_check_expert_ids(const CheckExpertIdsArgs& args) {
    if (args.numel == 0)
        return;
    const int blocks = static_cast<int>(std::min<int64_t>((args.numel + kCheckThreads - 1) / kCheckThreads, 32));
    routing::check_expert_ids<<<blocks, kCheckThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

int dispatch_layout_blocks(int num_tokens) { return std::max(1, (num_tokens + kLayoutThreads - 1) / kLayoutThreads); }

void launch_dispatch_layout(const DispatchLayoutArgs& args) {
    DEEP_EP_CHECK(args.num_ranks >= 1 && args.num_ranks <= 64, "layout supports 1..64 ranks, got " << args.num_ranks);
    const int blocks = dispatch_layout_blocks(args.num_tokens);
    DEEP_EP_CHECK(blocks == 1 || (args.block_counts != nullptr && args.done_blocks != nullptr),
                  "a layout over several blocks needs block_counts and done_blocks");
    const int num_nodes = args.num_tokens_per_node != nullptr ? args.num_ranks / args.num_nvl_ranks : 0;
    const size_t shared_bytes = sizeof(int) * (args.num_experts + args.num_ranks + num_nodes);
    auto kernel = args.topk_idx_is_int64 ? routing::count_tokens<int64_t> : routing::count_tokens<int32_t>;
    if (shared_bytes > 48 * 1024)
        DEEP_EP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
    kernel<<<blocks, kLayoutThreads, shared_bytes, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
