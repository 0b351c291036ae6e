// Buffer sizes, from the one description of each buffer's layout (kernels/common/buffer_layout.cuh for the
// NVLink buffer, LowLatencyLayout in kernels/api_low_latency.cuh for the symmetric one): the capacity
// checks of the ops and the size hints users allocate with are computed here, and Python asks here too
// (deep_ep.config), so a Buffer sized by a hint always passes the checks of the shapes it was sized for.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace deep_ep::runtime::size_hints {

// Largest top-k of a normal dispatch, and the one the NVLink size hint assumes.
inline constexpr int kMaxNumTopk = 16;
// Largest top-k of a low-latency dispatch/combine (DeepEP V1's kernel limit, kept for compatibility).
inline constexpr int kLowLatencyMaxNumTopk = 9;
// Hints are rounded up to this, the granularity CUDA IPC / VMM allocations come in anyway.
inline constexpr int64_t kBufferAlignmentBytes = 2 << 20;

// NVLink buffer bytes a rank needs to dispatch num_tokens rows (staged rows + send lists), or to combine
// num_rows received rows; both include the control region.
int64_t nvl_dispatch_bytes(int64_t hidden_bytes, int64_t num_scales, int64_t num_topk, int64_t num_ranks,
                           int64_t num_tokens);
int64_t nvl_combine_bytes(int64_t hidden, int64_t num_topk, int64_t num_rows);
// Holds a dispatch of num_max_tokens_per_rank tokens (BF16 or FP8 with scales, any top-k) and the combine
// of what all ranks could send back; hidden_bytes is V1's hidden * max(element size, 2).
int64_t nvl_size_hint(int64_t hidden_bytes, int64_t num_ranks, int64_t num_max_tokens_per_rank);
// Symmetric (NVSHMEM) bytes of low-latency dispatch + combine, exact, and rounded up as a hint.
int64_t low_latency_bytes(int64_t num_max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts);
int64_t low_latency_size_hint(int64_t num_max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts);

// Symmetric (NVSHMEM) bytes of the inter-node normal ops (kernels/api_internode.cuh): the control region,
// a dispatch of num_tokens tokens per rank, the combine of what those dispatches sent (whatever the
// routing, rows staged), and the hint that holds both for num_max_tokens_per_rank tokens (BF16 or FP8 with
// scales, any top-k). internode_combine_call_bytes: what one combine uses, for its capacity check.
int64_t internode_control_bytes(int64_t num_ranks, int64_t num_nvl_ranks);
int64_t internode_dispatch_bytes(int64_t hidden_bytes, int64_t num_scales, int64_t num_topk, int64_t num_ranks,
                                 int64_t num_nvl_ranks, int64_t num_tokens);
int64_t internode_combine_bytes(int64_t hidden, int64_t num_topk, int64_t num_ranks, int64_t num_nvl_ranks,
                                int64_t num_tokens);
int64_t internode_combine_call_bytes(int64_t hidden, int64_t num_topk, int64_t num_ranks, int64_t num_nvl_ranks,
                                     int64_t num_staged_rows, int64_t num_forwarded, int64_t num_tokens);
int64_t internode_size_hint(int64_t hidden_bytes, int64_t num_ranks, int64_t num_nvl_ranks,
                            int64_t num_max_tokens_per_rank);

void register_apis(pybind11::module_& m);

}  // namespace deep_ep::runtime::size_hints
