// The per-rank runtime: the NVLink buffer every intra-node kernel works in, its peers' mappings (CUDA
// IPC, which also works between processes that share one GPU), the host-mapped error word and the
// host-mapped counters the notify step writes. Streams belong to Python; this class owns memory only.
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/api.cuh"
#include "runtime/host_exchange.hpp"

namespace deep_ep::runtime {

class Buffer {
  public:
    Buffer(int rank, int num_ranks, int64_t num_nvl_bytes, double timeout_s);
    ~Buffer();
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;

    // CUDA IPC handle of this rank's NVLink buffer, for the group's all_gather_object.
    pybind11::bytes local_ipc_handle() const;
    // Opens every peer's buffer from the gathered handles (index = rank); this rank's own entry is ignored.
    void connect(const std::vector<std::string>& ipc_handles);
    void destroy();

    bool is_connected() const { return connected_; }
    int rank() const { return rank_; }
    int num_ranks() const { return num_ranks_; }
    int device() const { return device_; }
    int64_t num_nvl_bytes() const { return num_nvl_bytes_; }
    uintptr_t local_buffer_ptr() const { return reinterpret_cast<uintptr_t>(peer_buffers_[rank_]); }

    // Every kernel waiting on peers gets this; the timeout is the Buffer's, the error word is shared.
    WaitContext wait_context() const;
    // Tags the host-mapped receive counts of each waited-for count exchange, so a wait never mistakes an
    // earlier exchange's counts for its own.
    int next_notify_tag() { return ++notify_tag_; }
    const std::array<void*, kMaxNvlRanks>& peer_buffers() const { return peer_buffers_; }
    // Host-mapped ints the notify kernel writes (received token and expert counts); read after a sync.
    int* mapped_counters_device() const { return mapped_counters_device_; }
    const volatile int* mapped_counters_host() const { return mapped_counters_host_; }
    static constexpr int kNumMappedCounters = 4096;

    // Direct peer reads: the host exchange (shared memory among the node's ranks) and the switch.
    void attach_host_exchange(const std::string& name, bool create);
    void unlink_host_exchange();
    bool direct_reads() const { return direct_reads_; }
    void set_direct_reads(bool enabled) { direct_reads_ = enabled; }
    // Ops that read peers' tensors directly so far (tests check that the fast path really ran).
    int64_t num_direct_ops() const { return num_direct_ops_; }
    // Peer allocations mapped so far (each a cudaIpcOpenMemHandle; mappings are cached, so this stays flat
    // while ops reuse the same tensors' memory).
    int64_t num_peer_allocation_opens() const { return num_peer_allocation_opens_; }
    // Where every rank's tensors of this op are, as this process maps them: out[i][r] is rank r's i-th
    // tensor (nullptr where it passed none). All ranks call it together with the same number of tensors.
    // Returns false, and fills nothing, unless every rank has direct reads on, is not capturing `stream`
    // into a CUDA graph (opening IPC handles is not allowed then) and could export every tensor (CUDA
    // IPC needs cudaMalloc memory: not the expandable segments of torch's allocator).
    bool gather_peer_tensors(const std::vector<const void*>& local, cudaStream_t stream,
                             std::vector<std::array<const char*, kMaxNvlRanks>>& out);

    // Expert ids are range-checked on the GPU (no host sync before launching); a bad one is raised as a
    // ValueError at the next host synchronisation point or op, then cleared: the Buffer stays usable.
    InvalidExpertIdWord* invalid_expert_id_device() const { return invalid_expert_id_device_; }
    void raise_if_invalid_expert_id();

    // Raises RuntimeError with rank, wait site, peer and values if any kernel timed out. Sticky: after a
    // timeout the ranks' barrier epochs disagree, so the Buffer cannot be used again.
    void raise_if_failed() const;
    bool failed() const { return error_host_->status != 0; }

  private:
    void require_usable() const;
    void* open_peer_allocation(const std::string& handle_bytes);
    void close_peer_allocations();

    int rank_, num_ranks_, device_;
    int64_t num_nvl_bytes_;
    uint64_t timeout_ns_;
    bool connected_ = false, destroyed_ = false;
    int notify_tag_ = 0;
    std::array<void*, kMaxNvlRanks> peer_buffers_{};
    DeviceErrorWord* error_host_ = nullptr;
    DeviceErrorWord* error_device_ = nullptr;
    int* mapped_counters_host_ = nullptr;
    InvalidExpertIdWord* invalid_expert_id_host_ = nullptr;
    InvalidExpertIdWord* invalid_expert_id_device_ = nullptr;
    int* mapped_counters_device_ = nullptr;
    bool direct_reads_ = true;
    int64_t num_direct_ops_ = 0;
    int64_t num_peer_allocation_opens_ = 0;
    std::unique_ptr<HostExchange> host_exchange_;
    // Peers' allocations opened for direct reads, by IPC handle (unique per allocation), kept open: torch's
    // caching allocator hands out the same segments call after call.
    std::unordered_map<std::string, void*> opened_;
};

std::string describe_wait_site(int site);
void register_apis(pybind11::module_& m);

}  // namespace deep_ep::runtime
