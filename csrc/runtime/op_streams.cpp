#include "runtime/op_streams.hpp"

#include <array>

#include "runtime/errors.hpp"

namespace deep_ep::runtime {
namespace {

constexpr int kMaxDevices = 64;

// One event per thread and device: cudaStreamWaitEvent waits for the event's latest record at the time of
// the wait, so re-recording it for the next ordering is safe; per thread, so that two threads issuing ops
// at once never wait on each other's record.
cudaEvent_t ordering_event(int device) {
    thread_local std::array<cudaEvent_t, kMaxDevices> events{};
    DEEP_EP_CHECK(device >= 0 && device < kMaxDevices, "device index " << device << " out of range");
    if (events[device] == nullptr)
        DEEP_EP_CUDA_CHECK(cudaEventCreateWithFlags(&events[device], cudaEventDisableTiming));
    return events[device];
}

// `waiter` waits for everything queued on `first` so far (also inside a CUDA-graph capture: it becomes a
// graph dependency).
void order_after(int device, cudaStream_t waiter, cudaStream_t first) {
    const cudaEvent_t event = ordering_event(device);
    DEEP_EP_CUDA_CHECK(cudaEventRecord(event, first));
    DEEP_EP_CUDA_CHECK(cudaStreamWaitEvent(waiter, event, 0));
}

}  // namespace

OpStreams::OpStreams(int device, const StreamOptions& options)
    : device_(device),
      caller_(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream()),
      comm_(reinterpret_cast<cudaStream_t>(options.comm_stream)),
      caller_waits_(options.caller_waits) {
    if (options.wait_for_caller)
        order_after(device_, comm_, caller_);
    if (options.allocate_on_comm_stream)
        allocation_guard_.emplace(c10::cuda::getStreamFromExternal(comm_, static_cast<c10::DeviceIndex>(device)));
}

void OpStreams::finish() {
    if (caller_waits_)
        order_after(device_, caller_, comm_);
}

void register_stream_apis(pybind11::module_& m) {
    pybind11::class_<StreamOptions>(m, "StreamOptions")
        .def(pybind11::init([](int64_t comm_stream, bool wait_for_caller, bool allocate_on_comm_stream,
                               bool caller_waits) {
                 return StreamOptions{comm_stream, wait_for_caller, allocate_on_comm_stream, caller_waits};
             }),
             pybind11::arg("comm_stream"), pybind11::arg("wait_for_caller"), pybind11::arg("allocate_on_comm_stream"),
             pybind11::arg("caller_waits"));
}

}  // namespace deep_ep::runtime
