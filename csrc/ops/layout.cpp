// get_dispatch_layout: checks its arguments, orders itself after the caller's stream, launches one kernel.
#include <torch/extension.h>

#include "kernels/api.cuh"
#include "kernels/common/buffer_layout.cuh"
#include "ops/arguments.hpp"
#include "ops/ops.hpp"
#include "runtime/buffer.hpp"
#include "runtime/errors.hpp"
#include "runtime/op_streams.hpp"
#include "runtime/output_tensors.hpp"
#include "runtime/size_hints.hpp"

namespace deep_ep::ops {

/// Returns (num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [N] (inter-node) or None,
/// num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R], event or None). Expert ids are range-checked by the kernel itself (Buffer::invalid_expert_id_device).
pybind11::tuple get_dispatch_layout(runtime::Buffer& buffer, pybind11::handle topk_idx_arg, pybind11::handle num_experts_arg,
                                    pybind11::handle previous_event, bool async_finish, bool allocate_on_comm_stream) {
    buffer.require_usable();
    const int64_t num_ranks = buffer.num_ranks();
    const int64_t num_experts = arguments::num_experts(num_experts_arg, num_ranks);
    // Named here rather than by the allocator, which a huge count would make fail on the per-expert counts.
    if (num_experts / num_ranks > layout::kMaxLocalExperts)
        arguments::raise_value_error("num_experts: at most " + std::to_string(layout::kMaxLocalExperts) +
                                     " experts a rank in normal mode (" +
                                     std::to_string(layout::kMaxLocalExperts * num_ranks) + " for " +
                                     std::to_string(num_ranks) + " ranks), got " + std::to_string(num_experts));
    const torch::Tensor& topk_idx =
        arguments::topk_idx(topk_idx_arg, arguments::kAny, runtime::size_hints::kMaxNumTopk, buffer.device());
    if (buffer.host_expert_id_check())
        arguments::check_expert_ids_on_host(topk_idx, num_experts);

    runtime::OpStreams streams(buffer, {previous_event, async_finish, allocate_on_comm_stream});
    // One allocation for the outputs and the kernel's per-block scratch (runtime/output_tensors.hpp).
    const int64_t num_tokens = topk_idx.size(0);
    const int num_blocks = dispatch_layout_blocks(static_cast<int>(num_tokens));
    runtime::OutputTensors outputs;
    const int per_rank_index = outputs.add({num_ranks}, torch::kInt32);
    const int per_expert_index = outputs.add({num_experts}, torch::kInt32);
    const int in_rank_index = outputs.add({num_tokens, num_ranks}, torch::kBool);
    // An inter-node Buffer also counts the tokens bound for each node (V1's num_tokens_per_rdma_rank).
    const int64_t num_nodes = buffer.is_internode() ? num_ranks / buffer.num_nvl_ranks() : 0;
    const int per_node_index = num_nodes > 0 ? outputs.add({num_nodes}, torch::kInt32) : -1;
    const int scratch_index =
        num_blocks > 1 ? outputs.add({num_blocks, num_ranks + num_experts + num_nodes}, torch::kInt32) : -1;
    outputs.allocate(topk_idx.device());
    auto num_tokens_per_rank = outputs[per_rank_index];
    auto num_tokens_per_expert = outputs[per_expert_index];
    auto is_token_in_rank = outputs[in_rank_index];
    DispatchLayoutArgs args{};
    args.topk_idx = topk_idx.data_ptr();
    args.topk_idx_is_int64 = topk_idx.scalar_type() == torch::kInt64;
    args.num_tokens = static_cast<int>(num_tokens);
    args.num_topk = static_cast<int>(topk_idx.size(1));
    args.num_experts = static_cast<int>(num_experts);
    args.num_ranks = static_cast<int>(num_ranks);
    args.num_nvl_ranks = buffer.num_nvl_ranks();
    pybind11::object num_tokens_per_node = pybind11::none();
    if (per_node_index >= 0) {
        const torch::Tensor per_node = outputs[per_node_index];
        args.num_tokens_per_node = per_node.data_ptr<int>();
        num_tokens_per_node = pybind11::cast(per_node);
    }
    args.num_tokens_per_rank = num_tokens_per_rank.data_ptr<int>();
    args.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
    args.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    args.block_counts = scratch_index >= 0 ? outputs[scratch_index].data_ptr<int>() : nullptr;
    args.done_blocks = buffer.layout_done_blocks();
    args.invalid = buffer.invalid_expert_id_device();
    args.stream = streams.stream();
    launch_dispatch_layout(args);
    pybind11::object event = streams.needs_tensor_lists()
                                 ? streams.finish({topk_idx}, {num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank})
                                 : streams.finish();
    raise_pending_errors(buffer, streams);
    return pybind11::make_tuple(num_tokens_per_rank, num_tokens_per_node, num_tokens_per_expert, is_token_in_rank, event);
}

void register_layout_apis(pybind11::module_& m) {
    namespace py = pybind11;
    m.def("get_dispatch_layout", &get_dispatch_layout, py::arg("buffer"), py::arg("topk_idx"), py::arg("num_experts"),
          py::arg("previous_event"), py::arg("async_finish"), py::arg("allocate_on_comm_stream"));
}

}  // namespace deep_ep::ops
