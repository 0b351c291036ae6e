// EventHandle: a CUDA event recorded on a stream, plus the tensors the work before it still uses (so they
// outlive the op even if the caller drops them). Ops return one with async_finish; deep_ep.utils exposes
// it under DeepEP V1's name, where `EventHandle()` records on the current stream.
#pragma once

#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <torch/extension.h>

#include <memory>
#include <vector>

namespace deep_ep::runtime {

class EventHandle {
  public:
    // Recorded on the current stream of the current device.
    EventHandle();
    EventHandle(cudaStream_t stream, int device, std::vector<torch::Tensor> keep_alive);

    // The current stream (or `stream`) waits for the event; the host does not.
    void current_stream_wait() const;
    void stream_wait(cudaStream_t stream) const;

  private:
    int device_;
    std::shared_ptr<CUevent_st> event_;  // destroyed with the last copy
    std::vector<torch::Tensor> keep_alive_;
};

void register_event_apis(pybind11::module_& m);

}  // namespace deep_ep::runtime
