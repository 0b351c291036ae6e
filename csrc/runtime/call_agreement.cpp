#include "runtime/call_agreement.hpp"

#include <pybind11/pybind11.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "runtime/errors.hpp"

namespace deep_ep::runtime {
namespace {

// A message travels in a record of at most HostExchange::kRecordBytes with the addresses behind it.
constexpr size_t kMaxMessageBytes = 768;

void put_string(std::string& out, const std::string& s) {
    const auto size = static_cast<uint32_t>(s.size());
    out.append(reinterpret_cast<const char*>(&size), sizeof(size));
    out.append(s);
}

std::string take_string(const std::string& in, size_t& offset) {
    uint32_t size = 0;
    DEEP_EP_CHECK(offset + sizeof(size) <= in.size(), "malformed call record");
    std::memcpy(&size, in.data() + offset, sizeof(size));
    offset += sizeof(size);
    DEEP_EP_CHECK(offset + size <= in.size(), "malformed call record");
    std::string s = in.substr(offset, size);
    offset += size;
    return s;
}

std::string ranks_text(const std::vector<int>& ranks, int num_ranks) {
    std::ostringstream text;
    text << (ranks.size() == 1 ? "rank " : "ranks ");
    for (size_t i = 0; i < ranks.size(); ++i)
        text << (i ? ", " : "") << ranks[i];
    text << " of " << num_ranks;
    return text.str();
}

// Python's repr(value) cut to 80 characters, as agreement._shown shows a signature value.
std::string shown(const std::string& repr) { return repr.size() <= 80 ? repr : repr.substr(0, 77) + "..."; }

[[noreturn]] void raise_as(const std::string& error_type, const std::string& message) {
    if (error_type == "TypeError")
        throw pybind11::type_error(message);
    if (error_type == "ValueError")
        throw pybind11::value_error(message);
    throw std::runtime_error(message);
}

}  // namespace

std::string CallRecord::encode() const {
    std::string out;
    put_string(out, op);
    put_string(out, error_type);
    put_string(out, message.size() <= kMaxMessageBytes ? message : message.substr(0, kMaxMessageBytes) + "...");
    const auto num_fields = static_cast<uint32_t>(signature.size());
    out.append(reinterpret_cast<const char*>(&num_fields), sizeof(num_fields));
    for (const auto& [field, value] : signature) {
        put_string(out, field);
        put_string(out, value);
    }
    return out;
}

CallRecord CallRecord::decode(const std::string& bytes) {
    CallRecord record;
    size_t offset = 0;
    record.op = take_string(bytes, offset);
    record.error_type = take_string(bytes, offset);
    record.message = take_string(bytes, offset);
    uint32_t num_fields = 0;
    DEEP_EP_CHECK(offset + sizeof(num_fields) <= bytes.size(), "malformed call record");
    std::memcpy(&num_fields, bytes.data() + offset, sizeof(num_fields));
    offset += sizeof(num_fields);
    for (uint32_t i = 0; i < num_fields; ++i) {
        std::string field = take_string(bytes, offset);
        record.signature.emplace_back(std::move(field), take_string(bytes, offset));
    }
    return record;
}

CallRecord failed_call(const std::string& op, std::exception_ptr error) {
    CallRecord record{op, "RuntimeError", "", {}};
    try {
        std::rethrow_exception(error);
    } catch (const pybind11::type_error& e) {
        record.error_type = "TypeError", record.message = e.what();
    } catch (const pybind11::value_error& e) {
        record.error_type = "ValueError", record.message = e.what();
    } catch (const pybind11::error_already_set& e) {
        record.error_type = e.matches(PyExc_TypeError) ? "TypeError"
                            : e.matches(PyExc_ValueError) ? "ValueError"
                                                          : "RuntimeError";
        record.message = e.what();
    } catch (const c10::TypeError& e) {
        record.error_type = "TypeError", record.message = e.what_without_backtrace();
    } catch (const c10::ValueError& e) {
        record.error_type = "ValueError", record.message = e.what_without_backtrace();
    } catch (const c10::Error& e) {
        record.message = e.what_without_backtrace();
    } catch (const std::invalid_argument& e) {
        record.error_type = "ValueError", record.message = e.what();
    } catch (const std::exception& e) {
        record.message = e.what();
    } catch (...) {
        record.message = "unknown C++ exception";
    }
    return record;
}

void raise_call_error(const CallRecord& failed) { raise_as(failed.error_type, failed.message); }

std::string repr_int(long long value) { return std::to_string(value); }

std::string repr_str(const std::string& value) { return "'" + value + "'"; }

std::string repr_none() { return "None"; }

namespace {
thread_local int agreed_error_rank = -1;
}  // namespace

int take_agreed_error_rank() { return std::exchange(agreed_error_rank, -1); }

void raise_if_disagreed(const std::vector<CallRecord>& records, int first_rank, int num_ranks) {
    const int n = static_cast<int>(records.size());
    for (int i = 1; i < n; ++i) {
        if (records[i].op == records[0].op)
            continue;
        std::ostringstream calls;
        for (int j = 0; j < n; ++j)
            calls << (j ? ", " : "") << "rank " << first_rank + j << ": " << records[j].op;
        throw pybind11::value_error("operation: ranks disagree on the call (" + calls.str() +
                                    "); every rank of the group must make the same collective calls in the same "
                                    "order");
    }
    const std::string& op = records[0].op;

    std::vector<int> failed;
    for (int i = 0; i < n; ++i)
        if (!records[i].error_type.empty())
            failed.push_back(i);
    if (!failed.empty()) {
        const CallRecord& first = records[failed[0]];
        std::vector<int> failed_ranks;
        std::string others;
        for (const int i : failed) {
            failed_ranks.push_back(first_rank + i);
            if (i != failed[0] && records[i].message != first.message)
                others += "; rank " + std::to_string(first_rank + i) + ": " + records[i].message;
        }
        agreed_error_rank = failed_ranks[0];
        raise_as(first.error_type, first.message + " (on " + ranks_text(failed_ranks, num_ranks) + others + "; " + op +
                                       " rejected on every rank)");
    }

    for (size_t f = 0; f < records[0].signature.size(); ++f) {
        const std::string& field = records[0].signature[f].first;
        // A handle without identity (a copy, a rebuilt tuple) matches any, as in the reference.
        const bool unknown_matches_any = field == kHandleIdentityField;
        const std::string* known = nullptr;
        bool differs = false;
        for (int i = 0; i < n; ++i) {
            if (records[i].signature.size() != records[0].signature.size() || records[i].signature[f].first != field) {
                differs = true;
                continue;
            }
            const std::string& value = records[i].signature[f].second;
            if (unknown_matches_any && value == repr_none())
                continue;
            if (known == nullptr)
                known = &value;
            differs |= value != *known;
        }
        if (!differs)
            continue;
        std::ostringstream per_rank;
        for (int i = 0; i < n; ++i)
            per_rank << (i ? ", " : "") << "rank " << first_rank + i << ": "
                     << (f < records[i].signature.size() ? shown(records[i].signature[f].second) : "None");
        throw pybind11::value_error(field + ": ranks disagree on this " + op + " call (" + per_rank.str() +
                                    "); every rank must pass the same");
    }
}

std::vector<std::string> agree_on_call(HostExchange& exchange, const CallRecord& call, const std::string& payload,
                                       int num_ranks) {
    const std::string encoded = call.encode();
    const auto encoded_bytes = static_cast<uint32_t>(encoded.size());
    std::string record(reinterpret_cast<const char*>(&encoded_bytes), sizeof(encoded_bytes));
    record += encoded;
    record += payload;
    std::vector<std::string> records;
    {
        // Peers may arrive late (or, until the timeout, never): let other Python threads run meanwhile.
        pybind11::gil_scoped_release release;
        records = exchange.all_gather(record);
    }
    // The common case costs a comparison: every rank sent this rank's own record, which passed its checks.
    bool all_equal = call.error_type.empty();
    std::vector<std::string> payloads;
    std::vector<std::pair<size_t, uint32_t>> call_bytes;  // (offset, size) of each rank's call record
    for (const std::string& r : records) {
        uint32_t bytes = 0;
        DEEP_EP_CHECK(r.size() >= sizeof(bytes), "malformed call record");
        std::memcpy(&bytes, r.data(), sizeof(bytes));
        DEEP_EP_CHECK(r.size() >= sizeof(bytes) + bytes, "malformed call record");
        all_equal &= bytes == encoded_bytes && r.compare(sizeof(bytes), bytes, encoded) == 0;
        call_bytes.emplace_back(sizeof(bytes), bytes);
        payloads.push_back(r.substr(sizeof(bytes) + bytes));
    }
    if (!all_equal) {
        std::vector<CallRecord> calls;
        for (size_t i = 0; i < records.size(); ++i)
            calls.push_back(CallRecord::decode(records[i].substr(call_bytes[i].first, call_bytes[i].second)));
        raise_if_disagreed(calls, exchange.first_rank(), num_ranks);
    }
    return payloads;
}

}  // namespace deep_ep::runtime
