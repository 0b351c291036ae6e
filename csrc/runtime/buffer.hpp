// The per-rank runtime, one per deep_ep.Buffer: the NVLink buffer every intra-node kernel works in, its
// peers' mappings (CUDA IPC, which also works between processes that share one GPU), the NVSHMEM symmetric
// buffer of the low-latency ops and its per-call state, the host-mapped error words and counters, and the
// per-Buffer settings every call reads (communication stream, SM budget cap, load kind), so that none of
// them crosses the Python binding on each call.
#pragma once

#include <pybind11/pybind11.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kernels/api.cuh"
#include "runtime/call_agreement.hpp"
#include "runtime/handle_identity.hpp"
#include "runtime/host_exchange.hpp"

namespace deep_ep::runtime {

struct BufferOptions {
    int rank = 0;
    int num_ranks = 1;
    // Ranks per NVLink domain ("node"): num_ranks when the group is one domain; fewer makes the normal ops
    // inter-node (kernels/api_internode.cuh).
    int num_nvl_ranks = 1;
    int64_t num_nvl_bytes = 0;  // 0: no NVLink buffer (a low-latency-only Buffer)
    double timeout_s = 100.0;
    cudaStream_t comm_stream = nullptr;  // the communication stream (a torch.cuda.Stream Python keeps)
    int max_num_sms = 1;  // SMs one op may use: the GPU's over the ranks sharing it (they spin-wait on each other)
    bool conservative_loads = false;
    // Check expert ids on the host before anything runs (one GPU synchronisation per call that takes
    // topk_idx) instead of on the GPU: DEEP_EP_HOST_EXPERT_ID_CHECK=1.
    bool host_expert_id_check = false;
    // Run every normal op on the communication stream, as DeepEP V1 does, also without the flags that ask
    // for it (DEEP_EP_INLINE_OPS=0); by default such ops run on the caller's stream (runtime/op_streams.hpp).
    bool always_comm_stream = false;
};

/// The NVSHMEM symmetric buffer of the low-latency ops (allocated by Python, collectively) and the state
/// consecutive low-latency calls share.
struct SymmetricBuffer {
    void* base = nullptr;
    int64_t num_bytes = 0;
    torch::Tensor mapped_bases;  // device int64 [num_ranks]: each rank's buffer mapped here, 0 = reach it by puts
    bool all_ranks_mapped = false;
    bool node_ranks_mapped = false;  // every rank of this rank's node (inter-node ops read them directly)
    int num_blocks = 1;
    // Consecutive operations alternate between the buffer's two sets (kernels/api_low_latency.cuh).
    int next_set = 0;
    // (M, hidden, experts) the signal words are laid out for; a new shape starts from a clean buffer.
    std::array<int64_t, 3> shape{};
    bool has_shape = false;
    torch::Tensor combine_done_blocks;  // device int32 [1], 0 between combines

    int take_set() { return std::exchange(next_set, next_set ^ 1); }
};

class Buffer {
  public:
    explicit Buffer(const BufferOptions& options);
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
    int num_nvl_ranks() const { return num_nvl_ranks_; }
    bool is_internode() const { return num_nvl_ranks_ < num_ranks_; }
    int device() const { return device_; }
    int64_t num_nvl_bytes() const { return num_nvl_bytes_; }
    // The symmetric buffer's size (0 before it is attached): what inter-node and low-latency ops fit in.
    int64_t num_rdma_bytes() const { return symmetric_.num_bytes; }
    cudaStream_t comm_stream() const { return comm_stream_; }
    // The stream the Buffer's last normal op ran on (or that waits for it): the next op runs after it
    // (runtime/op_streams.hpp). nullptr before the first op.
    cudaStream_t last_op_stream() const { return last_op_stream_; }
    void set_last_op_stream(cudaStream_t stream) { last_op_stream_ = stream; }
    bool conservative_loads() const { return conservative_loads_; }
    bool host_expert_id_check() const { return host_expert_id_check_; }
    bool always_comm_stream() const { return always_comm_stream_; }
    // An op's SM budget: what the Config asks for, within what this rank may take of a shared GPU.
    int num_sms(int64_t requested) const {
        return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(requested, max_num_sms_)));
    }
    uintptr_t local_buffer_ptr() const {
        return num_nvl_bytes_ == 0 ? 0 : reinterpret_cast<uintptr_t>(peer_buffers_[rank_]);
    }
    // Rows inter-node dispatches of this Buffer sent across a node boundary (a test counter; synchronises).
    int64_t num_internode_rows_sent() const;

    // Every kernel waiting on peers gets this; the timeout is the Buffer's, the error word is shared.
    WaitContext wait_context() const;
    // Tags the host-mapped receive counts of each waited-for count exchange, so a wait never mistakes an
    // earlier exchange's counts for its own.
    int next_notify_tag() { return ++notify_tag_; }
    const std::array<void*, kMaxNvlRanks>& peer_buffers() const { return peer_buffers_; }
    // Host-mapped ints the notify kernel writes (received token and expert counts); read after a sync.
    int* mapped_counters_device() const { return mapped_counters_device_; }
    // Device int, 0 between calls: how many blocks of the running get_dispatch_layout are done.
    int* layout_done_blocks() const { return layout_done_blocks_; }
    const volatile int* mapped_counters_host() const { return mapped_counters_host_; }
    static constexpr int kNumMappedCounters = 4096;

    // Direct peer reads: the host exchange (shared memory among the node's ranks) and the switch.
    void attach_host_exchange(const std::string& name, bool create);
    void unlink_host_exchange();
    bool direct_reads() const { return direct_reads_; }
    void set_direct_reads(bool enabled) { direct_reads_ = enabled; }
    // Whether an op on `stream` may read its peers' tensors in place (gather_peer_tensors may still find an
    // allocation it cannot export): false when direct reads are off or the stream is being captured.
    bool may_read_directly(cudaStream_t stream) const;
    // Ops that read peers' tensors directly so far (tests check that the fast path really ran).
    int64_t num_direct_ops() const { return num_direct_ops_; }
    // Handle identity (runtime/handle_identity.hpp): this Buffer's process-unique id, and the number of the
    // next fresh dispatch (every rank counts the same: a dispatch that fails its agreed checks counts nowhere).
    int64_t uid() const { return uid_; }
    int64_t next_dispatch_seq() { return ++num_dispatches_; }
    // Inter-node ops open with one GPU exchange each on every rank, rejected or not, in the same order: the
    // number of an op's exchange is the same on every rank (an inter-node handle's identity).
    int64_t next_internode_exchange() { return ++num_internode_exchanges_; }
    // Peer allocations mapped so far (each a cudaIpcOpenMemHandle; mappings are cached, so this stays flat
    // while ops reuse the same tensors' memory).
    int64_t num_peer_allocation_opens() const { return num_peer_allocation_opens_; }
    // Where every rank's tensors of this op are, as this process maps them: out[i][l] is the i-th tensor of
    // local rank l of this node (nullptr where it passed none; of an intra-node Buffer, l is the rank). All
    // ranks of the node call it together with the same number of tensors.
    // Returns false, and fills nothing, unless every rank has direct reads on, is not capturing `stream`
    // into a CUDA graph (opening IPC handles is not allowed then) and could export every tensor (CUDA
    // IPC needs cudaMalloc memory: not the expandable segments of torch's allocator).
    // The exchange also agrees on the call (runtime/call_agreement.hpp): it raises on every rank of the node
    // if any rank's `call` failed its checks or the ranks' calls disagree, before anything is read.
    bool gather_peer_tensors(const CallRecord& call, const std::vector<const void*>& local, cudaStream_t stream,
                             std::vector<std::array<const char*, kMaxNvlRanks>>& out);
    // A rank whose checks failed: makes, in place of the op's gather_peer_tensors, the same exchange with
    // `failed` in it, so every rank of the node raises the agreed error; always throws.
    [[noreturn]] void agree_on_error(const CallRecord& failed);

    // Low-latency mode: the symmetric buffer, attached once after Python allocated it; `op` names the call
    // in the error raised when the Buffer has none.
    void attach_symmetric(uintptr_t base, int64_t num_bytes, const std::vector<int64_t>& mapped_bases, int num_blocks);
    SymmetricBuffer& symmetric(const char* op);

    // Expert ids are range-checked on the GPU (no host sync before launching): a kernel treats a bad one as
    // -1 and records the first in this host-mapped word. Ops raise it as a ValueError once their own kernels
    // are queued (so peers are never left waiting), then clear it: the Buffer stays usable.
    InvalidExpertIdWord* invalid_expert_id_device() const { return invalid_expert_id_device_; }
    void raise_if_invalid_expert_id();
    // Ops every rank skipped because some rank rejected them (kernels/api.cuh: RejectionReport): an
    // inter-node rank's failed checks, or a verdict every rank reached on the GPU. Reported by the op's
    // exchange on every rank that did not raise already, raised like a flagged expert id.
    RejectionReport* rejection_report_device() const { return rejection_report_device_; }
    void raise_if_rejected_by_peer();
    // The error a RejectionReport's fields stand for (the same words on every rank), raised.
    [[noreturn]] static void raise_rejection(int rank, int code, int value, int limit);
    // The ops a rank can reject and still take part in, so that its peers raise instead of waiting.
    enum class RejectedOp { kNormal, kLowLatencyDispatch, kLowLatencyCombine };
    // What a rank that rejects an op tells its peers: the argument its error names (the message's
    // "name: ..." prefix), whether it is a TypeError, and which op. Never 0, below 1 << 15.
    static int rejection_code(const std::string& message, bool type_error, RejectedOp op = RejectedOp::kNormal);
    // What every op checks after queuing its work: a timeout (sticky), then a flagged expert id, then a
    // rejected op.
    void raise_pending_errors() {
        raise_if_failed();
        raise_if_invalid_expert_id();
        raise_if_rejected_by_peer();
    }
    // Raises RuntimeError unless the Buffer can run an op (not destroyed, no timeout so far).
    void require_usable() const;

    // Raises RuntimeError with rank, wait site, peer and values if any kernel timed out. Sticky: after a
    // timeout the ranks' barrier epochs disagree, so the Buffer cannot be used again.
    void raise_if_failed() const;
    bool failed() const { return error_host_->status != 0; }

  private:
    void* open_peer_allocation(const std::string& handle_bytes);
    void close_peer_allocations();

    int rank_, num_ranks_, num_nvl_ranks_, device_;
    int64_t num_nvl_bytes_;
    uint64_t timeout_ns_;
    cudaStream_t comm_stream_;
    cudaStream_t last_op_stream_ = nullptr;
    int max_num_sms_;
    bool conservative_loads_;
    bool host_expert_id_check_;
    bool always_comm_stream_;
    SymmetricBuffer symmetric_;
    bool connected_ = false, destroyed_ = false;
    int notify_tag_ = 0;
    std::array<void*, kMaxNvlRanks> peer_buffers_{};
    DeviceErrorWord* error_host_ = nullptr;
    DeviceErrorWord* error_device_ = nullptr;
    int* mapped_counters_host_ = nullptr;
    InvalidExpertIdWord* invalid_expert_id_host_ = nullptr;
    InvalidExpertIdWord* invalid_expert_id_device_ = nullptr;
    RejectionReport* rejection_report_host_ = nullptr;
    RejectionReport* rejection_report_device_ = nullptr;
    int* mapped_counters_device_ = nullptr;
    int* layout_done_blocks_ = nullptr;
    bool direct_reads_ = true;
    int64_t num_direct_ops_ = 0;
    const int64_t uid_ = next_buffer_uid();
    int64_t num_dispatches_ = 0;
    int64_t num_internode_exchanges_ = 0;
    int64_t num_peer_allocation_opens_ = 0;
    std::unique_ptr<HostExchange> host_exchange_;
    // Peers' allocations opened for direct reads, by IPC handle (unique per allocation), kept open: torch's
    // caching allocator hands out the same segments call after call.
    std::unordered_map<std::string, void*> opened_;
};

std::string describe_wait_site(int site);
void register_apis(pybind11::module_& m);

}  // namespace deep_ep::runtime
