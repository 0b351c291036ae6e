// Part of the host/device seam (kernels/api.cuh): Tiny kernels that drive the primitives for tests and deep_ep.check.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deep_ep {

}  // namespace deep_ep
