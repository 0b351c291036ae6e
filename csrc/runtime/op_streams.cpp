#include "runtime/op_streams.hpp"

#include <c10/cuda/CUDACachingAllocator.h>

#include <array>

#include "runtime/errors.hpp"
#include "runtime/event.hpp"

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

// The comm stream waits for `previous_event` (an EventOverlap). Our own EventHandle is waited for
// directly; any other event object (torch.cuda.Event, another library's handle with only
// current_stream_wait()) is asked to make the current stream wait while the comm stream is current.
// Returns false when the EventOverlap holds no event (its work is already ordered on the caller's stream).
bool order_after_event(int device, cudaStream_t comm, pybind11::handle previous_event) {
    const pybind11::object event = previous_event.attr("event");
    if (event.is_none())
        return false;
    if (pybind11::isinstance<EventHandle>(event)) {
        event.cast<const EventHandle&>().stream_wait(comm);
        return true;
    }
    const c10::cuda::CUDAStreamGuard guard(c10::cuda::getStreamFromExternal(comm, static_cast<c10::DeviceIndex>(device)));
    if (pybind11::hasattr(event, "current_stream_wait"))
        event.attr("current_stream_wait")();
    else
        event.attr("wait")();
    return true;
}

bool is_capturing(cudaStream_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    DEEP_EP_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    return status != cudaStreamCaptureStatusNone;
}

}  // namespace

void order_after(int device, cudaStream_t waiter, cudaStream_t first) {
    const cudaEvent_t event = ordering_event(device);
    DEEP_EP_CUDA_CHECK(cudaEventRecord(event, first));
    DEEP_EP_CUDA_CHECK(cudaStreamWaitEvent(waiter, event, 0));
}

OpStreams::OpStreams(Buffer& buffer, const StreamOrder& order)
    : buffer_(buffer),
      device_(buffer.device()),
      caller_(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream()),
      on_comm_stream_(buffer.always_comm_stream() || !order.previous_event.is_none() || order.async_finish ||
                      order.allocate_on_comm_stream),
      order_(order) {
    stream_ = on_comm_stream_ ? buffer.comm_stream() : caller_;
    bool after_caller = false;
    if (on_comm_stream_) {
        after_caller =
            order.previous_event.is_none() || !order_after_event(device_, stream_, order.previous_event);
        if (after_caller)
            order_after(device_, stream_, caller_);
    }
    const cudaStream_t last = buffer.last_op_stream();
    const bool last_is_covered = last == nullptr || last == stream_ || (after_caller && last == caller_);
    if (!last_is_covered && !(is_capturing(stream_) && !is_capturing(last)))
        order_after(device_, stream_, last);
    if (order.allocate_on_comm_stream)
        allocation_guard_.emplace(c10::cuda::getStreamFromExternal(stream_, static_cast<c10::DeviceIndex>(device_)));
}

pybind11::object OpStreams::finish(std::vector<torch::Tensor> inputs, const std::vector<torch::Tensor>& outputs) {
    if (order_.allocate_on_comm_stream) {
        // Allocated in the communication stream's pool, used on the caller's: tell the allocator.
        const auto caller = c10::cuda::getStreamFromExternal(caller_, static_cast<c10::DeviceIndex>(device_));
        for (const torch::Tensor& t : outputs)
            if (t.defined())
                c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), caller);
    }
    if (!order_.async_finish) {
        if (on_comm_stream_)
            order_after(device_, caller_, stream_);
        buffer_.set_last_op_stream(caller_);  // the caller's later work comes after the op
        return pybind11::none();
    }
    buffer_.set_last_op_stream(stream_);
    for (const torch::Tensor& t : outputs)
        if (t.defined())
            inputs.push_back(t);
    return pybind11::cast(EventHandle(stream_, device_, std::move(inputs)));
}

void OpStreams::join_caller() {
    if (stream_ != caller_)
        order_after(device_, caller_, stream_);
    buffer_.set_last_op_stream(caller_);
}

}  // namespace deep_ep::runtime
