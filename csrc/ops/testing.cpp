// deep_ep._C.testing: launches for deep_ep.check and tests/test_primitives.py. Peer pointers and the wait
// context come from a RuntimeBuffer (for the inter-node check: the NVSHMEM symmetric buffer attached to it);
// counters and outputs are torch tensors the caller allocated.
#include <torch/extension.h>

#include <pybind11/stl.h>

#include <initializer_list>
#include <stdexcept>
#include <string>

#include "kernels/api.cuh"
#include "ops/ops.hpp"
#include "runtime/buffer.hpp"
#include "runtime/call_agreement.hpp"
#include "runtime/handle_identity.hpp"
#include "runtime/errors.hpp"

namespace deep_ep::ops {
namespace {

// Views of `strings` (which must outlive them) as the C strings runtime::HandleElements names its tensors by.
std::vector<const char*> c_strings(const std::vector<std::string>& strings) {
    std::vector<const char*> out;
    for (const std::string& s : strings)
        out.push_back(s.c_str());
    return out;
}

CoherenceVariant parse_variant(const std::string& name) {
    if (name == "aggressive")
        return CoherenceVariant::kAggressive;
    if (name == "conservative")
        return CoherenceVariant::kConservative;
    if (name == "nc_allocating_acquire")
        return CoherenceVariant::kNcAllocatingAcquire;
    if (name == "nc_allocating_relaxed")
        return CoherenceVariant::kNcAllocatingRelaxed;
    DEEP_EP_CHECK(false, "unknown coherence variant '" << name
                                                       << "' (aggressive, conservative, nc_allocating_acquire, "
                                                          "nc_allocating_relaxed)");
}

CoherencePlacement parse_placement(const std::string& name) {
    if (name == "pull")
        return CoherencePlacement::kPull;
    if (name == "push")
        return CoherencePlacement::kPush;
    DEEP_EP_CHECK(false, "unknown placement '" << name << "' (pull, push)");
}

uint8_t* peer_buffer(const runtime::Buffer& buffer, int peer) {
    DEEP_EP_CHECK(peer >= 0 && peer < buffer.num_ranks(), "peer " << peer << " out of range");
    DEEP_EP_CHECK(peer == buffer.rank() || buffer.is_connected(), "RuntimeBuffer is not connected to its peers");
    auto* base = static_cast<uint8_t*>(buffer.peer_buffers()[peer]);
    DEEP_EP_CHECK(base != nullptr, "no NVLink buffer mapped for rank " << peer);
    return base;
}

void check_device_tensor(const torch::Tensor& t, torch::ScalarType dtype, int64_t min_numel, const char* name) {
    DEEP_EP_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == dtype && t.numel() >= min_numel,
                  name << " must be a contiguous CUDA tensor of " << dtype << " with at least " << min_numel
                       << " elements");
}

int64_t coherence_buffer_bytes(int64_t num_blocks, int64_t slice_bytes) {
    return CoherenceLayout{static_cast<int>(num_blocks), slice_bytes}.total_bytes();
}

void coherence_round_trip(runtime::Buffer& buffer, int64_t producer_rank, int64_t consumer_rank,
                          const std::string& variant, const std::string& placement, int64_t num_blocks,
                          int64_t slice_bytes, int64_t num_rounds, int64_t seq_base, torch::Tensor& counters,
                          int64_t stream) {
    buffer.raise_if_failed();
    check_device_tensor(counters, torch::kInt64, kNumCoherenceCounters, "counters");
    CoherenceArgs args{};
    args.variant = parse_variant(variant);
    args.placement = parse_placement(placement);
    args.layout = CoherenceLayout{static_cast<int>(num_blocks), slice_bytes};
    DEEP_EP_CHECK(args.layout.total_bytes() <= buffer.num_nvl_bytes(),
                  "the coherence regions need " << args.layout.total_bytes() << " bytes, the RuntimeBuffer has "
                                                << buffer.num_nvl_bytes());
    args.num_rounds = static_cast<int>(num_rounds);
    args.seq_base = static_cast<int>(seq_base);
    args.local_buffer = peer_buffer(buffer, buffer.rank());
    args.producer_peer_buffer = peer_buffer(buffer, static_cast<int>(producer_rank));
    args.consumer_peer_buffer = peer_buffer(buffer, static_cast<int>(consumer_rank));
    args.producer_rank = static_cast<int>(producer_rank);
    args.consumer_rank = static_cast<int>(consumer_rank);
    args.counters = reinterpret_cast<unsigned long long*>(counters.data_ptr<int64_t>());
    args.wait = buffer.wait_context();
    args.stream = reinterpret_cast<cudaStream_t>(stream);
    launch_coherence_round_trip(args);
}

#ifdef DEEP_EP_WITH_NVSHMEM
CoherenceDelivery parse_delivery(const std::string& name) {
    if (name == "put_then_signal")
        return CoherenceDelivery::kPutThenSignal;
    if (name == "put_with_signal")
        return CoherenceDelivery::kPutWithSignal;
    DEEP_EP_CHECK(false, "unknown delivery '" << name << "' (put_then_signal, put_with_signal)");
}

// The symmetric buffer attached to `buffer` (RuntimeBuffer.attach_symmetric), once each of `peers` is known
// to be reached by NVSHMEM puts only: the inter-node tests must not fall back to mapped stores, which would
// test the intra-node path instead. Reads the mapped bases back from the device (a test, not a hot path).
const runtime::SymmetricBuffer& put_reached_symmetric(runtime::Buffer& buffer, std::initializer_list<int64_t> peers,
                                                      const char* op) {
    const runtime::SymmetricBuffer& symmetric = buffer.symmetric(op);
    const torch::Tensor mapped = symmetric.mapped_bases.cpu();
    for (const int64_t peer : peers) {
        DEEP_EP_CHECK(peer >= 0 && peer < buffer.num_ranks() && peer != buffer.rank(),
                      op << ": peer " << peer << " must be another rank of the " << buffer.num_ranks());
        DEEP_EP_CHECK(mapped[peer].item<int64_t>() == 0,
                      op << ": rank " << peer << "'s symmetric buffer is mapped into this process (same node); the "
                         << "inter-node check needs a peer that only NVSHMEM puts reach (another node)");
    }
    return symmetric;
}

void internode_coherence_round_trip(runtime::Buffer& buffer, int64_t producer_rank, int64_t consumer_rank,
                                    const std::string& variant, const std::string& delivery, int64_t num_blocks,
                                    int64_t slice_bytes, int64_t num_rounds, int64_t seq_base, torch::Tensor& counters,
                                    int64_t stream) {
    buffer.raise_if_failed();
    check_device_tensor(counters, torch::kInt64, kNumCoherenceCounters, "counters");
    const runtime::SymmetricBuffer& symmetric =
        put_reached_symmetric(buffer, {producer_rank, consumer_rank}, "internode_coherence_round_trip");
    InternodeCoherenceArgs args{};
    args.variant = parse_variant(variant);
    args.delivery = parse_delivery(delivery);
    args.layout = CoherenceLayout{static_cast<int>(num_blocks), slice_bytes};
    DEEP_EP_CHECK(args.layout.total_bytes() <= symmetric.num_bytes,
                  "the coherence regions need " << args.layout.total_bytes() << " bytes, the symmetric buffer has "
                                                << symmetric.num_bytes);
    args.num_rounds = static_cast<int>(num_rounds);
    args.seq_base = static_cast<int>(seq_base);
    args.local_base = symmetric.base;
    args.mapped_bases = reinterpret_cast<const uint64_t*>(symmetric.mapped_bases.data_ptr<int64_t>());
    args.producer_rank = static_cast<int>(producer_rank);
    args.consumer_rank = static_cast<int>(consumer_rank);
    args.counters = reinterpret_cast<unsigned long long*>(counters.data_ptr<int64_t>());
    args.wait = buffer.wait_context();
    args.stream = reinterpret_cast<cudaStream_t>(stream);
    launch_internode_coherence_round_trip(args);
}

void put_bandwidth(runtime::Buffer& buffer, int64_t dst_rank, int64_t offset, int64_t num_bytes, int64_t num_blocks,
                   int64_t stream) {
    buffer.raise_if_failed();
    const runtime::SymmetricBuffer& symmetric = put_reached_symmetric(buffer, {dst_rank}, "put_bandwidth");
    DEEP_EP_CHECK(offset >= 0 && num_bytes > 0 && offset + num_bytes <= symmetric.num_bytes,
                  "cannot put " << num_bytes << " bytes at offset " << offset << " of a " << symmetric.num_bytes
                                << "-byte symmetric buffer");
    PutBandwidthArgs args{};
    args.local_base = symmetric.base;
    args.mapped_bases = reinterpret_cast<const uint64_t*>(symmetric.mapped_bases.data_ptr<int64_t>());
    args.dst_rank = static_cast<int>(dst_rank);
    args.offset = offset;
    args.num_bytes = num_bytes;
    args.num_blocks = static_cast<int>(num_blocks);
    args.stream = reinterpret_cast<cudaStream_t>(stream);
    launch_put_bandwidth(args);
}
#endif  // DEEP_EP_WITH_NVSHMEM

void peer_read_bandwidth(runtime::Buffer& buffer, int64_t peer, int64_t num_bytes, bool conservative_loads,
                         int64_t num_blocks, torch::Tensor& sink, int64_t stream) {
    buffer.raise_if_failed();
    check_device_tensor(sink, torch::kInt32, num_blocks * kPeerReadThreads, "sink");
    DEEP_EP_CHECK(num_bytes <= buffer.num_nvl_bytes(),
                  "cannot read " << num_bytes << " bytes from a " << buffer.num_nvl_bytes() << "-byte buffer");
    PeerReadBandwidthArgs args{};
    args.source = reinterpret_cast<const int*>(peer_buffer(buffer, static_cast<int>(peer)));
    args.num_bytes = num_bytes;
    args.conservative_loads = conservative_loads;
    args.num_blocks = static_cast<int>(num_blocks);
    args.sink = sink.data_ptr<int>();
    args.stream = reinterpret_cast<cudaStream_t>(stream);
    launch_peer_read_bandwidth(args);
}

void wait_probe(runtime::Buffer& buffer, int64_t flag_offset_bytes, int64_t target, int64_t peer, int64_t stream) {
    buffer.raise_if_failed();
    DEEP_EP_CHECK(flag_offset_bytes >= 0 && flag_offset_bytes % 4 == 0 &&
                      flag_offset_bytes + 4 <= buffer.num_nvl_bytes(),
                  "flag offset " << flag_offset_bytes << " is not an int inside the buffer");
    WaitProbeArgs args{};
    args.flag = reinterpret_cast<const int*>(peer_buffer(buffer, buffer.rank()) + flag_offset_bytes);
    args.target = static_cast<int>(target);
    args.peer = static_cast<int>(peer);
    args.wait = buffer.wait_context();
    args.stream = reinterpret_cast<cudaStream_t>(stream);
    launch_wait_probe(args);
}

void ptx_probe(const torch::Tensor& inputs, torch::Tensor& scratch, torch::Tensor& outputs, int64_t stream) {
    check_device_tensor(inputs, torch::kInt32, kPtxProbeInputs, "inputs");
    check_device_tensor(scratch, torch::kInt32, kPtxProbeScratch, "scratch");
    check_device_tensor(outputs, torch::kInt32, kPtxProbeOutputs, "outputs");
    // The probe reads and writes int4 vectors at the start of both buffers.
    DEEP_EP_CHECK(reinterpret_cast<uintptr_t>(inputs.data_ptr()) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(scratch.data_ptr()) % 16 == 0,
                  "inputs and scratch must be 16-byte aligned");
    PtxProbeArgs args{};
    args.inputs = inputs.data_ptr<int>();
    args.scratch = scratch.data_ptr<int>();
    args.outputs = outputs.data_ptr<int>();
    args.stream = reinterpret_cast<cudaStream_t>(stream);
    launch_ptx_probe(args);
}

}  // namespace

void register_testing_apis(pybind11::module_& m) {
    namespace py = pybind11;
    auto sub = m.def_submodule("testing", "kernels that exercise the primitives (deep_ep.check, tests)");
    sub.attr("num_coherence_counters") = static_cast<int>(kNumCoherenceCounters);
    sub.attr("max_coherence_blocks") = CoherenceLayout::kMaxBlocks;
    sub.attr("peer_read_threads") = kPeerReadThreads;
    sub.attr("ptx_probe_inputs") = kPtxProbeInputs;
    sub.attr("ptx_probe_scratch") = kPtxProbeScratch;
    sub.attr("ptx_probe_outputs") = kPtxProbeOutputs;
    sub.def("coherence_buffer_bytes", &coherence_buffer_bytes, py::arg("num_blocks"), py::arg("slice_bytes"));
    sub.def("coherence_round_trip", &coherence_round_trip, py::arg("buffer"), py::arg("producer_rank"),
            py::arg("consumer_rank"), py::arg("variant"), py::arg("placement"), py::arg("num_blocks"),
            py::arg("slice_bytes"), py::arg("num_rounds"), py::arg("seq_base"), py::arg("counters"),
            py::arg("stream"));
    // What a RejectionReport raises, from the codes and signatures kernels fill it with (no GPU): the
    // agreed errors' words, tested on the CPU (tests/test_extension.py).
    sub.attr("low_latency_signature_differs") = static_cast<int>(kLowLatencySignatureDiffers);
    sub.def("raise_rejection", &runtime::Buffer::raise_rejection, py::arg("rank"), py::arg("code"), py::arg("value"),
            py::arg("limit"));
    sub.def(
        "rejection_code",
        [](const std::string& message, bool type_error, const std::string& op) {
            using Op = runtime::Buffer::RejectedOp;
            DEEP_EP_CHECK(op == "normal" || op == "low_latency_dispatch" || op == "low_latency_combine",
                          "op: normal, low_latency_dispatch or low_latency_combine, got '" << op << "'");
            const Op rejected = op == "low_latency_dispatch"  ? Op::kLowLatencyDispatch
                                : op == "low_latency_combine" ? Op::kLowLatencyCombine
                                                              : Op::kNormal;
            return runtime::Buffer::rejection_code(message, type_error, rejected);
        },
        py::arg("message"), py::arg("type_error"), py::arg("op"));
    sub.def(
        "low_latency_signature",
        [](bool use_fp8, int64_t hidden, int64_t num_max_tokens, int64_t num_experts) {
            DEEP_EP_CHECK(low_latency_hidden_index(hidden) >= 0, "hidden " << hidden << " is not a low-latency hidden size");
            return LowLatencySignature::of(use_fp8, hidden, num_max_tokens, num_experts);
        },
        py::arg("use_fp8"), py::arg("hidden"), py::arg("num_max_tokens"), py::arg("num_experts"));
    // The call agreement over a bare host exchange (no GPU): tests/test_call_agreement.py runs it in
    // several CPU processes.
    py::class_<runtime::HostExchange>(sub, "HostExchange")
        .def(py::init<const std::string&, int, int, bool, uint64_t, int>(), py::arg("name"), py::arg("rank"),
             py::arg("num_ranks"), py::arg("create"), py::arg("timeout_ns"), py::arg("first_rank") = 0)
        .def("unlink", &runtime::HostExchange::unlink)
        .def(
            "agree",
            [](runtime::HostExchange& exchange, const std::string& op, const std::string& error_type,
               const std::string& message, const std::vector<std::pair<std::string, std::string>>& signature,
               const py::bytes& payload, int num_ranks) {
                const std::vector<std::string> payloads = runtime::agree_on_call(
                    exchange, runtime::CallRecord{op, error_type, message, signature}, std::string(payload), num_ranks);
                py::list out;
                for (const std::string& p : payloads)
                    out.append(py::bytes(p));
                return out;
            },
            py::arg("op"), py::arg("error_type"), py::arg("message"), py::arg("signature"), py::arg("payload"),
            py::arg("num_ranks"));
    // Handle identity on CPU tensors (tests/test_call_agreement.py): the stamp a dispatch leaves and its
    // check on use, without a Buffer.
    sub.def(
        "stamp_handle",
        [](const std::vector<torch::Tensor>& tensors, const std::vector<std::string>& names, int key,
           int64_t buffer_uid, int64_t seq) {
            runtime::stamp_handle({tensors, c_strings(names), key}, buffer_uid, seq);
        },
        py::arg("tensors"), py::arg("names"), py::arg("key"), py::arg("buffer_uid"), py::arg("seq"));
    sub.def(
        "handle_identity",
        [](const std::vector<torch::Tensor>& tensors, const std::vector<std::string>& names, int key,
           int64_t buffer_uid) { return runtime::handle_identity({tensors, c_strings(names), key}, buffer_uid); },
        py::arg("tensors"), py::arg("names"), py::arg("key"), py::arg("buffer_uid"));
    sub.attr("put_bandwidth_threads") = kPutBandwidthThreads;
#ifdef DEEP_EP_WITH_NVSHMEM
    sub.attr("internode_compiled") = true;
    sub.def("internode_coherence_round_trip", &internode_coherence_round_trip, py::arg("buffer"),
            py::arg("producer_rank"), py::arg("consumer_rank"), py::arg("variant"), py::arg("delivery"),
            py::arg("num_blocks"), py::arg("slice_bytes"), py::arg("num_rounds"), py::arg("seq_base"),
            py::arg("counters"), py::arg("stream"));
    sub.def("put_bandwidth", &put_bandwidth, py::arg("buffer"), py::arg("dst_rank"), py::arg("offset"),
            py::arg("num_bytes"), py::arg("num_blocks"), py::arg("stream"));
#else
    sub.attr("internode_compiled") = false;
    for (const char* name : {"internode_coherence_round_trip", "put_bandwidth"})
        sub.def(name, [](py::args, py::kwargs) {
            throw std::runtime_error("deep_ep was built without NVSHMEM: the inter-node coherence check is missing; "
                                     "install nvidia-nvshmem-cu13 or set NVSHMEM_DIR and rebuild");
        });
#endif
    sub.def("peer_read_bandwidth", &peer_read_bandwidth, py::arg("buffer"), py::arg("peer"), py::arg("num_bytes"),
            py::arg("conservative_loads"), py::arg("num_blocks"), py::arg("sink"), py::arg("stream"));
    sub.def("wait_probe", &wait_probe, py::arg("buffer"), py::arg("flag_offset_bytes"), py::arg("target"),
            py::arg("peer"), py::arg("stream"));
    sub.def("ptx_probe", &ptx_probe, py::arg("inputs"), py::arg("scratch"), py::arg("outputs"), py::arg("stream"));
}

}  // namespace deep_ep::ops
