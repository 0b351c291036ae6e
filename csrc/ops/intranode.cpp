// Intra-node dispatch and combine, one binding call each: check every argument (a rejected call leaves the
// Buffer as it was), order the op after the caller's stream (runtime::OpStreams), fill Args, launch, return
// what the Python call returns.
#include <torch/extension.h>

#include <chrono>
#include <optional>
#include <sstream>

#include "kernels/api.cuh"
#include "kernels/common/buffer_layout.cuh"
#include "ops/arguments.hpp"
#include "ops/normal_outputs.hpp"
#include "ops/intranode_arguments.hpp"
#include "ops/ops.hpp"
#include "runtime/buffer.hpp"
#include "runtime/errors.hpp"
#include "runtime/op_streams.hpp"
#include "runtime/output_tensors.hpp"
#include "runtime/size_hints.hpp"

namespace deep_ep::ops {
namespace {

NvlPeers nvl_peers(const runtime::Buffer& buffer) {
    DEEP_EP_CHECK(buffer.is_connected(), "the Buffer is not connected to its peers");
    DEEP_EP_CHECK(buffer.num_nvl_bytes() > layout::kControlBytes, "num_nvl_bytes is too small for intra-node ops");
    NvlPeers peers{};
    for (int r = 0; r < kMaxNvlRanks; ++r)
        peers.buffers[r] = buffer.peer_buffers()[r];
    peers.rank = buffer.rank();
    peers.num_ranks = buffer.num_ranks();
    return peers;
}

NvlBarrier next_barrier(const runtime::Buffer& buffer) { return NvlBarrier{buffer.wait_context(), true}; }

DispatchRowShape dispatch_row_shape(int64_t hidden_bytes, int64_t num_scales, int64_t num_topk, int64_t num_ranks) {
    return DispatchRowShape{static_cast<int>(hidden_bytes), static_cast<int>(num_scales), static_cast<int>(num_topk),
                            static_cast<int>(num_ranks)};
}

}  // namespace

std::pair<int, std::vector<int>> wait_for_receive_counts(runtime::Buffer& buffer, int tag, int num_local_experts) {
    const volatile int* counters = buffer.mapped_counters_host();
    {
        pybind11::gil_scoped_release release;
        // Longer than the kernel's own timeout: the notify kernel may first wait behind earlier work.
        const auto limit = std::chrono::nanoseconds(2 * buffer.wait_context().timeout_ns) + std::chrono::seconds(10);
        const auto start = std::chrono::steady_clock::now();
        while (counters[0] != tag && !buffer.failed()) {
            if (std::chrono::steady_clock::now() - start > limit) {
                std::ostringstream message;
                message << "rank " << buffer.rank() << ": the dispatch count exchange did not finish in time "
                        << "(the notify kernel never ran, or a peer never launched it)";
                throw std::runtime_error(message.str());
            }
        }
    }
    buffer.raise_if_failed();
    std::vector<int> per_expert(num_local_experts);
    for (int e = 0; e < num_local_experts; ++e)
        per_expert[e] = counters[2 + e];
    return {counters[1], per_expert};
}

namespace {

// Rows in each rank's own staging area (stage copied them there).
DispatchSources staged_dispatch_sources(const NvlPeers& peers, const DispatchRowShape& shape) {
    const layout::DispatchRowLayout rows(shape);
    DispatchSources sources{};
    for (int r = 0; r < peers.num_ranks; ++r) {
        const char* first = rows.row(peers.buffers[r], 0);
        sources.x[r] = first + rows.x_offset;
        sources.scales[r] = first + rows.scales_offset;
        sources.topk_idx[r] = first + rows.topk_idx_offset;
        sources.topk_weights[r] = first + rows.topk_weights_offset;
    }
    sources.x_stride = sources.scales_stride = sources.topk_idx_stride = sources.topk_weights_stride = rows.stride;
    sources.topk_idx_is_int64 = false;  // staged as int32
    return sources;
}

// Rows in each rank's input tensors, or nullopt when the ranks could not all export them (then every
// rank stages: the decision is taken from the same exchanged records everywhere).
std::optional<DispatchSources> direct_dispatch_sources(runtime::Buffer& buffer, const runtime::CallRecord& call,
                                                       const torch::Tensor& x,
                                                       const OptionalTensor& x_scales, const OptionalTensor& topk_idx,
                                                       const OptionalTensor& topk_weights, cudaStream_t stream) {
    auto ptr = [](const OptionalTensor& t) -> const void* { return t.has_value() ? t->data_ptr() : nullptr; };
    std::vector<std::array<const char*, kMaxNvlRanks>> peers;
    if (!buffer.gather_peer_tensors(call, {x.data_ptr(), ptr(x_scales), ptr(topk_idx), ptr(topk_weights)}, stream,
                                    peers))
        return std::nullopt;
    DispatchSources sources{};
    for (int r = 0; r < buffer.num_ranks(); ++r) {
        sources.x[r] = peers[0][r];
        sources.scales[r] = peers[1][r];
        sources.topk_idx[r] = peers[2][r];
        sources.topk_weights[r] = peers[3][r];
    }
    sources.x_stride = x.size(1) * x.element_size();
    sources.scales_stride = x_scales.has_value() ? x_scales->size(1) * 4 : 0;
    sources.topk_idx_stride = topk_idx.has_value() ? topk_idx->size(1) * topk_idx->element_size() : 0;
    sources.topk_weights_stride = topk_weights.has_value() ? topk_weights->size(1) * 4 : 0;
    sources.topk_idx_is_int64 = topk_idx.has_value() && topk_idx->scalar_type() == torch::kInt64;
    return sources;
}

CombineSources staged_combine_sources(const NvlPeers& peers, int64_t hidden, int64_t num_topk) {
    const layout::CombineRowLayout rows(static_cast<int>(hidden), static_cast<int>(num_topk));
    CombineSources sources{};
    for (int r = 0; r < peers.num_ranks; ++r) {
        sources.x[r] = rows.row(peers.buffers[r], 0) + rows.x_offset;
        sources.topk_weights[r] = rows.row(peers.buffers[r], 0) + rows.topk_weights_offset;
    }
    sources.x_stride = sources.topk_weights_stride = rows.stride;
    return sources;
}

}  // namespace

std::optional<CombineSources> direct_combine_sources(runtime::Buffer& buffer, const runtime::CallRecord& call,
                                                     const torch::Tensor& x, const OptionalTensor& topk_weights,
                                                     cudaStream_t stream) {
    std::vector<std::array<const char*, kMaxNvlRanks>> peers;
    if (!buffer.gather_peer_tensors(call, {x.data_ptr(), topk_weights.has_value() ? topk_weights->data_ptr() : nullptr},
                                    stream, peers))
        return std::nullopt;
    CombineSources sources{};
    for (int r = 0; r < kMaxNvlRanks; ++r) {
        sources.x[r] = peers[0][r];
        sources.topk_weights[r] = peers[1][r];
    }
    sources.x_stride = x.size(1) * 2;
    sources.topk_weights_stride = topk_weights.has_value() ? topk_weights->size(1) * 4 : 0;
    return sources;
}

/// Returns (recv_x (a tensor, or the (fp8, scales) tuple as x came), recv_topk_idx, recv_topk_weights,
/// num_recv_tokens_per_expert_list, handle tensors (a 6-tuple), event), DeepEP V1's dispatch minus the
/// handle's NamedTuple type. A cached dispatch (handle given) returns (recv_x, None, None, None, None, event):
/// no notify and no CPU synchronisation. A fresh one waits once for the receive counts, unless
/// num_worst_tokens fixes the output size.
pybind11::tuple intranode_dispatch(runtime::Buffer& buffer, pybind11::handle x_arg, pybind11::handle handle_arg,
                                   pybind11::handle num_tokens_per_rank_arg, pybind11::handle num_tokens_per_rdma_rank_arg,
                                   pybind11::handle is_token_in_rank_arg, pybind11::handle num_tokens_per_expert_arg,
                                   pybind11::handle topk_idx_arg, pybind11::handle topk_weights_arg,
                                   pybind11::handle expert_alignment_arg, pybind11::handle num_worst_tokens_arg,
                                   int64_t num_sms, pybind11::handle previous_event, bool async_finish,
                                   bool allocate_on_comm_stream) {
    buffer.require_usable();
    const DispatchCall call = agreed_checks(buffer, dispatch_op_name(!handle_arg.is_none()), [&] {
        return checked_dispatch(buffer, x_arg, handle_arg, num_tokens_per_rank_arg, num_tokens_per_rdma_rank_arg,
                                is_token_in_rank_arg, num_tokens_per_expert_arg, topk_idx_arg, topk_weights_arg,
                                expert_alignment_arg, num_worst_tokens_arg, num_sms);
    });
    const torch::Tensor& x = call.x;
    const OptionalTensor& x_scales = call.x_scales;
    const OptionalTensor& topk_idx = call.topk_idx;
    const OptionalTensor& topk_weights = call.topk_weights;
    const bool cached = call.handle.has_value();

    runtime::OpStreams streams(buffer, {previous_event, async_finish, allocate_on_comm_stream});
    const cudaStream_t stream = streams.stream();
    const NvlPeers peers = nvl_peers(buffer);
    const int64_t num_ranks = peers.num_ranks, num_tokens = x.size(0);
    const int64_t hidden_bytes = x.size(1) * x.element_size();
    const int64_t num_scales = x_scales.has_value() ? x_scales->size(1) : 0;
    const int64_t num_topk = topk_idx.has_value() ? topk_idx->size(1) : 0;
    const int64_t num_experts = call.num_experts;
    const DispatchRowShape shape = dispatch_row_shape(hidden_bytes, num_scales, num_topk, num_ranks);

    // Host-only (no GPU synchronisation), before anything is launched: the ranks agree on the call (an error
    // on one rank is raised on all) and learn where every rank's inputs are, for direct reads.
    const std::optional<DispatchSources> direct =
        direct_dispatch_sources(buffer, call_record(call), x, x_scales, topk_idx, topk_weights, stream);

    torch::Tensor rank_prefix_matrix;
    OptionalTensor channel_prefix_matrix, recv_channel_prefix_matrix, send_head;
    int num_recv_capacity = 0, notify_tag = 0;
    std::vector<int> num_recv_tokens_per_expert_list;
    if (!cached) {
        // The id range is checked on the GPU (a host check would drain the stream first): by the notify for a
        // small batch, else by a kernel of its own first; what is flagged is raised once the op is queued, so
        // peers are never left waiting.
        const bool notify_checks_ids = topk_idx.has_value() && topk_idx->numel() <= kNotifyCheckedTopkEntries;
        if (topk_idx.has_value() && !notify_checks_ids)
            launch_check_expert_ids(CheckExpertIdsArgs{topk_idx->data_ptr(), topk_idx->scalar_type() == torch::kInt64,
                                                       topk_idx->numel(), static_cast<int>(num_experts),
                                                       buffer.invalid_expert_id_device(), stream});
        // The handle's int32 tensors and the per-expert counts share one allocation (runtime/output_tensors.hpp).
        const int64_t num_local_experts = num_experts / num_ranks;
        runtime::OutputTensors ints;
        const int rank_prefix_index = ints.add({num_ranks, num_ranks}, torch::kInt32);
        const int channel_prefix_index = ints.add({num_ranks, 1}, torch::kInt32);
        const int recv_channel_prefix_index = ints.add({num_ranks, 1}, torch::kInt32);
        const int send_head_index = ints.add({num_tokens, num_ranks}, torch::kInt32);
        const int per_expert_index = ints.add({num_local_experts, 1}, torch::kInt32);
        ints.allocate(x.device());
        rank_prefix_matrix = ints[rank_prefix_index];
        channel_prefix_matrix = ints[channel_prefix_index];
        recv_channel_prefix_matrix = ints[recv_channel_prefix_index];
        send_head = ints[send_head_index];
        const torch::Tensor num_recv_tokens_per_expert = ints[per_expert_index];

        IntranodeNotifyArgs notify{};
        notify.peers = peers;
        notify.barrier = next_barrier(buffer);
        notify.num_tokens_per_rank = call.num_tokens_per_rank->data_ptr<int>();
        notify.num_tokens_per_expert = call.num_tokens_per_expert->data_ptr<int>();
        notify.num_experts = static_cast<int>(num_experts);
        notify.expert_alignment = static_cast<int>(call.expert_alignment);
        notify.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
        notify.num_recv_tokens_per_expert = num_recv_tokens_per_expert.data_ptr<int>();
        notify.send_counts = channel_prefix_matrix->data_ptr<int>();
        notify.recv_first_row = recv_channel_prefix_matrix->data_ptr<int>();
        notify.num_worst_tokens = static_cast<int>(call.num_worst_tokens);
        notify.rejection = buffer.rejection_report_device();
        if (notify_checks_ids) {
            notify.topk_idx = topk_idx->data_ptr();
            notify.topk_idx_is_int64 = topk_idx->scalar_type() == torch::kInt64;
            notify.num_topk_entries = topk_idx->numel();
            notify.invalid = buffer.invalid_expert_id_device();
        }
        // With num_worst_tokens nobody waits for the counts, and a late write could be mistaken for a
        // later dispatch's: only the waited-for notify touches the host-mapped counters.
        notify.mapped_counters = call.num_worst_tokens > 0 ? nullptr : buffer.mapped_counters_device();
        notify.mapped_tag = notify_tag = buffer.next_notify_tag();
        notify.stream = stream;
        launch_intranode_notify(notify);
    } else {
        rank_prefix_matrix = call.handle->rank_prefix_matrix;
    }

    IntranodeDispatchStageArgs stage{};
    stage.peers = peers;
    // After notify the op is already open; a cached dispatch opens it here.
    stage.barrier = cached ? next_barrier(buffer) : NvlBarrier{buffer.wait_context(), false};
    stage.shape = shape;
    stage.num_tokens = static_cast<int>(num_tokens);
    stage.x = x.data_ptr();
    stage.x_scales = data_or_null<float>(x_scales);
    stage.topk_idx = topk_idx.has_value() ? topk_idx->data_ptr() : nullptr;
    stage.topk_idx_is_int64 = topk_idx.has_value() && topk_idx->scalar_type() == torch::kInt64;
    stage.topk_weights = data_or_null<float>(topk_weights);
    stage.is_token_in_rank = call.is_token_in_rank.data_ptr<bool>();
    stage.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    stage.send_head = cached ? nullptr : send_head->data_ptr<int>();
    stage.stage_rows = !direct.has_value();
    stage.num_blocks = call.num_sms;
    stage.stream = stream;
    launch_intranode_dispatch_stage(stage);

    if (cached) {
        num_recv_capacity = static_cast<int>(call.handle->recv_src_idx.size(0));
    } else if (call.num_worst_tokens > 0) {
        num_recv_capacity = static_cast<int>(call.num_worst_tokens);
    } else {
        auto [num_recv, per_expert] = wait_for_receive_counts(buffer, notify_tag, num_experts / num_ranks);
        num_recv_capacity = num_recv;
        num_recv_tokens_per_expert_list = std::move(per_expert);
    }

    // Outputs on the current stream (the caller's, or the comm stream with allocate_on_comm_stream).
    const DispatchOutputs out = DispatchOutputs::allocate(num_recv_capacity, x, x_scales, topk_idx);

    IntranodeDispatchPullArgs pull{};
    pull.peers = peers;
    pull.barrier = next_barrier(buffer);
    // Direct reads: peers read this rank's inputs until the pull's closing barrier, so the caller's stream
    // (which waits for ours) cannot overwrite or free them earlier.
    pull.barrier.closes = direct.has_value();
    pull.shape = shape;
    pull.sources = direct.has_value() ? *direct : staged_dispatch_sources(peers, shape);
    pull.num_experts = static_cast<int>(num_experts);
    pull.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    pull.num_recv_capacity = num_recv_capacity;
    pull.recv_x = out.recv_x.data_ptr();
    pull.recv_x_scales = data_or_null<float>(out.recv_x_scales);
    pull.recv_topk_idx = data_or_null<int64_t>(out.recv_topk_idx);
    pull.recv_topk_weights = data_or_null<float>(out.recv_topk_weights);
    pull.recv_src_idx = out.recv_src_idx.data_ptr<int>();
    pull.check_verdict = !cached;
    pull.num_blocks = call.num_sms;
    pull.conservative_loads = buffer.conservative_loads();
    pull.stream = stream;
    launch_intranode_dispatch_pull(pull);

    HandleTensors handle;
    if (!cached) {
        handle = HandleTensors{rank_prefix_matrix, *channel_prefix_matrix, *recv_channel_prefix_matrix,
                               out.recv_src_idx, call.is_token_in_rank, *send_head};
        stamp_handle(buffer, handle, buffer.next_dispatch_seq());
    }
    pybind11::object event;
    if (streams.needs_tensor_lists()) {
        std::vector<torch::Tensor> inputs{x, call.is_token_in_rank};
        for (const OptionalTensor& t : {x_scales, topk_idx, topk_weights, call.num_tokens_per_rank, call.num_tokens_per_expert})
            if (t.has_value())
                inputs.push_back(*t);
        std::vector<torch::Tensor> outputs = out.tensors();
        outputs.push_back(rank_prefix_matrix);
        for (const OptionalTensor& t : {channel_prefix_matrix, recv_channel_prefix_matrix, send_head})
            if (t.has_value())
                outputs.push_back(*t);
        event = streams.finish(std::move(inputs), outputs);
    } else {
        event = streams.finish();
    }
    raise_pending_errors(buffer, streams);
    return out.result(cached, num_recv_tokens_per_expert_list, cached ? pybind11::object(pybind11::none()) : handle.as_tuple(), event);
}

/// Returns (combined_x, combined_topk_weights or None, event). x row i is the i-th row this rank received
/// in the dispatch whose handle is given.
pybind11::tuple intranode_combine(runtime::Buffer& buffer, pybind11::handle x_arg, pybind11::handle handle_arg,
                                  pybind11::handle topk_weights_arg, pybind11::handle bias_arg, int64_t num_sms,
                                  pybind11::handle previous_event, bool async_finish, bool allocate_on_comm_stream) {
    buffer.require_usable();
    const CombineCall call = agreed_checks(buffer, kCombineOpName, [&] {
        return checked_combine(buffer, x_arg, handle_arg, topk_weights_arg, bias_arg, num_sms);
    });
    const torch::Tensor& x = call.x;
    const OptionalTensor& topk_weights = call.topk_weights;
    const torch::Tensor& send_head = call.handle.send_head;

    runtime::OpStreams streams(buffer, {previous_event, async_finish, allocate_on_comm_stream});
    const cudaStream_t stream = streams.stream();
    const NvlPeers peers = nvl_peers(buffer);
    const int64_t num_rows = x.size(0), hidden = x.size(1), num_tokens = send_head.size(0);
    const int64_t num_topk = topk_weights.has_value() ? topk_weights->size(1) : 0;

    // Host only, before anything is launched: the ranks agree on the call and learn where the inputs are.
    const std::optional<CombineSources> direct = direct_combine_sources(buffer, call_record(call), x, topk_weights, stream);
    const CombineOutputs out = CombineOutputs::allocate(num_tokens, x, topk_weights);

    if (!direct.has_value()) {
        IntranodeCombineStageArgs stage{};
        stage.peers = peers;
        stage.barrier = next_barrier(buffer);
        stage.hidden = static_cast<int>(hidden);
        stage.num_topk = static_cast<int>(num_topk);
        stage.num_rows = static_cast<int>(num_rows);
        stage.x = x.data_ptr();
        stage.topk_weights = data_or_null<float>(topk_weights);
        stage.num_blocks = call.num_sms;
        stage.stream = stream;
        launch_intranode_combine_stage(stage);
    }

    IntranodeCombinePullArgs pull{};
    pull.peers = peers;
    pull.barrier = next_barrier(buffer);
    pull.barrier.closes = direct.has_value();  // as in the dispatch
    pull.hidden = static_cast<int>(hidden);
    pull.num_topk = static_cast<int>(num_topk);
    pull.num_tokens = static_cast<int>(num_tokens);
    pull.sources = direct.has_value() ? *direct : staged_combine_sources(peers, hidden, num_topk);
    pull.send_head = send_head.data_ptr<int>();
    pull.bias_0 = call.bias_0.has_value() ? call.bias_0->data_ptr() : nullptr;
    pull.bias_1 = call.bias_1.has_value() ? call.bias_1->data_ptr() : nullptr;
    pull.combined_x = out.combined_x.data_ptr();
    pull.combined_topk_weights = data_or_null<float>(out.combined_topk_weights);
    pull.num_blocks = call.num_sms;
    pull.conservative_loads = buffer.conservative_loads();
    pull.stream = stream;
    launch_intranode_combine_pull(pull);

    pybind11::object event;
    if (streams.needs_tensor_lists()) {
        std::vector<torch::Tensor> inputs{x, send_head};
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

/// A group barrier enqueued on `stream` (nothing else): all ranks must call it the same number of times.
void intranode_barrier(runtime::Buffer& buffer, int64_t stream_handle) {
    buffer.raise_if_failed();
    launch_intranode_barrier(
        IntranodeBarrierArgs{nvl_peers(buffer), next_barrier(buffer), reinterpret_cast<cudaStream_t>(stream_handle)});
}

void register_intranode_apis(pybind11::module_& m) {
    namespace py = pybind11;
    m.def("intranode_barrier", &intranode_barrier, py::arg("buffer"), py::arg("stream"));
    m.def("intranode_dispatch", &intranode_dispatch, py::arg("buffer"), py::arg("x"), py::arg("handle"),
          py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_rdma_rank"), py::arg("is_token_in_rank"),
          py::arg("num_tokens_per_expert"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("expert_alignment"),
          py::arg("num_worst_tokens"), py::arg("num_sms"), py::arg("previous_event"), py::arg("async_finish"),
          py::arg("allocate_on_comm_stream"));
    m.def("intranode_combine", &intranode_combine, py::arg("buffer"), py::arg("x"), py::arg("handle"),
          py::arg("topk_weights"), py::arg("bias"), py::arg("num_sms"), py::arg("previous_event"),
          py::arg("async_finish"), py::arg("allocate_on_comm_stream"));
}

}  // namespace deep_ep::ops
