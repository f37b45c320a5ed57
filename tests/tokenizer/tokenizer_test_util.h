// Helpers shared by the tokenizer tests.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace pyr::test {

inline const Tokenizer& tiny_tokenizer() {
    static const std::unique_ptr<Tokenizer> tok =
        Tokenizer::load(std::string(PYR_TEST_MODEL_DIR) + "/tokenizer.model");
    return *tok;
}

// The bundled model keeps byte b at id 3 + b (checked in test_tokenizer.cpp).
inline int32_t byte_token(unsigned char b) { return 3 + b; }

// Strict UTF-8 check written independently of the decoder: decode each code point, then
// reject overlong forms, surrogates and values above U+10FFFF.
inline bool is_valid_utf8(const std::string& s) {
    for (size_t i = 0; i < s.size();) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        int extra = 0;
        uint32_t cp = 0, min = 0;
        if (c < 0x80) { extra = 0; cp = c; min = 0; }
        else if ((c & 0xE0) == 0xC0) { extra = 1; cp = c & 0x1F; min = 0x80; }
        else if ((c & 0xF0) == 0xE0) { extra = 2; cp = c & 0x0F; min = 0x800; }
        else if ((c & 0xF8) == 0xF0) { extra = 3; cp = c & 0x07; min = 0x10000; }
        else return false;
        if (i + extra >= s.size()) return false;  // truncated sequence
        for (int k = 1; k <= extra; ++k) {
            const unsigned char d = static_cast<unsigned char>(s[i + k]);
            if ((d & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (d & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += extra + 1;
    }
    return true;
}

struct Streamed {
    std::string text;                 // all chunks joined
    std::vector<std::string> chunks;  // one per push(), then the flush()
};

// Decodes ids through a StreamDecoder, one token at a time, as a session would.
inline Streamed stream_decode(const std::vector<int32_t>& ids, int32_t previous = -1) {
    StreamDecoder dec(tiny_tokenizer());
    dec.reset(previous);
    Streamed out;
    for (int32_t id : ids) out.chunks.push_back(dec.push(id));
    out.chunks.push_back(dec.flush());
    for (const auto& c : out.chunks) out.text += c;
    return out;
}

}  // namespace pyr::test
