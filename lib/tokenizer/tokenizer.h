// SentencePiece tokenizer (tokenizer.model) and the streaming detokenizer. CPU only; knows
// nothing of backends.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace pyr {

// Immutable after load(): every const method may be called from any thread at once.
class Tokenizer {
public:
    // Loads a SentencePiece model file. PYR_ERR_IO if missing/unreadable, PYR_ERR_FORMAT
    // if it is not a valid model; the message names the file.
    static std::unique_ptr<Tokenizer> load(const std::string& path);
    ~Tokenizer();

    // Encodes UTF-8 text (invalid bytes are handled as SentencePiece does: see the tests),
    // BOS first when add_bos. Control tokens are never produced from raw text.
    std::vector<int32_t> encode(std::string_view text, bool add_bos) const;

    // Queries taking an id throw PYR_ERR_INVALID_ARGUMENT for ids outside [0, n_vocab).
    int32_t n_vocab() const;
    int32_t bos_id() const;
    int32_t eos_id() const;
    bool is_control(int32_t id) const;

    // The bytes a token stands for: a byte piece <0xAB> -> that byte, a control/unknown
    // token -> "" (unk -> its surface " ⁇ " as SentencePiece decodes it), '▁' -> ' '.
    const std::string& token_bytes(int32_t id) const;

private:
    friend class StreamDecoder;
    Tokenizer();
    // True for a normal piece (not control, unknown or byte): the only kind whose leading
    // '▁' SentencePiece drops at the start of a text.
    bool is_normal_piece(int32_t id) const;

    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Turns a stream of token ids into UTF-8 text chunks holding only whole code points.
// Rule (as SentencePiece decodes whole sequences): the single leading space of the first
// piece right after BOS is dropped; an incomplete UTF-8 tail (at most 3 bytes) is held back
// until the next token completes it; invalid bytes become U+FFFD; flush() emits what is held.
// In detail, matching SentencePiece's DecodeIds byte for byte:
//  - "first piece" = the first non-control token after BOS or after an empty history (-1,
//    as DecodeIds strips the first piece of any sequence). Only a normal piece loses its
//    space; an unknown or byte token keeps it. Either way the next pieces keep theirs.
//    A BOS in mid-stream starts a new text (DecodeIds would keep that space).
//  - every byte that cannot start or continue a valid sequence becomes one U+FFFD (strict
//    UTF-8: no overlongs, surrogates or code points above U+10FFFF).
//  - control tokens add no text, but they end a run of byte pieces: bytes held before one
//    can no longer be completed and come out as U+FFFD from that push().
//  - ids at or past the tokenizer's n_vocab (a checkpoint's padded embedding rows) have
//    no piece: they add no text and end a byte run like a control token.
// So push() over ids + flush() == DecodeIds(ids) for any ids with BOS at most at the start.
class StreamDecoder {
public:
    explicit StreamDecoder(const Tokenizer& tokenizer);

    // Starts a new stream whose preceding token in the history is `previous_token`
    // (-1 when the history is empty): after BOS or -1 the first piece drops its leading
    // space, after anything else it keeps it. Drops any held bytes.
    void reset(int32_t previous_token);
    // Adds one token; returns the text that is now complete (maybe "").
    std::string push(int32_t token);
    // Returns the held-back tail (invalid/incomplete bytes as U+FFFD) and empties it.
    std::string flush();

private:
    // Emits the decided prefix of pending_; with at_end, the held tail as U+FFFD too.
    std::string take(bool at_end);

    const Tokenizer& tokenizer_;
    bool at_start_ = true;  // the next non-control token is the first piece (see above)
    std::string pending_;   // bytes not yet emitted: at most an incomplete tail (<= 3 bytes)
};

}  // namespace pyr
