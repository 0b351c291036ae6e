// get_dispatch_layout: the Python layer has validated shapes, dtypes and devices already.
#include <torch/extension.h>

#include "kernels/api.cuh"
#include "ops/ops.hpp"
#include "runtime/buffer.hpp"
#include "runtime/errors.hpp"
#include "runtime/op_streams.hpp"

namespace deep_ep::ops {

// buffer (or None) receives the GPU-side expert id check's finding; without one, validation checked them.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> get_dispatch_layout(runtime::Buffer* buffer,
                                                                            const torch::Tensor& topk_idx,
                                                                            int64_t num_experts, int64_t num_ranks,
                                                                            const runtime::StreamOptions& stream_options) {
    runtime::OpStreams streams(topk_idx.get_device(), stream_options);
    const auto int_options = topk_idx.options().dtype(torch::kInt32);
    auto num_tokens_per_rank = torch::empty({num_ranks}, int_options);
    auto num_tokens_per_expert = torch::empty({num_experts}, int_options);
    auto is_token_in_rank = torch::empty({topk_idx.size(0), num_ranks}, topk_idx.options().dtype(torch::kBool));
    DispatchLayoutArgs args{};
    args.topk_idx = topk_idx.data_ptr();
    args.topk_idx_is_int64 = topk_idx.scalar_type() == torch::kInt64;
    args.num_tokens = static_cast<int>(topk_idx.size(0));
    args.num_topk = static_cast<int>(topk_idx.size(1));
    args.num_experts = static_cast<int>(num_experts);
    args.num_ranks = static_cast<int>(num_ranks);
    args.num_tokens_per_rank = num_tokens_per_rank.data_ptr<int>();
    args.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
    args.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    args.invalid = buffer == nullptr ? nullptr : buffer->invalid_expert_id_device();
    args.stream = streams.comm();
    launch_dispatch_layout(args);
    streams.finish();
    return {num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank};
}

void register_layout_apis(pybind11::module_& m) {
    m.def("get_dispatch_layout", &get_dispatch_layout, pybind11::arg("buffer").none(true), pybind11::arg("topk_idx"), pybind11::arg("num_experts"),
          pybind11::arg("num_ranks"), pybind11::arg("streams"));
}

}  // namespace deep_ep::ops
