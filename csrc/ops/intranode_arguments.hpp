// The checked arguments of the normal (intra- and inter-node) ops: every check runs before anything is launched or
// communicated, so a rejected call leaves the Buffer as it was (ops/arguments.hpp has the rules and wording).
#pragma once

#include <pybind11/pybind11.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "runtime/buffer.hpp"

namespace deep_ep::ops {

using OptionalTensor = std::optional<torch::Tensor>;

// The six tensors of an intra-node handle (deep_ep/handles.py IntranodeHandle), checked.
struct HandleTensors {
    torch::Tensor rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
        is_token_in_rank, send_head;

    pybind11::tuple as_tuple() const {
        return pybind11::make_tuple(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
                                    is_token_in_rank, send_head);
    }
    // In the tuple's order, for the handle's identity (runtime/handle_identity.hpp).
    std::vector<torch::Tensor> elements() const {
        return {rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank,
                send_head};
    }
};

// The stamp of an intra-node handle and its check on use: keyed by recv_src_idx, as the reference keys it.
void stamp_handle(const runtime::Buffer& buffer, const HandleTensors& handle, int64_t seq);
std::optional<int64_t> handle_identity(const runtime::Buffer& buffer, const HandleTensors& handle);

// The handle's tensors, checked against the Buffer's rank count and device.
HandleTensors checked_handle(pybind11::handle handle, int64_t num_ranks, int device);

// The ten tensors of an inter-node handle (deep_ep/handles.py InternodeHandle, V1's element order; what each
// holds in deep_ep is documented there), checked.
struct InternodeHandleTensors {
    torch::Tensor is_token_in_rank, node_count_matrix, rank_prefix_matrix, forward_offsets, forward_map, recv_first_row,
        recv_rank_prefix_sum, recv_src_idx, send_node_head, send_head;

    pybind11::tuple as_tuple() const {
        return pybind11::make_tuple(is_token_in_rank, node_count_matrix, rank_prefix_matrix, forward_offsets,
                                    forward_map, recv_first_row, recv_rank_prefix_sum, recv_src_idx, send_node_head,
                                    send_head);
    }
    // In the tuple's order, for the handle's identity (runtime/handle_identity.hpp).
    std::vector<torch::Tensor> elements() const {
        return {is_token_in_rank, node_count_matrix, rank_prefix_matrix, forward_offsets, forward_map,
                recv_first_row, recv_rank_prefix_sum, recv_src_idx, send_node_head, send_head};
    }
};

// The same for an inter-node handle, keyed by recv_src_meta.
void stamp_handle(const runtime::Buffer& buffer, const InternodeHandleTensors& handle, int64_t seq);
std::optional<int64_t> handle_identity(const runtime::Buffer& buffer, const InternodeHandleTensors& handle);

InternodeHandleTensors checked_internode_handle(pybind11::handle handle, int64_t num_ranks, int64_t num_nvl_ranks,
                                                int device);

/// A normal dispatch whose arguments passed every check (intra- or inter-node, as the Buffer is).
struct DispatchCall {
    torch::Tensor x;
    OptionalTensor x_scales;
    std::optional<HandleTensors> handle;  // a cached dispatch
    std::optional<InternodeHandleTensors> internode_handle;  // a cached dispatch of an inter-node Buffer
    OptionalTensor num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, topk_idx, topk_weights;
    torch::Tensor is_token_in_rank;
    int64_t num_experts = 0;
    int64_t expert_alignment = 1;
    int64_t num_worst_tokens = 0;
    int num_sms = 1;
    std::optional<int64_t> handle_seq;  // a cached dispatch: the handle's dispatch, if it has identity
};

DispatchCall checked_dispatch(const runtime::Buffer& buffer, pybind11::handle x, pybind11::handle handle,
                              pybind11::handle num_tokens_per_rank, pybind11::handle num_tokens_per_rdma_rank,
                              pybind11::handle is_token_in_rank, pybind11::handle num_tokens_per_expert,
                              pybind11::handle topk_idx, pybind11::handle topk_weights, pybind11::handle expert_alignment,
                              pybind11::handle num_worst_tokens, int64_t num_sms);

/// A normal combine whose arguments passed every check (intra- or inter-node, as the Buffer is).
struct CombineCall {
    torch::Tensor x;
    HandleTensors handle;                       // intra-node
    std::optional<InternodeHandleTensors> internode_handle;  // inter-node (then `handle` is empty)
    OptionalTensor topk_weights, bias_0, bias_1;
    int num_sms = 1;
    std::optional<int64_t> handle_seq;  // the handle's dispatch, if it has identity
};

CombineCall checked_combine(const runtime::Buffer& buffer, pybind11::handle x, pybind11::handle handle,
                            pybind11::handle topk_weights, pybind11::handle bias, int64_t num_sms);

/// Raises the capacity error naming num_rdma_bytes unless this inter-node Buffer holds a combine that
/// stages `num_staged_rows` rows (0 with direct reads), forwards `num_forwarded` and returns `num_tokens`.
void check_internode_combine_capacity(const runtime::Buffer& buffer, const char* name, const std::string& what,
                                      int64_t hidden, int64_t num_topk, int64_t num_staged_rows, int64_t num_forwarded,
                                      int64_t num_tokens);

// What the ranks of a normal op agree on before anything moves (runtime/call_agreement.hpp): the operation's
// name (as the reference backend names it) and the signature fields of deep_ep/backends/reference_backend.py
// that can be read without the GPU (no handle checksum or identity here).
const char* dispatch_op_name(bool cached);
inline constexpr const char* kCombineOpName = "combine";
runtime::CallRecord call_record(const DispatchCall& call);
runtime::CallRecord call_record(const CombineCall& call);

}  // namespace deep_ep::ops
