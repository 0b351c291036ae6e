#include "ops/intranode_arguments.hpp"

#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/api.cuh"
#include "kernels/common/buffer_layout.cuh"
#include "ops/arguments.hpp"
#include "runtime/size_hints.hpp"

namespace deep_ep::ops {
namespace {

// `x`: BF16 [T, H], or the FP8 tuple (float8_e4m3fn [T, H], float32 scales [T, H / 128] of any strides,
// made contiguous here: DeepGEMM produces column-major ones).
std::pair<torch::Tensor, OptionalTensor> checked_dispatch_x(pybind11::handle x, int device) {
    if (PyTuple_Check(x.ptr())) {  // as V1: only a tuple means FP8
        const Py_ssize_t length = PyTuple_GET_SIZE(x.ptr());
        if (length != 2)
            arguments::raise_value_error("x: an FP8 input is a tuple (x_fp8, x_scales), got " + std::to_string(length) +
                                         " elements");
        const torch::Tensor& data = arguments::tensor(pybind11::handle(PyTuple_GET_ITEM(x.ptr(), 0)), "x[0]",
                                                      {{c10::ScalarType::Float8_e4m3fn}, {}, 2}, device);
        if (data.size(1) % kFp8GroupSize != 0)
            arguments::raise_value_error("x[0]: FP8 hidden size must be a multiple of " + std::to_string(kFp8GroupSize) +
                                         ", got " + std::to_string(data.size(1)));
        const torch::Tensor& scales =
            arguments::tensor(pybind11::handle(PyTuple_GET_ITEM(x.ptr(), 1)), "x[1]",
                              {{c10::ScalarType::Float}, {data.size(0), data.size(1) / kFp8GroupSize}, -1, false}, device);
        return {data, scales.contiguous()};
    }
    if (THPVariable_Check(x.ptr()) && THPVariable_Unpack(x.ptr()).scalar_type() == c10::ScalarType::Float8_e4m3fn)
        arguments::raise_type_error("x: an FP8 tensor must come with its scales, as the tuple (x_fp8, x_scales)");
    const torch::Tensor& data = arguments::tensor(x, "x", {{c10::ScalarType::BFloat16}, {}, 2}, device);
    if (data.size(1) * data.element_size() % 16 != 0)
        arguments::raise_value_error("x: hidden size must be a multiple of 8 for BF16 (16-byte rows), got " +
                                     std::to_string(data.size(1)));
    return {data, std::nullopt};
}

// The Buffer holds a combine of `num_rows` BF16 rows back into `num_tokens` tokens a rank: intra-node in its
// NVLink buffer; inter-node in the symmetric one, where the rows are staged only if the call cannot read its
// node's inputs in place (known here when direct reads are off or the stream is being captured; otherwise
// internode_combine checks again once the node has decided). num_forwarded: the handle's forwarded rows.
void check_combine_capacity(const runtime::Buffer& buffer, const char* name, const std::string& what, int64_t hidden,
                            int64_t num_topk, int64_t num_rows, int64_t num_tokens, int64_t num_forwarded) {
    if (buffer.is_internode()) {
        const cudaStream_t caller = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(buffer.device()));
        const bool staged = !buffer.may_read_directly(caller);
        check_internode_combine_capacity(buffer, name, what, hidden, num_topk, staged ? num_rows : 0, num_forwarded,
                                         num_tokens);
    } else {
        const int64_t needed = runtime::size_hints::nvl_combine_bytes(hidden, num_topk, num_rows);
        if (needed > buffer.num_nvl_bytes())
            arguments::raise_capacity_error(name, what, needed, buffer.num_nvl_bytes(), "num_nvl_bytes");
    }
}

}  // namespace

void check_internode_combine_capacity(const runtime::Buffer& buffer, const char* name, const std::string& what,
                                      int64_t hidden, int64_t num_topk, int64_t num_staged_rows, int64_t num_forwarded,
                                      int64_t num_tokens) {
    const int64_t needed = runtime::size_hints::internode_combine_call_bytes(
        hidden, num_topk, buffer.num_ranks(), buffer.num_nvl_ranks(), num_staged_rows, num_forwarded, num_tokens);
    if (needed > buffer.num_rdma_bytes())
        arguments::raise_capacity_error(name, what + " inter-node" + (num_staged_rows > 0 ? " (rows staged)" : ""),
                                        needed, buffer.num_rdma_bytes(), "num_rdma_bytes");
}

HandleTensors checked_handle(pybind11::handle handle, int64_t num_ranks, int device) {
    using arguments::kAny;
    const arguments::HandleItems item(handle, "dispatch");
    const Py_ssize_t length = item.size();
    if (length == 5)
        arguments::raise_value_error(
            "handle: this is a low-latency handle (5 elements); normal ops need dispatch's 6-element one");
    if (length == 10)
        arguments::raise_value_error("handle: this is an inter-node handle (10 elements); this Buffer is intra-node");
    if (length != 6)
        arguments::raise_value_error("handle: expected the 6-element intra-node handle, got " + std::to_string(length) +
                                     " elements");
    const auto int32 = c10::ScalarType::Int;
    HandleTensors h;
    h.rank_prefix_matrix = arguments::tensor(item(0), "handle.rank_prefix_matrix", {{int32}, {num_ranks, num_ranks}}, device);
    h.channel_prefix_matrix = arguments::tensor(item(1), "handle.channel_prefix_matrix", {{int32}, {num_ranks, kAny}}, device);
    h.recv_channel_prefix_matrix =
        arguments::tensor(item(2), "handle.recv_channel_prefix_matrix", {{int32}, {num_ranks, kAny}}, device);
    h.recv_src_idx = arguments::tensor(item(3), "handle.recv_src_idx", {{int32}, {}, 1}, device);
    h.is_token_in_rank =
        arguments::tensor(item(4), "handle.is_token_in_rank", {{c10::ScalarType::Bool}, {kAny, num_ranks}}, device);
    h.send_head = arguments::tensor(item(5), "handle.send_head", {{int32}, {h.is_token_in_rank.size(0), num_ranks}}, device);
    return h;
}

namespace {

const std::vector<const char*>& intranode_handle_names() {
    static const std::vector<const char*> names{"rank_prefix_matrix", "channel_prefix_matrix",
                                                "recv_channel_prefix_matrix", "recv_src_idx", "is_token_in_rank",
                                                "send_head"};
    return names;
}
constexpr int kIntranodeHandleKey = 3;  // recv_src_idx

// V1's element names (deep_ep/handles.py InternodeHandle).
const std::vector<const char*>& internode_handle_names() {
    static const std::vector<const char*> names{
        "is_token_in_rank",       "rdma_channel_prefix_matrix",     "gbl_channel_prefix_matrix",
        "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum", "recv_gbl_channel_prefix_matrix",
        "recv_gbl_rank_prefix_sum", "recv_src_meta",                "send_rdma_head",
        "send_nvl_head"};
    return names;
}
constexpr int kInternodeHandleKey = 7;  // recv_src_meta

}  // namespace

void stamp_handle(const runtime::Buffer& buffer, const InternodeHandleTensors& handle, int64_t seq) {
    const std::vector<torch::Tensor> elements = handle.elements();
    runtime::stamp_handle({elements, internode_handle_names(), kInternodeHandleKey}, buffer.uid(), seq);
}

std::optional<int64_t> handle_identity(const runtime::Buffer& buffer, const InternodeHandleTensors& handle) {
    const std::vector<torch::Tensor> elements = handle.elements();
    return runtime::handle_identity({elements, internode_handle_names(), kInternodeHandleKey}, buffer.uid());
}

void stamp_handle(const runtime::Buffer& buffer, const HandleTensors& handle, int64_t seq) {
    const std::vector<torch::Tensor> elements = handle.elements();
    runtime::stamp_handle({elements, intranode_handle_names(), kIntranodeHandleKey}, buffer.uid(), seq);
}

std::optional<int64_t> handle_identity(const runtime::Buffer& buffer, const HandleTensors& handle) {
    const std::vector<torch::Tensor> elements = handle.elements();
    return runtime::handle_identity({elements, intranode_handle_names(), kIntranodeHandleKey}, buffer.uid());
}

InternodeHandleTensors checked_internode_handle(pybind11::handle handle, int64_t num_ranks, int64_t num_nvl_ranks,
                                                int device) {
    using arguments::kAny;
    const arguments::HandleItems item(handle, "dispatch");
    const Py_ssize_t length = item.size();
    if (length != 10)
        arguments::raise_value_error("handle: expected the 10-element inter-node handle, got " + std::to_string(length) +
                                     " elements" + (length == 6 ? " (an intra-node handle)" : ""));
    const auto int32 = c10::ScalarType::Int;
    const int64_t num_nodes = num_ranks / num_nvl_ranks;
    InternodeHandleTensors h;
    h.is_token_in_rank =
        arguments::tensor(item(0), "handle.is_token_in_rank", {{c10::ScalarType::Bool}, {kAny, num_ranks}}, device);
    const int64_t num_tokens = h.is_token_in_rank.size(0);
    h.node_count_matrix = arguments::tensor(item(1), "handle.node_count_matrix", {{int32}, {num_ranks, num_nodes}}, device);
    h.rank_prefix_matrix = arguments::tensor(item(2), "handle.rank_prefix_matrix", {{int32}, {num_ranks, num_ranks}}, device);
    h.forward_offsets = arguments::tensor(item(3), "handle.forward_offsets", {{int32}, {num_nodes + 1}}, device);
    h.forward_map = arguments::tensor(item(4), "handle.forward_map", {{int32}, {kAny, num_nvl_ranks}}, device);
    h.recv_first_row = arguments::tensor(item(5), "handle.recv_first_row", {{int32}, {num_ranks}}, device);
    h.recv_rank_prefix_sum = arguments::tensor(item(6), "handle.recv_gbl_rank_prefix_sum", {{int32}, {num_ranks}}, device);
    h.recv_src_idx = arguments::tensor(item(7), "handle.recv_src_idx", {{int32}, {}, 1}, device);
    h.send_node_head = arguments::tensor(item(8), "handle.send_node_head", {{int32}, {num_tokens, num_nodes}}, device);
    h.send_head = arguments::tensor(item(9), "handle.send_head", {{int32}, {num_tokens, num_ranks}}, device);
    return h;
}

DispatchCall checked_dispatch(const runtime::Buffer& buffer, pybind11::handle x, pybind11::handle handle,
                              pybind11::handle num_tokens_per_rank, pybind11::handle num_tokens_per_rdma_rank,
                              pybind11::handle is_token_in_rank, pybind11::handle num_tokens_per_expert,
                              pybind11::handle topk_idx, pybind11::handle topk_weights, pybind11::handle expert_alignment,
                              pybind11::handle num_worst_tokens, int64_t num_sms) {
    using arguments::kAny;
    const int device = buffer.device();
    const int64_t num_ranks = buffer.num_ranks();
    DispatchCall call;
    call.expert_alignment = arguments::integer(expert_alignment, "expert_alignment", 1);
    call.num_worst_tokens = arguments::integer(num_worst_tokens, "num_worst_tokens", 0);
    const bool internode = buffer.is_internode();
    if (!internode)
        arguments::check_tensor_or_none(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank");  // inter-node only
    std::tie(call.x, call.x_scales) = checked_dispatch_x(x, device);
    const int64_t num_tokens = call.x.size(0);
    int64_t num_topk = 0;
    if (!handle.is_none()) {
        torch::Tensor handle_is_token_in_rank;
        if (internode) {
            call.internode_handle = checked_internode_handle(handle, num_ranks, buffer.num_nvl_ranks(), device);
            call.handle_seq = handle_identity(buffer, *call.internode_handle);
            handle_is_token_in_rank = call.internode_handle->is_token_in_rank;
        } else {
            call.handle = checked_handle(handle, num_ranks, device);
            call.handle_seq = handle_identity(buffer, *call.handle);
            handle_is_token_in_rank = call.handle->is_token_in_rank;
        }
        if (!topk_idx.is_none() || !topk_weights.is_none())
            arguments::raise_value_error(std::string(topk_idx.is_none() ? "topk_weights" : "topk_idx") +
                                         ": must be None for a cached dispatch (handle given); top-k is not resent");
        if (handle_is_token_in_rank.size(0) != num_tokens)
            arguments::raise_value_error("x: has " + std::to_string(num_tokens) + " tokens but the handle was made for " +
                                         std::to_string(handle_is_token_in_rank.size(0)));
        call.is_token_in_rank = handle_is_token_in_rank;
    } else {
        for (const auto& [name, value] : {std::pair{"num_tokens_per_rank", num_tokens_per_rank},
                                          std::pair{"is_token_in_rank", is_token_in_rank},
                                          std::pair{"num_tokens_per_expert", num_tokens_per_expert}})
            if (value.is_none())
                arguments::raise_value_error(std::string(name) +
                                             ": required when no handle is given (get it from get_dispatch_layout)");
        call.num_tokens_per_rank = arguments::tensor(num_tokens_per_rank, "num_tokens_per_rank",
                                                     {{c10::ScalarType::Int}, {num_ranks}}, device);
        // Optional inter-node (the count exchange derives it from is_token_in_rank when absent).
        if (internode)
            call.num_tokens_per_rdma_rank =
                arguments::optional_tensor(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank",
                                           {{c10::ScalarType::Int}, {num_ranks / buffer.num_nvl_ranks()}}, device);
        call.is_token_in_rank = arguments::tensor(is_token_in_rank, "is_token_in_rank",
                                                  {{c10::ScalarType::Bool}, {num_tokens, num_ranks}}, device);
        call.num_tokens_per_expert = arguments::tensor(num_tokens_per_expert, "num_tokens_per_expert",
                                                       {{c10::ScalarType::Int}, {}, 1}, device);
        call.num_experts = call.num_tokens_per_expert->size(0);
        if (call.num_experts == 0 || call.num_experts % num_ranks != 0)
            arguments::raise_value_error("num_tokens_per_expert: length (the expert count) must be a positive multiple of " +
                                         std::to_string(num_ranks) + " ranks, got " + std::to_string(call.num_experts));
        if (call.num_experts / num_ranks > layout::kMaxLocalExperts)
            arguments::raise_value_error("num_tokens_per_expert: length (the expert count) must be at most " +
                                         std::to_string(layout::kMaxLocalExperts) + " a rank, got " +
                                         std::to_string(call.num_experts));
        if (topk_idx.is_none() != topk_weights.is_none())
            arguments::raise_value_error(
                "topk_weights: topk_idx and topk_weights must be given together (or both None)");
        if (!topk_idx.is_none()) {
            call.topk_idx = arguments::topk_idx(topk_idx, num_tokens, runtime::size_hints::kMaxNumTopk, device);
            if (buffer.host_expert_id_check())
                arguments::check_expert_ids_on_host(*call.topk_idx, call.num_experts);
            num_topk = call.topk_idx->size(1);
            call.topk_weights = arguments::tensor(topk_weights, "topk_weights",
                                                  {{c10::ScalarType::Float}, {num_tokens, num_topk}}, device);
        } else if (call.num_worst_tokens > 0) {
            arguments::raise_value_error("num_worst_tokens: requires topk_idx and topk_weights (as in DeepEP V1)");
        }
    }
    const int64_t hidden_bytes = call.x.size(1) * call.x.element_size();
    const int64_t num_scales = call.x_scales.has_value() ? call.x_scales->size(1) : 0;
    if (internode) {
        const int64_t needed = runtime::size_hints::internode_dispatch_bytes(hidden_bytes, num_scales, num_topk, num_ranks,
                                                                             buffer.num_nvl_ranks(), num_tokens);
        if (needed > buffer.num_rdma_bytes())
            arguments::raise_capacity_error("x", "dispatching " + std::to_string(num_tokens) + " tokens inter-node",
                                            needed, buffer.num_rdma_bytes(), "num_rdma_bytes");
    } else {
        const int64_t needed =
            runtime::size_hints::nvl_dispatch_bytes(hidden_bytes, num_scales, num_topk, num_ranks, num_tokens);
        if (needed > buffer.num_nvl_bytes())
            arguments::raise_capacity_error("x", "dispatching " + std::to_string(num_tokens) + " tokens", needed,
                                            buffer.num_nvl_bytes(), "num_nvl_bytes");
    }
    // Padded rows no combine of this Buffer could take back are refused here, by name, rather than by the
    // allocator of the padded outputs.
    if (handle.is_none() && call.num_worst_tokens > 0)
        check_combine_capacity(buffer, "num_worst_tokens",
                               "padding to " + std::to_string(call.num_worst_tokens) + " rows (combining them back)",
                               call.x.size(1), num_topk, call.num_worst_tokens, num_tokens, 0);
    call.num_sms = buffer.num_sms(num_sms);
    return call;
}

CombineCall checked_combine(const runtime::Buffer& buffer, pybind11::handle x, pybind11::handle handle,
                            pybind11::handle topk_weights, pybind11::handle bias, int64_t num_sms) {
    using arguments::kAny;
    const int device = buffer.device();
    const int64_t num_ranks = buffer.num_ranks();
    CombineCall call;
    if (handle.is_none())
        arguments::raise_value_error("handle: combine needs the handle returned by dispatch");
    const bool internode = buffer.is_internode();
    if (internode) {
        call.internode_handle = checked_internode_handle(handle, num_ranks, buffer.num_nvl_ranks(), device);
        call.handle_seq = handle_identity(buffer, *call.internode_handle);
    } else {
        call.handle = checked_handle(handle, num_ranks, device);
        call.handle_seq = handle_identity(buffer, call.handle);
    }
    const int64_t num_rows = internode ? call.internode_handle->recv_src_idx.size(0) : call.handle.recv_src_idx.size(0);
    call.x = arguments::tensor(x, "x", {{c10::ScalarType::BFloat16}, {}, 2}, device);
    if (call.x.size(0) != num_rows)
        arguments::raise_value_error("x: has " + std::to_string(call.x.size(0)) +
                                     " rows but the handle's dispatch received " + std::to_string(num_rows));
    const int64_t hidden = call.x.size(1);
    if (hidden * 2 % 16 != 0)
        arguments::raise_value_error("x: hidden size must be a multiple of 8 (16-byte rows), got " + std::to_string(hidden));
    int64_t num_topk = 0;
    if (!topk_weights.is_none()) {
        call.topk_weights =
            arguments::tensor(topk_weights, "topk_weights", {{c10::ScalarType::Float}, {num_rows, kAny}}, device);
        num_topk = call.topk_weights->size(1);
        if (num_topk < 1 || num_topk > runtime::size_hints::kMaxNumTopk)
            arguments::raise_value_error("topk_weights: top-k must be in [1, " +
                                         std::to_string(runtime::size_hints::kMaxNumTopk) + "], got " +
                                         std::to_string(num_topk));
    }
    // bias: None, one tensor, or a tuple / list of up to two, each BF16 [T, H].
    std::vector<pybind11::handle> parts;
    if (THPVariable_Check(bias.ptr())) {
        parts.push_back(bias);
    } else if (PyTuple_Check(bias.ptr()) || PyList_Check(bias.ptr())) {
        const pybind11::sequence sequence = pybind11::reinterpret_borrow<pybind11::sequence>(bias);
        if (sequence.size() > 2)
            arguments::raise_value_error("bias: at most 2 tensors, got " + std::to_string(sequence.size()));
        for (const pybind11::handle part : sequence)
            parts.push_back(part);
    } else if (!bias.is_none()) {
        arguments::raise_type_error(std::string("bias: expected a tensor or a tuple of tensors, got ") +
                                    Py_TYPE(bias.ptr())->tp_name);
    }
    const int64_t num_tokens =
        internode ? call.internode_handle->is_token_in_rank.size(0) : call.handle.is_token_in_rank.size(0);
    for (size_t i = 0; i < parts.size(); ++i) {
        const std::string name = "bias[" + std::to_string(i) + "]";
        (i == 0 ? call.bias_0 : call.bias_1) =
            arguments::tensor(parts[i], name.c_str(), {{c10::ScalarType::BFloat16}, {num_tokens, hidden}}, device);
    }
    // Inter-node, the rows this rank forwards are known on the GPU only (checked by the op's exchange).
    check_combine_capacity(buffer, "x", "combining " + std::to_string(num_rows) + " rows", hidden, num_topk, num_rows,
                           num_tokens, 0);
    call.num_sms = buffer.num_sms(num_sms);
    return call;
}

namespace {

// As the reference shows an identity in a signature: 'dispatch #N', or None.
std::string identity_text(const std::optional<int64_t>& seq) {
    return seq.has_value() ? runtime::repr_str("dispatch #" + std::to_string(*seq)) : runtime::repr_none();
}

}  // namespace

const char* dispatch_op_name(bool cached) { return cached ? "dispatch (cached: handle given)" : "dispatch"; }

runtime::CallRecord call_record(const DispatchCall& call) {
    const bool cached = call.handle.has_value() || call.internode_handle.has_value();
    runtime::CallRecord record{dispatch_op_name(cached), "", "", {}};
    record.signature = {{"x.dtype", runtime::repr_str(arguments::dtype_name(call.x.scalar_type()))},
                        {"x.size(1)", runtime::repr_int(call.x.size(1))}};
    if (cached)
        record.signature.emplace_back(runtime::kHandleIdentityField, identity_text(call.handle_seq));
    else {
        record.signature.emplace_back("topk_idx.size(1)", call.topk_idx.has_value()
                                                              ? runtime::repr_int(call.topk_idx->size(1))
                                                              : runtime::repr_none());
        record.signature.emplace_back("num_tokens_per_expert.size(0)", runtime::repr_int(call.num_experts));
    }
    return record;
}

runtime::CallRecord call_record(const CombineCall& call) {
    runtime::CallRecord record{kCombineOpName, "", "", {}};
    record.signature = {{"x.size(1)", runtime::repr_int(call.x.size(1))},
                        {"topk_weights.size(1)", call.topk_weights.has_value()
                                                     ? runtime::repr_int(call.topk_weights->size(1))
                                                     : runtime::repr_none()},
                        {runtime::kHandleIdentityField, identity_text(call.handle_seq)}};
    return record;
}

}  // namespace deep_ep::ops
