#include "runtime/buffer.hpp"

#include <cuda.h>
#include <cuda_runtime.h>
// connect() takes the gathered handles as a Python list of bytes: the list caster lives in stl.h.
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <iterator>
#include <sstream>

#include "runtime/errors.hpp"

namespace deep_ep::runtime {
namespace {

// Zeroed host memory that kernels write and the host reads without a copy: count objects of T, seen by
// the host at *host and by kernels at *device.
template <typename T>
void allocate_mapped(size_t count, T** host, T** device) {
    DEEP_EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(host), sizeof(T) * count, cudaHostAllocMapped));
    std::memset(*host, 0, sizeof(T) * count);
    DEEP_EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(device), *host, 0));
}

// Without a topology from Python: the largest NVLink domain size (at most 8) that divides the group.
int default_num_nvl_ranks(int num_ranks) {
    int size = std::min(num_ranks, kMaxNvlRanks);
    while (size > 1 && num_ranks % size != 0)
        --size;
    return std::max(size, 1);
}

template <typename T>
void free_mapped(T** host, T** device) {
    cudaFreeHost(*host);
    *host = *device = nullptr;
}

}  // namespace

Buffer::Buffer(const BufferOptions& options)
    : rank_(options.rank), num_ranks_(options.num_ranks), num_nvl_ranks_(options.num_nvl_ranks), num_nvl_bytes_(options.num_nvl_bytes),
      timeout_ns_(static_cast<uint64_t>(options.timeout_s * 1e9)), comm_stream_(options.comm_stream),
      max_num_sms_(std::max(1, options.max_num_sms)), conservative_loads_(options.conservative_loads),
      host_expert_id_check_(options.host_expert_id_check), always_comm_stream_(options.always_comm_stream) {
    // The NVLink buffer spans one NVLink domain; a low-latency-only Buffer (no NVLink buffer) any group.
    DEEP_EP_CHECK(num_ranks_ >= 1, "a Buffer needs at least 1 rank, got " << num_ranks_);
    DEEP_EP_CHECK(num_nvl_bytes_ == 0 || num_ranks_ <= kMaxNvlRanks,
                  "an NVLink buffer spans at most " << kMaxNvlRanks << " ranks, got " << num_ranks_);
    DEEP_EP_CHECK(rank_ >= 0 && rank_ < num_ranks_, "rank " << rank_ << " out of range for " << num_ranks_ << " ranks");
    DEEP_EP_CHECK(num_nvl_ranks_ >= 1 && num_nvl_ranks_ <= std::min(num_ranks_, kMaxNvlRanks) &&
                      num_ranks_ % num_nvl_ranks_ == 0,
                  "num_nvl_ranks must divide " << num_ranks_ << " ranks and be in [1, " << kMaxNvlRanks << "], got "
                                               << num_nvl_ranks_);
    DEEP_EP_CUDA_CHECK(cudaGetDevice(&device_));
    if (num_nvl_bytes_ > 0) {
        DEEP_EP_CUDA_CHECK(cudaMalloc(&peer_buffers_[rank_], num_nvl_bytes_));
        // Barrier signals and counters start at zero; epochs count up from there on every rank.
        DEEP_EP_CUDA_CHECK(cudaMemset(peer_buffers_[rank_], 0, num_nvl_bytes_));
    }
    allocate_mapped(1, &error_host_, &error_device_);
    allocate_mapped(kNumMappedCounters, &mapped_counters_host_, &mapped_counters_device_);
    allocate_mapped(1, &invalid_expert_id_host_, &invalid_expert_id_device_);
    allocate_mapped(1, &rejection_report_host_, &rejection_report_device_);
    DEEP_EP_CUDA_CHECK(cudaMalloc(&layout_done_blocks_, sizeof(int)));
    DEEP_EP_CUDA_CHECK(cudaMemset(layout_done_blocks_, 0, sizeof(int)));
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
    close_peer_allocations();
    host_exchange_.reset();
    for (int peer = 0; peer < num_ranks_; ++peer) {
        if (peer_buffers_[peer] == nullptr)
            continue;
        if (peer == rank_)
            cudaFree(peer_buffers_[peer]);
        else
            cudaIpcCloseMemHandle(peer_buffers_[peer]);
        peer_buffers_[peer] = nullptr;
    }
    free_mapped(&error_host_, &error_device_);
    free_mapped(&mapped_counters_host_, &mapped_counters_device_);
    free_mapped(&invalid_expert_id_host_, &invalid_expert_id_device_);
    free_mapped(&rejection_report_host_, &rejection_report_device_);
    if (layout_done_blocks_ != nullptr)
        cudaFree(std::exchange(layout_done_blocks_, nullptr));
    symmetric_ = SymmetricBuffer{};  // the symmetric memory itself is freed collectively by Python
    connected_ = false;
}

void Buffer::attach_symmetric(uintptr_t base, int64_t num_bytes, const std::vector<int64_t>& mapped_bases,
                              int num_blocks) {
    require_usable();
    DEEP_EP_CHECK(symmetric_.base == nullptr, "the symmetric buffer is already attached");
    DEEP_EP_CHECK(static_cast<int>(mapped_bases.size()) == num_ranks_,
                  "expected " << num_ranks_ << " mapped bases, got " << mapped_bases.size());
    const auto options = torch::TensorOptions().device(torch::kCUDA, device_);
    symmetric_.base = reinterpret_cast<void*>(base);
    symmetric_.num_bytes = num_bytes;
    symmetric_.mapped_bases = torch::tensor(mapped_bases, options.dtype(torch::kInt64));
    symmetric_.all_ranks_mapped = std::all_of(mapped_bases.begin(), mapped_bases.end(), [](int64_t p) { return p != 0; });
    const auto node_begin = mapped_bases.begin() + rank_ / num_nvl_ranks_ * num_nvl_ranks_;
    symmetric_.node_ranks_mapped =
        std::all_of(node_begin, node_begin + num_nvl_ranks_, [](int64_t p) { return p != 0; });
    symmetric_.num_blocks = std::max(1, num_blocks);
    symmetric_.combine_done_blocks = torch::zeros({1}, options.dtype(torch::kInt32));
}

SymmetricBuffer& Buffer::symmetric(const char* op) {
    if (symmetric_.base == nullptr) {
        require_usable();
        throw std::runtime_error(std::string(op) + ": requires Buffer(..., low_latency_mode=True)");
    }
    return symmetric_;
}

void Buffer::attach_host_exchange(const std::string& name, bool create) {
    require_usable();
    // Among the ranks of this rank's node: all of them, unless the Buffer spans nodes.
    host_exchange_ = std::make_unique<HostExchange>(name, rank_ % num_nvl_ranks_, num_nvl_ranks_, create, timeout_ns_,
                                                    rank_ / num_nvl_ranks_ * num_nvl_ranks_);
}

void Buffer::unlink_host_exchange() {
    if (host_exchange_)
        host_exchange_->unlink();
}

namespace {

// What a rank tells its peers about one tensor of a direct-read op.
struct AllocationRecord {
    enum State : int32_t { kAbsent = 0, kExported = 1, kNotExportable = 2 };
    cudaIpcMemHandle_t handle;
    int64_t offset;  // of the tensor's first byte from the allocation's base
    int32_t state;
    int32_t padding;
};

// One rank's message: an int32 "wants direct reads" flag, then one AllocationRecord per tensor.
constexpr size_t kWantsFlagBytes = sizeof(int32_t);
constexpr size_t message_bytes(size_t count) { return kWantsFlagBytes + count * sizeof(AllocationRecord); }
constexpr size_t record_offset(size_t i) { return message_bytes(i); }

// The base of the cudaMalloc allocation holding ptr (torch's allocator carves tensors out of larger
// segments), through the driver entry point: linking libcuda would break the import on machines
// without a driver.
bool allocation_base(const void* ptr, CUdeviceptr* base) {
    using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
    static const GetAddressRange get_address_range = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found{};
        if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault, &found) !=
                cudaSuccess ||
            found != cudaDriverEntryPointSuccess)
            fn = nullptr;
        return reinterpret_cast<GetAddressRange>(fn);
    }();
    size_t size = 0;
    return get_address_range != nullptr &&
           get_address_range(base, &size, reinterpret_cast<CUdeviceptr>(ptr)) == CUDA_SUCCESS;
}

AllocationRecord export_allocation(const void* ptr) {
    AllocationRecord record{};
    if (ptr == nullptr)
        return record;
    CUdeviceptr base = 0;
    record.state = AllocationRecord::kNotExportable;
    if (allocation_base(ptr, &base) &&
        cudaIpcGetMemHandle(&record.handle, reinterpret_cast<void*>(base)) == cudaSuccess) {
        record.offset = static_cast<int64_t>(reinterpret_cast<CUdeviceptr>(ptr) - base);
        record.state = AllocationRecord::kExported;
    } else {
        cudaGetLastError();  // not sticky: clear it so the next launch check does not report it
    }
    return record;
}

}  // namespace

void* Buffer::open_peer_allocation(const std::string& handle_bytes) {
    if (auto it = opened_.find(handle_bytes); it != opened_.end())
        return it->second;
    // Bounded: a program that keeps freeing and allocating segments would otherwise pin them all.
    if (opened_.size() >= 512)
        close_peer_allocations();
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, handle_bytes.data(), sizeof(handle));
    void* ptr = nullptr;
    DEEP_EP_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess));
    ++num_peer_allocation_opens_;
    opened_.emplace(handle_bytes, ptr);
    return ptr;
}

void Buffer::close_peer_allocations() {
    if (opened_.empty())
        return;
    // Our queued kernels may still read through these mappings.
    cudaDeviceSynchronize();
    for (auto& [handle, ptr] : opened_)
        cudaIpcCloseMemHandle(ptr);
    opened_.clear();
}

[[noreturn]] void Buffer::agree_on_error(const CallRecord& failed) {
    require_usable();
    if (host_exchange_)
        agree_on_call(*host_exchange_, failed, {}, num_ranks_);
    // Without a host exchange (no NVLink buffer) nobody else can know: the error stays this rank's.
    raise_call_error(failed);
}

bool Buffer::may_read_directly(cudaStream_t stream) const {
    if (!host_exchange_ || !direct_reads_)
        return false;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    DEEP_EP_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    return capture == cudaStreamCaptureStatusNone;
}

bool Buffer::gather_peer_tensors(const CallRecord& call, const std::vector<const void*>& local, cudaStream_t stream,
                                 std::vector<std::array<const char*, kMaxNvlRanks>>& out) {
    require_usable();
    if (!host_exchange_)
        return false;
    const size_t count = local.size();
    std::string record(message_bytes(count), '\0');
    const int32_t wants = may_read_directly(stream) ? 1 : 0;
    std::memcpy(record.data(), &wants, sizeof(wants));
    for (size_t i = 0; i < count && wants; ++i) {
        const AllocationRecord exported = export_allocation(local[i]);
        std::memcpy(record.data() + record_offset(i), &exported, sizeof(exported));
    }
    // Every rank takes the same decision from the same records.
    const std::vector<std::string> records = agree_on_call(*host_exchange_, call, record, num_ranks_);
    const int num_members = host_exchange_->num_ranks(), own = host_exchange_->rank();
    std::vector<std::vector<AllocationRecord>> parsed(num_members, std::vector<AllocationRecord>(count));
    for (int peer = 0; peer < num_members; ++peer) {
        DEEP_EP_CHECK(records[peer].size() == record.size(),
                      "rank " << host_exchange_->first_rank() + peer
                              << " exchanged a different operation (ranks diverged)");
        int32_t peer_wants = 0;
        std::memcpy(&peer_wants, records[peer].data(), sizeof(peer_wants));
        if (!peer_wants)
            return false;
        for (size_t i = 0; i < count; ++i) {
            std::memcpy(&parsed[peer][i], records[peer].data() + record_offset(i), sizeof(AllocationRecord));
            if (parsed[peer][i].state == AllocationRecord::kNotExportable)
                return false;
        }
    }
    ++num_direct_ops_;
    out.assign(count, {});
    for (size_t i = 0; i < count; ++i) {
        for (int peer = 0; peer < num_members; ++peer) {
            const AllocationRecord& r = parsed[peer][i];
            if (r.state == AllocationRecord::kAbsent)
                out[i][peer] = nullptr;
            else if (peer == own)
                out[i][peer] = static_cast<const char*>(local[i]);
            else
                out[i][peer] = static_cast<const char*>(open_peer_allocation(
                                   std::string(reinterpret_cast<const char*>(&r.handle), sizeof(r.handle)))) +
                               r.offset;
        }
    }
    return true;
}

int64_t Buffer::num_internode_rows_sent() const {
    if (symmetric_.base == nullptr)
        return 0;
    int64_t value = 0;
    const int64_t offset = InternodeControl{num_ranks_, num_nvl_ranks_}.rows_sent_counter();
    DEEP_EP_CUDA_CHECK(cudaMemcpy(&value, static_cast<char*>(symmetric_.base) + offset, sizeof(value), cudaMemcpyDeviceToHost));
    return value;
}

WaitContext Buffer::wait_context() const { return WaitContext{error_device_, rank_, timeout_ns_}; }

std::string describe_wait_site(int site) {
    switch (static_cast<WaitSite>(site)) {
        case WaitSite::kBarrier: return "the barrier signal of";
        case WaitSite::kCoherenceFlag: return "the coherence-check flag of";
        case WaitSite::kLowLatencyCount: return "the low-latency receive count from";
        case WaitSite::kLowLatencyFlag: return "the low-latency combine flag from";
        case WaitSite::kTestingWait: return "the test flag of";
        case WaitSite::kInternodeExchange: return "the inter-node op-opening signal of";
        case WaitSite::kInternodeRows: return "the inter-node dispatch rows of";
        case WaitSite::kInternodeStaged: return "the inter-node staged combine input of";
        case WaitSite::kInternodePartial: return "the inter-node combine partial sums of node";
        case WaitSite::kInternodeClose: return "the inter-node combine's closing signal of";
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

void Buffer::raise_if_invalid_expert_id() {
    volatile InvalidExpertIdWord* word = invalid_expert_id_host_;
    if (word == nullptr || word->found == 0)
        return;
    // found was read first; with the acquire fence the kernel's writes of value and num_experts, fenced
    // before found, are visible.
    std::atomic_thread_fence(std::memory_order_acquire);
    const int value = word->value, num_experts = word->num_experts, rank = word->rank;
    const bool every_rank = rank >= 0;
    word->found = 0;
    word->claimed = 0;  // last: a kernel may claim the word again only once it reads as clear
    std::ostringstream message;
    message << "topk_idx: expert ids must be in [-1, " << num_experts << "), found " << value << " on rank "
            << (every_rank ? rank : rank_);
    if (every_rank)
        message << " (checked on the GPU: low_latency_dispatch treated it as -1 and completed on every rank, so its "
                   "outputs lack that token's pair with the expert; every rank of the call raises this error)";
    else
        message << " (checked on the GPU: the operation that passed it treated it as -1 and completed on every rank, "
                   "so its outputs lack that token's pair with the expert)";
    throw std::invalid_argument(message.str());
}

namespace {

// The arguments a rejection code can name (its low byte: index + 1; kUnnamedArgument: none of these).
constexpr const char* kRejectableArguments[] = {
    "x", "handle", "num_tokens_per_rank", "num_tokens_per_rdma_rank", "is_token_in_rank", "num_tokens_per_expert",
    "topk_idx", "topk_weights", "expert_alignment", "num_worst_tokens", "bias", "config", "previous_event", "num_sms",
    "num_max_dispatch_tokens_per_rank", "num_experts", "cumulative_local_expert_recv_stats",
    "dispatch_wait_recv_cost_stats", "use_ue8m0", "out", "combine_wait_recv_cost_stats"};
constexpr int kNumRejectableArguments = sizeof(kRejectableArguments) / sizeof(kRejectableArguments[0]);
constexpr int kUnnamedArgument = 0xff;
constexpr int kTypeErrorBit = 1 << 8;
constexpr int kLowLatencyBit = 1 << 9;
constexpr int kLowLatencyCombineBit = 1 << 10;
static_assert(kLowLatencyCombineBit < (1 << 15), "low-latency combine counters carry the code in 15 bits");

}  // namespace

namespace {

// A signature field's value as the intra-node signature shows it (runtime/call_agreement.hpp).
std::string shown_signature_field(int field, int value) {
    switch (field) {
        case 0: {
            static const char* const kOps[] = {"?", "dispatch", "dispatch (cached: handle given)", "combine", "barrier"};
            return value >= 1 && value <= 4 ? kOps[value] : "?";
        }
        case 1: return value == InternodeCallSignature::kFloat8 ? "torch.float8_e4m3fn" : "torch.bfloat16";
        case InternodeCallSignature::kNumFields - 1: return "dispatch #" + std::to_string(value);
        default: return std::to_string(value);
    }
}

}  // namespace

int Buffer::rejection_code(const std::string& message, bool type_error, RejectedOp op) {
    // "x[1]: ...", "handle.send_head: ..." name x and handle.
    const std::string name = message.substr(0, message.find_first_of(":.[ "));
    int index = kUnnamedArgument;
    for (int i = 0; i < kNumRejectableArguments; ++i)
        if (name == kRejectableArguments[i])
            index = i + 1;
    const int op_bit = op == RejectedOp::kLowLatencyDispatch  ? kLowLatencyBit
                       : op == RejectedOp::kLowLatencyCombine ? kLowLatencyCombineBit
                                                              : 0;
    return index | (type_error ? kTypeErrorBit : 0) | op_bit;
}

void Buffer::raise_if_rejected_by_peer() {
    volatile RejectionReport* word = rejection_report_host_;
    if (word == nullptr || word->found != 1)
        return;
    // found was read first; the kernel fenced the other fields before it.
    std::atomic_thread_fence(std::memory_order_acquire);
    const int rank = word->rank, code = word->code, value = word->value, limit = word->limit;
    word->found = 0;
    raise_rejection(rank, code, value, limit);
}

void Buffer::raise_rejection(int rank, int code, int value, int limit) {
    // The same words on every rank.
    const std::string skipped = "; every rank skipped the operation: its outputs are NaN";
    if (code == kTooFewWorstTokens)
        throw std::invalid_argument("num_worst_tokens: rank " + std::to_string(rank) + " would receive " +
                                    std::to_string(value) + " rows, more than its num_worst_tokens=" +
                                    std::to_string(limit) + " (checked on the GPU by every rank of the dispatch "
                                    "before any row moved)" + skipped);
    if (code == kForwardedRowsExceedBuffer)
        throw std::invalid_argument(
            "x: combining inter-node, rank " + std::to_string(rank) + " forwards " + std::to_string(value) +
            " rows for its node, but its buffer has room for " + std::to_string(limit) +
            " after its staged rows and the other nodes' partial sums (checked on the GPU): raise num_rdma_bytes "
            "(Config.get_rdma_buffer_size_hint covers every routing)" + skipped);
    if ((code & kGpuVerdictMask) == kSignatureDiffers) {
        const int op = (code >> 24) & 0xf, field = (code >> 8) & 0xff, reference = code & 0xff;
        throw std::invalid_argument(std::string(InternodeCallSignature::field_name(field, op)) +
                                    ": ranks disagree on this inter-node call (rank " + std::to_string(reference) +
                                    ": " + shown_signature_field(field, limit) + ", rank " + std::to_string(rank) +
                                    ": " + shown_signature_field(field, value) +
                                    "; compared on the GPU before anything moved); every rank must pass the same" +
                                    skipped);
    }
    if ((code & kGpuVerdictMask) == kLowLatencySignatureDiffers) {
        const int reference = code & 0xffff;
        int field = 0;
        while (field + 1 < LowLatencySignature::kNumFields &&
               LowLatencySignature::field(value, static_cast<LowLatencySignature::Field>(field)) ==
                   LowLatencySignature::field(limit, static_cast<LowLatencySignature::Field>(field)))
            ++field;
        const auto shown = [&](int signature) {
            const int v = LowLatencySignature::field(signature, static_cast<LowLatencySignature::Field>(field));
            switch (field) {
                case LowLatencySignature::kUseFp8: return std::string(v != 0 ? "True" : "False");
                case LowLatencySignature::kHidden:
                    return std::to_string(v < static_cast<int>(std::size(kLowLatencySupportedHidden))
                                              ? kLowLatencySupportedHidden[v]
                                              : -1);
                case LowLatencySignature::kNumExperts: return std::to_string(v + 1);
                default: return std::to_string(v);
            }
        };
        static const char* const kFields[] = {"use_fp8", "x", "num_max_dispatch_tokens_per_rank", "num_experts"};
        static const char* const kShownAs[] = {"", " (hidden size)", "", ""};
        throw std::invalid_argument(std::string(kFields[field]) + ": ranks disagree on this low-latency dispatch" +
                                    kShownAs[field] + " (rank " + std::to_string(reference) + ": " + shown(limit) +
                                    ", rank " + std::to_string(rank) + ": " + shown(value) +
                                    "; compared on the GPU by every rank from the count words); every rank must "
                                    "pass the same, and this round's outputs are not valid");
    }
    const int index = code & 0xff;
    const bool type_error = (code & kTypeErrorBit) != 0;
    std::ostringstream message;
    message << (index >= 1 && index <= kNumRejectableArguments ? kRejectableArguments[index - 1] : "arguments")
            << ": rank " << rank;
    if ((code & kLowLatencyBit) != 0)
        message << " rejected the low-latency dispatch of this round (" << (type_error ? "TypeError" : "ValueError")
                << " there, with the details): it took part with no tokens and its experts returned NaN rows, so "
                   "this round's low_latency_combine outputs are NaN for the tokens routed to rank "
                << rank << "'s experts";
    else if ((code & kLowLatencyCombineBit) != 0)
        message << " rejected a low_latency_combine this rank took part in (" << (type_error ? "TypeError" : "ValueError")
                << " there, with the details): its experts returned NaN rows, so that combine's outputs are NaN "
                   "for the tokens routed to rank "
                << rank << "'s experts";
    else
        message << " rejected an inter-node operation this rank took part in ("
                << (type_error ? "TypeError" : "ValueError") << " there, with the details)" << skipped
                << " (a fresh dispatch that waited for its counts returned none)";
    if (type_error)
        throw pybind11::type_error(message.str());
    throw std::invalid_argument(message.str());
}

void Buffer::require_usable() const {
    DEEP_EP_CHECK(!destroyed_, "Buffer was destroyed");
    raise_if_failed();
}

void register_apis(pybind11::module_& m) {
    pybind11::class_<Buffer>(m, "RuntimeBuffer")
        .def(pybind11::init([](int rank, int num_ranks, int64_t num_nvl_bytes, double timeout_s, int64_t comm_stream,
                               int max_num_sms, bool conservative_loads, bool host_expert_id_check,
                               bool always_comm_stream, int num_nvl_ranks) {
                 return std::make_unique<Buffer>(BufferOptions{
                     rank, num_ranks, num_nvl_ranks <= 0 ? default_num_nvl_ranks(num_ranks) : num_nvl_ranks,
                     num_nvl_bytes, timeout_s, reinterpret_cast<cudaStream_t>(comm_stream), max_num_sms,
                     conservative_loads, host_expert_id_check, always_comm_stream});
             }),
             pybind11::arg("rank"), pybind11::arg("num_ranks"), pybind11::arg("num_nvl_bytes"),
             pybind11::arg("timeout_s"), pybind11::arg("comm_stream") = 0, pybind11::arg("max_num_sms") = 1,
             pybind11::arg("conservative_loads") = false, pybind11::arg("host_expert_id_check") = false,
             pybind11::arg("always_comm_stream") = false, pybind11::arg("num_nvl_ranks") = 0)
        .def("local_ipc_handle", &Buffer::local_ipc_handle)
        .def("connect", &Buffer::connect)
        .def("destroy", &Buffer::destroy)
        .def("raise_if_failed", &Buffer::raise_if_failed)
        .def("raise_if_invalid_expert_id", &Buffer::raise_if_invalid_expert_id)
        .def("raise_if_rejected_by_peer", &Buffer::raise_if_rejected_by_peer)
        .def("attach_host_exchange", &Buffer::attach_host_exchange, pybind11::arg("name"), pybind11::arg("create"))
        .def("unlink_host_exchange", &Buffer::unlink_host_exchange)
        // Python's own checks of an op that agrees on errors (deep_ep/backends/cuda.py): always raises.
        .def(
            "agree_on_error",
            [](Buffer& self, const std::string& op, const std::string& error_type, const std::string& message) {
                self.agree_on_error(CallRecord{op, error_type, message, {}});
            },
            pybind11::arg("op"), pybind11::arg("error_type"), pybind11::arg("message"))
        .def("attach_symmetric", &Buffer::attach_symmetric, pybind11::arg("base"), pybind11::arg("num_bytes"),
             pybind11::arg("mapped_bases"), pybind11::arg("num_blocks"))
        .def_property("direct_reads", &Buffer::direct_reads, &Buffer::set_direct_reads)
        .def_property_readonly("num_direct_ops", &Buffer::num_direct_ops)
        .def_property_readonly("num_peer_allocation_opens", &Buffer::num_peer_allocation_opens)
        .def_property_readonly("failed", &Buffer::failed)
        .def_property_readonly("is_connected", &Buffer::is_connected)
        .def_property_readonly("rank", &Buffer::rank)
        .def_property_readonly("num_ranks", &Buffer::num_ranks)
        .def_property_readonly("num_nvl_ranks", &Buffer::num_nvl_ranks)
        .def_property_readonly("num_internode_rows_sent", &Buffer::num_internode_rows_sent)
        .def_property_readonly("device", &Buffer::device)
        .def_property_readonly("num_nvl_bytes", &Buffer::num_nvl_bytes)
        .def_property_readonly("local_buffer_ptr", &Buffer::local_buffer_ptr);
}

}  // namespace deep_ep::runtime
