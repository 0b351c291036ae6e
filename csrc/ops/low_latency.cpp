// Low-latency dispatch/combine: the Python layer (deep_ep/low_latency_backend.py) has validated shapes,
// dtypes and devices, owns the NVSHMEM symmetric buffer and picks the buffer set; this file allocates
// outputs, fills one Args struct and launches. The kernels need NVSHMEM; without it every entry point
// but the size hint raises.
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "kernels/api.cuh"
#include "ops/ops.hpp"
#include "runtime/buffer.hpp"
#include "runtime/errors.hpp"

namespace deep_ep::ops {
namespace {

LowLatencyLayout make_layout(int64_t num_max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
    DEEP_EP_CHECK(num_ranks > 0 && num_experts % num_ranks == 0,
                  "num_experts (" << num_experts << ") must be a multiple of num_ranks (" << num_ranks << ")");
    return LowLatencyLayout{num_max_tokens, hidden, num_ranks, num_experts};
}

int64_t low_latency_rdma_size_hint(int64_t num_max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
    return make_layout(num_max_tokens, hidden, num_ranks, num_experts).total_bytes();
}

#ifdef DEEP_EP_WITH_NVSHMEM

LowLatencySymmetricArgs symmetric_args(int64_t local_base, const torch::Tensor& mapped_bases, bool all_ranks_mapped) {
    return LowLatencySymmetricArgs{reinterpret_cast<void*>(local_base),
                                   reinterpret_cast<const uint64_t*>(mapped_bases.data_ptr<int64_t>()),
                                   all_ranks_mapped};
}

/// What dispatch and combine Args share: where the buffers are, which set and half to run, how to wait.
struct LowLatencyLaunch {
    runtime::Buffer& runtime;
    LowLatencyLayout layout;
    int64_t buffer_set;
    bool do_send, do_recv;
    LowLatencySymmetricArgs symmetric;
    int64_t num_blocks;
    bool conservative_loads;
    int64_t stream;

    template <typename Args>
    void fill(Args& args) const {
        args.layout = layout;
        args.buffer_set = static_cast<int>(buffer_set);
        args.do_send = do_send;
        args.do_recv = do_recv;
        args.symmetric = symmetric;
        args.wait = runtime.wait_context();
        args.rank = runtime.rank();
        args.num_blocks = static_cast<int>(num_blocks);
        args.conservative_loads = conservative_loads;
        args.stream = reinterpret_cast<cudaStream_t>(stream);
    }
};

/// Returns [recv_x, recv_scales (empty without FP8), recv_count, recv_src_info, recv_layout_range].
/// With do_send only (the hook's first half) the outputs are allocated and returned unfilled; the hook
/// passes them back in `outputs` with do_recv only.
std::vector<torch::Tensor> low_latency_dispatch(
    runtime::Buffer& runtime, int64_t local_base, const torch::Tensor& mapped_bases, bool all_ranks_mapped,
    const torch::Tensor& x, const torch::Tensor& topk_idx, const std::optional<torch::Tensor>& cumulative_stats,
    const std::optional<torch::Tensor>& wait_cost_stats, int64_t num_max_tokens, int64_t num_experts,
    int64_t buffer_set, bool use_fp8, bool round_scale, bool use_ue8m0, bool do_send, bool do_recv,
    const std::optional<std::vector<torch::Tensor>>& outputs, int64_t num_blocks, bool conservative_loads,
    int64_t stream) {
    runtime.raise_if_failed();
    const int64_t num_ranks = runtime.num_ranks(), hidden = x.size(1);
    const auto layout = make_layout(num_max_tokens, hidden, num_ranks, num_experts);
    const int64_t num_local_experts = layout.num_local_experts(), rows = num_ranks * num_max_tokens;
    const int64_t num_groups = hidden / kLowLatencyFp8GroupSize;

    std::vector<torch::Tensor> out;
    if (outputs.has_value()) {
        out = *outputs;
    } else {
        const auto options = x.options();
        out.push_back(torch::empty({num_local_experts, rows, hidden},
                                   options.dtype(use_fp8 ? torch::kFloat8_e4m3fn : torch::kBFloat16)));
        if (use_fp8 && use_ue8m0)  // column-major: allocated [L, groups/4, rows], returned transposed
            out.push_back(torch::empty({num_local_experts, (num_groups + 3) / 4, rows}, options.dtype(torch::kInt32))
                              .transpose(1, 2));
        else if (use_fp8)
            out.push_back(
                torch::empty({num_local_experts, num_groups, rows}, options.dtype(torch::kFloat32)).transpose(1, 2));
        else
            out.push_back(torch::empty({0}, options.dtype(torch::kFloat32)));
        out.push_back(torch::empty({num_local_experts}, options.dtype(torch::kInt32)));
        out.push_back(torch::empty({num_local_experts, rows}, options.dtype(torch::kInt32)));
        out.push_back(torch::empty({num_local_experts, num_ranks}, options.dtype(torch::kInt64)));
    }

    LowLatencyDispatchArgs args{};
    LowLatencyLaunch{runtime, layout, buffer_set, do_send, do_recv,
                     symmetric_args(local_base, mapped_bases, all_ranks_mapped), num_blocks, conservative_loads, stream}
        .fill(args);
    args.x = x.data_ptr();
    args.topk_idx = topk_idx.data_ptr();
    args.topk_idx_is_int64 = topk_idx.scalar_type() == torch::kInt64;
    args.num_tokens = static_cast<int>(x.size(0));
    args.num_topk = static_cast<int>(topk_idx.size(1));
    args.use_fp8 = use_fp8;
    args.round_scale = round_scale;
    args.use_ue8m0 = use_ue8m0;
    args.recv_x = out[0].data_ptr();
    args.recv_scales = use_fp8 ? out[1].data_ptr() : nullptr;
    args.recv_count = out[2].data_ptr<int>();
    args.recv_src_info = out[3].data_ptr<int>();
    args.recv_layout_range = out[4].data_ptr<int64_t>();
    args.cumulative_local_expert_recv_stats = cumulative_stats.has_value() ? cumulative_stats->data_ptr<int>() : nullptr;
    args.dispatch_wait_recv_cost_stats = wait_cost_stats.has_value() ? wait_cost_stats->data_ptr<int64_t>() : nullptr;
    launch_low_latency_dispatch(args);
    return out;
}

/// Returns `out` (allocated when not given). With do_send only, `out` is allocated and left for the hook.
torch::Tensor low_latency_combine(runtime::Buffer& runtime, int64_t local_base, const torch::Tensor& mapped_bases,
                                  bool all_ranks_mapped, const torch::Tensor& x, bool zero_copy,
                                  const torch::Tensor& src_info, const torch::Tensor& layout_range,
                                  const torch::Tensor& topk_idx, const torch::Tensor& topk_weights,
                                  const std::optional<torch::Tensor>& out, const torch::Tensor& done_blocks,
                                  int64_t num_max_tokens,
                                  int64_t num_experts, int64_t buffer_set, bool do_send, bool do_recv,
                                  int64_t num_blocks, bool conservative_loads, int64_t stream) {
    runtime.raise_if_failed();
    const int64_t num_ranks = runtime.num_ranks(), hidden = x.size(2);
    const auto layout = make_layout(num_max_tokens, hidden, num_ranks, num_experts);
    auto combined = out.has_value() ? *out : torch::empty({topk_idx.size(0), hidden}, x.options());

    LowLatencyCombineArgs args{};
    LowLatencyLaunch{runtime, layout, buffer_set, do_send, do_recv,
                     symmetric_args(local_base, mapped_bases, all_ranks_mapped), num_blocks, conservative_loads, stream}
        .fill(args);
    args.x = x.data_ptr();
    args.zero_copy = zero_copy;
    args.src_info = src_info.data_ptr<int>();
    args.layout_range = layout_range.data_ptr<int64_t>();
    args.topk_idx = topk_idx.data_ptr();
    args.topk_idx_is_int64 = topk_idx.scalar_type() == torch::kInt64;
    args.topk_weights = topk_weights.data_ptr<float>();
    args.num_tokens = static_cast<int>(topk_idx.size(0));
    args.num_topk = static_cast<int>(topk_idx.size(1));
    args.out = combined.data_ptr();
    args.done_blocks = done_blocks.data_ptr<int>();
    launch_low_latency_combine(args);
    return combined;
}

/// The combine send rows of `buffer_set` as a [L, R*M, H] bf16 tensor (no copy): the zero-copy buffer.
torch::Tensor low_latency_combine_send_buffer(int64_t local_base, int64_t num_max_tokens, int64_t hidden,
                                              int64_t num_ranks, int64_t num_experts, int64_t buffer_set,
                                              int64_t device) {
    const auto layout = make_layout(num_max_tokens, hidden, num_ranks, num_experts);
    void* ptr = reinterpret_cast<char*>(local_base) + layout.send_region(static_cast<int>(buffer_set));
    return torch::from_blob(ptr, {layout.num_local_experts(), num_ranks * num_max_tokens, hidden},
                            torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA, device));
}

/// Zeroes every signal word of both sets (stream-ordered). The caller brackets it with group barriers so
/// that no rank is still sending into this buffer.
void low_latency_clean(int64_t local_base, int64_t num_max_tokens, int64_t hidden, int64_t num_ranks,
                       int64_t num_experts, int64_t stream) {
    const auto layout = make_layout(num_max_tokens, hidden, num_ranks, num_experts);
    for (int set = 0; set < 2; ++set)
        DEEP_EP_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<char*>(local_base) + layout.set_offset(set), 0,
                                           layout.signal_bytes(), reinterpret_cast<cudaStream_t>(stream)));
}

void low_latency_barrier(int64_t stream) {
    launch_low_latency_barrier(LowLatencyBarrierArgs{reinterpret_cast<cudaStream_t>(stream)});
}

#else

[[noreturn]] void not_compiled() {
    throw std::runtime_error("deep_ep was built without NVSHMEM: low-latency kernels are missing; install "
                             "nvidia-nvshmem-cu13 or set NVSHMEM_DIR and rebuild");
}

#endif

}  // namespace

void register_low_latency_apis(pybind11::module_& m) {
    m.def("low_latency_rdma_size_hint", &low_latency_rdma_size_hint, pybind11::arg("num_max_dispatch_tokens_per_rank"),
          pybind11::arg("hidden"), pybind11::arg("num_ranks"), pybind11::arg("num_experts"));
    m.attr("low_latency_compiled") =
#ifdef DEEP_EP_WITH_NVSHMEM
        true;
    m.def("low_latency_dispatch", &low_latency_dispatch);
    m.def("low_latency_combine", &low_latency_combine);
    m.def("low_latency_combine_send_buffer", &low_latency_combine_send_buffer);
    m.def("low_latency_clean", &low_latency_clean);
    m.def("low_latency_barrier", &low_latency_barrier, pybind11::arg("stream"));
#else
        false;
    for (const char* name :
         {"low_latency_dispatch", "low_latency_combine", "low_latency_combine_send_buffer", "low_latency_clean",
          "low_latency_barrier"})
        m.def(name, [](pybind11::args, pybind11::kwargs) { not_compiled(); });
#endif
}

}  // namespace deep_ep::ops
