// Checks of a public call's arguments, made before anything is launched or communicated, so a rejected
// call leaves the Buffer as it was. TypeError for a wrong Python type or dtype, ValueError for a wrong
// shape, device, contiguity or value; every message starts with the argument's name, worded as the
// reference backend's checks (deep_ep/backends/validation.py) word them.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

namespace deep_ep::ops::arguments {

[[noreturn]] void raise_type_error(const std::string& message);
[[noreturn]] void raise_value_error(const std::string& message);

// A size in a shape that may be anything.
inline constexpr int64_t kAny = -1;

struct TensorRule {
    std::initializer_list<c10::ScalarType> dtypes;
    // Expected sizes (kAny where free); empty: any shape with `ndim` dimensions (any ndim when -1).
    std::initializer_list<int64_t> shape = {};
    int64_t ndim = -1;
    bool contiguous = true;
};

// The tensor `obj` holds, checked against `rule` and the Buffer's device. `rule` is read before the call
// returns, so a braced temporary is fine.
const torch::Tensor& tensor(pybind11::handle obj, const char* name, const TensorRule& rule, int device);
// As tensor(), or nullopt for None.
std::optional<torch::Tensor> optional_tensor(pybind11::handle obj, const char* name, const TensorRule& rule,
                                             int device);
// Only the Python type: a tensor or None (for arguments V1 accepts and this path does not read).
void check_tensor_or_none(pybind11::handle obj, const char* name);

// An int (not a bool, not a tensor: reading a tensor's value would synchronise with the GPU), >= minimum.
int64_t integer(pybind11::handle obj, const char* name, int64_t minimum);

// The elements of a handle: a tuple, or a list (code that rebuilds V1 handles makes lists); anything else
// is a TypeError that names `made_by`, the op whose handle is expected. Borrowed from `obj`.
class HandleItems {
  public:
    HandleItems(pybind11::handle obj, const char* made_by);
    Py_ssize_t size() const { return size_; }
    pybind11::handle operator()(Py_ssize_t i) const {
        return pybind11::handle(is_tuple_ ? PyTuple_GET_ITEM(obj_, i) : PyList_GET_ITEM(obj_, i));
    }

  private:
    PyObject* obj_;
    bool is_tuple_;
    Py_ssize_t size_;
};

// "[8, *, 16]"-style shape text and torch's dtype names ("torch.bfloat16"), for messages.
std::string shape_text(std::initializer_list<int64_t> shape);
std::string dtype_name(c10::ScalarType dtype);

// Checks several ops share.
// num_experts: an int >= 1 divisible by the number of ranks.
int64_t num_experts(pybind11::handle obj, int64_t num_ranks);
// topk_idx: int64 or int32 [num_tokens (kAny: any), k] with 1 <= k <= max_topk, on `device`, contiguous.
// The ids themselves are range-checked by the kernels (Buffer::invalid_expert_id_device).
const torch::Tensor& topk_idx(pybind11::handle obj, int64_t num_tokens, int64_t max_topk, int device);

// Every id of topk_idx in [-1, num_experts), checked on the host: one aminmax, which waits for the GPU.
// Only with DEEP_EP_HOST_EXPERT_ID_CHECK=1; by default the kernels check the ids.
void check_expert_ids_on_host(const torch::Tensor& topk_idx, int64_t num_experts);

// The buffer-capacity error every op raises with the same wording.
[[noreturn]] void raise_capacity_error(const char* name, const std::string& what, int64_t needed, int64_t available,
                                       const char* buffer_argument);

}  // namespace deep_ep::ops::arguments
