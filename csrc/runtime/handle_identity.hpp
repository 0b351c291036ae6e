// Handle identity on the CUDA backend, as deep_ep/backends/agreement.py gives it on the reference one
// (docs/errors.md, "Handle identity"): a fresh dispatch stamps its handle with (the Buffer, the dispatch's
// number on that Buffer) and the version counters of the handle's tensors. On use, a handle made by another
// Buffer, or one of whose tensors was written in place since, is refused by name; the dispatch's number goes
// into the call's signature, so ranks passing handles of different dispatches raise instead of mixing rows.
// The stamps are keyed by one tensor of the handle and hold weak references only: a handle nobody holds
// costs nothing, and a copied or rebuilt handle carries no identity (accepted, matches any).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace deep_ep::runtime {

struct HandleElements {
    const std::vector<torch::Tensor>& tensors;
    const std::vector<const char*>& names;  // "rank_prefix_matrix", ... (messages say "handle.<name>")
    int key;                                // the element the stamp is found by
};

// Records that `handle` is dispatch number `seq` of the Buffer `buffer_uid`.
void stamp_handle(const HandleElements& handle, int64_t buffer_uid, int64_t seq);

// The number of the dispatch that made `handle`, or nullopt when it carries no identity. ValueError (named
// as the reference names it) for another Buffer's handle or a tensor modified in place since the dispatch.
std::optional<int64_t> handle_identity(const HandleElements& handle, int64_t buffer_uid);

// A process-unique id for each runtime::Buffer (stamps never outlive the uniqueness: the counter only grows).
int64_t next_buffer_uid();

}  // namespace deep_ep::runtime
