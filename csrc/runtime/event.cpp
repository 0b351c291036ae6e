#include "runtime/event.hpp"

#include <c10/cuda/CUDAStream.h>

#include "runtime/errors.hpp"

namespace deep_ep::runtime {
namespace {

// Timing-free events are the cheapest to record and wait for.
std::shared_ptr<CUevent_st> record_event(cudaStream_t stream) {
    cudaEvent_t event = nullptr;
    DEEP_EP_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    std::shared_ptr<CUevent_st> owned(event, [](cudaEvent_t e) { cudaEventDestroy(e); });
    DEEP_EP_CUDA_CHECK(cudaEventRecord(event, stream));
    return owned;
}

int current_device() {
    int device = 0;
    DEEP_EP_CUDA_CHECK(cudaGetDevice(&device));
    return device;
}

}  // namespace

EventHandle::EventHandle()
    : device_(current_device()),
      event_(record_event(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream())) {}

EventHandle::EventHandle(cudaStream_t stream, int device, std::vector<torch::Tensor> keep_alive)
    : device_(device), event_(record_event(stream)), keep_alive_(std::move(keep_alive)) {}

void EventHandle::current_stream_wait() const {
    stream_wait(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream());
}

void EventHandle::stream_wait(cudaStream_t stream) const { DEEP_EP_CUDA_CHECK(cudaStreamWaitEvent(stream, event_.get(), 0)); }

void register_event_apis(pybind11::module_& m) {
    pybind11::class_<EventHandle>(m, "EventHandle",
                                  "A CUDA event plus the tensors its op still uses (DeepEP V1's EventHandle)")
        .def(pybind11::init<>(), "Records an event on the current CUDA stream.")
        .def("current_stream_wait", &EventHandle::current_stream_wait,
             "The current stream waits for the event (no host synchronisation).");
}

}  // namespace deep_ep::runtime
