// Where an op runs relative to the caller's stream (DeepEP V1 semantics): kernels run on the communication
// stream, which first waits for the caller's current stream (unless Python already ordered it after the
// caller's previous_event); outputs are allocated on the caller's stream, or on the communication stream
// with allocate_on_comm_stream; unless async_finish, the caller's stream then waits for the op.
// Done here, with one reused event, because torch.cuda.Stream / Event calls from Python cost tens of
// microseconds per op, more than some ops take on the GPU.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>

namespace deep_ep::runtime {

// How one call orders itself; Python keeps one per combination of flags (building it per call costs).
struct StreamOptions {
    int64_t comm_stream = 0;  // cudaStream_t of the communication stream
    bool wait_for_caller = true;
    bool allocate_on_comm_stream = false;
    bool caller_waits = true;  // false with async_finish: Python returns an event instead
};

class OpStreams {
  public:
    // Orders the communication stream after the caller's and, with allocate_on_comm_stream, makes it the
    // current stream until this object dies so that torch::empty allocates there.
    OpStreams(int device, const StreamOptions& options);
    OpStreams(const OpStreams&) = delete;
    OpStreams& operator=(const OpStreams&) = delete;

    cudaStream_t comm() const { return comm_; }
    // Call after the op's last launch: the caller's stream waits for it unless async_finish.
    void finish();

  private:
    int device_;
    cudaStream_t caller_, comm_;
    bool caller_waits_;
    std::optional<c10::cuda::CUDAStreamGuard> allocation_guard_;
};

void register_stream_apis(pybind11::module_& m);

}  // namespace deep_ep::runtime
