#include "runtime/size_hints.hpp"

#include <pybind11/stl.h>

#include <algorithm>
#include <vector>

#include "kernels/api.cuh"
#include "kernels/common/buffer_layout.cuh"

namespace deep_ep::runtime::size_hints {
namespace {

constexpr int64_t round_up(int64_t value, int64_t alignment) { return (value + alignment - 1) / alignment * alignment; }

}  // namespace

int64_t nvl_dispatch_bytes(int64_t hidden_bytes, int64_t num_scales, int64_t num_topk, int64_t num_ranks,
                           int64_t num_tokens) {
    const layout::DispatchRowLayout rows(DispatchRowShape{static_cast<int>(hidden_bytes), static_cast<int>(num_scales),
                                                          static_cast<int>(num_topk), static_cast<int>(num_ranks)});
    return layout::kControlBytes + rows.data_bytes(num_tokens);
}

int64_t nvl_combine_bytes(int64_t hidden, int64_t num_topk, int64_t num_rows) {
    const layout::CombineRowLayout rows(static_cast<int>(hidden), static_cast<int>(num_topk));
    return layout::kControlBytes + rows.data_bytes(num_rows);
}

int64_t nvl_size_hint(int64_t hidden_bytes, int64_t num_ranks, int64_t num_max_tokens_per_rank) {
    // One row shape bounds both dispatch forms: BF16 rows have hidden_bytes and no scales, FP8 rows half the
    // bytes and a float32 scale per 128 values.
    const int64_t num_scales = (hidden_bytes + kFp8GroupSize - 1) / kFp8GroupSize;
    const int64_t dispatch = nvl_dispatch_bytes(hidden_bytes, num_scales, kMaxNumTopk, num_ranks, num_max_tokens_per_rank);
    const int64_t combine = nvl_combine_bytes((hidden_bytes + 1) / 2, kMaxNumTopk, num_ranks * num_max_tokens_per_rank);
    return round_up(std::max(dispatch, combine), kBufferAlignmentBytes);
}

int64_t low_latency_bytes(int64_t num_max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
    return LowLatencyLayout{num_max_tokens, hidden, num_ranks, num_experts}.total_bytes();
}

int64_t low_latency_size_hint(int64_t num_max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
    return round_up(low_latency_bytes(num_max_tokens, hidden, num_ranks, num_experts), kBufferAlignmentBytes);
}

namespace {
InternodeControl internode_control(int64_t num_ranks, int64_t num_nvl_ranks) {
    return InternodeControl{static_cast<int>(num_ranks), static_cast<int>(num_nvl_ranks)};
}
}  // namespace

int64_t internode_control_bytes(int64_t num_ranks, int64_t num_nvl_ranks) {
    return internode_control(num_ranks, num_nvl_ranks).bytes();
}

int64_t internode_dispatch_bytes(int64_t hidden_bytes, int64_t num_scales, int64_t num_topk, int64_t num_ranks,
                                 int64_t num_nvl_ranks, int64_t num_tokens) {
    const InternodeControl control = internode_control(num_ranks, num_nvl_ranks);
    const int64_t stride = InternodeDispatchLayout::row_stride(hidden_bytes, num_scales, num_topk);
    const int64_t slots = round_up(num_tokens, InternodeDispatchLayout::kTokenSlotGranularity);
    return control.bytes() + slots * InternodeDispatchLayout::bytes_per_token(control, stride);
}

int64_t internode_combine_call_bytes(int64_t hidden, int64_t num_topk, int64_t num_ranks, int64_t num_nvl_ranks,
                                     int64_t num_staged_rows, int64_t num_forwarded, int64_t num_tokens) {
    const InternodeControl control = internode_control(num_ranks, num_nvl_ranks);
    return control.bytes() +
           InternodeCombineLayout::rows_needed(control.num_nodes(), num_staged_rows, num_forwarded, num_tokens) *
               InternodeCombineLayout::row_stride(hidden, num_topk);
}

int64_t internode_combine_bytes(int64_t hidden, int64_t num_topk, int64_t num_ranks, int64_t num_nvl_ranks,
                                int64_t num_tokens) {
    // The worst case: every token of every rank comes here (staged rows), and as forwarder this rank lands
    // every token of its counterpart in each other node.
    const int64_t num_other_nodes = num_ranks / num_nvl_ranks - 1;
    return internode_combine_call_bytes(hidden, num_topk, num_ranks, num_nvl_ranks, num_ranks * num_tokens,
                                        num_other_nodes * num_tokens, num_tokens);
}

int64_t internode_size_hint(int64_t hidden_bytes, int64_t num_ranks, int64_t num_nvl_ranks,
                            int64_t num_max_tokens_per_rank) {
    const int64_t num_scales = (hidden_bytes + kFp8GroupSize - 1) / kFp8GroupSize;
    const int64_t dispatch = internode_dispatch_bytes(hidden_bytes, num_scales, kMaxNumTopk, num_ranks, num_nvl_ranks,
                                                      num_max_tokens_per_rank);
    const int64_t combine =
        internode_combine_bytes((hidden_bytes + 1) / 2, kMaxNumTopk, num_ranks, num_nvl_ranks, num_max_tokens_per_rank);
    return round_up(std::max(dispatch, combine), kBufferAlignmentBytes);
}

void register_apis(pybind11::module_& m) {
    namespace py = pybind11;
    auto sub = m.def_submodule("layout", "Buffer sizes from the kernels' own buffer layouts");
    sub.def("nvl_dispatch_bytes", &nvl_dispatch_bytes, py::arg("hidden_bytes"), py::arg("num_scales"), py::arg("num_topk"),
            py::arg("num_ranks"), py::arg("num_tokens"));
    sub.def("nvl_combine_bytes", &nvl_combine_bytes, py::arg("hidden"), py::arg("num_topk"), py::arg("num_rows"));
    sub.def("nvl_size_hint", &nvl_size_hint, py::arg("hidden_bytes"), py::arg("num_ranks"),
            py::arg("num_max_tokens_per_rank"));
    sub.def("low_latency_bytes", &low_latency_bytes, py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"),
            py::arg("num_ranks"), py::arg("num_experts"));
    sub.def("low_latency_size_hint", &low_latency_size_hint, py::arg("num_max_dispatch_tokens_per_rank"),
            py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"));
    sub.def("internode_control_bytes", &internode_control_bytes, py::arg("num_ranks"), py::arg("num_nvl_ranks"));
    sub.def("internode_dispatch_bytes", &internode_dispatch_bytes, py::arg("hidden_bytes"), py::arg("num_scales"),
            py::arg("num_topk"), py::arg("num_ranks"), py::arg("num_nvl_ranks"), py::arg("num_tokens"));
    sub.def("internode_combine_bytes", &internode_combine_bytes, py::arg("hidden"), py::arg("num_topk"),
            py::arg("num_ranks"), py::arg("num_nvl_ranks"), py::arg("num_tokens"));
    sub.def("internode_combine_call_bytes", &internode_combine_call_bytes, py::arg("hidden"), py::arg("num_topk"),
            py::arg("num_ranks"), py::arg("num_nvl_ranks"), py::arg("num_staged_rows"), py::arg("num_forwarded"),
            py::arg("num_tokens"));
    sub.def("internode_size_hint", &internode_size_hint, py::arg("hidden_bytes"), py::arg("num_ranks"),
            py::arg("num_nvl_ranks"), py::arg("num_max_tokens_per_rank"));
    sub.attr("NVL_CONTROL_BYTES") = layout::kControlBytes;
    sub.attr("BUFFER_ALIGNMENT_BYTES") = kBufferAlignmentBytes;
    sub.attr("MAX_NUM_TOPK") = kMaxNumTopk;
    sub.attr("LOW_LATENCY_MAX_NUM_TOPK") = kLowLatencyMaxNumTopk;
    sub.attr("FP8_SCALE_BLOCK") = kFp8GroupSize;
    sub.attr("LOW_LATENCY_MAX_EXPERTS") = kLowLatencyMaxExperts;
    sub.attr("LOW_LATENCY_MAX_TOKENS_PER_RANK") = kLowLatencyMaxTokensPerRank;
    sub.attr("LOW_LATENCY_SUPPORTED_HIDDEN") =
        std::vector<int>(std::begin(kLowLatencySupportedHidden), std::end(kLowLatencySupportedHidden));
}

}  // namespace deep_ep::runtime::size_hints
