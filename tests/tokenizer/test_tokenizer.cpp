// Tokenizer: loading errors, the token_bytes table, encode() against the Python
// sentencepiece module, and encode -> StreamDecoder round trips.
#include <doctest/doctest.h>
#include <sentencepiece_processor.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "common/error.h"
#include "tokenizer_test_util.h"

using pyr::Tokenizer;
using pyr::test::byte_token;
using pyr::test::is_valid_utf8;
using pyr::test::stream_decode;
using pyr::test::tiny_tokenizer;

namespace {

const std::string kModelPath = std::string(PYR_TEST_MODEL_DIR) + "/tokenizer.model";

pyr_status load_status(const std::string& path, std::string* message) {
    try {
        Tokenizer::load(path);
    } catch (const pyr::Error& e) {
        *message = e.what();
        return e.status();
    }
    return PYR_OK;
}

// A file in the temp dir, removed at scope exit.
struct TempFile {
    std::filesystem::path path;
    explicit TempFile(const std::string& contents) {
        path = std::filesystem::temp_directory_path() /
               ("pyr_tok_test_" + std::to_string(std::random_device{}()) + ".model");
        std::ofstream(path, std::ios::binary) << contents;
    }
    ~TempFile() { std::filesystem::remove(path); }
};

// The reference: libsentencepiece's own whole-sequence decoder.
std::string sp_decode(const std::vector<int32_t>& ids) {
    static const auto sp = [] {
        auto p = std::make_unique<sentencepiece::SentencePieceProcessor>();
        REQUIRE(p->Load(kModelPath).ok());
        return p;
    }();
    return sp->DecodeIds(std::vector<int>(ids.begin(), ids.end()));
}

// Texts for the round trips.
const std::vector<std::string> kTexts = {
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n\treturn fibonacci(n - 1) + "
    "fibonacci(n - 2)\n\n\n# two  spaces   three\t\ttabs  \n",
    "  two leading spaces",
    "\n  starts with a newline",
    "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE3\x83\x86\xE3\x82\xAD\xE3\x82\xB9\xE3"
    "\x83\x88",                    // 日本語のテキスト
    "\xE4\xB8\xAD\xE6\x96\x87",  // 中文
    "\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x92\xBB \xF0\x9F\x8E\x89",  // 👩‍💻 🎉
    "x\xF0\x9F\x8E\x89\xF0\x9F\x8E\x89y",                              // x🎉🎉y
    "print(\"\xE4\xB8\xAD\xE6\x96\x87\")  # \xF0\x9F\x8E\x89 done \xE2\x80\x94 ok "
    "\xE2\x9C\x93\n",  // print("中文")  # 🎉 done — ok ✓
};

}  // namespace

TEST_CASE("load: missing file, directory, garbage and empty models") {
    std::string msg;
    CHECK(load_status("/nonexistent/dir/tokenizer.model", &msg) == PYR_ERR_IO);
    CHECK(msg.find("/nonexistent/dir/tokenizer.model") != std::string::npos);

    CHECK(load_status(PYR_TEST_MODEL_DIR, &msg) == PYR_ERR_IO);
    CHECK(msg.find(PYR_TEST_MODEL_DIR) != std::string::npos);

    TempFile garbage("this is not a protobuf \xff\xff\xff\xff");
    CHECK(load_status(garbage.path.string(), &msg) == PYR_ERR_FORMAT);
    CHECK(msg.find(garbage.path.string()) != std::string::npos);
    CHECK(msg.find("not a valid SentencePiece model") != std::string::npos);

    TempFile empty("");
    CHECK(load_status(empty.path.string(), &msg) == PYR_ERR_FORMAT);
    CHECK(msg.find("unk is not defined") != std::string::npos);  // SentencePiece's message

    CHECK(load_status(kModelPath, &msg) == PYR_OK);
}

TEST_CASE("vocabulary facts of the bundled model") {
    const Tokenizer& tok = tiny_tokenizer();
    CHECK(tok.n_vocab() == 4096);
    CHECK(tok.bos_id() == 1);
    CHECK(tok.eos_id() == 2);
    CHECK(tok.is_control(1));
    CHECK(tok.is_control(2));
    CHECK_FALSE(tok.is_control(0));
    CHECK_FALSE(tok.is_control(3));
    CHECK_FALSE(tok.is_control(432));
    for (int b = 0; b < 256; ++b)
        REQUIRE(tok.token_bytes(byte_token(static_cast<unsigned char>(b))) ==
                std::string(1, static_cast<char>(b)));
    CHECK(tok.token_bytes(1).empty());
    CHECK(tok.token_bytes(2).empty());
    CHECK(tok.token_bytes(0) == " \xE2\x81\x87 ");  // unk: " ⁇ ", as DecodeIds({0})
    CHECK(tok.token_bytes(0) == sp_decode({0}));
    CHECK(tok.token_bytes(432) == " def");
    CHECK(tok.token_bytes(4004) == " ");
    CHECK(tok.token_bytes(259) == "  ");
    CHECK(tok.token_bytes(4031) == "b");
    for (int32_t bad : {-1, 4096, 1 << 30}) {
        CHECK_THROWS_AS(tok.token_bytes(bad), pyr::Error);
        CHECK_THROWS_AS(tok.is_control(bad), pyr::Error);
    }
}

TEST_CASE("encode matches the Python sentencepiece module") {
    // Made with: sp = sentencepiece.SentencePieceProcessor(model_file=".../tokenizer.model");
    // [1] + sp.encode(text)   (sentencepiece 0.2.3; libsentencepiece 0.1.97 agrees)
    const Tokenizer& tok = tiny_tokenizer();
    using Ids = std::vector<int32_t>;
    CHECK(tok.encode("def fibonacci(n):", true) ==
          Ids{1, 432, 290, 590, 267, 975, 1238, 4025, 4011, 313});
    CHECK(tok.encode("    return a + b\n", true) == Ids{1, 262, 350, 310, 431, 312, 13});
    CHECK(tok.encode("Hello, world!", true) == Ids{1, 943, 335, 302, 4021, 332, 3524, 4092});
    CHECK(tok.encode("x = 12345", true) == Ids{1, 480, 273, 4004, 4035, 4039, 4049, 4055, 4057});
    CHECK(tok.encode("  x\tb\n\n    y", false) == Ids{259, 480, 12, 4031, 13, 13, 260, 4029});
    CHECK(tok.encode("def fibonacci(n):", false) ==
          Ids{432, 290, 590, 267, 975, 1238, 4025, 4011, 313});
    CHECK(tok.encode("", true) == Ids{1});
    CHECK(tok.encode("", false).empty());
}

TEST_CASE("control tokens are never produced from raw text") {
    const Tokenizer& tok = tiny_tokenizer();
    using Ids = std::vector<int32_t>;
    CHECK(tok.encode("<s>", true) == Ids{1, 815, 4007, 4052});  // ▁< s >, from Python
    CHECK(tok.encode("</s>", false) == Ids{815, 4068, 4007, 4052});
    for (const char* text : {"<s>", "</s>", "<unk>", "<s></s><s>", "a<s>b</s>c"}) {
        CAPTURE(text);
        const auto ids = tok.encode(text, false);
        for (int32_t id : ids) {
            CHECK_FALSE(tok.is_control(id));
            CHECK(id != 0);
        }
        CHECK(stream_decode(ids).text == text);
    }
}

TEST_CASE("byte fallback: characters outside the vocabulary become byte pieces") {
    const Tokenizer& tok = tiny_tokenizer();
    // "é" is not a piece: '▁' then the bytes C3 A9 (Python: [4004, 198, 172]).
    CHECK(tok.encode("\xC3\xA9", false) ==
          std::vector<int32_t>{4004, byte_token(0xC3), byte_token(0xA9)});
    CHECK(stream_decode(tok.encode("caf\xC3\xA9", true)).text == "caf\xC3\xA9");
    // 中文: every id after the leading '▁' is a byte piece.
    const auto ids = tok.encode("\xE4\xB8\xAD\xE6\x96\x87", false);
    REQUIRE(ids.size() == 7);
    CHECK(ids[0] == 4004);
    for (size_t i = 1; i < ids.size(); ++i) CHECK((ids[i] >= 3 && ids[i] <= 258));
}

TEST_CASE("invalid UTF-8 input: each bad byte becomes U+FFFD, as SentencePiece does") {
    const Tokenizer& tok = tiny_tokenizer();
    const int32_t fffd[] = {byte_token(0xEF), byte_token(0xBF), byte_token(0xBD)};
    using Ids = std::vector<int32_t>;
    // Python: sp.encode(b"\xff\xfe abc") -> [4004, 242, 194, 192, 242, 194, 192, 2307, 4017]
    const Ids expected{4004, fffd[0], fffd[1], fffd[2], fffd[0], fffd[1], fffd[2], 2307, 4017};
    const auto ids = tok.encode("\xff\xfe abc", false);
    CHECK(ids == expected);
    CHECK(stream_decode(ids).text == "\xEF\xBF\xBD\xEF\xBF\xBD abc");
    // A truncated 日 (E6 97): two bytes, two replacements.
    const auto cut = tok.encode("\xE6\x97", true);
    CHECK(cut == Ids{1, 4004, fffd[0], fffd[1], fffd[2], fffd[0], fffd[1], fffd[2]});
    CHECK(stream_decode(cut).text == "\xEF\xBF\xBD\xEF\xBF\xBD");
    // Embedded NUL is kept (string_view, not C string).
    CHECK(stream_decode(tok.encode(std::string("a\0b", 3), true)).text == std::string("a\0b", 3));
}

TEST_CASE("round trips encode -> StreamDecoder, token by token") {
    const Tokenizer& tok = tiny_tokenizer();
    for (const std::string& text : kTexts) {
        CAPTURE(text);
        const auto ids = tok.encode(text, /*add_bos=*/true);
        const auto out = stream_decode(ids);
        CHECK(out.text == text);
        for (const auto& chunk : out.chunks) CHECK(is_valid_utf8(chunk));
        CHECK(out.chunks.back().empty());  // nothing held back at the end of valid text
        // Same as SentencePiece decoding the whole sequence, with or without the BOS.
        CHECK(out.text == sp_decode(ids));
        CHECK(out.text == sp_decode(std::vector<int32_t>(ids.begin() + 1, ids.end())));
    }
}

TEST_CASE("emoji and CJK arrive whole, never split across chunks") {
    const Tokenizer& tok = tiny_tokenizer();
    const std::string party = "\xF0\x9F\x8E\x89";  // 🎉
    const auto out = stream_decode(tok.encode("a " + party + " b", true));
    bool seen = false;
    for (const auto& chunk : out.chunks) {
        if (chunk.find(party) != std::string::npos) seen = true;
        CHECK(is_valid_utf8(chunk));
    }
    CHECK(seen);
}

TEST_CASE("continuation keeps the leading space after a non-BOS token") {
    const Tokenizer& tok = tiny_tokenizer();
    const auto ids = tok.encode("def foo", true);  // [1, ▁def 432, ▁f 290, oo 2327]
    REQUIRE(ids == std::vector<int32_t>{1, 432, 290, 2327});
    // History [BOS, ▁def]; the new tokens are " foo".
    CHECK(stream_decode({290, 2327}, /*previous=*/432).text == " foo");
    // Right after BOS, or with an empty history, the first piece loses its space.
    CHECK(stream_decode({290, 2327}, /*previous=*/1).text == "foo");
    CHECK(stream_decode({290, 2327}, /*previous=*/-1).text == "foo");
    // Split anywhere, the pieces add up to the whole.
    for (size_t cut = 1; cut < ids.size(); ++cut) {
        const std::vector<int32_t> head(ids.begin(), ids.begin() + cut);
        const std::vector<int32_t> tail(ids.begin() + cut, ids.end());
        CHECK(stream_decode(head).text + stream_decode(tail, ids[cut - 1]).text == "def foo");
    }
}

TEST_CASE("random token sequences decode exactly like SentencePiece DecodeIds") {
    // Mostly byte pieces (incl. the UTF-8 lead/continuation ranges), some normal pieces,
    // unk and EOS anywhere, BOS only first: the rule's promise in tokenizer.h.
    const Tokenizer& tok = tiny_tokenizer();
    std::mt19937 rng(1234);
    const unsigned char interesting[] = {0x20, 0x61, 0x80, 0x8F, 0x90, 0x9F, 0xA0,
                                         0xBF, 0xC0, 0xC2, 0xDF, 0xE0, 0xE6, 0xED,
                                         0xEF, 0xF0, 0xF4, 0xF5, 0xFF};
    for (int iter = 0; iter < 3000; ++iter) {
        std::vector<int32_t> ids;
        if (rng() % 2) ids.push_back(tok.bos_id());
        const int n = 1 + static_cast<int>(rng() % 12);
        for (int i = 0; i < n; ++i) {
            const unsigned r = rng() % 100;
            if (r < 50) ids.push_back(byte_token(interesting[rng() % sizeof(interesting)]));
            else if (r < 70) ids.push_back(byte_token(static_cast<unsigned char>(rng() % 256)));
            else if (r < 90) ids.push_back(259 + static_cast<int32_t>(rng() % (4096 - 259)));
            else if (r < 95) ids.push_back(0);
            else ids.push_back(tok.eos_id());
        }
        const auto out = stream_decode(ids);
        CAPTURE(iter);
        REQUIRE(out.text == sp_decode(ids));
        for (const auto& chunk : out.chunks) REQUIRE(is_valid_utf8(chunk));
    }
}
