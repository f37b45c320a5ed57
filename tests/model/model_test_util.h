// Helpers for the loader tests: temp directories, a small safetensors writer (so that every
// malformed variant is built byte by byte here, not stored as fixtures) and error checks.
#pragma once

#include <doctest/doctest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/error.h"

namespace pyr_test {

using json = nlohmann::json;

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it at scope exit.
class TempDir {
public:
    TempDir() {
        const char* base = std::getenv("TMPDIR");
        std::string tmpl = std::string(base && *base ? base : "/tmp") + "/pyr_model_test_XXXXXX";
        std::vector<char> buf(tmpl.begin(), tmpl.end());
        buf.push_back('\0');
        REQUIRE(mkdtemp(buf.data()) != nullptr);
        path_ = buf.data();
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;

    const std::string& path() const { return path_; }
    std::string operator/(const std::string& name) const { return path_ + "/" + name; }

private:
    std::string path_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    REQUIRE(f.good());
    f.write(bytes.data(), std::streamsize(bytes.size()));
    REQUIRE(f.good());
}

inline std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    REQUIRE(f.good());
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

inline void copy_file(const std::string& from, const std::string& to) {
    write_file(to, read_file(from));
}

// ---- safetensors bytes ----------------------------------------------------------------

inline std::string u64_le(uint64_t v) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[size_t(i)] = char((v >> (8 * i)) & 0xff);
    return s;
}

// A file from an explicit header text and data section (for malformed variants).
inline std::string safetensors_raw(const std::string& header, const std::string& data) {
    return u64_le(header.size()) + header + data;
}

template <class T>
std::string raw_bytes(const std::vector<T>& v) {
    std::string s(v.size() * sizeof(T), '\0');
    if (!v.empty()) std::memcpy(&s[0], v.data(), s.size());
    return s;
}

inline std::string f32_bytes(const std::vector<float>& v) { return raw_bytes(v); }

// Bytes of `n` elements of `dtype` ("F32", "F16", "BF16"; 2 bytes otherwise), all set to a
// recognisable pattern derived from `seed`. Only shapes matter to the loader.
inline std::string filler_bytes(const std::string& dtype, int64_t n, int seed = 1) {
    size_t elem = dtype == "F32" ? 4 : 2;
    std::string s(size_t(n) * elem, '\0');
    for (size_t i = 0; i < s.size(); ++i) s[i] = char((i * 31 + size_t(seed)) & 0x3f);
    return s;
}

struct StTensor {
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
    std::string bytes;  // empty -> filler of the right size
};

inline int64_t numel(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

// A well-formed file: tensors laid out contiguously in the given order. The header is
// right-padded with spaces to `header_len` bytes when that is larger (to control the
// alignment of the data section, as real writers pad to 8).
inline std::string safetensors_bytes(const std::vector<StTensor>& tensors,
                                     size_t header_len = 0, const json& metadata = nullptr) {
    json header = json::object();
    if (!metadata.is_null()) header["__metadata__"] = metadata;
    std::string data;
    for (const StTensor& t : tensors) {
        std::string bytes = t.bytes.empty() ? filler_bytes(t.dtype, numel(t.shape)) : t.bytes;
        header[t.name] = {{"dtype", t.dtype},
                          {"shape", t.shape},
                          {"data_offsets", {data.size(), data.size() + bytes.size()}}};
        data += bytes;
    }
    std::string text = header.dump();
    if (text.size() < header_len) text.append(header_len - text.size(), ' ');
    return safetensors_raw(text, data);
}

// ---- error checks ---------------------------------------------------------------------

struct Caught {
    bool thrown = false;
    pyr_status status = PYR_OK;
    std::string message;
};

// Runs f and returns the pyr::Error it threw; anything else thrown escapes to doctest,
// which reports it as a failure.
template <class F>
Caught catch_error(F&& f) {
    try {
        f();
    } catch (const pyr::Error& e) {
        return Caught{true, e.status(), e.what()};
    }
    return Caught{};
}

}  // namespace pyr_test

// Checks that `expr` throws pyr::Error with `st` and a message containing each substring.
#define CHECK_PYR_ERROR(expr, st, ...)                                                   \
    do {                                                                                 \
        ::pyr_test::Caught caught_ = ::pyr_test::catch_error([&] { (void)(expr); });      \
        CHECK_MESSAGE(caught_.thrown, "expected an error from: " #expr);                 \
        CHECK_MESSAGE(caught_.status == (st), "status ", int(caught_.status), ": ",      \
                      caught_.message);                                                  \
        for (const char* sub_ : {__VA_ARGS__})                                           \
            CHECK_MESSAGE(caught_.message.find(sub_) != std::string::npos, "message \"",  \
                          caught_.message, "\" lacks \"", sub_, "\"");                   \
    } while (0)
