#include <torch/extension.h>

#include "ops/ops.hpp"

namespace deep_ep::ops {

void register_testing_apis(pybind11::module_& m) {}

}  // namespace deep_ep::ops
