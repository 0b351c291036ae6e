// A host-only all-gather of small records among the ranks of one node (of an inter-node Buffer: its
// NVLink domain), through POSIX shared memory.
// Direct peer reads use it to learn, per call, where each peer's input tensors are (their CUDA IPC
// handles): no GPU work, no CPU-GPU synchronisation, a few microseconds when the ranks arrive together.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/api.cuh"

namespace deep_ep::runtime {

class HostExchange {
  public:
    static constexpr int kRecordBytes = 2048;  // a call record (runtime/call_agreement.hpp) + addresses

    // Member 0 creates the segment; the others open it once it exists (the caller orders that). Members are
    // the group's ranks first_rank .. first_rank + num_ranks - 1 (errors name those).
    HostExchange(const std::string& name, int rank, int num_ranks, bool create, uint64_t timeout_ns, int first_rank);
    ~HostExchange();
    HostExchange(const HostExchange&) = delete;
    HostExchange& operator=(const HostExchange&) = delete;

    // Removes the name once every rank has mapped the segment; the mapping stays valid.
    void unlink();
    // Every rank calls it the same number of times; returns every rank's record (index = rank). Throws,
    // naming the missing rank, if a peer does not arrive within the timeout.
    std::vector<std::string> all_gather(const std::string& record);
    // This rank's index among the members, and how many there are.
    int rank() const { return rank_; }
    int num_ranks() const { return num_ranks_; }
    int first_rank() const { return first_rank_; }  // the group rank of member 0

  private:
    // One slot per rank, written by that rank only. Round k uses data[k % 2]: a rank can start round
    // k + 2 only after every peer published round k + 1, by which time they have all read round k.
    struct alignas(64) Slot {
        std::atomic<uint64_t> round;
        uint32_t size[2];
        char data[2][kRecordBytes];
    };

    std::string name_;
    int rank_, num_ranks_, first_rank_;
    uint64_t timeout_ns_;
    uint64_t round_ = 0;
    bool linked_ = false;
    Slot* slots_ = nullptr;
};

}  // namespace deep_ep::runtime
