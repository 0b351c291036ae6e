// A call's output tensors carved out of one allocation. On the host, an op costs mostly its allocations and
// launches (each torch::empty is a caching-allocator lookup under a lock, each narrow / view a dispatcher
// round trip), so an op with several outputs asks the allocator once and builds the tensors directly over
// the shared storage. Every tensor starts at a multiple of kOutputAlignmentBytes, so kernels may use
// vector and TMA accesses on each as if it were allocated alone.
#pragma once

#include <c10/util/SmallVector.h>
#include <torch/extension.h>

#include <cstdint>

namespace deep_ep::runtime {

constexpr int64_t kOutputAlignmentBytes = 256;

class OutputTensors {
  public:
    // Reserves a tensor of `sizes` and `dtype`, contiguous unless `strides` (in elements) are given;
    // returns its index. With strides, the caller guarantees the largest offset they reach fits in
    // prod(sizes) elements (a permuted contiguous layout).
    int add(c10::IntArrayRef sizes, c10::ScalarType dtype, c10::IntArrayRef strides = {});
    // One allocation for all of them, on `device`'s current stream (as torch::empty would).
    void allocate(c10::Device device);
    // The tensor `index` (after allocate()).
    torch::Tensor operator[](int index) const;

  private:
    struct Spec {
        c10::SmallVector<int64_t, 4> sizes, strides;
        c10::ScalarType dtype;
        int64_t byte_offset;
    };
    c10::SmallVector<Spec, 8> specs_;
    int64_t num_bytes_ = 0;
    torch::Tensor storage_;
};

}  // namespace deep_ep::runtime
