// Registration entry points of the ops/ files: each validates nothing (Python did), allocates outputs,
// fills one Args struct and launches. Streams arrive as raw cudaStream_t values from torch.
#pragma once

#include <pybind11/pybind11.h>

namespace deep_ep::ops {

void register_layout_apis(pybind11::module_& m);
void register_intranode_apis(pybind11::module_& m);
void register_low_latency_apis(pybind11::module_& m);
void register_testing_apis(pybind11::module_& m);

}  // namespace deep_ep::ops
