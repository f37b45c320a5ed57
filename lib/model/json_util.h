// Small helpers shared by the JSON readers of lib/model/ (config.json, safetensors headers,
// model.safetensors.index.json): opening and reading their files, strict UTF-8 checking and
// parse errors turned into pyr::Error messages that name the file. Private to lib/model/.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace pyr {
namespace json_util {

using json = nlohmann::json;

// Offset of the first byte that is not part of well-formed UTF-8 (RFC 3629: no overlongs,
// no surrogates, nothing above U+10FFFF), or `size` when the whole text is valid.
inline size_t utf8_invalid_offset(const char* text, size_t size) {
    const auto* s = reinterpret_cast<const unsigned char*>(text);
    size_t i = 0;
    while (i < size) {
        unsigned char c = s[i];
        if (c < 0x80) {
            ++i;
            continue;
        }
        size_t len = 0;
        unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte
        if (c >= 0xc2 && c <= 0xdf) {
            len = 2;
        } else if (c >= 0xe0 && c <= 0xef) {
            len = 3;
            if (c == 0xe0) lo = 0xa0;       // overlong
            if (c == 0xed) hi = 0x9f;       // surrogates
        } else if (c >= 0xf0 && c <= 0xf4) {
            len = 4;
            if (c == 0xf0) lo = 0x90;       // overlong
            if (c == 0xf4) hi = 0x8f;       // above U+10FFFF
        } else {
            return i;
        }
        if (size - i < len || s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k < len; ++k)
            if ((s[i + k] & 0xc0) != 0x80) return i;
        i += len;
    }
    return size;
}

// Parses `size` bytes of UTF-8 JSON. Throws PYR_ERR_FORMAT "<source>: ..." for invalid
// UTF-8 (checked first, so that messages never quote broken bytes) or invalid JSON (with
// nlohmann's line and column). `callback` is nlohmann's parser callback (may be null).
inline json parse(const char* text, size_t size, const std::string& source,
                  const json::parser_callback_t& callback = nullptr) {
    size_t bad = utf8_invalid_offset(text, size);
    if (bad != size)
        fail(PYR_ERR_FORMAT, source + ": not valid UTF-8 (byte " + std::to_string(bad) + ")");
    try {
        return json::parse(text, text + size, callback);
    } catch (const json::exception& e) {  // parse_error, or out_of_range for 1e999
        std::string what = e.what();
        size_t pos = what.find("] ");  // drop nlohmann's "[json.exception.parse_error.101] "
        if (pos != std::string::npos) what = what.substr(pos + 2);
        fail(PYR_ERR_FORMAT, source + ": invalid JSON: " + what);
    }
}

// Opens a regular file for reading: its descriptor (the caller closes it), and its size in
// `size`. PYR_ERR_IO "<path>: ..." with strerror when it cannot be opened or stat'ed, or is
// not a regular file.
inline int open_regular_file(const std::string& path, uint64_t& size) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(PYR_ERR_IO, path + ": cannot open: " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        int err = errno;
        ::close(fd);
        fail(PYR_ERR_IO, path + ": cannot stat: " + std::strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(PYR_ERR_IO, path + ": not a regular file");
    }
    size = uint64_t(st.st_size);
    return fd;
}

// Reads a whole (small) file: config.json, the shard index. PYR_ERR_IO "<path>: ..." with
// strerror when it cannot be opened or read; files over `max_size` bytes are PYR_ERR_FORMAT.
inline std::string read_text_file(const std::string& path, size_t max_size = 100000000) {
    uint64_t size = 0;
    const int fd = open_regular_file(path, size);
    if (size > max_size) {
        ::close(fd);
        fail(PYR_ERR_FORMAT, path + ": file is " + std::to_string(size) +
                                 " bytes, more than the " + std::to_string(max_size) +
                                 "-byte limit");
    }
    std::string text(size_t(size), '\0');
    size_t done = 0;
    while (done < text.size()) {
        ssize_t n = ::read(fd, &text[done], text.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            int err = n < 0 ? errno : 0;
            ::close(fd);
            fail(PYR_ERR_IO, path + ": read failed after " + std::to_string(done) + " of " +
                                 std::to_string(text.size()) + " bytes" +
                                 (err ? std::string(": ") + std::strerror(err) : std::string()));
        }
        done += size_t(n);
    }
    ::close(fd);
    return text;
}

// "object", "string", "number", ... for messages about wrong types.
inline std::string type_name(const json& j) { return j.type_name(); }

// The JSON value as an exact 64-bit integer, or false when it is not an integer (floats
// such as 4096.0 are not accepted: sizes in these files are always written as integers).
inline bool get_int64(const json& j, int64_t& out) {
    if (j.is_number_unsigned()) {
        uint64_t u = j.get<uint64_t>();
        if (u > uint64_t(INT64_MAX)) return false;
        out = int64_t(u);
        return true;
    }
    if (j.is_number_integer()) {
        out = j.get<int64_t>();
        return true;
    }
    return false;
}

}  // namespace json_util
}  // namespace pyr
