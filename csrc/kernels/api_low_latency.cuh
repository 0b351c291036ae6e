// Part of the host/device seam (kernels/api.cuh): Low-latency dispatch/combine (NVSHMEM).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deep_ep {

}  // namespace deep_ep
