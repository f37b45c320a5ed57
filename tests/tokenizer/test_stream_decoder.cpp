// StreamDecoder against raw bytes fed as byte tokens (id 3 + b), and the leading-space rule.
#include <doctest/doctest.h>

#include "common/error.h"
#include "tokenizer_test_util.h"

using pyr::StreamDecoder;
using pyr::test::byte_token;
using pyr::test::stream_decode;
using pyr::test::tiny_tokenizer;

namespace {

const std::string kFFFD = "\xEF\xBF\xBD";

// One push() per byte; returns each push's output.
std::vector<std::string> push_bytes(StreamDecoder& dec, const std::string& bytes) {
    std::vector<std::string> out;
    for (char c : bytes) out.push_back(dec.push(byte_token(static_cast<unsigned char>(c))));
    return out;
}

using Chunks = std::vector<std::string>;

}  // namespace

TEST_CASE("a 4-byte emoji comes out whole on its last byte") {
    StreamDecoder dec(tiny_tokenizer());
    CHECK(push_bytes(dec, "\xF0\x9F\x8E\x89") == Chunks{"", "", "", "\xF0\x9F\x8E\x89"});
    CHECK(dec.flush().empty());
}

TEST_CASE("ZWJ sequence: each code point is emitted when complete") {
    StreamDecoder dec(tiny_tokenizer());
    // 👩 ZWJ 💻
    CHECK(push_bytes(dec, "\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x92\xBB") ==
          Chunks{"", "", "", "\xF0\x9F\x91\xA9", "", "", "\xE2\x80\x8D",  //
                 "", "", "", "\xF0\x9F\x92\xBB"});
}

TEST_CASE("an invalid continuation emits U+FFFD and decoding goes on") {
    StreamDecoder dec(tiny_tokenizer());
    // E6 expects a continuation; 'a' is not one: E6 -> U+FFFD, then 'a'.
    CHECK(push_bytes(dec, "\xE6" "a") == Chunks{"", kFFFD + "a"});
    // Then a correct 日 (E6 97 A5).
    CHECK(push_bytes(dec, "\xE6\x97\xA5") == Chunks{"", "", "\xE6\x97\xA5"});
    // E6 97 cut short by a new lead byte: one U+FFFD per byte (as DecodeIds), then 日.
    CHECK(push_bytes(dec, "\xE6\x97\xE6\x97\xA5") ==
          Chunks{"", "", kFFFD + kFFFD, "", "\xE6\x97\xA5"});
    CHECK(dec.flush().empty());
}

TEST_CASE("bytes that can never be valid are replaced at once") {
    StreamDecoder dec(tiny_tokenizer());
    CHECK(push_bytes(dec, "\x80") == Chunks{kFFFD});          // lone continuation
    CHECK(push_bytes(dec, "\xC0\xAF") == Chunks{kFFFD, kFFFD});  // overlong lead
    CHECK(push_bytes(dec, "\xF5\xFF") == Chunks{kFFFD, kFFFD});  // not UTF-8 at all
    // Valid leads whose second byte rules them out: overlong, surrogate, > U+10FFFF.
    CHECK(push_bytes(dec, "\xE0\x80") == Chunks{"", kFFFD + kFFFD});
    CHECK(push_bytes(dec, "\xED\xA0") == Chunks{"", kFFFD + kFFFD});
    CHECK(push_bytes(dec, "\xF4\x90") == Chunks{"", kFFFD + kFFFD});
    CHECK(push_bytes(dec, "\xF0\x80") == Chunks{"", kFFFD + kFFFD});
    // Their valid neighbours are held and completed.
    CHECK(push_bytes(dec, "\xED\x9F\xBF") == Chunks{"", "", "\xED\x9F\xBF"});          // U+D7FF
    CHECK(push_bytes(dec, "\xF4\x8F\xBF\xBF") ==
          Chunks{"", "", "", "\xF4\x8F\xBF\xBF"});  // U+10FFFF
    CHECK(dec.flush().empty());
}

TEST_CASE("flush emits a held tail as one U+FFFD per byte") {
    StreamDecoder dec(tiny_tokenizer());
    CHECK(push_bytes(dec, "ok\xF0\x9F\x8E") == Chunks{"o", "k", "", "", ""});
    CHECK(dec.flush() == kFFFD + kFFFD + kFFFD);
    CHECK(dec.flush().empty());
    // The next stream starts clean.
    CHECK(push_bytes(dec, "\xC3\xA9") == Chunks{"", "\xC3\xA9"});
}

TEST_CASE("control tokens add nothing but end a run of byte pieces") {
    const auto& tok = tiny_tokenizer();
    StreamDecoder dec(tok);
    CHECK(dec.push(tok.eos_id()).empty());
    CHECK(push_bytes(dec, "\xF0\x9F") == Chunks{"", ""});
    // As DecodeIds: the held bytes can no longer be completed.
    CHECK(dec.push(tok.eos_id()) == kFFFD + kFFFD);
    CHECK(push_bytes(dec, "\x8E\x89") == Chunks{kFFFD, kFFFD});
    CHECK(dec.flush().empty());
}

TEST_CASE("reset drops held bytes and sets the leading-space state") {
    const auto& tok = tiny_tokenizer();
    StreamDecoder dec(tok);
    CHECK(push_bytes(dec, "\xF0\x9F") == Chunks{"", ""});
    dec.reset(-1);
    CHECK(push_bytes(dec, "a") == Chunks{"a"});
    dec.reset(432);            // after "▁def"
    CHECK(dec.push(432) == " def");
    dec.reset(tok.bos_id());
    CHECK(dec.push(432) == "def");
}

TEST_CASE("leading space: only a normal piece first after BOS loses one space") {
    using Ids = std::vector<int32_t>;
    CHECK(stream_decode(Ids{1, 432, 432}).text == "def def");
    CHECK(stream_decode(Ids{432, 432}).text == "def def");          // empty history = start
    CHECK(stream_decode(Ids{1, 259, 432}).text == "  def");         // "▁▁": one space dropped
    CHECK(stream_decode(Ids{1, 4004, 432}).text == " def");         // "▁" -> "", state spent
    CHECK(stream_decode(Ids{1, 2, 432}).text == "def");             // control tokens are skipped
    CHECK(stream_decode(Ids{1, byte_token(' '), 432}).text == "  def");  // byte space is kept
    CHECK(stream_decode(Ids{1, 0, 432}).text == " \xE2\x81\x87  def");  // unk " ⁇ " kept
    // A BOS in mid-stream starts a new text (DecodeIds would give "def def" here).
    CHECK(stream_decode(Ids{432, 1, 432}).text == "defdef");
    CHECK(stream_decode(Ids{4031}, /*previous=*/432).text == "b");  // no space to keep
}

TEST_CASE("negative ids throw; ids past the tokenizer (padded embedding rows) add no text") {
    StreamDecoder dec(tiny_tokenizer());
    CHECK(push_bytes(dec, "\xF0") == Chunks{""});
    try {
        dec.push(-5);
        FAIL("push(-5) did not throw");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_ERR_INVALID_ARGUMENT);
    }
    // The failed push changed nothing.
    CHECK(push_bytes(dec, "\x9F\x8E\x89") == Chunks{"", "", "\xF0\x9F\x8E\x89"});
    // A padded id ends a byte run like a control token does.
    CHECK(push_bytes(dec, "\xE6\x97") == Chunks{"", ""});
    CHECK(dec.push(4096) == kFFFD + kFFFD);
    CHECK(dec.push(432) == " def");  // mid-text: the space stays
}

TEST_CASE("the test's own UTF-8 validator rejects what the chunk checks must catch") {
    using pyr::test::is_valid_utf8;
    CHECK(is_valid_utf8("a\xF0\x9F\x8E\x89\xE6\x97\xA5\xC3\xA9"));
    CHECK(is_valid_utf8(kFFFD));
    CHECK_FALSE(is_valid_utf8("\xF0\x9F\x8E"));    // truncated emoji
    CHECK_FALSE(is_valid_utf8("\xE6\x97"));        // truncated 日
    CHECK_FALSE(is_valid_utf8("\x80"));            // lone continuation
    CHECK_FALSE(is_valid_utf8("\xC0\xAF"));        // overlong
    CHECK_FALSE(is_valid_utf8("\xED\xA0\x80"));    // surrogate
    CHECK_FALSE(is_valid_utf8("\xF4\x90\x80\x80"));  // above U+10FFFF
}
