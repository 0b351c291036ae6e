// Registration only: each area registers its own functions.
#include <torch/extension.h>

#include "ops/ops.hpp"
#include "runtime/buffer.hpp"
#include "runtime/event.hpp"
#include "runtime/nvshmem.hpp"
#include "runtime/size_hints.hpp"

namespace {

bool is_sm90_compiled() {
#ifdef DEEP_EP_DISABLE_SM90_FEATURES
    return false;
#else
    return true;
#endif
}

bool aggressive_loads_compiled() {
#ifdef DEEP_EP_DISABLE_AGGRESSIVE_PTX_INSTRS
    return false;
#else
    return true;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "deep_ep CUDA extension";
    m.def("is_sm90_compiled", &is_sm90_compiled);
    m.def("aggressive_loads_compiled", &aggressive_loads_compiled);
    deep_ep::runtime::register_apis(m);
    deep_ep::runtime::register_event_apis(m);
    deep_ep::runtime::size_hints::register_apis(m);
    deep_ep::runtime::nvshmem::register_apis(m);
    deep_ep::ops::register_layout_apis(m);
    deep_ep::ops::register_intranode_apis(m);
    deep_ep::ops::register_internode_apis(m);
    deep_ep::ops::register_low_latency_apis(m);
    deep_ep::ops::register_testing_apis(m);
}
