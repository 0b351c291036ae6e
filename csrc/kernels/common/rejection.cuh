// Ops that every rank skips because some rank rejected them, as the notify kernels report them to the host
// (the Buffer's host-mapped RejectionReport, raised once the op is queued, at the next call or check()).
// The rejection itself is agreed on the GPU: every rank reaches the same verdict in the op's exchange.
#pragma once

#include "kernels/api.cuh"

namespace deep_ep::rejection {

/// Records the op's rejection unless the report holds one the host has not raised yet.
__device__ __forceinline__ void report(RejectionReport* report, int rank, int code, int value, int limit) {
    if (report == nullptr || atomicCAS(&report->found, 0, 2) != 0)
        return;
    report->rank = rank;
    report->code = code;
    report->value = value;
    report->limit = limit;
    // The host reads the report without synchronising with the GPU: the fields must be visible to it
    // before found is.
    __threadfence_system();
    atomicExch(&report->found, 1);
}

/// Whether rank j, receiving `num_recv` rows, overflows the num_worst_tokens it passed (0: none given).
__device__ __forceinline__ bool exceeds_worst_tokens(int num_recv, int num_worst_tokens) {
    return num_worst_tokens > 0 && num_recv > num_worst_tokens;
}

}  // namespace deep_ep::rejection
