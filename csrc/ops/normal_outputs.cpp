#include "ops/normal_outputs.hpp"

#include <pybind11/stl.h>

#include "ops/ops.hpp"
#include "runtime/output_tensors.hpp"

namespace deep_ep::ops {

DispatchOutputs DispatchOutputs::allocate(int64_t num_rows, const torch::Tensor& x,
                                          const std::optional<torch::Tensor>& x_scales,
                                          const std::optional<torch::Tensor>& topk_idx) {
    runtime::OutputTensors outputs;
    const int recv_x_index = outputs.add({num_rows, x.size(1)}, x.scalar_type());
    const int scales_index = x_scales.has_value() ? outputs.add({num_rows, x_scales->size(1)}, torch::kFloat32) : -1;
    const int num_topk = topk_idx.has_value() ? static_cast<int>(topk_idx->size(1)) : 0;
    const int topk_idx_index = topk_idx.has_value() ? outputs.add({num_rows, num_topk}, torch::kInt64) : -1;
    const int topk_weights_index = topk_idx.has_value() ? outputs.add({num_rows, num_topk}, torch::kFloat32) : -1;
    const int src_idx_index = outputs.add({num_rows}, torch::kInt32);
    outputs.allocate(x.device());
    DispatchOutputs out;
    out.recv_x = outputs[recv_x_index];
    out.recv_src_idx = outputs[src_idx_index];
    if (scales_index >= 0)
        out.recv_x_scales = outputs[scales_index];
    if (topk_idx_index >= 0) {
        out.recv_topk_idx = outputs[topk_idx_index];
        out.recv_topk_weights = outputs[topk_weights_index];
    }
    return out;
}

std::vector<torch::Tensor> DispatchOutputs::tensors() const {
    std::vector<torch::Tensor> all{recv_x, recv_src_idx};
    for (const auto& t : {recv_x_scales, recv_topk_idx, recv_topk_weights})
        if (t.has_value())
            all.push_back(*t);
    return all;
}

pybind11::tuple DispatchOutputs::result(bool cached, const std::vector<int>& num_recv_tokens_per_expert_list,
                                        const pybind11::object& handle, const pybind11::object& event) const {
    const pybind11::object recv = recv_x_scales.has_value()
                                      ? pybind11::object(pybind11::make_tuple(recv_x, *recv_x_scales))
                                      : pybind11::cast(recv_x);
    if (cached)
        return pybind11::make_tuple(recv, pybind11::none(), pybind11::none(), pybind11::none(), pybind11::none(), event);
    return pybind11::make_tuple(recv, tensor_or_none(recv_topk_idx), tensor_or_none(recv_topk_weights),
                                pybind11::cast(num_recv_tokens_per_expert_list), handle, event);
}

CombineOutputs CombineOutputs::allocate(int64_t num_tokens, const torch::Tensor& x,
                                        const std::optional<torch::Tensor>& topk_weights) {
    runtime::OutputTensors outputs;
    const int combined_x_index = outputs.add({num_tokens, x.size(1)}, x.scalar_type());
    const int weights_index =
        topk_weights.has_value() ? outputs.add({num_tokens, topk_weights->size(1)}, torch::kFloat32) : -1;
    outputs.allocate(x.device());
    CombineOutputs out;
    out.combined_x = outputs[combined_x_index];
    if (weights_index >= 0)
        out.combined_topk_weights = outputs[weights_index];
    return out;
}

std::vector<torch::Tensor> CombineOutputs::tensors() const {
    std::vector<torch::Tensor> all{combined_x};
    if (combined_topk_weights.has_value())
        all.push_back(*combined_topk_weights);
    return all;
}

pybind11::tuple CombineOutputs::result(const pybind11::object& event) const {
    return pybind11::make_tuple(combined_x, tensor_or_none(combined_topk_weights), event);
}

}  // namespace deep_ep::ops
