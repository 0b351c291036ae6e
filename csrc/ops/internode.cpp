// Inter-node dispatch and combine, one binding call each, with the intra-node ops' arguments, checks
// (ops/intranode_arguments.hpp) and stream semantics; the kernels and buffer layout are in
// kernels/api_internode.cuh. All ranks of the group run in the NVSHMEM symmetric buffer.
#include <torch/extension.h>

#include <algorithm>
#include <stdexcept>

#include "kernels/api.cuh"
#include "ops/arguments.hpp"
#include "ops/normal_outputs.hpp"
#include "ops/intranode_arguments.hpp"
#include "ops/ops.hpp"
#include "runtime/buffer.hpp"
#include "runtime/errors.hpp"
#include "runtime/op_streams.hpp"
#include "runtime/output_tensors.hpp"

namespace deep_ep::ops {

#ifdef DEEP_EP_WITH_NVSHMEM
namespace {

InternodePeers internode_peers(runtime::Buffer& buffer, const char* op) {
    DEEP_EP_CHECK(buffer.is_internode(), op << ": this Buffer's group is one NVLink domain (intra-node ops apply)");
    runtime::SymmetricBuffer& symmetric = buffer.symmetric(op);
    DEEP_EP_CHECK(symmetric.node_ranks_mapped, op << ": the ranks of a node must reach each other's symmetric buffer "
                                                     "over NVLink (nvshmem_ptr returned null for a rank of this node)");
    return InternodePeers{symmetric.base, reinterpret_cast<const uint64_t*>(symmetric.mapped_bases.data_ptr<int64_t>()),
                          buffer.rank(), buffer.wait_context()};
}

InternodeControl internode_control(const runtime::Buffer& buffer) {
    return InternodeControl{buffer.num_ranks(), buffer.num_nvl_ranks()};
}

// Launches an op's opening exchange; returns its number, the same on every rank (a handle's identity).
int64_t open_op(runtime::Buffer& buffer, const InternodeNotifyArgs& notify) {
    const int64_t exchange = buffer.next_internode_exchange();
    launch_internode_notify(notify);
    return exchange;
}

// The op-opening exchange without counts (a cached dispatch, a combine, a rejection, a barrier).
InternodeNotifyArgs exchange_args(runtime::Buffer& buffer, const InternodePeers& peers, cudaStream_t stream) {
    InternodeNotifyArgs notify{};
    notify.peers = peers;
    notify.control = internode_control(buffer);
    notify.with_counts = false;
    notify.rejection = buffer.rejection_report_device();
    notify.stream = stream;
    return notify;
}

// What the ranks compare in the exchange (the intra-node ops' signature fields, call_record).
int signature_handle(const std::optional<int64_t>& seq) { return seq.has_value() ? static_cast<int>(*seq) : -1; }

int signature_dtype(const torch::Tensor& x) {
    return x.scalar_type() == torch::kBFloat16 ? InternodeCallSignature::kBFloat16 : InternodeCallSignature::kFloat8;
}

InternodeCallSignature signature_of(const DispatchCall& call) {
    if (call.internode_handle.has_value())
        return {InternodeCallSignature::kCachedDispatch, signature_dtype(call.x), static_cast<int>(call.x.size(1)), 0,
                0, signature_handle(call.handle_seq)};
    return {InternodeCallSignature::kFreshDispatch,
            signature_dtype(call.x),
            static_cast<int>(call.x.size(1)),
            call.topk_idx.has_value() ? static_cast<int>(call.topk_idx->size(1)) : 0,
            static_cast<int>(call.num_experts),
            -1};
}

InternodeCallSignature signature_of(const CombineCall& call) {
    return {InternodeCallSignature::kCombine,
            InternodeCallSignature::kBFloat16,
            static_cast<int>(call.x.size(1)),
            call.topk_weights.has_value() ? static_cast<int>(call.topk_weights->size(1)) : 0,
            0,
            signature_handle(call.handle_seq)};
}

// A cached dispatch's or combine's exchange; a combine's also has the GPU check its forwarded rows against
// `max_forwarded_rows`.
void launch_exchange(runtime::Buffer& buffer, const InternodePeers& peers, cudaStream_t stream,
                     const InternodeCallSignature& signature, const int* forward_offsets_to_check = nullptr,
                     int64_t max_forwarded_rows = 0) {
    InternodeNotifyArgs notify = exchange_args(buffer, peers, stream);
    notify.signature = signature;
    notify.forward_offsets_to_check = forward_offsets_to_check;
    notify.max_forwarded_rows = max_forwarded_rows;
    open_op(buffer, notify);
}

// The exchange of a rank whose checks raised `message`, ordered after the Buffer's previous op like any op:
// its verdict instead of counts, blaming the rank the error names (this rank, or a node peer whose failed
// checks the node agreed on in its host exchange).
void launch_rejection(runtime::Buffer& buffer, const InternodePeers& peers, const char* message, bool type_error) {
    const int agreed_rank = runtime::take_agreed_error_rank();
    runtime::OpStreams streams(buffer, {pybind11::none(), false, false});
    InternodeNotifyArgs notify = exchange_args(buffer, peers, streams.stream());
    notify.rejected_code = runtime::Buffer::rejection_code(message, type_error);
    notify.rejected_rank = agreed_rank >= 0 ? agreed_rank : buffer.rank();
    open_op(buffer, notify);
    streams.finish();
}

// An op's argument checks (and the node's agreement on them) on an inter-node Buffer. When they raise a
// TypeError or ValueError, this rank opens the op all the same, with a verdict that names the argument, so
// that no rank of any node waits for it: every rank skips the op and the others raise the rejection
// (InternodeNotifyArgs); the error is then raised here.
template <typename Check>
auto checked_or_rejected(runtime::Buffer& buffer, const InternodePeers& peers, Check&& check) -> decltype(check()) {
    runtime::take_agreed_error_rank();  // only an error `check` raises counts
    try {
        return check();
    } catch (const pybind11::type_error& error) {
        launch_rejection(buffer, peers, error.what(), true);
        throw;
    } catch (const pybind11::value_error& error) {
        launch_rejection(buffer, peers, error.what(), false);
        throw;
    } catch (const std::invalid_argument& error) {
        launch_rejection(buffer, peers, error.what(), false);
        throw;
    }
}

}  // namespace

/// As intranode_dispatch (same arguments and returns), for a Buffer whose group spans several nodes; the
/// handle is the 10-element inter-node one.
pybind11::tuple internode_dispatch(runtime::Buffer& buffer, pybind11::handle x_arg, pybind11::handle handle_arg,
                                   pybind11::handle num_tokens_per_rank_arg, pybind11::handle num_tokens_per_rdma_rank_arg,
                                   pybind11::handle is_token_in_rank_arg, pybind11::handle num_tokens_per_expert_arg,
                                   pybind11::handle topk_idx_arg, pybind11::handle topk_weights_arg,
                                   pybind11::handle expert_alignment_arg, pybind11::handle num_worst_tokens_arg,
                                   int64_t num_sms, pybind11::handle previous_event, bool async_finish,
                                   bool allocate_on_comm_stream) {
    buffer.require_usable();
    const InternodePeers peers = internode_peers(buffer, "dispatch");
    const DispatchCall call = checked_or_rejected(buffer, peers, [&] {
        return checked_dispatch(buffer, x_arg, handle_arg, num_tokens_per_rank_arg, num_tokens_per_rdma_rank_arg,
                                is_token_in_rank_arg, num_tokens_per_expert_arg, topk_idx_arg, topk_weights_arg,
                                expert_alignment_arg, num_worst_tokens_arg, num_sms);
    });
    const torch::Tensor& x = call.x;
    const OptionalTensor& x_scales = call.x_scales;
    const OptionalTensor& topk_idx = call.topk_idx;
    const bool cached = call.internode_handle.has_value();

    runtime::OpStreams streams(buffer, {previous_event, async_finish, allocate_on_comm_stream});
    const cudaStream_t stream = streams.stream();
    const InternodeControl control = internode_control(buffer);
    const int64_t num_ranks = control.num_ranks, num_nvl_ranks = control.num_nvl_ranks, num_nodes = control.num_nodes();
    const int64_t num_tokens = x.size(0), hidden_bytes = x.size(1) * x.element_size();
    const int64_t num_scales = x_scales.has_value() ? x_scales->size(1) : 0;
    const int64_t num_topk = topk_idx.has_value() ? topk_idx->size(1) : 0;
    const int64_t num_experts = call.num_experts;
    const InternodeDispatchLayout layout(control, buffer.num_rdma_bytes(), hidden_bytes, num_scales, num_topk);

    InternodeHandleTensors handle;
    int num_recv_capacity = 0, notify_tag = 0;
    int64_t fresh_exchange = 0;
    std::vector<int> num_recv_tokens_per_expert_list;
    if (cached) {
        handle = *call.internode_handle;
        launch_exchange(buffer, peers, stream, signature_of(call));
    } else {
        if (topk_idx.has_value())
            launch_check_expert_ids(CheckExpertIdsArgs{topk_idx->data_ptr(), topk_idx->scalar_type() == torch::kInt64,
                                                       topk_idx->numel(), static_cast<int>(num_experts),
                                                       buffer.invalid_expert_id_device(), stream});
        const int64_t num_local_experts = num_experts / num_ranks;
        // The forward map is sized for the most rows this rank can land as forwarder (its counterpart on
        // every other node sending a full buffer), so that the host need not wait for the count first.
        const int64_t max_forwarded = (num_nodes - 1) * layout.capacity;
        runtime::OutputTensors ints;
        const int node_count_index = ints.add({num_ranks, num_nodes}, torch::kInt32);
        const int rank_prefix_index = ints.add({num_ranks, num_ranks}, torch::kInt32);
        const int forward_offsets_index = ints.add({num_nodes + 1}, torch::kInt32);
        const int first_row_index = ints.add({num_ranks}, torch::kInt32);
        const int prefix_sum_index = ints.add({num_ranks}, torch::kInt32);
        const int send_node_head_index = ints.add({num_tokens, num_nodes}, torch::kInt32);
        const int send_head_index = ints.add({num_tokens, num_ranks}, torch::kInt32);
        const int per_expert_index = ints.add({num_local_experts}, torch::kInt32);
        const int forward_map_index = ints.add({max_forwarded, num_nvl_ranks}, torch::kInt32);
        ints.allocate(x.device());
        handle.is_token_in_rank = call.is_token_in_rank;
        handle.node_count_matrix = ints[node_count_index];
        handle.rank_prefix_matrix = ints[rank_prefix_index];
        handle.forward_offsets = ints[forward_offsets_index];
        handle.recv_first_row = ints[first_row_index];
        handle.recv_rank_prefix_sum = ints[prefix_sum_index];
        handle.send_node_head = ints[send_node_head_index];
        handle.send_head = ints[send_head_index];
        handle.forward_map = ints[forward_map_index];
        const torch::Tensor num_recv_tokens_per_expert = ints[per_expert_index];

        InternodeNotifyArgs notify{};
        notify.peers = peers;
        notify.control = control;
        notify.with_counts = true;
        notify.signature = signature_of(call);
        notify.num_tokens_per_rank = call.num_tokens_per_rank->data_ptr<int>();
        notify.num_tokens_per_rdma_rank = data_or_null<int>(call.num_tokens_per_rdma_rank);
        notify.is_token_in_rank = call.is_token_in_rank.data_ptr<bool>();
        notify.num_tokens = static_cast<int>(num_tokens);
        notify.num_tokens_per_expert = call.num_tokens_per_expert->data_ptr<int>();
        notify.num_experts = static_cast<int>(num_experts);
        notify.expert_alignment = static_cast<int>(call.expert_alignment);
        notify.rank_prefix_matrix = handle.rank_prefix_matrix.data_ptr<int>();
        notify.node_count_matrix = handle.node_count_matrix.data_ptr<int>();
        notify.recv_first_row = handle.recv_first_row.data_ptr<int>();
        notify.recv_rank_prefix_sum = handle.recv_rank_prefix_sum.data_ptr<int>();
        notify.num_recv_tokens_per_expert = num_recv_tokens_per_expert.data_ptr<int>();
        notify.forward_offsets = handle.forward_offsets.data_ptr<int>();
        // Every rank checks every rank's num_worst_tokens against its receive count (a verdict, no wait).
        notify.num_worst_tokens = static_cast<int>(call.num_worst_tokens);
        // With num_worst_tokens nobody waits for the counts, and a late write could be mistaken for a
        // later dispatch's: only the waited-for notify touches the host-mapped counters.
        notify.mapped_counters = call.num_worst_tokens > 0 ? nullptr : buffer.mapped_counters_device();
        notify.mapped_tag = buffer.next_notify_tag();
        notify.rejection = buffer.rejection_report_device();
        notify.stream = stream;
        fresh_exchange = open_op(buffer, notify);
        notify_tag = notify.mapped_tag;
    }

    InternodeDispatchPlanArgs plan{};
    plan.peers = peers;
    plan.layout = layout;
    plan.num_tokens = static_cast<int>(num_tokens);
    plan.is_token_in_rank = call.is_token_in_rank.data_ptr<bool>();
    plan.rank_prefix_matrix = handle.rank_prefix_matrix.data_ptr<int>();
    plan.send_head = cached ? nullptr : handle.send_head.data_ptr<int>();
    plan.send_node_head = cached ? nullptr : handle.send_node_head.data_ptr<int>();
    plan.forward_offsets = handle.forward_offsets.data_ptr<int>();
    plan.forward_map = cached ? nullptr : handle.forward_map.data_ptr<int>();
    plan.stream = stream;
    launch_internode_dispatch_plan(plan);

    InternodeDispatchSendArgs send{};
    send.peers = peers;
    send.layout = layout;
    send.num_tokens = static_cast<int>(num_tokens);
    send.hidden_bytes = static_cast<int>(hidden_bytes);
    send.num_scales = static_cast<int>(num_scales);
    send.num_topk = static_cast<int>(num_topk);
    send.x = x.data_ptr();
    send.x_scales = data_or_null<float>(x_scales);
    send.topk_idx = topk_idx.has_value() ? topk_idx->data_ptr() : nullptr;
    send.topk_idx_is_int64 = topk_idx.has_value() && topk_idx->scalar_type() == torch::kInt64;
    send.topk_weights = data_or_null<float>(call.topk_weights);
    send.is_token_in_rank = call.is_token_in_rank.data_ptr<bool>();
    send.send_node_head = handle.send_node_head.data_ptr<int>();
    send.num_blocks = call.num_sms;
    send.stream = stream;
    launch_internode_dispatch_send(send);

    if (cached) {
        num_recv_capacity = static_cast<int>(handle.recv_src_idx.size(0));  // padded rows included
    } else if (call.num_worst_tokens > 0) {
        // No wait: a rank that would receive more rows is rejected by every rank's exchange (raised at the
        // call's end, the next call or check(); the outputs are NaN).
        num_recv_capacity = static_cast<int>(call.num_worst_tokens);
    } else {
        // Plan and send run on the GPU meanwhile.
        const int num_local_experts = static_cast<int>(num_experts / num_ranks);
        auto [rows, per_expert] = wait_for_receive_counts(buffer, notify_tag, num_local_experts);
        if (rows < 0) {  // a peer rejected the op: every rank skips it (its plan and send already did)
            streams.join_caller();
            buffer.raise_if_rejected_by_peer();
            throw std::runtime_error("dispatch: a peer rejected this inter-node dispatch");
        }
        num_recv_capacity = rows;
        num_recv_tokens_per_expert_list = std::move(per_expert);
    }

    const DispatchOutputs out = DispatchOutputs::allocate(num_recv_capacity, x, x_scales, topk_idx);
    if (!cached) {
        handle.recv_src_idx = out.recv_src_idx;
        stamp_handle(buffer, handle, fresh_exchange);
    }

    InternodeDispatchPullArgs pull{};
    pull.peers = peers;
    pull.layout = layout;
    pull.hidden_bytes = static_cast<int>(hidden_bytes);
    pull.num_scales = static_cast<int>(num_scales);
    pull.num_topk = static_cast<int>(num_topk);
    pull.num_experts = static_cast<int>(num_experts);
    pull.rank_prefix_matrix = handle.rank_prefix_matrix.data_ptr<int>();
    pull.recv_first_row = handle.recv_first_row.data_ptr<int>();
    pull.forward_offsets = handle.forward_offsets.data_ptr<int>();
    pull.recv_rank_prefix_sum = handle.recv_rank_prefix_sum.data_ptr<int>();
    pull.num_recv_capacity = num_recv_capacity;
    pull.recv_x = out.recv_x.data_ptr();
    pull.recv_x_scales = data_or_null<float>(out.recv_x_scales);
    pull.recv_topk_idx = data_or_null<int64_t>(out.recv_topk_idx);
    pull.recv_topk_weights = data_or_null<float>(out.recv_topk_weights);
    pull.recv_src_idx = out.recv_src_idx.data_ptr<int>();
    pull.forward_map = cached ? nullptr : handle.forward_map.data_ptr<int>();
    pull.num_blocks = call.num_sms;
    pull.conservative_loads = buffer.conservative_loads();
    pull.stream = stream;
    launch_internode_dispatch_pull(pull);

    pybind11::object event;
    if (streams.needs_tensor_lists()) {
        std::vector<torch::Tensor> inputs{x, call.is_token_in_rank, handle.rank_prefix_matrix, handle.send_node_head};
        for (const OptionalTensor& t : {x_scales, topk_idx, call.topk_weights, call.num_tokens_per_rank,
                                        call.num_tokens_per_rdma_rank, call.num_tokens_per_expert})
            if (t.has_value())
                inputs.push_back(*t);
        std::vector<torch::Tensor> outs = out.tensors();
        if (!cached)
            for (const torch::Tensor& t : {handle.node_count_matrix, handle.forward_offsets, handle.forward_map,
                                           handle.recv_first_row, handle.recv_rank_prefix_sum, handle.send_head})
                outs.push_back(t);
        event = streams.finish(std::move(inputs), outs);
    } else {
        event = streams.finish();
    }
    raise_pending_errors(buffer, streams);
    return out.result(cached, num_recv_tokens_per_expert_list, cached ? pybind11::object(pybind11::none()) : handle.as_tuple(), event);
}

/// As intranode_combine (same arguments and returns), for a Buffer whose group spans several nodes.
pybind11::tuple internode_combine(runtime::Buffer& buffer, pybind11::handle x_arg, pybind11::handle handle_arg,
                                  pybind11::handle topk_weights_arg, pybind11::handle bias_arg, int64_t num_sms,
                                  pybind11::handle previous_event, bool async_finish, bool allocate_on_comm_stream) {
    buffer.require_usable();
    // Agreed inside the node by the host exchange, across nodes by the rejection in the op's first GPU
    // exchange (docs/errors.md).
    const InternodePeers peers = internode_peers(buffer, "combine");
    const CombineCall call = checked_or_rejected(buffer, peers, [&] {
        return agreed_checks(buffer, kCombineOpName, [&] {
            return checked_combine(buffer, x_arg, handle_arg, topk_weights_arg, bias_arg, num_sms);
        });
    });
    const InternodeHandleTensors& handle = *call.internode_handle;
    const torch::Tensor& x = call.x;
    const OptionalTensor& topk_weights = call.topk_weights;

    runtime::OpStreams streams(buffer, {previous_event, async_finish, allocate_on_comm_stream});
    const cudaStream_t stream = streams.stream();
    const int64_t num_rows = x.size(0), hidden = x.size(1), num_tokens = handle.is_token_in_rank.size(0);
    const int64_t num_topk = topk_weights.has_value() ? topk_weights->size(1) : 0;

    // Host only, before anything is queued: the node's ranks agree on the call and learn where their inputs
    // are, to read them in place.
    // The same exchange raises the error of a node peer whose checks failed: rejected here as well.
    const std::optional<CombineSources> direct = checked_or_rejected(buffer, peers, [&] {
        return direct_combine_sources(buffer, call_record(call), x, topk_weights, stream);
    });
    // Staged although direct reads looked possible (an allocation could not be exported): checked here, where
    // only the rank that does not fit raises (its node peers learn of it with the others, by the rejection);
    // the agreed checks counted the staged rows wherever staging was certain.
    const int64_t num_staged_rows = direct.has_value() ? 0 : num_rows;
    if (!direct.has_value() && buffer.may_read_directly(stream))
        checked_or_rejected(buffer, peers, [&] {
            check_internode_combine_capacity(buffer, "x", "combining " + std::to_string(num_rows) + " rows", hidden,
                                             num_topk, num_staged_rows, 0, num_tokens);
        });
    const CombineOutputs out = CombineOutputs::allocate(num_tokens, x, topk_weights);

    // The rows this rank forwards are known on the GPU only: the exchange checks them against what is left.
    const InternodeCombineLayout layout(internode_control(buffer), buffer.num_rdma_bytes(), hidden, num_topk);
    const int64_t max_forwarded_rows =
        layout.num_row_slots -
        InternodeCombineLayout::rows_needed(layout.control.num_nodes(), num_staged_rows, 0, num_tokens);
    launch_exchange(buffer, peers, stream, signature_of(call), handle.forward_offsets.data_ptr<int>(),
                    max_forwarded_rows);
    InternodeCombineArgs args{};
    args.peers = peers;
    args.layout = layout;
    args.hidden = static_cast<int>(hidden);
    args.num_topk = static_cast<int>(num_topk);
    args.num_rows = static_cast<int>(num_rows);
    args.num_tokens = static_cast<int>(num_tokens);
    args.x = x.data_ptr();
    args.topk_weights = data_or_null<float>(topk_weights);
    args.direct_reads = direct.has_value();
    if (direct.has_value())
        args.node_inputs = *direct;
    args.send_head = handle.send_head.data_ptr<int>();
    args.send_node_head = handle.send_node_head.data_ptr<int>();
    args.forward_offsets = handle.forward_offsets.data_ptr<int>();
    args.forward_map = handle.forward_map.data_ptr<int>();
    args.bias_0 = call.bias_0.has_value() ? call.bias_0->data_ptr() : nullptr;
    args.bias_1 = call.bias_1.has_value() ? call.bias_1->data_ptr() : nullptr;
    args.combined_x = out.combined_x.data_ptr();
    args.combined_topk_weights = data_or_null<float>(out.combined_topk_weights);
    args.num_blocks = call.num_sms;
    args.conservative_loads = buffer.conservative_loads();
    args.stream = stream;
    launch_internode_combine(args);

    pybind11::object event;
    if (streams.needs_tensor_lists()) {
        std::vector<torch::Tensor> inputs{x, handle.send_head, handle.send_node_head, handle.forward_offsets,
                                          handle.forward_map};
        for (const OptionalTensor& t : {topk_weights, call.bias_0, call.bias_1})
            if (t.has_value())
                inputs.push_back(*t);
        event = streams.finish(std::move(inputs), out.tensors());
    } else {
        event = streams.finish();
    }
    raise_pending_errors(buffer, streams);
    return out.result(event);
}

/// A rank whose Python-side checks of `op` failed (config, previous_event): opens the op with a verdict, as a
/// failed C++ check does (a combine agrees inside the node first), and raises the error.
[[noreturn]] void internode_reject(runtime::Buffer& buffer, const std::string& op, const std::string& error_type,
                                   const std::string& message) {
    buffer.require_usable();
    const InternodePeers peers = internode_peers(buffer, op.c_str());
    checked_or_rejected(buffer, peers, [&] {
        if (op == kCombineOpName)
            buffer.agree_on_error(runtime::CallRecord{op, error_type, message, {}});
        if (error_type == "TypeError")
            throw pybind11::type_error(message);
        throw pybind11::value_error(message);
    });
    throw std::logic_error("internode_reject: the check did not raise");
}

/// A group barrier enqueued on `stream` (the op-opening exchange alone): all ranks must call it the same
/// number of times. Benchmarks line the ranks up with it.
void internode_barrier(runtime::Buffer& buffer, int64_t stream_handle) {
    buffer.raise_if_failed();
    launch_exchange(buffer, internode_peers(buffer, "barrier"), reinterpret_cast<cudaStream_t>(stream_handle),
                    InternodeCallSignature{InternodeCallSignature::kBarrier, 0, 0, 0, 0, -1});
}

#endif  // DEEP_EP_WITH_NVSHMEM

void register_internode_apis(pybind11::module_& m) {
    namespace py = pybind11;
    m.attr("internode_compiled") =
#ifdef DEEP_EP_WITH_NVSHMEM
        true;
    m.def("internode_dispatch", &internode_dispatch, py::arg("buffer"), py::arg("x"), py::arg("handle"),
          py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_rdma_rank"), py::arg("is_token_in_rank"),
          py::arg("num_tokens_per_expert"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("expert_alignment"),
          py::arg("num_worst_tokens"), py::arg("num_sms"), py::arg("previous_event"), py::arg("async_finish"),
          py::arg("allocate_on_comm_stream"));
    m.def("internode_barrier", &internode_barrier, py::arg("buffer"), py::arg("stream"));
    m.def("internode_reject", &internode_reject, py::arg("buffer"), py::arg("op"), py::arg("error_type"),
          py::arg("message"));
    m.def("internode_combine", &internode_combine, py::arg("buffer"), py::arg("x"), py::arg("handle"),
          py::arg("topk_weights"), py::arg("bias"), py::arg("num_sms"), py::arg("previous_event"),
          py::arg("async_finish"), py::arg("allocate_on_comm_stream"));
#else
        false;
    for (const char* name : {"internode_dispatch", "internode_combine", "internode_barrier", "internode_reject"})
        m.def(name, [](py::args, py::kwargs) {
            throw std::runtime_error("deep_ep was built without NVSHMEM: inter-node kernels are missing; install "
                                     "nvidia-nvshmem-cu13 or set NVSHMEM_DIR and rebuild");
        });
#endif
}

}  // namespace deep_ep::ops
