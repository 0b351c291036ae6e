#include "runtime/nvshmem.hpp"

#include <pybind11/stl.h>

#include <cstring>
#include <string>

#include "runtime/errors.hpp"

#ifdef DEEP_EP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace deep_ep::runtime::nvshmem {

#ifdef DEEP_EP_WITH_NVSHMEM
namespace {
bool g_initialized = false;
}

bool is_compiled() { return true; }

pybind11::bytes get_unique_id() {
    nvshmemx_uniqueid_t unique_id;
    DEEP_EP_CHECK(nvshmemx_get_uniqueid(&unique_id) == 0, "nvshmemx_get_uniqueid failed");
    return pybind11::bytes(reinterpret_cast<const char*>(&unique_id), sizeof(unique_id));
}

void init(const std::string& unique_id, int rank, int num_ranks) {
    if (g_initialized)
        return;
    DEEP_EP_CHECK(unique_id.size() == sizeof(nvshmemx_uniqueid_t), "malformed NVSHMEM unique id");
    nvshmemx_uniqueid_t id;
    std::memcpy(&id, unique_id.data(), sizeof(id));
    nvshmemx_init_attr_t attr;
    std::memset(&attr, 0, sizeof(attr));
    DEEP_EP_CHECK(nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr) == 0,
                  "nvshmemx_set_attr_uniqueid_args failed");
    // Initialised here, not only through nvshmem4py: the device state lives in this extension's own
    // statically linked libnvshmem_device, which only this call sets up.
    DEEP_EP_CHECK(nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) == 0, "nvshmemx_init_attr failed");
    DEEP_EP_CHECK(nvshmem_my_pe() == rank, "NVSHMEM PE " << nvshmem_my_pe() << " differs from rank " << rank);
    g_initialized = true;
}

bool is_initialized() { return g_initialized; }

int init_status() { return nvshmemx_init_status(); }

std::pair<int, int> my_pe_and_n_pes() {
    DEEP_EP_CHECK(nvshmemx_init_status() != NVSHMEM_STATUS_NOT_INITIALIZED, "NVSHMEM is not initialised");
    return {nvshmem_my_pe(), nvshmem_n_pes()};
}

void attach(int rank, int num_ranks) {
    if (g_initialized)
        return;
    DEEP_EP_CHECK(nvshmemx_init_status() != NVSHMEM_STATUS_NOT_INITIALIZED,
                  "NVSHMEM is not initialised in this process: nothing to attach to");
    DEEP_EP_CHECK(nvshmem_my_pe() == rank && nvshmem_n_pes() == num_ranks,
                  "NVSHMEM runs as PE " << nvshmem_my_pe() << " of " << nvshmem_n_pes() << ", not as rank " << rank
                                        << " of " << num_ranks);
    // NVSHMEM allows further init calls from the same processes, each matched by one finalize. On a host
    // library that is bootstrapped already, the call skips the bootstrap (so it needs no unique id), registers
    // the device state of the libnvshmem_device this call is linked with (this extension's own, statically
    // linked: whoever initialised the host library never saw it) and copies the running state into it.
    // Without it this module's kernels would see NVSHMEM as uninitialised.
    DEEP_EP_CHECK(nvshmemx_init_attr(0, nullptr) == 0, "nvshmemx_init_attr failed");
    g_initialized = true;
}

uintptr_t alloc(int64_t num_bytes) {
    DEEP_EP_CHECK(g_initialized, "NVSHMEM is not initialised");
    void* ptr = nvshmem_align(128, static_cast<size_t>(num_bytes));
    DEEP_EP_CHECK(ptr != nullptr, "nvshmem_align(" << num_bytes << ") failed: raise NVSHMEM_SYMMETRIC_SIZE");
    DEEP_EP_CUDA_CHECK(cudaMemset(ptr, 0, num_bytes));
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    return reinterpret_cast<uintptr_t>(ptr);
}

void free(uintptr_t ptr) {
    if (g_initialized && ptr != 0)
        nvshmem_free(reinterpret_cast<void*>(ptr));
}

uintptr_t peer_ptr(uintptr_t ptr, int pe) {
    return reinterpret_cast<uintptr_t>(nvshmem_ptr(reinterpret_cast<void*>(ptr), pe));
}

void barrier_all() {
    DEEP_EP_CHECK(g_initialized, "NVSHMEM is not initialised");
    nvshmem_barrier_all();
}

void finalize() {
    if (!g_initialized)
        return;
    nvshmem_finalize();
    g_initialized = false;
}

std::string version() {
    int spec_major = 0, spec_minor = 0;
    nvshmem_info_get_version(&spec_major, &spec_minor);
    return std::to_string(NVSHMEM_VENDOR_MAJOR_VERSION) + "." + std::to_string(NVSHMEM_VENDOR_MINOR_VERSION) + "." +
           std::to_string(NVSHMEM_VENDOR_PATCH_VERSION) + " (OpenSHMEM " + std::to_string(spec_major) + "." +
           std::to_string(spec_minor) + ")";
}

#else  // no NVSHMEM in this build: every entry point says so

namespace {
[[noreturn]] void not_compiled() {
    throw std::runtime_error("deep_ep was built without NVSHMEM (low-latency and inter-node kernels are missing); "
                             "install nvidia-nvshmem-cu13 or set NVSHMEM_DIR and rebuild");
}
}  // namespace

bool is_compiled() { return false; }
pybind11::bytes get_unique_id() { not_compiled(); }
void init(const std::string&, int, int) { not_compiled(); }
bool is_initialized() { return false; }
int init_status() { return 0; }
std::pair<int, int> my_pe_and_n_pes() { not_compiled(); }
void attach(int, int) { not_compiled(); }
uintptr_t alloc(int64_t) { not_compiled(); }
void free(uintptr_t) {}
uintptr_t peer_ptr(uintptr_t, int) { not_compiled(); }
void barrier_all() { not_compiled(); }
void finalize() {}
std::string version() { return "not compiled"; }

#endif

void register_apis(pybind11::module_& m) {
    auto sub = m.def_submodule("nvshmem", "NVSHMEM host runtime (the extension's own device state)");
    sub.def("is_compiled", &is_compiled);
    sub.def("get_unique_id", &get_unique_id);
    sub.def("init", &init, pybind11::arg("unique_id"), pybind11::arg("rank"), pybind11::arg("num_ranks"));
    sub.def("is_initialized", &is_initialized);
    sub.def("init_status", &init_status);
    sub.def("my_pe_and_n_pes", &my_pe_and_n_pes);
    sub.def("attach", &attach, pybind11::arg("rank"), pybind11::arg("num_ranks"));
    sub.def("alloc", &alloc);
    sub.def("free", &free);
    sub.def("peer_ptr", &peer_ptr);
    sub.def("barrier_all", &barrier_all);
    sub.def("finalize", &finalize);
    sub.def("version", &version);
}

}  // namespace deep_ep::runtime::nvshmem
