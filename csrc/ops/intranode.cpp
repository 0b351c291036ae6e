// Intra-node dispatch and combine: the Python layer (deep_ep/cuda_backend.py) has validated shapes,
// dtypes, devices and the buffer size; runtime::OpStreams orders each op between the caller's stream and
// the communication stream. Each op: fill Args, launch, return.
#include <torch/extension.h>

#include <chrono>
#include <optional>
#include <sstream>

#include "kernels/api.cuh"
#include "kernels/common/buffer_layout.cuh"
#include "ops/ops.hpp"
#include "runtime/buffer.hpp"
#include "runtime/errors.hpp"
#include "runtime/op_streams.hpp"

namespace deep_ep::ops {
namespace {

using OptionalTensor = std::optional<torch::Tensor>;

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

template <typename T>
T* data_or_null(const OptionalTensor& tensor) {
    return tensor.has_value() ? tensor->data_ptr<T>() : nullptr;
}

DispatchRowShape dispatch_row_shape(int64_t hidden_bytes, int64_t num_scales, int64_t num_topk, int64_t num_ranks) {
    return DispatchRowShape{static_cast<int>(hidden_bytes), static_cast<int>(num_scales), static_cast<int>(num_topk),
                            static_cast<int>(num_ranks)};
}

// The one CPU synchronisation of a non-cached dispatch: the notify kernel publishes the receive counts
// in host-mapped memory, tag last. Stage is already queued behind notify, so it runs while we wait.
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
std::optional<DispatchSources> direct_dispatch_sources(runtime::Buffer& buffer, const torch::Tensor& x,
                                                       const OptionalTensor& x_scales, const OptionalTensor& topk_idx,
                                                       const OptionalTensor& topk_weights, cudaStream_t stream) {
    auto ptr = [](const OptionalTensor& t) -> const void* { return t.has_value() ? t->data_ptr() : nullptr; };
    std::vector<std::array<const char*, kMaxNvlRanks>> peers;
    if (!buffer.gather_peer_tensors({x.data_ptr(), ptr(x_scales), ptr(topk_idx), ptr(topk_weights)}, stream, peers))
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

std::optional<CombineSources> direct_combine_sources(runtime::Buffer& buffer, const torch::Tensor& x,
                                                     const OptionalTensor& topk_weights, cudaStream_t stream) {
    std::vector<std::array<const char*, kMaxNvlRanks>> peers;
    if (!buffer.gather_peer_tensors({x.data_ptr(), topk_weights.has_value() ? topk_weights->data_ptr() : nullptr},
                                    stream, peers))
        return std::nullopt;
    CombineSources sources{};
    for (int r = 0; r < buffer.num_ranks(); ++r) {
        sources.x[r] = peers[0][r];
        sources.topk_weights[r] = peers[1][r];
    }
    sources.x_stride = x.size(1) * 2;
    sources.topk_weights_stride = topk_weights.has_value() ? topk_weights->size(1) * 4 : 0;
    return sources;
}

// Direct reads: peers read this rank's inputs until they pass this barrier, queued after the pull, so the
// caller's stream (which waits for ours) cannot overwrite or free them earlier.
void close_direct_op(runtime::Buffer& buffer, const NvlPeers& peers, cudaStream_t stream) {
    launch_intranode_barrier(IntranodeBarrierArgs{peers, next_barrier(buffer), stream});
}

}  // namespace

int64_t intranode_dispatch_buffer_bytes(int64_t hidden_bytes, int64_t num_scales, int64_t num_topk, int64_t num_ranks,
                                        int64_t num_tokens) {
    const layout::DispatchRowLayout rows(dispatch_row_shape(hidden_bytes, num_scales, num_topk, num_ranks));
    return layout::kControlBytes + rows.data_bytes(num_tokens);
}

int64_t intranode_combine_buffer_bytes(int64_t hidden, int64_t num_topk, int64_t num_rows) {
    const layout::CombineRowLayout rows(static_cast<int>(hidden), static_cast<int>(num_topk));
    return layout::kControlBytes + rows.data_bytes(num_rows);
}

/// Returns (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
/// rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, send_head).
/// Cached mode (cached_rank_prefix_matrix given): no notify, no CPU sync; the handle's tensors are
/// returned as they came (None for the ones the caller keeps) and num_recv_tokens_per_expert_list is empty.
pybind11::tuple intranode_dispatch(runtime::Buffer& buffer, const torch::Tensor& x, const OptionalTensor& x_scales,
                                   const OptionalTensor& topk_idx, const OptionalTensor& topk_weights,
                                   const torch::Tensor& is_token_in_rank, const OptionalTensor& num_tokens_per_rank,
                                   const OptionalTensor& num_tokens_per_expert, int64_t num_experts,
                                   const OptionalTensor& cached_rank_prefix_matrix, int64_t cached_num_recv_tokens,
                                   int64_t expert_alignment, int64_t num_worst_tokens, int64_t num_sms,
                                   bool conservative_loads, const runtime::StreamOptions& stream_options) {
    buffer.raise_if_failed();
    runtime::OpStreams streams(buffer.device(), stream_options);
    const cudaStream_t stream = streams.comm();
    const NvlPeers peers = nvl_peers(buffer);
    const int64_t num_ranks = peers.num_ranks, num_tokens = x.size(0);
    const int64_t hidden_bytes = x.size(1) * x.element_size();
    const int64_t num_scales = x_scales.has_value() ? x_scales->size(1) : 0;
    const int64_t num_topk = topk_idx.has_value() ? topk_idx->size(1) : 0;
    const DispatchRowShape shape = dispatch_row_shape(hidden_bytes, num_scales, num_topk, num_ranks);
    DEEP_EP_CHECK(intranode_dispatch_buffer_bytes(hidden_bytes, num_scales, num_topk, num_ranks, num_tokens) <=
                      buffer.num_nvl_bytes(),
                  "num_nvl_bytes is too small for this dispatch");
    const bool cached = cached_rank_prefix_matrix.has_value();
    const auto int_options = x.options().dtype(torch::kInt32);

    torch::Tensor rank_prefix_matrix;
    OptionalTensor channel_prefix_matrix, recv_channel_prefix_matrix, send_head;
    int num_recv_capacity = 0, notify_tag = 0;
    std::vector<int> num_recv_tokens_per_expert_list;
    if (!cached) {
        DEEP_EP_CHECK(num_tokens_per_rank.has_value() && num_tokens_per_expert.has_value(),
                      "a non-cached dispatch needs num_tokens_per_rank and num_tokens_per_expert");
        // Validation left the id range to the GPU (a host check would drain the stream first); the caller
        // raises what this flags once the op is queued, so peers are never left waiting.
        if (topk_idx.has_value())
            launch_check_expert_ids(CheckExpertIdsArgs{topk_idx->data_ptr(), topk_idx->scalar_type() == torch::kInt64,
                                                       topk_idx->numel(), static_cast<int>(num_experts),
                                                       buffer.invalid_expert_id_device(), stream});
        rank_prefix_matrix = torch::empty({num_ranks, num_ranks}, int_options);
        channel_prefix_matrix = torch::empty({num_ranks, 1}, int_options);
        recv_channel_prefix_matrix = torch::empty({num_ranks, 1}, int_options);
        send_head = torch::empty({num_tokens, num_ranks}, int_options);
        auto num_recv_tokens_per_expert = torch::empty({num_experts / num_ranks}, int_options);

        IntranodeNotifyArgs notify{};
        notify.peers = peers;
        notify.barrier = next_barrier(buffer);
        notify.num_tokens_per_rank = num_tokens_per_rank->data_ptr<int>();
        notify.num_tokens_per_expert = num_tokens_per_expert->data_ptr<int>();
        notify.num_experts = static_cast<int>(num_experts);
        notify.expert_alignment = static_cast<int>(expert_alignment);
        notify.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
        notify.num_recv_tokens_per_expert = num_recv_tokens_per_expert.data_ptr<int>();
        notify.send_counts = channel_prefix_matrix->data_ptr<int>();
        notify.recv_first_row = recv_channel_prefix_matrix->data_ptr<int>();
        // With num_worst_tokens nobody waits for the counts, and a late write could be mistaken for a
        // later dispatch's: only the waited-for notify touches the host-mapped counters.
        notify.mapped_counters = num_worst_tokens > 0 ? nullptr : buffer.mapped_counters_device();
        notify.mapped_tag = notify_tag = buffer.next_notify_tag();
        notify.stream = stream;
        launch_intranode_notify(notify);
    } else {
        rank_prefix_matrix = *cached_rank_prefix_matrix;
    }

    // Host-only (no GPU synchronisation): where every rank's inputs are, for direct reads.
    const std::optional<DispatchSources> direct = direct_dispatch_sources(buffer, x, x_scales, topk_idx, topk_weights, stream);

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
    stage.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    stage.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    stage.send_head = cached ? nullptr : send_head->data_ptr<int>();
    stage.stage_rows = !direct.has_value();
    stage.num_blocks = static_cast<int>(num_sms);
    stage.stream = stream;
    launch_intranode_dispatch_stage(stage);

    if (cached) {
        num_recv_capacity = static_cast<int>(cached_num_recv_tokens);
    } else if (num_worst_tokens > 0) {
        num_recv_capacity = static_cast<int>(num_worst_tokens);
    } else {
        auto [num_recv, per_expert] = wait_for_receive_counts(buffer, notify_tag, num_experts / num_ranks);
        num_recv_capacity = num_recv;
        num_recv_tokens_per_expert_list = std::move(per_expert);
    }

    // Outputs on the current stream (the caller chose it); the kernels below run on `stream`.
    auto recv_x = torch::empty({num_recv_capacity, x.size(1)}, x.options());
    OptionalTensor recv_x_scales, recv_topk_idx, recv_topk_weights;
    if (x_scales.has_value())
        recv_x_scales = torch::empty({num_recv_capacity, num_scales}, x_scales->options());
    if (topk_idx.has_value()) {
        recv_topk_idx = torch::empty({num_recv_capacity, num_topk}, topk_idx->options().dtype(torch::kInt64));
        recv_topk_weights = torch::empty({num_recv_capacity, num_topk}, topk_weights->options());
    }
    auto recv_src_idx = torch::empty({num_recv_capacity}, int_options);

    IntranodeDispatchPullArgs pull{};
    pull.peers = peers;
    pull.barrier = next_barrier(buffer);
    pull.shape = shape;
    pull.sources = direct.has_value() ? *direct : staged_dispatch_sources(peers, shape);
    pull.num_experts = static_cast<int>(num_experts);
    pull.rank_prefix_matrix = rank_prefix_matrix.data_ptr<int>();
    pull.num_recv_capacity = num_recv_capacity;
    pull.recv_x = recv_x.data_ptr();
    pull.recv_x_scales = data_or_null<float>(recv_x_scales);
    pull.recv_topk_idx = data_or_null<int64_t>(recv_topk_idx);
    pull.recv_topk_weights = data_or_null<float>(recv_topk_weights);
    pull.recv_src_idx = recv_src_idx.data_ptr<int>();
    pull.num_blocks = static_cast<int>(num_sms);
    pull.conservative_loads = conservative_loads;
    pull.stream = stream;
    launch_intranode_dispatch_pull(pull);
    if (direct.has_value())
        close_direct_op(buffer, peers, stream);
    streams.finish();

    auto to_object = [](const OptionalTensor& t) { return t.has_value() ? pybind11::cast(*t) : pybind11::none(); };
    return pybind11::make_tuple(recv_x, to_object(recv_x_scales), to_object(recv_topk_idx),
                                to_object(recv_topk_weights), num_recv_tokens_per_expert_list, rank_prefix_matrix,
                                to_object(channel_prefix_matrix), to_object(recv_channel_prefix_matrix), recv_src_idx,
                                to_object(send_head));
}

/// Returns (combined_x, combined_topk_weights or None). x row i is the i-th row this rank received in the
/// dispatch whose handle gave send_head.
pybind11::tuple intranode_combine(runtime::Buffer& buffer, const torch::Tensor& x, const OptionalTensor& topk_weights,
                                  const OptionalTensor& bias_0, const OptionalTensor& bias_1,
                                  const torch::Tensor& send_head, int64_t num_sms, bool conservative_loads,
                                  const runtime::StreamOptions& stream_options) {
    buffer.raise_if_failed();
    runtime::OpStreams streams(buffer.device(), stream_options);
    const cudaStream_t stream = streams.comm();
    const NvlPeers peers = nvl_peers(buffer);
    const int64_t num_rows = x.size(0), hidden = x.size(1), num_tokens = send_head.size(0);
    const int64_t num_topk = topk_weights.has_value() ? topk_weights->size(1) : 0;
    DEEP_EP_CHECK(intranode_combine_buffer_bytes(hidden, num_topk, num_rows) <= buffer.num_nvl_bytes(),
                  "num_nvl_bytes is too small for this combine");

    auto combined_x = torch::empty({num_tokens, hidden}, x.options());
    OptionalTensor combined_topk_weights;
    if (topk_weights.has_value())
        combined_topk_weights = torch::empty({num_tokens, num_topk}, topk_weights->options());

    const std::optional<CombineSources> direct = direct_combine_sources(buffer, x, topk_weights, stream);
    if (!direct.has_value()) {
        IntranodeCombineStageArgs stage{};
        stage.peers = peers;
        stage.barrier = next_barrier(buffer);
        stage.hidden = static_cast<int>(hidden);
        stage.num_topk = static_cast<int>(num_topk);
        stage.num_rows = static_cast<int>(num_rows);
        stage.x = x.data_ptr();
        stage.topk_weights = data_or_null<float>(topk_weights);
        stage.num_blocks = static_cast<int>(num_sms);
        stage.stream = stream;
        launch_intranode_combine_stage(stage);
    }

    IntranodeCombinePullArgs pull{};
    pull.peers = peers;
    pull.barrier = next_barrier(buffer);
    pull.hidden = static_cast<int>(hidden);
    pull.num_topk = static_cast<int>(num_topk);
    pull.num_tokens = static_cast<int>(num_tokens);
    pull.sources = direct.has_value() ? *direct : staged_combine_sources(peers, hidden, num_topk);
    pull.send_head = send_head.data_ptr<int>();
    pull.bias_0 = bias_0.has_value() ? bias_0->data_ptr() : nullptr;
    pull.bias_1 = bias_1.has_value() ? bias_1->data_ptr() : nullptr;
    pull.combined_x = combined_x.data_ptr();
    pull.combined_topk_weights = data_or_null<float>(combined_topk_weights);
    pull.num_blocks = static_cast<int>(num_sms);
    pull.conservative_loads = conservative_loads;
    pull.stream = stream;
    launch_intranode_combine_pull(pull);
    if (direct.has_value())
        close_direct_op(buffer, peers, stream);
    streams.finish();

    return pybind11::make_tuple(combined_x, combined_topk_weights.has_value() ? pybind11::cast(*combined_topk_weights)
                                                                                : pybind11::none());
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
    m.def("intranode_dispatch_buffer_bytes", &intranode_dispatch_buffer_bytes, py::arg("hidden_bytes"),
          py::arg("num_scales"), py::arg("num_topk"), py::arg("num_ranks"), py::arg("num_tokens"),
          "NVLink buffer bytes an intra-node dispatch of num_tokens rows needs on the sending rank.");
    m.def("intranode_combine_buffer_bytes", &intranode_combine_buffer_bytes, py::arg("hidden"), py::arg("num_topk"),
          py::arg("num_rows"), "NVLink buffer bytes an intra-node combine of num_rows input rows needs.");
    m.def("intranode_dispatch", &intranode_dispatch, py::arg("buffer"), py::arg("x"), py::arg("x_scales"),
          py::arg("topk_idx"), py::arg("topk_weights"), py::arg("is_token_in_rank"), py::arg("num_tokens_per_rank"),
          py::arg("num_tokens_per_expert"), py::arg("num_experts"), py::arg("cached_rank_prefix_matrix"),
          py::arg("cached_num_recv_tokens"), py::arg("expert_alignment"), py::arg("num_worst_tokens"),
          py::arg("num_sms"), py::arg("conservative_loads"), py::arg("streams"));
    m.def("intranode_combine", &intranode_combine, py::arg("buffer"), py::arg("x"), py::arg("topk_weights"),
          py::arg("bias_0"), py::arg("bias_1"), py::arg("send_head"), py::arg("num_sms"),
          py::arg("conservative_loads"), py::arg("streams"));
}

}  // namespace deep_ep::ops
