#include "runtime/host_exchange.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "runtime/errors.hpp"

namespace deep_ep::runtime {

HostExchange::HostExchange(const std::string& name, int rank, int num_ranks, bool create, uint64_t timeout_ns,
                           int first_rank)
    : name_(name), rank_(rank), num_ranks_(num_ranks), first_rank_(first_rank), timeout_ns_(timeout_ns),
      linked_(create) {
    DEEP_EP_CHECK(num_ranks >= 1 && num_ranks <= kMaxNvlRanks && rank >= 0 && rank < num_ranks,
                  "bad rank " << rank << " of " << num_ranks);
    const size_t bytes = sizeof(Slot) * kMaxNvlRanks;
    const int fd = shm_open(name.c_str(), create ? (O_CREAT | O_EXCL | O_RDWR) : O_RDWR, 0600);
    DEEP_EP_CHECK(fd >= 0, "shm_open(" << name << ") failed: " << std::strerror(errno));
    // A fresh segment reads as zeros: every slot starts at round 0.
    if (create && ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        const int error = errno;
        close(fd);
        shm_unlink(name.c_str());
        DEEP_EP_CHECK(false, "ftruncate of " << name << " failed: " << std::strerror(error));
    }
    void* mapped = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    DEEP_EP_CHECK(mapped != MAP_FAILED, "mmap of " << name << " failed: " << std::strerror(errno));
    slots_ = static_cast<Slot*>(mapped);
}

HostExchange::~HostExchange() {
    if (slots_ != nullptr)
        munmap(slots_, sizeof(Slot) * kMaxNvlRanks);
    unlink();
}

void HostExchange::unlink() {
    if (linked_)
        shm_unlink(name_.c_str());
    linked_ = false;
}

std::vector<std::string> HostExchange::all_gather(const std::string& record) {
    DEEP_EP_CHECK(record.size() <= kRecordBytes, "exchange record of " << record.size() << " bytes is too large");
    const uint64_t round = ++round_;
    const int parity = static_cast<int>(round % 2);
    Slot& own = slots_[rank_];
    std::memcpy(own.data[parity], record.data(), record.size());
    own.size[parity] = static_cast<uint32_t>(record.size());
    own.round.store(round, std::memory_order_release);

    std::vector<std::string> records(num_ranks_);
    const auto start = std::chrono::steady_clock::now();
    for (int peer = 0; peer < num_ranks_; ++peer) {
        Slot& slot = slots_[peer];
        for (uint64_t spins = 0; slot.round.load(std::memory_order_acquire) < round; ++spins) {
            if (spins % 1024 == 1023) {
                if (std::chrono::steady_clock::now() - start > std::chrono::nanoseconds(timeout_ns_))
                    DEEP_EP_CHECK(false, "rank " << first_rank_ + rank_ << " timed out after " << timeout_ns_ / 1e9
                                                 << " s waiting for rank " << first_rank_ + peer
                                                 << " in the host address exchange (round " << round
                                                 << "); a peer is missing, crashed or diverged");
                std::this_thread::yield();
            }
        }
        records[peer].assign(slot.data[parity], slot.size[parity]);
    }
    return records;
}

}  // namespace deep_ep::runtime
