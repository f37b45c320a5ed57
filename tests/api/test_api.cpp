// The C API from C++: what tests/c/test_c_api.c does not cover — logging, tokenize's buffer
// contract, the memory estimate, seeded sampling across reset, device selection.
#include <doctest/doctest.h>

#include "backend/backend.h"

#include <string>
#include <vector>

#include "pyramid.h"

namespace {

pyr_engine* open_bundled() {
    pyr_engine* engine = nullptr;
    REQUIRE(pyr_engine_open(PYR_TEST_MODEL_DIR, nullptr, &engine) == PYR_OK);
    return engine;
}

std::vector<int32_t> generate(pyr_session* s, const char* prompt) {
    REQUIRE(pyr_session_feed_text(s, prompt) == PYR_OK);
    std::vector<int32_t> out;
    pyr_status st;
    while ((st = pyr_session_next(s)) == PYR_OK) out.push_back(pyr_session_token(s));
    REQUIRE(st == PYR_DONE);
    return out;
}

struct LogSink {
    std::vector<std::string> messages;
    static void callback(pyr_log_level, const char* message, void* user) {
        static_cast<LogSink*>(user)->messages.push_back(message);
    }
};

}  // namespace

TEST_CASE("the log callback receives messages at the chosen level") {
    LogSink sink;
    pyr_log_set_callback(LogSink::callback, &sink);
    pyr_log_set_level(PYR_LOG_INFO);
    pyr_engine* engine = open_bundled();
    pyr_log_set_level(PYR_LOG_WARN);
    pyr_log_set_callback(nullptr, nullptr);
    bool found = false;
    for (const auto& m : sink.messages) found = found || m.find("tiny-code-llama") != std::string::npos;
    CHECK(found);
    size_t before = sink.messages.size();
    pyr_engine_close(engine);
    engine = open_bundled();  // level WARN, callback removed: nothing more arrives
    CHECK(sink.messages.size() == before);
    pyr_engine_close(engine);
}

TEST_CASE("tokenize reports the needed size and fills at most capacity") {
    pyr_engine* engine = open_bundled();
    int32_t n = pyr_engine_tokenize(engine, "def fibonacci(n):", 1, nullptr, 0);
    CHECK(n == 10);  // the HF reference: [1, 432, 290, 590, 267, 975, 1238, 4025, 4011, 313]
    std::vector<int32_t> ids(4, -7);
    CHECK(pyr_engine_tokenize(engine, "def fibonacci(n):", 1, ids.data(), 3) == 10);
    CHECK(ids == std::vector<int32_t>{1, 432, 290, -7});
    CHECK(pyr_engine_tokenize(engine, nullptr, 1, nullptr, 0) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(std::string(pyr_engine_errmsg(engine)).find("NULL") != std::string::npos);
    pyr_engine_close(engine);
}

TEST_CASE("memory estimate and stats agree with the layout") {
    pyr_engine* engine = open_bundled();
    pyr_session_params sp;
    pyr_session_params_init(&sp);
    sp.n_ctx = 100;
    // 10 layers x 100 tokens x (K + V) x 2 kv heads x 64 dims x 4 bytes (fp32 on the CPU;
    // 2 bytes on a GPU, where "auto" opens the engine)
    const uint64_t elem = std::string(pyr_engine_device(engine)) == "cpu" ? 4 : 2;
    CHECK(pyr_engine_session_bytes_estimate(engine, &sp) == 10ull * 100 * 2 * 2 * 64 * elem);
    sp.n_ctx = -1;  // what pyr_session_create refuses has no estimate
    CHECK(pyr_engine_session_bytes_estimate(engine, &sp) == 0);
    sp.n_ctx = 100;
    sp.temperature = 0.0f;
    sp.max_tokens = 5;
    pyr_session* s = nullptr;
    REQUIRE(pyr_session_create(engine, &sp, &s) == PYR_OK);
    generate(s, "import os");
    // 4 prompt tokens (BOS + 3) and 5 generated, of which the last is not processed yet.
    int32_t processed = pyr_session_layer_tokens(s, 0);
    CHECK(pyr_session_n_tokens(s) == processed + 1);
    CHECK(pyr_session_n_processed(s) == processed);
    CHECK(pyr_session_kv_bytes(s) == uint64_t(processed) * 10 * 2 * 2 * 64 * elem);
    CHECK(pyr_session_layer_tokens(s, 10) == 0);  // out of range
    CHECK(pyr_session_layer_bytes(s, -1) == 0);
    pyr_session_destroy(s);
    pyr_engine_close(engine);
}

TEST_CASE("max_device_bytes on the CPU: a prompt past the budget is refused, a short one runs") {
    pyr_engine_params ep;
    pyr_engine_params_init(&ep);
    ep.device = "cpu";
    pyr_session_params sp;
    pyr_session_params_init(&sp);
    sp.n_ctx = 16;
    pyr_engine* probe = nullptr;
    REQUIRE(pyr_engine_open(PYR_TEST_MODEL_DIR, &ep, &probe) == PYR_OK);
    ep.max_device_bytes = pyr_engine_session_bytes_estimate(probe, &sp);  // 16 tokens' KV
    pyr_engine_close(probe);
    pyr_engine* engine = nullptr;
    REQUIRE(pyr_engine_open(PYR_TEST_MODEL_DIR, &ep, &engine) == PYR_OK);
    sp.n_ctx = 0;
    sp.temperature = 0.0f;
    sp.max_tokens = 8;  // "import os" is 4 tokens: 12 fit
    pyr_session* s = nullptr;
    REQUIRE(pyr_session_create(engine, &sp, &s) == PYR_OK);
    REQUIRE(pyr_session_feed_text(s, "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n") == PYR_OK);
    CHECK(pyr_session_n_tokens(s) > 16);
    CHECK(pyr_session_prefill(s) == PYR_ERR_OUT_OF_MEMORY);
    CHECK(std::string(pyr_session_errmsg(s)).find("max_device_bytes") != std::string::npos);
    CHECK(pyr_session_kv_bytes(s) == 0);
    REQUIRE(pyr_session_reset(s) == PYR_OK);
    CHECK(!generate(s, "import os").empty());
    pyr_session_destroy(s);
    pyr_engine_close(engine);
}

TEST_CASE("a seed repeats its tokens, also after reset") {
    pyr_engine* engine = open_bundled();
    pyr_session_params sp;
    pyr_session_params_init(&sp);
    sp.temperature = 1.0f;
    sp.seed = 1234;
    sp.max_tokens = 24;
    pyr_session* a = nullptr;
    pyr_session* b = nullptr;
    REQUIRE(pyr_session_create(engine, &sp, &a) == PYR_OK);
    REQUIRE(pyr_session_create(engine, &sp, &b) == PYR_OK);
    auto first = generate(a, "class Stack:");
    CHECK(generate(b, "class Stack:") == first);
    REQUIRE(pyr_session_reset(a) == PYR_OK);
    CHECK(generate(a, "class Stack:") == first);
    pyr_session_destroy(a);
    pyr_session_destroy(b);
    pyr_engine_close(engine);
}

TEST_CASE("device selection and engine params are checked") {
    pyr_engine_params ep;
    pyr_engine_params_init(&ep);
    pyr_engine* engine = nullptr;
    const bool gpu = pyr::cuda_device_count() > 0;
    ep.device = "cuda:7";  // past the devices of any machine this runs on
    CHECK(pyr_engine_open(PYR_TEST_MODEL_DIR, &ep, &engine) == PYR_ERR_UNSUPPORTED);
    CHECK(std::string(pyr_engine_errmsg(engine)).find("CUDA") != std::string::npos);
    pyr_engine_close(engine);
    ep.device = "cuda:0";
    CHECK(pyr_engine_open(PYR_TEST_MODEL_DIR, &ep, &engine) == (gpu ? PYR_OK : PYR_ERR_UNSUPPORTED));
    pyr_engine_close(engine);
    ep.device = "cpu";
    ep.n_threads = -2;
    CHECK(pyr_engine_open(PYR_TEST_MODEL_DIR, &ep, &engine) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(std::string(pyr_engine_errmsg(engine)).find("n_threads") != std::string::npos);
    pyr_engine_close(engine);
    ep.n_threads = 1;
    CHECK(ep.prefill_chunk == 512);  // the default from pyr_engine_params_init
    ep.prefill_chunk = -1;
    CHECK(pyr_engine_open(PYR_TEST_MODEL_DIR, &ep, &engine) == PYR_ERR_INVALID_ARGUMENT);
    CHECK(std::string(pyr_engine_errmsg(engine)).find("prefill_chunk") != std::string::npos);
    pyr_engine_close(engine);
    ep.prefill_chunk = 0;  // no chunks
    ep.device = nullptr;  // NULL means auto
    REQUIRE(pyr_engine_open(PYR_TEST_MODEL_DIR, &ep, &engine) == PYR_OK);
    CHECK(std::string(pyr_engine_device(engine)) == (gpu ? "cuda:0" : "cpu"));
    pyr_engine_close(engine);
}
