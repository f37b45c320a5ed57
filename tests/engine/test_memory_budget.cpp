// Admission by memory (DESIGN.md section 7) on the CPU: max_device_bytes caps the sessions'
// KV caches together; a step that would pass it fails with PYR_ERR_OUT_OF_MEMORY before it
// changes anything, its session stays as it was, and the others go on.
#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "engine/engine.h"
#include "engine/session.h"
#include "support/engine_util.h"

namespace {

const std::string kGqa = pyr_test::kFixtures + "/gqa_f16";  // 3 layers

std::vector<int32_t> greedy_tokens(pyr::Session& s) {
    std::vector<int32_t> out;
    while (s.next() == pyr::StepResult::Token) out.push_back(s.token());
    return out;
}

// A CPU engine whose budget is the KV room of `tokens` tokens in every layer, less `less`
// bytes.
std::shared_ptr<pyr::Engine> engine_with_room_for(int32_t tokens, uint64_t less = 0) {
    auto probe = pyr_test::open_engine(kGqa);
    const uint64_t per_token = probe->kv_bytes_per_token_layer() * uint64_t(probe->config().n_layer);
    return pyr_test::open_engine(kGqa, "cpu", uint64_t(tokens) * per_token - less);
}

}  // namespace

TEST_CASE("max_device_bytes on the CPU: a step past the budget fails cleanly, the others go on") {
    // Room for 60 tokens in every layer (a prefill takes what it needs; a cache that grows
    // then keeps room for an eighth more tokens than it has, at least 16 more, or just what
    // it needs where that would pass the budget).
    auto engine = engine_with_room_for(60);
    const int32_t vocab = engine->config().n_vocab;
    pyr::SessionParams sp;
    sp.sampling.temperature = 0.0f;
    sp.max_tokens = 8;
    auto a = std::make_unique<pyr::Session>(engine, sp);
    const std::vector<int32_t> prompt_a = pyr_test::random_tokens(20, vocab, 1);
    a->feed_tokens(prompt_a);
    a->prefill();  // holds 20 tokens of room

    pyr::Session b(engine, sp);
    const std::vector<int32_t> prompt_b = pyr_test::random_tokens(50, vocab, 2);
    b.feed_tokens(prompt_b);
    try {
        b.prefill();  // 20 + 50 > 60
        FAIL("the budget was not enforced");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_ERR_OUT_OF_MEMORY);
        CHECK(std::string(e.what()).find("max_device_bytes") != std::string::npos);
    }
    CHECK(b.memory().kv_bytes == 0);  // as before the step, the input still queued
    CHECK(b.history() == prompt_b);

    // a goes on (its room grows to 37 tokens: 37 <= 60)
    const std::vector<int32_t> tokens_a = greedy_tokens(*a);
    CHECK(tokens_a.size() == 8);
    a.reset();  // its memory goes back to the budget
    b.prefill();
    CHECK(b.memory().n_tokens == 50);

    // both generate what they generate without a budget: b's cache grows past 50 tokens by
    // what it needs only, its usual spare room passing the budget (58 of 60 tokens at the end)
    auto unlimited = pyr_test::open_engine(kGqa);
    pyr::Session a2(unlimited, sp), b2(unlimited, sp);
    a2.feed_tokens(prompt_a);
    b2.feed_tokens(prompt_b);
    CHECK(greedy_tokens(a2) == tokens_a);
    CHECK(greedy_tokens(b) == greedy_tokens(b2));

    // past it: 58 + 5 > 60 tokens; the session stays as it was
    const uint64_t before = b.memory().kv_bytes;
    b.feed_tokens({5, 6, 7, 8, 9});
    try {
        b.prefill();
        FAIL("growing past the budget was not refused");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_ERR_OUT_OF_MEMORY);
    }
    CHECK(b.memory().kv_bytes == before);
}

TEST_CASE("max_device_bytes on the CPU: compressed caches give room back") {
    auto engine = engine_with_room_for(100);
    const int32_t vocab = engine->config().n_vocab;
    pyr::SessionParams sp;
    sp.kv.policy = "streaming";  // keeps 25 of 100 tokens in every layer after the prefill
    sp.kv.retention = 0.25f;
    pyr::Session a(engine, sp);
    a.feed_tokens(pyr_test::random_tokens(100, vocab, 3));
    a.prefill();  // admitted at 100 tokens of room; compressed to 25, it keeps room for 41
    pyr::Session b(engine, sp);
    b.feed_tokens(pyr_test::random_tokens(45, vocab, 4));
    b.prefill();  // fits only because a gave room back: 41 + 45 <= 100
    CHECK(b.memory().n_tokens == 45);
}

TEST_CASE("max_device_bytes on the CPU: a shrinking prefill needs room only for what reaches a layer") {
    // pyramid drops prompt tokens at layers 1 and 2 of 3 and deeper layers never see them:
    // 100 prompt tokens fit in less than 100 tokens' room in every layer.
    auto engine = engine_with_room_for(100, 1);
    pyr::SessionParams sp;
    sp.kv.policy = "pyramid";
    sp.kv.retention = 0.5f;
    pyr::Session s(engine, sp);
    s.feed_tokens(pyr_test::random_tokens(100, engine->config().n_vocab, 5));
    s.prefill();
    CHECK(s.memory().kv_bytes < s.memory().kv_bytes_full);
}
