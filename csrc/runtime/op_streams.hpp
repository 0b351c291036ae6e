// Where an op runs relative to the caller's stream (DeepEP V1 semantics): kernels run on the Buffer's
// communication stream, which first waits for the caller's current stream, or for `previous_event` when
// one is given; outputs are allocated on the caller's stream, or on the communication stream with
// allocate_on_comm_stream (then recorded for the caller's stream); unless async_finish, the caller's stream
// then waits for the op, and with async_finish the op returns an EventHandle instead.
// A call with none of those three flags (the common one) runs on the caller's stream itself: to the caller
// it is the same order, without the two event records and waits that cost more host time than the
// smallest ops take on the GPU.
// Whatever stream an op runs on, it runs after the Buffer's previous op (the ops of one Buffer share its
// barriers and buffers): the Buffer remembers the stream of its last op, and an op on another stream first
// waits for it. One exception: a stream being captured into a CUDA graph does not wait for work queued
// outside the capture (CUDA forbids it); torch.cuda.graph synchronises the device before it captures.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "runtime/buffer.hpp"

namespace deep_ep::runtime {

// The stream flags of a public call, as the caller passed them.
struct StreamOrder {
    pybind11::handle previous_event;  // an EventOverlap or None
    bool async_finish = false;
    bool allocate_on_comm_stream = false;
};

class OpStreams {
  public:
    // Picks the op's stream and orders it (see above); with allocate_on_comm_stream, makes the
    // communication stream the current one until this object dies, so that torch::empty allocates there.
    OpStreams(Buffer& buffer, const StreamOrder& order);
    OpStreams(const OpStreams&) = delete;
    OpStreams& operator=(const OpStreams&) = delete;

    // The stream the op's kernels run on.
    cudaStream_t stream() const { return stream_; }
    bool needs_tensor_lists() const { return order_.async_finish || order_.allocate_on_comm_stream; }
    // After the op's last launch: the caller's stream waits for it (unless async_finish); outputs made on
    // the communication stream are recorded for the caller's. Returns the EventHandle (async_finish, keeping
    // `inputs` and `outputs` alive) or None.
    pybind11::object finish(std::vector<torch::Tensor> inputs = {}, const std::vector<torch::Tensor>& outputs = {});
    // On an error raised after the launches: the caller's stream still waits for the op, so the tensors the
    // failed call used may be freed safely.
    void join_caller();

  private:
    Buffer& buffer_;
    int device_;
    cudaStream_t caller_, stream_;
    bool on_comm_stream_;
    StreamOrder order_;
    std::optional<c10::cuda::CUDAStreamGuard> allocation_guard_;
};

// `waiter` waits for everything queued on `first` so far (also inside a CUDA-graph capture: it becomes a
// graph dependency).
void order_after(int device, cudaStream_t waiter, cudaStream_t first);

}  // namespace deep_ep::runtime
