#include "runtime/handle_identity.hpp"

#include <pybind11/pybind11.h>

#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>

namespace deep_ep::runtime {
namespace {

using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Element {
    WeakTensor tensor;
    std::optional<int64_t> version;  // none: an inference tensor, which tracks no versions
};

struct Stamp {
    int64_t buffer_uid = 0, seq = 0;
    std::vector<Element> elements;
};

std::optional<int64_t> version_of(const torch::Tensor& t) {
    const auto& counter = t.unsafeGetTensorImpl()->version_counter();
    if (!counter.enabled())
        return std::nullopt;
    return static_cast<int64_t>(counter.current_version());
}

bool is(const WeakTensor& weak, const torch::Tensor& t) {
    const auto locked = weak.lock();
    return locked.defined() && locked.get() == t.unsafeGetTensorImpl();
}

// Stamps by their key tensor; a weak reference keeps the key's TensorImpl from being reused for another
// tensor while its stamp exists, so an address found here is the stamped tensor or an expired one.
struct Registry {
    std::mutex mutex;
    std::unordered_map<const c10::TensorImpl*, Stamp> stamps;
    int64_t stamps_since_sweep = 0;
};

Registry& registry() {
    static Registry instance;
    return instance;
}

constexpr int64_t kSweepInterval = 64;  // expired stamps are dropped every this many stamps

}  // namespace

int64_t next_buffer_uid() {
    static std::atomic<int64_t> counter{0};
    return ++counter;
}

void stamp_handle(const HandleElements& handle, int64_t buffer_uid, int64_t seq) {
    Stamp stamp{buffer_uid, seq, {}};
    stamp.elements.reserve(handle.tensors.size());
    for (const torch::Tensor& t : handle.tensors)
        stamp.elements.push_back(Element{WeakTensor(t.getIntrusivePtr()), version_of(t)});
    Registry& r = registry();
    const std::lock_guard<std::mutex> lock(r.mutex);
    if (++r.stamps_since_sweep >= kSweepInterval) {
        r.stamps_since_sweep = 0;
        for (auto it = r.stamps.begin(); it != r.stamps.end();)
            it = it->second.elements.empty() || it->second.elements.front().tensor.expired() ? r.stamps.erase(it)
                                                                                               : std::next(it);
    }
    r.stamps[handle.tensors[handle.key].unsafeGetTensorImpl()] = std::move(stamp);
}

std::optional<int64_t> handle_identity(const HandleElements& handle, int64_t buffer_uid) {
    const torch::Tensor& key = handle.tensors[handle.key];
    Registry& r = registry();
    const std::lock_guard<std::mutex> lock(r.mutex);
    const auto found = r.stamps.find(key.unsafeGetTensorImpl());
    if (found == r.stamps.end() || !is(found->second.elements[handle.key].tensor, key))
        return std::nullopt;
    const Stamp& stamp = found->second;
    if (stamp.buffer_uid != buffer_uid)
        throw pybind11::value_error(
            "handle: it was made by another Buffer's dispatch; pass a handle to the Buffer that returned it");
    for (size_t i = 0; i < handle.tensors.size() && i < stamp.elements.size(); ++i) {
        const Element& element = stamp.elements[i];
        if (!element.version.has_value() || !is(element.tensor, handle.tensors[i]))
            continue;  // another tensor in its place: not what this check can tell (docs/errors.md)
        if (version_of(handle.tensors[i]) != element.version)
            throw pybind11::value_error(std::string("handle.") + handle.names[i] +
                                        ": modified in place after the dispatch returned it (dispatch #" +
                                        std::to_string(stamp.seq) +
                                        " of this Buffer); a handle must be passed on as the dispatch returned it");
    }
    return stamp.seq;
}

}  // namespace deep_ep::runtime
