// The ops/ files: each public call checks its arguments (ops/arguments.hpp), orders itself on the Buffer's
// communication stream (runtime/op_streams.hpp), allocates outputs, fills one Args struct per launch and
// returns what the Python call returns, so that a call crosses the binding once.
#pragma once

#include <pybind11/pybind11.h>

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

void register_layout_apis(pybind11::module_& m);
void register_intranode_apis(pybind11::module_& m);
void register_low_latency_apis(pybind11::module_& m);
void register_testing_apis(pybind11::module_& m);

}  // namespace deep_ep::ops
