// Errors agreed by every rank of a normal-mode call (docs/errors.md), the C++ side of what
// deep_ep/backends/agreement.py does for the reference backend, with the same checks, order and wording.
// A rank whose argument checks fail must not simply raise: its peers would wait for it in the op's first
// exchange (or pair that exchange with its NEXT call). So every rank publishes a CallRecord (the operation,
// its own check's error if any, and the signature every rank must agree on) in the host exchange the op
// makes anyway, before anything is launched, and every rank takes the same decision from the same records:
// all raise the same error, or all go on. The record rides in front of the direct-read addresses
// (Buffer::gather_peer_tensors), so agreeing costs no extra rendezvous.
#pragma once

#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "runtime/host_exchange.hpp"

namespace deep_ep::runtime {

struct CallRecord {
    std::string op;          // "dispatch", "dispatch (cached: handle given)", "combine"
    std::string error_type;  // empty when this rank's checks passed; else a Python exception type's name
    std::string message;
    // (field, value as Python's repr shows it): compared only between ranks whose checks passed.
    std::vector<std::pair<std::string, std::string>> signature;

    std::string encode() const;
    static CallRecord decode(const std::string& bytes);
};

// The record of a rank whose checks threw `error`: the Python exception type that error would have become
// (TypeError, ValueError; anything else RuntimeError) and its message.
CallRecord failed_call(const std::string& op, std::exception_ptr error);

// Raises `failed`'s error as it was (type and message): a rank's error that no peer had to agree on.
[[noreturn]] void raise_call_error(const CallRecord& failed);

// Python's repr of a signature value, as the reference backend prints it in the same messages.
std::string repr_int(long long value);
std::string repr_str(const std::string& value);
std::string repr_none();

// The signature field of a handle's identity ("dispatch #N", or None for a handle without one: that matches
// any value).
inline constexpr const char* kHandleIdentityField = "handle";

// Throws on every rank the same exception if the records disagree: ranks making different calls
// (ValueError naming each rank's operation), any rank's failed checks (that error's type, the lowest failing
// rank's message, naming the failing ranks) or a signature field that differs (ValueError naming it and each
// rank's value). records[i] is the record of group rank first_rank + i; num_ranks is the group's size.
void raise_if_disagreed(const std::vector<CallRecord>& records, int first_rank, int num_ranks);

// The group rank whose failed checks the last error raise_if_disagreed threw on this thread names (the lowest
// failing rank), or -1 (none since the last take, or ranks that disagree on the call itself); then -1.
// Inter-node ops pass the rank on to the other nodes (csrc/ops/internode.cpp).
int take_agreed_error_rank();

// One round of `exchange` carrying every member's call record in front of its `payload`: raises the agreed
// error if any (raise_if_disagreed), else returns every member's payload. The GIL is released while waiting.
std::vector<std::string> agree_on_call(HostExchange& exchange, const CallRecord& call, const std::string& payload,
                                       int num_ranks);

}  // namespace deep_ep::runtime
