// Host-side error checks. Every failure becomes a C++ exception that pybind11 turns into a Python
// RuntimeError (or ValueError for DEEP_EP_CHECK_ARG), so nothing aborts the interpreter.
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace deep_ep {

[[noreturn]] inline void throw_runtime_error(const std::string& what, const char* file, int line) {
    std::ostringstream message;
    message << "deep_ep: " << what << " (" << file << ":" << line << ")";
    throw std::runtime_error(message.str());
}

}  // namespace deep_ep

#define DEEP_EP_CUDA_CHECK(call)                                                                     \
    do {                                                                                             \
        const cudaError_t status_ = (call);                                                          \
        if (status_ != cudaSuccess)                                                                  \
            ::deep_ep::throw_runtime_error(std::string(#call) + " failed: " + cudaGetErrorString(status_), \
                                           __FILE__, __LINE__);                                      \
    } while (0)

#define DEEP_EP_CHECK(condition, message)                                                            \
    do {                                                                                             \
        if (!(condition)) {                                                                          \
            std::ostringstream stream_;                                                              \
            stream_ << message;                                                                      \
            ::deep_ep::throw_runtime_error(stream_.str(), __FILE__, __LINE__);                       \
        }                                                                                            \
    } while (0)

// The launch itself can fail (bad configuration, too much shared memory); checked right after it.
#define DEEP_EP_LAUNCH_CHECK() DEEP_EP_CUDA_CHECK(cudaGetLastError())
