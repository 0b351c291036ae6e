// The only file that touches NVSHMEM's host API: initialisation from a unique id broadcast over the
// process group, the symmetric heap, and teardown. Compiled to stubs that raise without NVSHMEM.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace deep_ep::runtime::nvshmem {

bool is_compiled();
pybind11::bytes get_unique_id();
// Every rank calls this with the same id (rank 0's, broadcast by Python). Idempotent per process.
void init(const std::string& unique_id, int rank, int num_ranks);
bool is_initialized();
uintptr_t alloc(int64_t num_bytes);  // symmetric: every PE must call it with the same size, in order
void free(uintptr_t ptr);
// Address through which this PE reaches `pe`'s copy of a symmetric object with loads/stores, or 0
// when only NVSHMEM's put/get reach it (another node, or P2P disabled).
uintptr_t peer_ptr(uintptr_t ptr, int pe);
void barrier_all();
void finalize();
std::string version();

void register_apis(pybind11::module_& m);

}  // namespace deep_ep::runtime::nvshmem
