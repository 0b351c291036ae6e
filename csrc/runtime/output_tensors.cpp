#include "runtime/output_tensors.hpp"

#include <c10/core/TensorImpl.h>

#include "runtime/errors.hpp"

namespace deep_ep::runtime {

int OutputTensors::add(c10::IntArrayRef sizes, c10::ScalarType dtype, c10::IntArrayRef strides) {
    DEEP_EP_CHECK(!storage_.defined(), "OutputTensors: add() after allocate()");
    DEEP_EP_CHECK(strides.empty() || strides.size() == sizes.size(), "OutputTensors: one stride per dimension");
    int64_t numel = 1;
    for (const int64_t size : sizes)
        numel *= size;
    Spec spec{{sizes.begin(), sizes.end()}, {strides.begin(), strides.end()}, dtype, num_bytes_};
    specs_.push_back(std::move(spec));
    const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
    num_bytes_ += (bytes + kOutputAlignmentBytes - 1) / kOutputAlignmentBytes * kOutputAlignmentBytes;
    return static_cast<int>(specs_.size()) - 1;
}

void OutputTensors::allocate(c10::Device device) {
    storage_ = torch::empty({num_bytes_}, torch::TensorOptions().dtype(torch::kUInt8).device(device));
}

torch::Tensor OutputTensors::operator[](int index) const {
    DEEP_EP_CHECK(storage_.defined(), "OutputTensors: allocate() first");
    const Spec& spec = specs_.at(index);
    // What torch::empty + view would build, without the dispatcher: a TensorImpl over the shared storage
    // with the allocation's dispatch keys (device, autograd) and its own dtype, offset and shape.
    auto tensor = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(storage_.storage()), storage_.key_set(),
                                                           c10::scalarTypeToTypeMeta(spec.dtype));
    c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
    impl->set_storage_offset(spec.byte_offset / static_cast<int64_t>(c10::elementSize(spec.dtype)));
    if (spec.strides.empty())
        impl->set_sizes_contiguous(spec.sizes);
    else
        impl->set_sizes_and_strides(spec.sizes, spec.strides);
    return tensor;
}

}  // namespace deep_ep::runtime
