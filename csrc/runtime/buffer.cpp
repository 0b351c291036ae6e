#include "runtime/buffer.hpp"

#include <cuda_runtime.h>
// connect() takes the gathered handles as a Python list of bytes: the list caster lives in stl.h.
#include <pybind11/stl.h>

#include <cstring>
#include <sstream>

#include "runtime/errors.hpp"

namespace deep_ep::runtime {

Buffer::Buffer(int rank, int num_ranks, int64_t num_nvl_bytes, double timeout_s)
    : rank_(rank), num_ranks_(num_ranks), num_nvl_bytes_(num_nvl_bytes),
      timeout_ns_(static_cast<uint64_t>(timeout_s * 1e9)) {
    DEEP_EP_CHECK(num_ranks >= 1 && num_ranks <= kMaxNvlRanks,
                  "intra-node buffers support 1.." << kMaxNvlRanks << " ranks, got " << num_ranks);
    DEEP_EP_CHECK(rank >= 0 && rank < num_ranks, "rank " << rank << " out of range for " << num_ranks << " ranks");
    DEEP_EP_CUDA_CHECK(cudaGetDevice(&device_));
    if (num_nvl_bytes_ > 0) {
        DEEP_EP_CUDA_CHECK(cudaMalloc(&peer_buffers_[rank_], num_nvl_bytes_));
        // Barrier signals and counters start at zero; epochs count up from there on every rank.
        DEEP_EP_CUDA_CHECK(cudaMemset(peer_buffers_[rank_], 0, num_nvl_bytes_));
    }
    DEEP_EP_CUDA_CHECK(cudaHostAlloc(&error_host_, sizeof(DeviceErrorWord), cudaHostAllocMapped));
    std::memset(error_host_, 0, sizeof(DeviceErrorWord));
    DEEP_EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), error_host_, 0));
    DEEP_EP_CUDA_CHECK(cudaHostAlloc(&mapped_counters_host_, sizeof(int) * kNumMappedCounters, cudaHostAllocMapped));
    std::memset(mapped_counters_host_, 0, sizeof(int) * kNumMappedCounters);
    DEEP_EP_CUDA_CHECK(
        cudaHostGetDevicePointer(reinterpret_cast<void**>(&mapped_counters_device_), mapped_counters_host_, 0));
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
}

Buffer::~Buffer() {
    try {
        destroy();
    } catch (...) {
        // A destructor must not throw; destroy() already reported through Python if called explicitly.
    }
}

pybind11::bytes Buffer::local_ipc_handle() const {
    require_usable();
    DEEP_EP_CHECK(peer_buffers_[rank_] != nullptr, "num_nvl_bytes is 0: this Buffer has no NVLink buffer");
    cudaIpcMemHandle_t handle;
    DEEP_EP_CUDA_CHECK(cudaIpcGetMemHandle(&handle, peer_buffers_[rank_]));
    return pybind11::bytes(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void Buffer::connect(const std::vector<std::string>& ipc_handles) {
    require_usable();
    DEEP_EP_CHECK(!connected_, "Buffer is already connected");
    DEEP_EP_CHECK(static_cast<int>(ipc_handles.size()) == num_ranks_,
                  "expected " << num_ranks_ << " IPC handles, got " << ipc_handles.size());
    for (int peer = 0; peer < num_ranks_; ++peer) {
        if (peer == rank_ || num_nvl_bytes_ == 0)
            continue;
        DEEP_EP_CHECK(ipc_handles[peer].size() == sizeof(cudaIpcMemHandle_t), "malformed IPC handle from rank " << peer);
        cudaIpcMemHandle_t handle;
        std::memcpy(&handle, ipc_handles[peer].data(), sizeof(handle));
        // Works across GPUs over NVLink and between processes on the same GPU alike.
        DEEP_EP_CUDA_CHECK(cudaIpcOpenMemHandle(&peer_buffers_[peer], handle, cudaIpcMemLazyEnablePeerAccess));
    }
    connected_ = true;
}

void Buffer::destroy() {
    if (destroyed_)
        return;
    destroyed_ = true;
    // Kernels of this process may still use the memory; peers synchronise through the Python-side barrier.
    cudaDeviceSynchronize();
    for (int peer = 0; peer < num_ranks_; ++peer) {
        if (peer_buffers_[peer] == nullptr)
            continue;
        if (peer == rank_)
            cudaFree(peer_buffers_[peer]);
        else
            cudaIpcCloseMemHandle(peer_buffers_[peer]);
        peer_buffers_[peer] = nullptr;
    }
    cudaFreeHost(error_host_);
    cudaFreeHost(mapped_counters_host_);
    error_host_ = error_device_ = nullptr;
    mapped_counters_host_ = mapped_counters_device_ = nullptr;
    connected_ = false;
}

WaitContext Buffer::wait_context() const { return WaitContext{error_device_, rank_, timeout_ns_}; }

std::string describe_wait_site(int site) {
    switch (static_cast<WaitSite>(site)) {
        case WaitSite::kBarrier: return "the barrier signal of";
        case WaitSite::kCoherenceFlag: return "the coherence-check flag of";
        case WaitSite::kLowLatencyCount: return "the low-latency receive count from";
        case WaitSite::kLowLatencyFlag: return "the low-latency combine flag from";
        case WaitSite::kTestingWait: return "the test flag of";
        default: return "an unknown wait on";
    }
}

void Buffer::raise_if_failed() const {
    if (error_host_ == nullptr || error_host_->status == 0)
        return;
    const volatile DeviceErrorWord* e = error_host_;
    std::ostringstream message;
    message << "rank " << e->rank << " timed out after " << timeout_ns_ / 1e9 << " s waiting for "
            << describe_wait_site(e->site) << " rank/channel " << e->peer << " (expected " << e->expected
            << ", last read " << e->observed
            << "); a peer is missing, crashed or diverged. This Buffer cannot be used again: destroy it.";
    throw std::runtime_error(message.str());
}

void Buffer::require_usable() const {
    DEEP_EP_CHECK(!destroyed_, "Buffer was destroyed");
    raise_if_failed();
}

void register_apis(pybind11::module_& m) {
    pybind11::class_<Buffer>(m, "RuntimeBuffer")
        .def(pybind11::init<int, int, int64_t, double>(), pybind11::arg("rank"), pybind11::arg("num_ranks"),
             pybind11::arg("num_nvl_bytes"), pybind11::arg("timeout_s"))
        .def("local_ipc_handle", &Buffer::local_ipc_handle)
        .def("connect", &Buffer::connect)
        .def("destroy", &Buffer::destroy)
        .def("raise_if_failed", &Buffer::raise_if_failed)
        .def_property_readonly("failed", &Buffer::failed)
        .def_property_readonly("is_connected", &Buffer::is_connected)
        .def_property_readonly("rank", &Buffer::rank)
        .def_property_readonly("num_ranks", &Buffer::num_ranks)
        .def_property_readonly("device", &Buffer::device)
        .def_property_readonly("num_nvl_bytes", &Buffer::num_nvl_bytes)
        .def_property_readonly("local_buffer_ptr", &Buffer::local_buffer_ptr);
}

}  // namespace deep_ep::runtime
