#include "ops/arguments.hpp"

#include <torch/csrc/autograd/python_variable.h>

#include <sstream>

namespace deep_ep::ops::arguments {
namespace {

std::string python_type_name(pybind11::handle obj) { return Py_TYPE(obj.ptr())->tp_name; }

std::string device_text(const c10::Device& device) { return device.str(); }

}  // namespace

void raise_type_error(const std::string& message) { throw pybind11::type_error(message); }

void raise_value_error(const std::string& message) { throw pybind11::value_error(message); }

HandleItems::HandleItems(pybind11::handle obj, const char* made_by)
    : obj_(obj.ptr()), is_tuple_(PyTuple_Check(obj_)) {
    if (!is_tuple_ && !PyList_Check(obj_))
        raise_type_error(std::string("handle: expected the tuple returned by ") + made_by + ", got " +
                         python_type_name(obj));
    size_ = is_tuple_ ? PyTuple_GET_SIZE(obj_) : PyList_GET_SIZE(obj_);
}

std::string shape_text(std::initializer_list<int64_t> shape) {
    std::ostringstream text;
    text << "[";
    const char* separator = "";
    for (const int64_t size : shape) {
        text << separator;
        if (size == kAny)
            text << "*";
        else
            text << size;
        separator = ", ";
    }
    text << "]";
    return text.str();
}

std::string dtype_name(c10::ScalarType dtype) {
    switch (dtype) {
        case c10::ScalarType::Float: return "torch.float32";
        case c10::ScalarType::Double: return "torch.float64";
        case c10::ScalarType::Half: return "torch.float16";
        case c10::ScalarType::BFloat16: return "torch.bfloat16";
        case c10::ScalarType::Float8_e4m3fn: return "torch.float8_e4m3fn";
        case c10::ScalarType::Long: return "torch.int64";
        case c10::ScalarType::Int: return "torch.int32";
        case c10::ScalarType::Short: return "torch.int16";
        case c10::ScalarType::Char: return "torch.int8";
        case c10::ScalarType::Byte: return "torch.uint8";
        case c10::ScalarType::Bool: return "torch.bool";
        default: return std::string("torch.") + c10::toString(dtype);
    }
}

const torch::Tensor& tensor(pybind11::handle obj, const char* name, const TensorRule& rule, int device) {
    if (!THPVariable_Check(obj.ptr()))
        raise_type_error(std::string(name) + ": expected a torch.Tensor, got " + python_type_name(obj));
    const torch::Tensor& t = THPVariable_Unpack(obj.ptr());
    const c10::ScalarType dtype = t.scalar_type();
    bool dtype_ok = false;
    for (const c10::ScalarType wanted : rule.dtypes)
        dtype_ok |= wanted == dtype;
    if (!dtype_ok) {
        std::string wanted_text;
        for (const c10::ScalarType wanted : rule.dtypes)
            wanted_text += (wanted_text.empty() ? "" : " or ") + dtype_name(wanted);
        raise_type_error(std::string(name) + ": expected dtype " + wanted_text + ", got " + dtype_name(dtype));
    }
    const auto sizes = t.sizes();
    if (rule.shape.size() > 0) {
        bool shape_ok = sizes.size() == rule.shape.size();
        size_t i = 0;
        for (const int64_t wanted : rule.shape) {
            if (!shape_ok)
                break;
            shape_ok = wanted == kAny || wanted == sizes[i];
            ++i;
        }
        if (!shape_ok)
            raise_value_error(std::string(name) + ": expected shape " + shape_text(rule.shape) + ", got " +
                              c10::str(sizes));
    } else if (rule.ndim >= 0 && static_cast<int64_t>(sizes.size()) != rule.ndim) {
        raise_value_error(std::string(name) + ": expected shape a " + std::to_string(rule.ndim) + "-D tensor, got " +
                          c10::str(sizes));
    }
    const c10::Device got = t.device();
    if (!got.is_cuda() || got.index() != device)
        raise_value_error(std::string(name) + ": must be on the buffer's device " +
                          device_text(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device))) +
                          ", found " + device_text(got));
    if (rule.contiguous && !t.is_contiguous())
        raise_value_error(std::string(name) + ": must be contiguous");
    return t;
}

std::optional<torch::Tensor> optional_tensor(pybind11::handle obj, const char* name, const TensorRule& rule,
                                             int device) {
    if (obj.is_none())
        return std::nullopt;
    return tensor(obj, name, rule, device);
}

void check_tensor_or_none(pybind11::handle obj, const char* name) {
    if (!obj.is_none() && !THPVariable_Check(obj.ptr()))
        raise_type_error(std::string(name) + ": expected Tensor or None, got " + python_type_name(obj));
}

int64_t integer(pybind11::handle obj, const char* name, int64_t minimum) {
    PyObject* value = obj.ptr();
    int64_t result = 0;
    if (PyLong_CheckExact(value)) {
        result = PyLong_AsLongLong(value);
    } else if (PyBool_Check(value) || THPVariable_Check(value) || !PyIndex_Check(value)) {
        raise_type_error(std::string(name) + ": expected an int, got " + python_type_name(obj));
    } else {
        // numpy and other integral types
        const pybind11::object index = pybind11::reinterpret_steal<pybind11::object>(PyNumber_Index(value));
        if (!index)
            throw pybind11::error_already_set();
        result = PyLong_AsLongLong(index.ptr());
    }
    if (result == -1 && PyErr_Occurred())
        throw pybind11::error_already_set();
    if (result < minimum)
        raise_value_error(std::string(name) + ": must be >= " + std::to_string(minimum) + ", got " +
                          std::to_string(result));
    return result;
}

int64_t num_experts(pybind11::handle obj, int64_t num_ranks) {
    const int64_t value = integer(obj, "num_experts", 1);
    if (value % num_ranks != 0)
        raise_value_error("num_experts: must be divisible by the number of ranks " + std::to_string(num_ranks) +
                          ", got " + std::to_string(value));
    return value;
}

const torch::Tensor& topk_idx(pybind11::handle obj, int64_t num_tokens, int64_t max_topk, int device) {
    const torch::Tensor& t =
        tensor(obj, "topk_idx", {{c10::ScalarType::Long, c10::ScalarType::Int}, {num_tokens, kAny}}, device);
    const int64_t k = t.size(1);
    if (k < 1 || k > max_topk)
        raise_value_error("topk_idx: top-k must be in [1, " + std::to_string(max_topk) + "], got " + std::to_string(k));
    return t;
}

void check_expert_ids_on_host(const torch::Tensor& topk_idx, int64_t num_experts) {
    if (topk_idx.numel() == 0)
        return;
    const auto [low, high] = torch::aminmax(topk_idx);
    const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
    if (lo < -1 || hi >= num_experts)
        raise_value_error("topk_idx: expert ids must be in [-1, " + std::to_string(num_experts) + "), found " +
                          std::to_string(lo < -1 ? lo : hi));
}

void raise_capacity_error(const char* name, const std::string& what, int64_t needed, int64_t available,
                          const char* buffer_argument) {
    std::ostringstream message;
    message << name << ": " << what << " needs " << needed << " bytes of buffer but the Buffer was created with "
            << buffer_argument << "=" << available << "; size it with the matching size hint";
    raise_value_error(message.str());
}

}  // namespace deep_ep::ops::arguments
