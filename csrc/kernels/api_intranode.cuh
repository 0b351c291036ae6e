// Part of the host/device seam (kernels/api.cuh): Intra-node dispatch/combine (NVLink, CUDA IPC).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deep_ep {

}  // namespace deep_ep
