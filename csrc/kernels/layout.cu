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

template <typename IndexT>
__global__ void __launch_bounds__(kCheckThreads) check_expert_ids(CheckExpertIdsArgs args) {
    const auto* ids = static_cast<const IndexT*>(args.topk_idx);
    for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < args.numel; i += int64_t{gridDim.x} * blockDim.x)
        expert_ids::is_valid(static_cast<int64_t>(ids[i]), args.num_experts, args.invalid);
}

// One thread per token. Counts go to shared-memory histograms first, so each block adds to global memory
// once per expert and rank instead of once per token (8 topk x 4096 tokens would serialise on atomics).
template <typename IndexT>
__global__ void __launch_bounds__(kLayoutThreads) count_tokens(DispatchLayoutArgs args) {
    extern __shared__ int shared_counts[];
    int* block_tokens_per_expert = shared_counts;
    int* block_tokens_per_rank = shared_counts + args.num_experts;
    for (int i = threadIdx.x; i < args.num_experts + args.num_ranks; i += blockDim.x)
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
    }
    __syncthreads();
    for (int i = threadIdx.x; i < args.num_experts; i += blockDim.x)
        if (block_tokens_per_expert[i] != 0)
            atomicAdd(&args.num_tokens_per_expert[i], block_tokens_per_expert[i]);
    for (int i = threadIdx.x; i < args.num_ranks; i += blockDim.x)
        if (block_tokens_per_rank[i] != 0)
            atomicAdd(&args.num_tokens_per_rank[i], block_tokens_per_rank[i]);
}

}  // namespace routing

void launch_check_expert_ids(const CheckExpertIdsArgs& args) {
    if (args.numel == 0)
        return;
    const int blocks = static_cast<int>(std::min<int64_t>((args.numel + kCheckThreads - 1) / kCheckThreads, 32));
    if (args.topk_idx_is_int64)
        routing::check_expert_ids<int64_t><<<blocks, kCheckThreads, 0, args.stream>>>(args);
    else
        routing::check_expert_ids<int><<<blocks, kCheckThreads, 0, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_dispatch_layout(const DispatchLayoutArgs& args) {
    DEEP_EP_CHECK(args.num_ranks >= 1 && args.num_ranks <= 64, "layout supports 1..64 ranks, got " << args.num_ranks);
    DEEP_EP_CHECK(args.num_tokens_per_expert == args.num_tokens_per_rank + args.num_ranks,
                  "the layout's counts are one array: per rank, then per expert");
    DEEP_EP_CUDA_CHECK(
        cudaMemsetAsync(args.num_tokens_per_rank, 0, sizeof(int) * (args.num_ranks + args.num_experts), args.stream));
    if (args.num_tokens == 0)
        return;
    const int blocks = (args.num_tokens + kLayoutThreads - 1) / kLayoutThreads;
    const size_t shared_bytes = sizeof(int) * (args.num_experts + args.num_ranks);
    auto kernel = args.topk_idx_is_int64 ? routing::count_tokens<int64_t> : routing::count_tokens<int32_t>;
    if (shared_bytes > 48 * 1024)
        DEEP_EP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
    kernel<<<blocks, kLayoutThreads, shared_bytes, args.stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
