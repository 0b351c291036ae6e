// The outputs of the normal ops (intra- and inter-node alike), each op's carved from one allocation, and the
// tuples the Python calls return.
#pragma once

#include <pybind11/pybind11.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace deep_ep::ops {

struct DispatchOutputs {
    torch::Tensor recv_x, recv_src_idx;
    std::optional<torch::Tensor> recv_x_scales, recv_topk_idx, recv_topk_weights;

    // `num_rows` rows shaped after x (and its scales and top-k, where the call has them), on the current stream.
    static DispatchOutputs allocate(int64_t num_rows, const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales,
                                    const std::optional<torch::Tensor>& topk_idx);
    // Every output tensor (what an async op's event keeps alive).
    std::vector<torch::Tensor> tensors() const;
    // V1's dispatch tuple: (recv_x or (recv_x, scales), recv_topk_idx, recv_topk_weights, per-expert list,
    // handle, event); a cached dispatch returns (recv_x, None, None, None, None, event).
    pybind11::tuple result(bool cached, const std::vector<int>& num_recv_tokens_per_expert_list,
                           const pybind11::object& handle, const pybind11::object& event) const;
};

/// A combine's outputs: combined_x [T, hidden] as x, and the summed top-k weights when the call has them.
struct CombineOutputs {
    torch::Tensor combined_x;
    std::optional<torch::Tensor> combined_topk_weights;

    static CombineOutputs allocate(int64_t num_tokens, const torch::Tensor& x,
                                   const std::optional<torch::Tensor>& topk_weights);
    std::vector<torch::Tensor> tensors() const;
    // (combined_x, combined_topk_weights or None, event).
    pybind11::tuple result(const pybind11::object& event) const;
};

}  // namespace deep_ep::ops
