// StreamDecoder: token ids -> UTF-8 chunks of whole code points (rule in tokenizer.h).
// The UTF-8 checks are strict (Unicode Table 3-7), as SentencePiece's own decoder, and an
// invalid byte is replaced on its own so that the output matches DecodeIds byte for byte.
#include "tokenizer/tokenizer.h"

namespace pyr {

namespace {

constexpr const char* kReplacement = "\xEF\xBF\xBD";  // U+FFFD
constexpr int kIncomplete = -1;

// Length of the valid UTF-8 sequence starting at s[i]; 0 if s[i] cannot start one (so it
// is replaced alone); kIncomplete if s ends while the sequence is still a valid prefix.
int sequence_length(const std::string& s, size_t i) {
    const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
    const unsigned char lead = byte(i);
    int len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (lead < 0x80) return 1;
    if (lead >= 0xC2 && lead <= 0xDF) len = 2;
    else if (lead >= 0xE0 && lead <= 0xEF) len = 3;
    else if (lead >= 0xF0 && lead <= 0xF4) len = 4;
    else return 0;  // continuation byte, overlong lead C0/C1, or F5..FF
    if (lead == 0xE0) lo = 0xA0;  // overlong
    if (lead == 0xED) hi = 0x9F;  // UTF-16 surrogates
    if (lead == 0xF0) lo = 0x90;  // overlong
    if (lead == 0xF4) hi = 0x8F;  // above U+10FFFF
    for (int k = 1; k < len; ++k) {
        if (i + k >= s.size()) return kIncomplete;
        const unsigned char c = byte(i + k);
        if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) return 0;
    }
    return len;
}

}  // namespace

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}

void StreamDecoder::reset(int32_t previous_token) {
    at_start_ = previous_token < 0 || previous_token == tokenizer_.bos_id();
    pending_.clear();
}

std::string StreamDecoder::push(int32_t token) {
    // Checkpoints may pad the embedding past the tokenizer's vocabulary; such ids have no
    // piece, and so no text.
    if (token >= tokenizer_.n_vocab()) return take(/*at_end=*/true);
    const std::string& bytes = tokenizer_.token_bytes(token);  // throws on a bad id
    if (tokenizer_.is_control(token)) {
        if (token == tokenizer_.bos_id()) at_start_ = true;
        // A control token ends a run of byte pieces in DecodeIds: held bytes stay invalid.
        return take(/*at_end=*/true);
    }
    size_t skip = 0;
    if (at_start_ && tokenizer_.is_normal_piece(token) && !bytes.empty() && bytes[0] == ' ')
        skip = 1;
    at_start_ = false;
    pending_.append(bytes, skip, std::string::npos);
    return take(/*at_end=*/false);
}

std::string StreamDecoder::flush() { return take(/*at_end=*/true); }

std::string StreamDecoder::take(bool at_end) {
    std::string out;
    size_t i = 0;
    while (i < pending_.size()) {
        const int len = sequence_length(pending_, i);
        if (len == kIncomplete && !at_end) break;  // hold back: the next token may complete it
        if (len > 0) {
            out.append(pending_, i, len);
            i += len;
        } else {
            out += kReplacement;  // invalid, or incomplete at the end: one U+FFFD per byte
            i += 1;
        }
    }
    pending_.erase(0, i);
    return out;
}

}  // namespace pyr
