// The ops/ files: each public call checks its arguments (ops/arguments.hpp), orders itself on the Buffer's
// communication stream (runtime/op_streams.hpp), allocates outputs, fills one Args struct per launch and
// returns what the Python call returns, so that a call crosses the binding once.
#pragma once

#include <pybind11/pybind11.h>

#include <torch/extension.h>

#include <optional>
#include <utility>
#include <vector>

#include "kernels/api.cuh"
#include "runtime/buffer.hpp"
#include "runtime/op_streams.hpp"

namespace deep_ep::ops {

// Raised once the op's kernels are queued on every rank's stream, so no peer is left waiting; the caller's
// stream still waits for the op, so whatever it used may be freed.
inline void raise_pending_errors(runtime::Buffer& buffer, runtime::OpStreams& streams) {
    try {
        buffer.raise_pending_errors();
    } catch (...) {
        streams.join_caller();
        throw;
    }
}

// An op's argument checks, agreed by the ranks of its host exchange (runtime/call_agreement.hpp): when
// `check` throws, this rank makes the op's exchange with its error in it, so that every peer raises the same
// error instead of waiting for it, and raises it too. Only for ops whose ranks all make that exchange
// (gather_peer_tensors) right after their checks, before anything is launched.
template <typename Check>
auto agreed_checks(runtime::Buffer& buffer, const char* op, Check&& check) -> decltype(check()) {
    try {
        return check();
    } catch (...) {
        buffer.agree_on_error(runtime::failed_call(op, std::current_exception()));
    }
}

template <typename T>
T* data_or_null(const std::optional<torch::Tensor>& tensor) {
    return tensor.has_value() ? tensor->data_ptr<T>() : nullptr;
}

inline pybind11::object tensor_or_none(const std::optional<torch::Tensor>& t) {
    return t.has_value() ? pybind11::cast(*t) : pybind11::none();
}

// The one CPU synchronisation of a fresh normal dispatch: the notify kernel publishes the receive counts in
// host-mapped memory, tag last ([1] rows, [2 + e] per local expert); the kernels queued after notify run
// while this waits. Returns (rows received, aligned rows per local expert).
std::pair<int, std::vector<int>> wait_for_receive_counts(runtime::Buffer& buffer, int tag, int num_local_experts);

// Direct reads of a combine's inputs: where the node's ranks' x and topk_weights are (index: local rank), or
// nullopt when they cannot all be read in place (then every rank of the node stages them; the decision is
// taken from the same exchanged records everywhere). The same exchange agrees on `call` first. Host only:
// no GPU synchronisation.
std::optional<CombineSources> direct_combine_sources(runtime::Buffer& buffer, const runtime::CallRecord& call,
                                                     const torch::Tensor& x,
                                                     const std::optional<torch::Tensor>& topk_weights,
                                                     cudaStream_t stream);

void register_layout_apis(pybind11::module_& m);
void register_internode_apis(pybind11::module_& m);
void register_intranode_apis(pybind11::module_& m);
void register_low_latency_apis(pybind11::module_& m);
void register_testing_apis(pybind11::module_& m);

}  // namespace deep_ep::ops
