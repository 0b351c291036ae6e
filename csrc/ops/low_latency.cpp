// Low-latency dispatch/combine, one binding call each: check every argument, lay the symmetric buffer out
// for the call's shape, pick the buffer set, allocate outputs, fill one Args struct and launch on the
// caller's current stream. Nothing here synchronises the host with the GPU, so a sequence of these calls
// can be captured in a CUDA graph. With return_recv_hook the receive half is launched by the returned hook.
// The kernels need NVSHMEM; without it every entry point raises.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <pybind11/stl.h>

#include <optional>
#include <vector>

#include "kernels/api.cuh"
#include "ops/arguments.hpp"
#include "ops/ops.hpp"
#include "runtime/buffer.hpp"
#include "runtime/errors.hpp"
#include "runtime/event.hpp"
#include "runtime/nvshmem.hpp"
#include "runtime/output_tensors.hpp"
#include "runtime/size_hints.hpp"

namespace deep_ep::ops {
namespace {

using OptionalTensor = std::optional<torch::Tensor>;
using arguments::kAny;

#ifdef DEEP_EP_WITH_NVSHMEM

int64_t checked_hidden(int64_t hidden, const char* name) {
    if (low_latency_hidden_index(hidden) >= 0)
        return hidden;
    std::string list;
    for (const int supported : kLowLatencySupportedHidden)
        list += (list.empty() ? "" : ", ") + std::to_string(supported);
    arguments::raise_value_error(std::string(name) + ": hidden size " + std::to_string(hidden) +
                                 " is not supported in low-latency mode (supported: (" + list + "))");
}

/// Runs `check`; when it throws an argument error, first calls `take_part(message, is_type_error)`, so that
/// this rank still takes part in the round and no peer waits for it, then rethrows the error.
template <typename Check, typename TakePart>
auto checked_or_taking_part(Check&& check, TakePart&& take_part) -> decltype(check()) {
    try {
        return check();
    } catch (const pybind11::type_error& error) {
        take_part(error.what(), true);
        throw;
    } catch (const pybind11::value_error& error) {
        take_part(error.what(), false);
        throw;
    } catch (const std::invalid_argument& error) {
        take_part(error.what(), false);
        throw;
    }
}

int64_t checked_num_experts(pybind11::handle obj, int64_t num_ranks) {
    const int64_t num_experts = arguments::num_experts(obj, num_ranks);
    if (num_experts > kLowLatencyMaxExperts)
        arguments::raise_value_error("num_experts: low-latency mode supports up to " +
                                     std::to_string(kLowLatencyMaxExperts) + " experts, got " +
                                     std::to_string(num_experts));
    return num_experts;
}

LowLatencyLayout checked_layout(const runtime::SymmetricBuffer& symmetric, const char* name, int64_t num_max_tokens,
                                int64_t hidden, int64_t num_ranks, int64_t num_experts) {
    const LowLatencyLayout layout{num_max_tokens, hidden, num_ranks, num_experts};
    if (layout.total_bytes() > symmetric.num_bytes)
        arguments::raise_capacity_error(name,
                                        "low-latency mode with " + std::to_string(num_max_tokens) +
                                            " tokens per rank, hidden " + std::to_string(hidden) + ", " +
                                            std::to_string(num_experts) + " experts",
                                        layout.total_bytes(), symmetric.num_bytes, "num_rdma_bytes");
    return layout;
}


/// Zeroes every signal word of both sets for `layout`. Collective: the NVSHMEM barriers around it make
/// sure no rank is still sending into this buffer, and that none starts before every rank is clean.
void clean_signals(runtime::SymmetricBuffer& symmetric, const LowLatencyLayout& layout, cudaStream_t stream) {
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    runtime::nvshmem::barrier_all();
    for (int set = 0; set < 2; ++set)
        DEEP_EP_CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(symmetric.base) + layout.set_offset(set), 0,
                                           layout.signal_bytes(), stream));
    symmetric.combine_done_blocks.zero_();
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    runtime::nvshmem::barrier_all();
    symmetric.shape = {layout.num_max_tokens, layout.hidden, layout.num_experts};
    symmetric.has_shape = true;
}

/// Signal words sit at shape-dependent offsets: the first call of a new shape starts from a clean buffer.
void use_layout(runtime::SymmetricBuffer& symmetric, const LowLatencyLayout& layout, cudaStream_t stream) {
    const std::array<int64_t, 3> shape{layout.num_max_tokens, layout.hidden, layout.num_experts};
    if (symmetric.has_shape && symmetric.shape == shape)
        return;
    if (!symmetric.has_shape) {  // the buffer is still as allocated: zeroed
        symmetric.shape = shape;
        symmetric.has_shape = true;
        return;
    }
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    DEEP_EP_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone)
        throw std::runtime_error(
            "low-latency shape changed during CUDA graph capture: call clean_low_latency_buffer first");
    clean_signals(symmetric, layout, stream);
}

/// What dispatch and combine Args share: where the buffers are, which set and half to run, how to wait.
template <typename Args>
void fill_common(Args& args, const runtime::Buffer& buffer, const runtime::SymmetricBuffer& symmetric,
                 const LowLatencyLayout& layout, int buffer_set, cudaStream_t stream) {
    args.layout = layout;
    args.buffer_set = buffer_set;
    args.symmetric = LowLatencySymmetricArgs{symmetric.base,
                                             reinterpret_cast<const uint64_t*>(symmetric.mapped_bases.data_ptr<int64_t>()),
                                             symmetric.all_ranks_mapped};
    args.wait = buffer.wait_context();
    args.rank = buffer.rank();
    args.num_blocks = symmetric.num_blocks;
    args.conservative_loads = buffer.conservative_loads();
    args.stream = stream;
}

cudaStream_t current_stream(const runtime::Buffer& buffer) {
    return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(buffer.device())).stream();
}

/// What an op raises once its kernels are queued. A dispatch (or its hook) raises only a timeout: the
/// errors its receive reports for the whole round (a flagged expert id, a rank that rejected the dispatch)
/// wait for the round's combine, so that no rank raises before its combine while its peers' combines wait
/// for its experts' rows.
void raise_after(runtime::Buffer& buffer, const LowLatencyDispatchArgs&) { buffer.raise_if_failed(); }
void raise_after(runtime::Buffer& buffer, const LowLatencyCombineArgs&) { buffer.raise_pending_errors(); }

/// The receive half of a dispatch or combine sent with return_recv_hook: calling it launches the receiving
/// kernel on the then-current stream, and then raises what the op itself would have (raise_after). Holds
/// the op's tensors until it is dropped.
template <typename Args>
class ReceiveHook {
  public:
    ReceiveHook(pybind11::object buffer, const Args& args, std::vector<torch::Tensor> keep_alive)
        : buffer_(std::move(buffer)), args_(args), keep_alive_(std::move(keep_alive)) {}

    void operator()() {
        auto& buffer = buffer_.cast<runtime::Buffer&>();
        buffer.require_usable();
        Args args = args_;
        args.do_send = false;
        args.do_recv = true;
        args.stream = current_stream(buffer);
        launch(args);
        raise_after(buffer, args);
    }

  private:
    static void launch(const LowLatencyDispatchArgs& args) { launch_low_latency_dispatch(args); }
    static void launch(const LowLatencyCombineArgs& args) { launch_low_latency_combine(args); }

    pybind11::object buffer_;
    Args args_;
    std::vector<torch::Tensor> keep_alive_;
};

/// After the launch: an event (async_finish) or None, the hook or None, and the Buffer's pending errors
/// raised now unless a hook will raise them after the receive half.
template <typename Args>
std::pair<pybind11::object, pybind11::object> finish(runtime::Buffer& buffer, const Args& args, bool async_finish,
                                                     bool return_recv_hook, std::vector<torch::Tensor> keep_alive) {
    pybind11::object event = pybind11::none(), hook = pybind11::none();
    if (async_finish)
        event = pybind11::cast(runtime::EventHandle(args.stream, buffer.device(), keep_alive));
    if (return_recv_hook)
        hook = pybind11::cast(ReceiveHook<Args>(pybind11::cast(&buffer, pybind11::return_value_policy::reference), args,
                                                std::move(keep_alive)));
    else
        raise_after(buffer, args);
    return {event, hook};
}

/// A low-latency dispatch whose arguments passed every check.
struct LowLatencyDispatchCall {
    torch::Tensor x, topk_idx;
    OptionalTensor cumulative_stats, wait_cost_stats;
    LowLatencyLayout layout;
};

LowLatencyDispatchCall checked_low_latency_dispatch(runtime::Buffer& buffer, runtime::SymmetricBuffer& symmetric,
                                                    pybind11::handle x_arg, pybind11::handle topk_idx_arg,
                                                    pybind11::handle num_max_tokens_arg,
                                                    pybind11::handle num_experts_arg,
                                                    pybind11::handle cumulative_stats_arg,
                                                    pybind11::handle wait_cost_stats_arg, bool use_fp8,
                                                    bool round_scale, bool use_ue8m0) {
    const int device = buffer.device();
    const int64_t num_ranks = buffer.num_ranks();
    const int64_t m = arguments::integer(num_max_tokens_arg, "num_max_dispatch_tokens_per_rank", 1);
    const int64_t num_experts = checked_num_experts(num_experts_arg, num_ranks);
    LowLatencyDispatchCall call;
    call.x = arguments::tensor(x_arg, "x", {{c10::ScalarType::BFloat16}, {}, 2}, device);
    const int64_t num_tokens = call.x.size(0), hidden = checked_hidden(call.x.size(1), "x");
    if (num_tokens > m)
        arguments::raise_value_error("x: " + std::to_string(num_tokens) +
                                     " tokens exceed num_max_dispatch_tokens_per_rank=" + std::to_string(m));
    if (m > kLowLatencyMaxTokensPerRank)
        arguments::raise_value_error("num_max_dispatch_tokens_per_rank: at most " +
                                     std::to_string(kLowLatencyMaxTokensPerRank) + ", got " + std::to_string(m));
    call.topk_idx = arguments::topk_idx(topk_idx_arg, num_tokens, runtime::size_hints::kLowLatencyMaxNumTopk, device);
    if (buffer.host_expert_id_check())
        arguments::check_expert_ids_on_host(call.topk_idx, num_experts);
    call.cumulative_stats = arguments::optional_tensor(cumulative_stats_arg, "cumulative_local_expert_recv_stats",
                                                       {{c10::ScalarType::Int}, {num_experts / num_ranks}}, device);
    call.wait_cost_stats = arguments::optional_tensor(
        wait_cost_stats_arg, "dispatch_wait_recv_cost_stats", {{c10::ScalarType::Long}, {num_ranks}}, device);
    if (use_ue8m0 && !(use_fp8 && round_scale))
        arguments::raise_value_error("use_ue8m0: requires use_fp8=True and round_scale=True");
    call.layout = checked_layout(symmetric, "x", m, hidden, num_ranks, num_experts);
    return call;
}

/// The layout a rank whose dispatch checks failed takes part in: the Buffer's current one, else (its first
/// low-latency op) the call's own sizes if they are valid; none if neither is known.
std::optional<LowLatencyLayout> rejection_layout(const runtime::Buffer& buffer,
                                                 const runtime::SymmetricBuffer& symmetric, pybind11::handle x_arg,
                                                 pybind11::handle num_max_tokens_arg,
                                                 pybind11::handle num_experts_arg) {
    const int64_t num_ranks = buffer.num_ranks();
    if (symmetric.has_shape)
        return LowLatencyLayout{symmetric.shape[0], symmetric.shape[1], num_ranks, symmetric.shape[2]};
    try {
        const int64_t m = arguments::integer(num_max_tokens_arg, "num_max_dispatch_tokens_per_rank", 1);
        const int64_t num_experts = checked_num_experts(num_experts_arg, num_ranks);
        if (!THPVariable_Check(x_arg.ptr()) || m > kLowLatencyMaxTokensPerRank)
            return std::nullopt;
        const torch::Tensor x = THPVariable_Unpack(x_arg.ptr());
        if (x.dim() != 2)
            return std::nullopt;
        return checked_layout(symmetric, "x", m, checked_hidden(x.size(1), "x"), num_ranks, num_experts);
    } catch (const std::exception&) {
        return std::nullopt;
    }
}

/// A combine that returns NaN rows for every row this rank's experts received (per the dispatch's src_info
/// and layout_range), taking the next set: the send region it sends from, zero copy, is set to 0xff first.
/// Sends and receives in one launch; the caller fills the receive side (topk_idx, out) and launches it.
LowLatencyCombineArgs nan_rows_combine(const runtime::Buffer& buffer, runtime::SymmetricBuffer& symmetric,
                                       const LowLatencyLayout& layout, const torch::Tensor& src_info,
                                       const torch::Tensor& layout_range, cudaStream_t stream) {
    LowLatencyCombineArgs combine{};
    fill_common(combine, buffer, symmetric, layout, symmetric.take_set(), stream);
    // All bytes 0xff: BF16 NaN in every staged row, sent as they are (zero copy).
    DEEP_EP_CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(symmetric.base) + layout.send_region(combine.buffer_set), 0xff,
                                       layout.num_experts * layout.num_max_tokens * layout.combine_row_bytes(), stream));
    combine.do_send = combine.do_recv = true;
    combine.zero_copy = true;
    combine.src_info = src_info.data_ptr<int>();
    combine.layout_range = layout_range.data_ptr<int64_t>();
    combine.done_blocks = symmetric.combine_done_blocks.data_ptr<int>();
    return combine;
}

/// A rank whose dispatch checks failed still takes part in the round, so that no peer waits for it: a
/// dispatch with no tokens that carries `code` to every rank (each records the lowest rejecting rank) and
/// drains what the peers sent it, then a combine that returns NaN rows for every row its experts got.
void take_part_rejected(runtime::Buffer& buffer, runtime::SymmetricBuffer& symmetric, const LowLatencyLayout& layout,
                        int code) {
    const cudaStream_t stream = current_stream(buffer);
    use_layout(symmetric, layout, stream);
    const int64_t num_ranks = layout.num_ranks, num_local_experts = layout.num_local_experts();
    runtime::OutputTensors drained;
    const int count_index = drained.add({num_local_experts}, torch::kInt32);
    const int src_info_index = drained.add({num_local_experts, num_ranks * layout.num_max_tokens}, torch::kInt32);
    const int layout_range_index = drained.add({num_local_experts, num_ranks}, torch::kInt64);
    drained.allocate(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(buffer.device())));
    const torch::Tensor src_info = drained[src_info_index], layout_range = drained[layout_range_index];

    LowLatencyDispatchArgs dispatch{};
    fill_common(dispatch, buffer, symmetric, layout, symmetric.take_set(), stream);
    dispatch.do_send = dispatch.do_recv = true;
    dispatch.num_topk = 1;
    dispatch.rejected_code = code;
    dispatch.recv_count = drained[count_index].data_ptr<int>();
    dispatch.recv_src_info = src_info.data_ptr<int>();
    dispatch.recv_layout_range = layout_range.data_ptr<int64_t>();
    launch_low_latency_dispatch(dispatch);

    LowLatencyCombineArgs combine = nan_rows_combine(buffer, symmetric, layout, src_info, layout_range, stream);
    combine.num_topk = 1;
    launch_low_latency_combine(combine);
}

/// Returns (recv_x, or (recv_x, recv_scales) with use_fp8; recv_count; the handle as a 5-tuple; event or
/// None; hook or None). Scales are column-major [L, R*M, H/128] float32, or int32 [L, R*M, H/512] with ue8m0.
/// A rank whose checks fail takes part in the round anyway (take_part_rejected) and raises its error; its
/// peers raise the rejection at their combine of the round.
pybind11::tuple low_latency_dispatch(runtime::Buffer& buffer, pybind11::handle x_arg, pybind11::handle topk_idx_arg,
                                     pybind11::handle num_max_tokens_arg, pybind11::handle num_experts_arg,
                                     pybind11::handle cumulative_stats_arg, pybind11::handle wait_cost_stats_arg,
                                     bool use_fp8, bool round_scale, bool use_ue8m0, bool async_finish,
                                     bool return_recv_hook) {
    buffer.require_usable();
    runtime::SymmetricBuffer& symmetric = buffer.symmetric("low_latency_dispatch");
    const LowLatencyDispatchCall call = checked_or_taking_part(
        [&] {
            return checked_low_latency_dispatch(buffer, symmetric, x_arg, topk_idx_arg, num_max_tokens_arg,
                                                num_experts_arg, cumulative_stats_arg, wait_cost_stats_arg, use_fp8,
                                                round_scale, use_ue8m0);
        },
        [&](const char* message, bool type_error) {
            const std::optional<LowLatencyLayout> layout =
                rejection_layout(buffer, symmetric, x_arg, num_max_tokens_arg, num_experts_arg);
            if (layout.has_value())
                take_part_rejected(buffer, symmetric, *layout,
                                   runtime::Buffer::rejection_code(message, type_error,
                                                                   runtime::Buffer::RejectedOp::kLowLatencyDispatch));
        });
    const torch::Tensor& x = call.x;
    const torch::Tensor& topk_idx = call.topk_idx;
    const OptionalTensor& cumulative_stats = call.cumulative_stats;
    const OptionalTensor& wait_cost_stats = call.wait_cost_stats;
    const LowLatencyLayout& layout = call.layout;
    const int64_t num_ranks = layout.num_ranks, m = layout.num_max_tokens, hidden = layout.hidden;
    const int64_t num_experts = layout.num_experts, num_tokens = x.size(0);

    const cudaStream_t stream = current_stream(buffer);
    use_layout(symmetric, layout, stream);
    const int64_t num_local_experts = layout.num_local_experts(), rows = num_ranks * m;
    const int64_t num_groups = hidden / kFp8GroupSize;
    // One allocation for the five outputs (runtime/output_tensors.hpp); the handle keeps it alive until the
    // combine, as it keeps recv_src_info and recv_layout_range.
    runtime::OutputTensors outputs;
    const int recv_x_index = outputs.add({num_local_experts, rows, hidden}, use_fp8 ? torch::kFloat8_e4m3fn : torch::kBFloat16);
    // Scales are column-major: [L, rows, groups] with the rows of each group contiguous. UE8M0 packs four
    // groups' exponents in one int32.
    const int64_t num_scale_columns = use_ue8m0 ? (num_groups + 3) / 4 : num_groups;
    const int recv_scales_index =
        use_fp8 ? outputs.add({num_local_experts, rows, num_scale_columns}, use_ue8m0 ? torch::kInt32 : torch::kFloat32,
                              {num_scale_columns * rows, 1, rows})
                : -1;
    const int recv_count_index = outputs.add({num_local_experts}, torch::kInt32);
    const int recv_src_info_index = outputs.add({num_local_experts, rows}, torch::kInt32);
    const int recv_layout_range_index = outputs.add({num_local_experts, num_ranks}, torch::kInt64);
    outputs.allocate(x.device());
    const torch::Tensor recv_x = outputs[recv_x_index];
    const torch::Tensor recv_scales = use_fp8 ? outputs[recv_scales_index] : torch::Tensor();
    const torch::Tensor recv_count = outputs[recv_count_index];
    const torch::Tensor recv_src_info = outputs[recv_src_info_index];
    const torch::Tensor recv_layout_range = outputs[recv_layout_range_index];

    LowLatencyDispatchArgs args{};
    fill_common(args, buffer, symmetric, layout, symmetric.take_set(), stream);
    args.do_send = true;
    args.do_recv = !return_recv_hook;
    args.invalid = buffer.invalid_expert_id_device();
    args.rejection = buffer.rejection_report_device();
    args.x = x.data_ptr();
    args.topk_idx = topk_idx.data_ptr();
    args.topk_idx_is_int64 = topk_idx.scalar_type() == torch::kInt64;
    args.num_tokens = static_cast<int>(num_tokens);
    args.num_topk = static_cast<int>(topk_idx.size(1));
    args.use_fp8 = use_fp8;
    args.round_scale = use_fp8 && round_scale;
    args.use_ue8m0 = use_ue8m0;
    args.recv_x = recv_x.data_ptr();
    args.recv_scales = use_fp8 ? recv_scales.data_ptr() : nullptr;
    args.recv_count = recv_count.data_ptr<int>();
    args.recv_src_info = recv_src_info.data_ptr<int>();
    args.recv_layout_range = recv_layout_range.data_ptr<int64_t>();
    args.cumulative_local_expert_recv_stats = cumulative_stats.has_value() ? cumulative_stats->data_ptr<int>() : nullptr;
    args.dispatch_wait_recv_cost_stats = wait_cost_stats.has_value() ? wait_cost_stats->data_ptr<int64_t>() : nullptr;
    args.signature = LowLatencySignature::of(use_fp8, hidden, m, num_experts);
    launch_low_latency_dispatch(args);

    std::vector<torch::Tensor> keep_alive{x, topk_idx, recv_x, recv_count, recv_src_info, recv_layout_range};
    if (recv_scales.defined())
        keep_alive.push_back(recv_scales);
    for (const OptionalTensor& t : {cumulative_stats, wait_cost_stats})
        if (t.has_value())
            keep_alive.push_back(*t);
    auto [event, hook] = finish(buffer, args, async_finish, return_recv_hook, std::move(keep_alive));
    const pybind11::object recv =
        use_fp8 ? pybind11::object(pybind11::make_tuple(recv_x, recv_scales)) : pybind11::cast(recv_x);
    const pybind11::tuple handle = pybind11::make_tuple(recv_src_info, recv_layout_range, m, hidden, num_experts);
    return pybind11::make_tuple(recv, recv_count, handle, event, hook);
}

/// A low-latency handle (deep_ep/handles.py LowLatencyHandle), checked, with its layout.
struct LowLatencyHandleTensors {
    torch::Tensor src_info, layout_range;
    int64_t num_max_tokens, hidden, num_experts;
};

LowLatencyHandleTensors checked_handle(pybind11::handle handle, int64_t num_ranks, int device) {
    const arguments::HandleItems item(handle, "low_latency_dispatch");
    if (item.size() != 5)
        arguments::raise_value_error("handle: expected the 5-element low-latency handle, got " +
                                     std::to_string(item.size()) + " elements");
    LowLatencyHandleTensors h;
    h.num_max_tokens = arguments::integer(item(2), "handle.num_max_dispatch_tokens_per_rank", 1);
    h.hidden = arguments::integer(item(3), "handle.hidden", 1);
    h.num_experts = checked_num_experts(item(4), num_ranks);
    const int64_t num_local_experts = h.num_experts / num_ranks;
    h.src_info = arguments::tensor(item(0), "handle.packed_recv_src_info",
                                   {{c10::ScalarType::Int}, {num_local_experts, num_ranks * h.num_max_tokens}}, device);
    h.layout_range = arguments::tensor(item(1), "handle.packed_recv_layout_range",
                                       {{c10::ScalarType::Long}, {num_local_experts, num_ranks}}, device);
    return h;
}

/// A low-latency combine whose arguments passed every check.
struct LowLatencyCombineCall {
    LowLatencyHandleTensors handle;
    torch::Tensor x, topk_idx, topk_weights;
    OptionalTensor out, wait_cost_stats;
    LowLatencyLayout layout;
};

/// What a rank whose combine checks fail needs to take part anyway, each set once it passed its check.
struct CombineParticipation {
    std::optional<LowLatencyHandleTensors> handle;
    std::optional<torch::Tensor> topk_idx;
};

LowLatencyCombineCall checked_low_latency_combine(runtime::Buffer& buffer, runtime::SymmetricBuffer& symmetric,
                                                  pybind11::handle x_arg, pybind11::handle topk_idx_arg,
                                                  pybind11::handle topk_weights_arg, pybind11::handle handle_arg,
                                                  pybind11::handle out_arg, pybind11::handle wait_cost_stats_arg,
                                                  CombineParticipation& participation) {
    const int device = buffer.device();
    const int64_t num_ranks = buffer.num_ranks();
    LowLatencyCombineCall call;
    call.handle = checked_handle(handle_arg, num_ranks, device);
    participation.handle = call.handle;
    const int64_t m = call.handle.num_max_tokens, hidden = call.handle.hidden, num_experts = call.handle.num_experts;
    // topk_idx before the rest: with it and the handle a rank can take part whatever else is wrong.
    call.topk_idx = arguments::topk_idx(topk_idx_arg, kAny, runtime::size_hints::kLowLatencyMaxNumTopk, device);
    if (buffer.host_expert_id_check())
        arguments::check_expert_ids_on_host(call.topk_idx, num_experts);
    const int64_t num_tokens = call.topk_idx.size(0), num_topk = call.topk_idx.size(1);
    if (num_tokens > m)
        arguments::raise_value_error("topk_idx: " + std::to_string(num_tokens) +
                                     " tokens exceed num_max_dispatch_tokens_per_rank=" + std::to_string(m));
    participation.topk_idx = call.topk_idx;
    call.x = arguments::tensor(x_arg, "x", {{c10::ScalarType::BFloat16}, {num_experts / num_ranks, num_ranks * m, hidden}},
                               device);
    call.topk_weights =
        arguments::tensor(topk_weights_arg, "topk_weights", {{c10::ScalarType::Float}, {num_tokens, num_topk}}, device);
    call.out = arguments::optional_tensor(out_arg, "out", {{c10::ScalarType::BFloat16}, {num_tokens, hidden}}, device);
    call.wait_cost_stats = arguments::optional_tensor(
        wait_cost_stats_arg, "combine_wait_recv_cost_stats", {{c10::ScalarType::Long}, {num_ranks}}, device);
    call.layout = checked_layout(symmetric, "x", m, hidden, num_ranks, num_experts);
    return call;
}

/// A rank whose combine checks failed still takes part, so that no peer waits for it, when its handle and
/// topk_idx passed theirs and the handle's layout is the Buffer's current one: it sends NaN rows for every
/// row its experts received (each (expert, receiver) range's first one carrying `code`) and waits for its
/// own tokens' rows, which leaves every counter clean for the next op on this set.
void take_part_in_combine_rejected(runtime::Buffer& buffer, runtime::SymmetricBuffer& symmetric,
                                   const CombineParticipation& participation, int code) {
    if (!participation.handle.has_value() || !participation.topk_idx.has_value() || !symmetric.has_shape)
        return;
    const LowLatencyHandleTensors& handle = *participation.handle;
    const std::array<int64_t, 3> shape{handle.num_max_tokens, handle.hidden, handle.num_experts};
    if (shape != symmetric.shape)  // another layout's words: taking part would need a collective clean
        return;
    const LowLatencyLayout layout{handle.num_max_tokens, handle.hidden, buffer.num_ranks(), handle.num_experts};
    if (layout.total_bytes() > symmetric.num_bytes)
        return;
    const torch::Tensor& topk_idx = *participation.topk_idx;
    const cudaStream_t stream = current_stream(buffer);
    // The combined rows of this rank's tokens: NaN, and discarded (the call raises).
    const torch::Tensor scratch =
        torch::empty({topk_idx.size(0), layout.hidden}, topk_idx.options().dtype(torch::kBFloat16));
    LowLatencyCombineArgs args =
        nan_rows_combine(buffer, symmetric, layout, handle.src_info, handle.layout_range, stream);
    args.topk_idx = topk_idx.data_ptr();
    args.topk_idx_is_int64 = topk_idx.scalar_type() == torch::kInt64;
    args.num_tokens = static_cast<int>(topk_idx.size(0));
    args.num_topk = static_cast<int>(topk_idx.size(1));
    args.out = scratch.data_ptr();
    args.rejected_code = code;
    launch_low_latency_combine(args);
}

/// Returns (combined_x (`out` when given), event or None, hook or None). A rank whose checks fail takes part
/// in the round where it can (take_part_in_combine_rejected) and raises its error; the peers that received
/// its rows raise naming it at this combine (or its hook, or check()), or at their next call.
pybind11::tuple low_latency_combine(runtime::Buffer& buffer, pybind11::handle x_arg, pybind11::handle topk_idx_arg,
                                    pybind11::handle topk_weights_arg, pybind11::handle handle_arg, bool zero_copy,
                                    bool async_finish, bool return_recv_hook, pybind11::handle out_arg,
                                    pybind11::handle wait_cost_stats_arg) {
    buffer.require_usable();
    runtime::SymmetricBuffer& symmetric = buffer.symmetric("low_latency_combine");
    CombineParticipation participation;
    const LowLatencyCombineCall call = checked_or_taking_part(
        [&] {
            return checked_low_latency_combine(buffer, symmetric, x_arg, topk_idx_arg, topk_weights_arg, handle_arg,
                                               out_arg, wait_cost_stats_arg, participation);
        },
        [&](const char* message, bool type_error) {
            take_part_in_combine_rejected(
                buffer, symmetric, participation,
                runtime::Buffer::rejection_code(message, type_error, runtime::Buffer::RejectedOp::kLowLatencyCombine));
        });
    const LowLatencyHandleTensors& handle = call.handle;
    const LowLatencyLayout& layout = call.layout;
    const torch::Tensor &x = call.x, &topk_idx = call.topk_idx, &topk_weights = call.topk_weights;
    const OptionalTensor &out = call.out, &wait_cost_stats = call.wait_cost_stats;
    const int64_t num_tokens = topk_idx.size(0), num_topk = topk_idx.size(1);

    const cudaStream_t stream = current_stream(buffer);
    use_layout(symmetric, layout, stream);
    const torch::Tensor combined = out.has_value() ? *out : torch::empty({num_tokens, layout.hidden}, x.options());

    LowLatencyCombineArgs args{};
    fill_common(args, buffer, symmetric, layout, symmetric.take_set(), stream);
    args.do_send = true;
    args.do_recv = !return_recv_hook;
    args.x = x.data_ptr();
    args.zero_copy = zero_copy;
    args.src_info = handle.src_info.data_ptr<int>();
    args.layout_range = handle.layout_range.data_ptr<int64_t>();
    args.topk_idx = topk_idx.data_ptr();
    args.topk_idx_is_int64 = topk_idx.scalar_type() == torch::kInt64;
    args.topk_weights = topk_weights.data_ptr<float>();
    args.num_tokens = static_cast<int>(num_tokens);
    args.num_topk = static_cast<int>(num_topk);
    args.out = combined.data_ptr();
    args.done_blocks = symmetric.combine_done_blocks.data_ptr<int>();
    args.combine_wait_recv_cost_stats = wait_cost_stats.has_value() ? wait_cost_stats->data_ptr<int64_t>() : nullptr;
    args.rejection = buffer.rejection_report_device();
    launch_low_latency_combine(args);

    std::vector<torch::Tensor> keep_alive{x, topk_idx, topk_weights, handle.src_info, handle.layout_range, combined};
    if (wait_cost_stats.has_value())
        keep_alive.push_back(*wait_cost_stats);
    auto [event, hook] = finish(buffer, args, async_finish, return_recv_hook, std::move(keep_alive));
    return pybind11::make_tuple(combined, event, hook);
}

/// The combine send rows of the set the next operation uses, as a [L, R*M, H] bf16 tensor (no copy): what
/// low_latency_combine(..., zero_copy=True) reads when it is that next operation.
torch::Tensor get_next_low_latency_combine_buffer(runtime::Buffer& buffer, pybind11::handle handle_arg) {
    buffer.require_usable();
    runtime::SymmetricBuffer& symmetric = buffer.symmetric("get_next_low_latency_combine_buffer");
    const LowLatencyHandleTensors handle = checked_handle(handle_arg, buffer.num_ranks(), buffer.device());
    const LowLatencyLayout layout =
        checked_layout(symmetric, "handle", handle.num_max_tokens, handle.hidden, buffer.num_ranks(), handle.num_experts);
    use_layout(symmetric, layout, current_stream(buffer));
    void* ptr = static_cast<char*>(symmetric.base) + layout.send_region(symmetric.next_set);
    return torch::from_blob(ptr, {layout.num_local_experts(), layout.num_ranks * layout.num_max_tokens, layout.hidden},
                            torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA, buffer.device()));
}

/// Zeroes every signal word of both sets for this shape (collective: every rank calls it).
void clean_low_latency_buffer(runtime::Buffer& buffer, pybind11::handle num_max_tokens_arg, pybind11::handle hidden_arg,
                              pybind11::handle num_experts_arg) {
    buffer.require_usable();
    runtime::SymmetricBuffer& symmetric = buffer.symmetric("clean_low_latency_buffer");
    const int64_t m = arguments::integer(num_max_tokens_arg, "num_max_dispatch_tokens_per_rank", 1);
    const int64_t hidden = checked_hidden(arguments::integer(hidden_arg, "hidden", 1), "hidden");
    const int64_t num_experts = checked_num_experts(num_experts_arg, buffer.num_ranks());
    const LowLatencyLayout layout =
        checked_layout(symmetric, "num_max_dispatch_tokens_per_rank", m, hidden, buffer.num_ranks(), num_experts);
    clean_signals(symmetric, layout, current_stream(buffer));
}

void low_latency_barrier(int64_t stream) {
    launch_low_latency_barrier(LowLatencyBarrierArgs{reinterpret_cast<cudaStream_t>(stream)});
}

#else

[[noreturn]] void not_compiled() {
    throw std::runtime_error("deep_ep was built without NVSHMEM: low-latency kernels are missing; install "
                             "nvidia-nvshmem-cu13 or set NVSHMEM_DIR and rebuild");
}

#endif

}  // namespace

void register_low_latency_apis(pybind11::module_& m) {
    namespace py = pybind11;
    m.attr("low_latency_compiled") =
#ifdef DEEP_EP_WITH_NVSHMEM
        true;
    py::class_<ReceiveHook<LowLatencyDispatchArgs>>(m, "LowLatencyDispatchHook")
        .def("__call__", &ReceiveHook<LowLatencyDispatchArgs>::operator());
    py::class_<ReceiveHook<LowLatencyCombineArgs>>(m, "LowLatencyCombineHook")
        .def("__call__", &ReceiveHook<LowLatencyCombineArgs>::operator());
    m.def("low_latency_dispatch", &low_latency_dispatch, py::arg("buffer"), py::arg("x"), py::arg("topk_idx"),
          py::arg("num_max_dispatch_tokens_per_rank"), py::arg("num_experts"),
          py::arg("cumulative_local_expert_recv_stats"), py::arg("dispatch_wait_recv_cost_stats"), py::arg("use_fp8"),
          py::arg("round_scale"), py::arg("use_ue8m0"), py::arg("async_finish"), py::arg("return_recv_hook"));
    m.def("low_latency_combine", &low_latency_combine, py::arg("buffer"), py::arg("x"), py::arg("topk_idx"),
          py::arg("topk_weights"), py::arg("handle"), py::arg("zero_copy"), py::arg("async_finish"),
          py::arg("return_recv_hook"), py::arg("out"), py::arg("combine_wait_recv_cost_stats"));
    m.def("get_next_low_latency_combine_buffer", &get_next_low_latency_combine_buffer, py::arg("buffer"),
          py::arg("handle"));
    m.def("clean_low_latency_buffer", &clean_low_latency_buffer, py::arg("buffer"),
          py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_experts"));
    m.def("low_latency_barrier", &low_latency_barrier, py::arg("stream"));
#else
        false;
    for (const char* name : {"low_latency_dispatch", "low_latency_combine", "get_next_low_latency_combine_buffer",
                             "clean_low_latency_buffer", "low_latency_barrier"})
        m.def(name, [](py::args, py::kwargs) { not_compiled(); });
#endif
}

}  // namespace deep_ep::ops
