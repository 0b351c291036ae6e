// The only file that touches NVSHMEM's host API: initialisation from a unique id broadcast over the
// process group (or attaching to an NVSHMEM that another library, e.g. nvshmem4py, initialised in this
// process), the symmetric heap, and teardown. Compiled to stubs that raise without NVSHMEM.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>

namespace deep_ep::runtime::nvshmem {

bool is_compiled();
pybind11::bytes get_unique_id();
// Every rank calls this with the same id (rank 0's, broadcast by Python). Idempotent per process.
void init(const std::string& unique_id, int rank, int num_ranks);
// Whether this extension initialised NVSHMEM (init or attach).
bool is_initialized();
// nvshmemx_init_status() of the process's NVSHMEM host library, whoever initialised it: 0 not initialised,
// 1 bootstrapped, 2 and above initialised. Callable at any time.
int init_status();
// (my PE, number of PEs) of an NVSHMEM that is initialised (by anyone).
std::pair<int, int> my_pe_and_n_pes();
// NVSHMEM was initialised by someone else in this process (nvshmem4py, another extension) as PE `rank` of
// `num_ranks`: set up this extension's own device state (see nvshmem.cu). Idempotent per process.
void attach(int rank, int num_ranks);
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
