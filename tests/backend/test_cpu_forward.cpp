// The CPU backend's whole forward pass: a tiny random LLaMA against the slow reference
// forward of cpu_test_util.h (prompt at once, token by token, chunked, after cache
// compression), cancellation, argument checks, the HF fixture tests/data/fixtures/mha_f32
// (logits from transformers), and a speed measurement at the bundled model's shapes.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_ops.h"
#include "common/error.h"
#include "cpu_test_util.h"

using namespace pyr_test;

namespace {

// Runs tokens at positions pos0.. through the cache; returns the last token's logits.
std::vector<float> run_step(pyr::Backend& backend, pyr::KvCache& cache,
                            const std::vector<int32_t>& tokens, int32_t pos0,
                            const std::atomic<bool>* cancel = nullptr, int32_t n_vocab = 50) {
    std::vector<int32_t> pos(tokens.size());
    for (size_t i = 0; i < pos.size(); ++i) pos[i] = pos0 + int32_t(i);
    std::vector<float> logits(size_t(n_vocab), NAN);
    pyr::SequenceStep step;
    step.tokens = tokens.data();
    step.positions = pos.data();
    step.n_tokens = int32_t(tokens.size());
    step.cache = &cache;
    step.logits = logits.data();
    step.cancel = cancel;
    backend.forward(&step, 1);
    return logits;
}

std::unique_ptr<pyr::KvCache> new_cache(pyr::Backend& backend, int n_layer, int32_t n_ctx = 32) {
    return std::make_unique<pyr::KvCache>(n_layer, backend.new_kv_storage(n_ctx));
}

void check_logits(const std::vector<float>& got, const Vec& want, double tol) {
    REQUIRE(got.size() == want.size());
    for (size_t i = 0; i < want.size(); ++i) {
        if (std::fabs(got[i] - want[i]) > tol * std::max(1.0, std::fabs(want[i]))) {
            CAPTURE(i);
            CHECK(got[i] == doctest::Approx(want[i]));
            return;
        }
    }
}

void check_same(const std::vector<float>& a, const std::vector<float>& b, double tol) {
    check_logits(a, Vec(b.begin(), b.end()), tol);
}

std::vector<int32_t> random_tokens(Rng& rng, size_t n, int32_t n_vocab) {
    std::vector<int32_t> t(n);
    for (int32_t& x : t) x = rng.index(n_vocab);
    return t;
}

}  // namespace

// ---- the tiny model against the reference ----------------------------------------------

TEST_CASE("forward: prompt at once == token by token == chunked == reference") {
    Rng rng;
    CAPTURE(rng.seed);
    struct Variant { DType dtype; bool bias, tied, simd; };
    for (Variant var : {Variant{DType::F32, false, false, true}, Variant{DType::F32, true, true, true},
                        Variant{DType::F16, true, false, true}, Variant{DType::BF16, false, true, true},
                        Variant{DType::F32, true, false, false}}) {
        CAPTURE(pyr::dtype_name(var.dtype));
        CAPTURE(var.bias);
        CAPTURE(var.tied);
        CAPTURE(var.simd);
        KernelChoice kc(var.simd);
        const TinyModel m = make_tiny_model(rng, var.dtype, var.bias, var.tied);
        pyr::CpuBackend backend(m.config, m.weights(), 2);
        CHECK(backend.device_name() == "cpu");
        const std::vector<int32_t> prompt = random_tokens(rng, 7, m.config.n_vocab);
        const std::vector<Vec> ref = ref_forward(m, prompt);

        auto at_once = new_cache(backend, 2);
        const std::vector<float> a = run_step(backend, *at_once, prompt, 0);
        check_logits(a, ref.back(), 1e-4);
        for (int il = 0; il < 2; ++il)
            CHECK(at_once->positions(il) == std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6});

        auto one_by_one = new_cache(backend, 2);
        std::vector<float> b;
        for (size_t t = 0; t < prompt.size(); ++t) {
            CAPTURE(t);
            b = run_step(backend, *one_by_one, {prompt[t]}, int32_t(t));
            check_logits(b, ref[t], 1e-4);
        }
        check_same(b, a, 1e-4);

        auto chunked = new_cache(backend, 2);
        run_step(backend, *chunked, {prompt.begin(), prompt.begin() + 3}, 0);
        check_same(run_step(backend, *chunked, {prompt.begin() + 3, prompt.end()}, 3), a, 1e-4);
    }
}

TEST_CASE("forward: after retain, a new token attends only to the kept tokens") {
    Rng rng;
    CAPTURE(rng.seed);
    const TinyModel m = make_tiny_model(rng, DType::F32, false, false);
    pyr::CpuBackend backend(m.config, m.weights(), 2);
    std::vector<int32_t> tokens = random_tokens(rng, 7, m.config.n_vocab);
    auto cache = new_cache(backend, 2);
    run_step(backend, *cache, {tokens.begin(), tokens.begin() + 6}, 0);
    // layer 0 keeps positions {0, 2, 3, 5}, layer 1 keeps {0, 1, 5}
    const std::vector<std::vector<int32_t>> kept{{0, 2, 3, 5}, {0, 1, 5}};
    for (int il = 0; il < 2; ++il) cache->retain(il, kept[size_t(il)]);
    const std::vector<float> got = run_step(backend, *cache, {tokens[6]}, 6);
    CHECK(cache->positions(0) == std::vector<int32_t>{0, 2, 3, 5, 6});
    CHECK(cache->positions(1) == std::vector<int32_t>{0, 1, 5, 6});
    auto visible = [&](int il, size_t iq, size_t ik) {
        if (iq < 6) return ik <= iq;  // the prompt was computed with the full cache
        const auto& k = kept[size_t(il)];
        return ik == 6 || std::find(k.begin(), k.end(), int32_t(ik)) != k.end();
    };
    check_logits(got, ref_forward(m, tokens, visible).back(), 1e-4);
}

TEST_CASE("forward: a batch of two sequences; logits == nullptr skips the head") {
    Rng rng;
    CAPTURE(rng.seed);
    const TinyModel m = make_tiny_model(rng, DType::F16, false, false);
    pyr::CpuBackend backend(m.config, m.weights(), 2);
    const std::vector<int32_t> p1 = random_tokens(rng, 5, 50), p2 = random_tokens(rng, 3, 50);
    const std::vector<int32_t> pos{0, 1, 2, 3, 4};
    auto c1 = new_cache(backend, 2), c2 = new_cache(backend, 2);
    std::vector<float> l1(50), l2(50);
    pyr::SequenceStep steps[2];
    steps[0] = {p1.data(), pos.data(), 5, c1.get(), nullptr, l1.data()};
    steps[1] = {p2.data(), pos.data(), 3, c2.get(), nullptr, nullptr};
    backend.forward(steps, 2);
    check_logits(l1, ref_forward(m, p1).back(), 1e-4);
    CHECK(c2->size(1) == 3);
    const std::vector<int32_t> next{7};
    const std::vector<int32_t> full{p2[0], p2[1], p2[2], 7};
    check_logits(run_step(backend, *c2, next, 3), ref_forward(m, full).back(), 1e-4);
}

TEST_CASE("forward: a set cancel flag throws PYR_CANCELLED; bad input is rejected") {
    Rng rng;
    CAPTURE(rng.seed);
    const TinyModel m = make_tiny_model(rng, DType::F32, false, false);
    pyr::CpuBackend backend(m.config, m.weights(), 2);
    auto cache = new_cache(backend, 2);
    std::atomic<bool> cancel{false};
    run_step(backend, *cache, {1, 2}, 0, &cancel);  // not set: runs
    cancel = true;
    try {
        run_step(backend, *cache, {3}, 2, &cancel);
        FAIL("forward did not throw");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_CANCELLED);
    }
    cache->truncate({2, 2});  // the caller's rollback after a cancelled step
    CHECK(cache->sizes() == std::vector<int32_t>{2, 2});
    cancel = false;
    const std::vector<float> resumed = run_step(backend, *cache, {3}, 2, &cancel);
    check_logits(resumed, ref_forward(m, {1, 2, 3}).back(), 1e-4);

    // in a batch, any step's flag stops the whole forward (the engine retries the others)
    {
        auto c1 = new_cache(backend, 2), c2 = new_cache(backend, 2);
        const std::vector<int32_t> p1{1, 2, 3}, pos{0, 1, 2};
        std::atomic<bool> flag1{false}, flag2{true};
        pyr::SequenceStep steps[2];
        steps[0] = {p1.data(), pos.data(), 3, c1.get(), nullptr, nullptr, &flag1};
        steps[1] = {p1.data(), pos.data(), 3, c2.get(), nullptr, nullptr, &flag2};
        try {
            backend.forward(steps, 2);
            FAIL("forward did not throw");
        } catch (const pyr::Error& e) {
            CHECK(e.status() == PYR_CANCELLED);
        }
    }

    try {
        run_step(backend, *cache, {50}, 3);
        FAIL("an out-of-range token was accepted");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_ERR_INVALID_ARGUMENT);
    }
    pyr::ModelWeights bad = m.weights();
    bad.layers[1].wk.rows = 12;
    CHECK_THROWS_AS(pyr::CpuBackend(m.config, bad, 1), pyr::Error);
}

// ---- the HF fixture -------------------------------------------------------------------

namespace {

using json = nlohmann::json;

std::string read_all(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    REQUIRE(f.good());
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// A single-file F32 checkpoint read directly (the model loader is tested elsewhere).
struct Fixture {
    pyr::ModelConfig config;
    std::map<std::string, std::vector<float>> data;
    pyr::ModelWeights weights;

    pyr::Tensor tensor(const std::string& name, int64_t rows, int64_t cols) {
        const std::vector<float>& d = data.at(name);
        REQUIRE(int64_t(d.size()) == rows * cols);
        return pyr::Tensor{DType::F32, rows, cols, d.data()};
    }

    explicit Fixture(const std::string& dir) {
        const json cfg = json::parse(read_all(dir + "/config.json"));
        pyr::ModelConfig& c = config;
        c.n_vocab = cfg["vocab_size"], c.n_embd = cfg["hidden_size"];
        c.n_ff = cfg["intermediate_size"], c.n_layer = cfg["num_hidden_layers"];
        c.n_head = cfg["num_attention_heads"], c.n_head_kv = cfg["num_key_value_heads"];
        c.head_dim = cfg["head_dim"], c.rms_norm_eps = cfg["rms_norm_eps"];
        c.rope_theta = cfg["rope_parameters"]["rope_theta"];
        c.n_ctx_train = cfg["max_position_embeddings"];
        const std::string bytes = read_all(dir + "/model.safetensors");
        uint64_t n_header;
        std::memcpy(&n_header, bytes.data(), 8);
        const json header = json::parse(bytes.substr(8, n_header));
        for (const auto& [name, info] : header.items()) {
            if (name == "__metadata__") continue;
            REQUIRE(info["dtype"] == "F32");
            const size_t begin = info["data_offsets"][0], end = info["data_offsets"][1];
            std::vector<float>& d = data[name];
            d.resize((end - begin) / 4);
            std::memcpy(d.data(), bytes.data() + 8 + n_header + begin, end - begin);
        }
        build_weights();
    }

    void build_weights() {
        const pyr::ModelConfig& c = config;
        const int64_t H = c.n_embd, Q = c.n_head * c.head_dim, KV = c.n_head_kv * c.head_dim;
        weights.tok_embd = tensor("model.embed_tokens.weight", c.n_vocab, H);
        weights.output_norm = tensor("model.norm.weight", H, 1);
        weights.output = tensor("lm_head.weight", c.n_vocab, H);
        for (int il = 0; il < c.n_layer; ++il) {
            const std::string p = "model.layers." + std::to_string(il) + ".";
            pyr::LayerWeights l;
            l.attn_norm = tensor(p + "input_layernorm.weight", H, 1);
            l.wq = tensor(p + "self_attn.q_proj.weight", Q, H);
            l.wk = tensor(p + "self_attn.k_proj.weight", KV, H);
            l.wv = tensor(p + "self_attn.v_proj.weight", KV, H);
            l.wo = tensor(p + "self_attn.o_proj.weight", H, Q);
            l.ffn_norm = tensor(p + "post_attention_layernorm.weight", H, 1);
            l.w_gate = tensor(p + "mlp.gate_proj.weight", c.n_ff, H);
            l.w_up = tensor(p + "mlp.up_proj.weight", c.n_ff, H);
            l.w_down = tensor(p + "mlp.down_proj.weight", H, c.n_ff);
            weights.layers.push_back(l);
        }
    }
};

}  // namespace

TEST_CASE("forward: HF transformers logits and greedy tokens (fixture mha_f32)") {
    const std::string dir = std::string(PYR_TEST_DATA_DIR) + "/fixtures/mha_f32";
    Fixture fx(dir);
    const json expected = json::parse(read_all(dir + "/expected.json"));
    pyr::CpuBackend backend(fx.config, fx.weights, 2);
    auto cache = new_cache(backend, fx.config.n_layer, 64);
    const std::vector<int32_t> prompt = expected["prompt_tokens"];
    const int32_t n_vocab = fx.config.n_vocab;
    std::vector<float> logits = run_step(backend, *cache, prompt, 0, nullptr, n_vocab);
    const std::vector<double> want = expected["last_logits"];
    check_logits(logits, want, 1e-4);  // the fixture prints 6 significant digits

    // greedy decoding through the cache: the same tokens, top logits within 1e-3 relative
    int32_t pos = int32_t(prompt.size());
    for (size_t i = 0; i < expected["greedy"].size(); ++i) {
        CAPTURE(i);
        const int32_t best = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
        const json& top = expected["steps"][i][0];
        CHECK(best == top[0].get<int32_t>());
        CHECK(logits[size_t(best)] == doctest::Approx(top[1].get<double>()).epsilon(1e-3));
        logits = run_step(backend, *cache, {best}, pos++, nullptr, n_vocab);
    }
}

// ---- speed ------------------------------------------------------------------------------

TEST_CASE("forward: speed at the bundled model's shapes (F16, random weights)") {
    Rng rng;
    TinyModel m;
    pyr::ModelConfig& c = m.config;
    c.n_vocab = 4096, c.n_embd = 384, c.n_ff = 1024, c.n_layer = 10;
    c.n_head = 6, c.n_head_kv = 2, c.head_dim = 64, c.n_ctx_train = 4096;
    const int64_t H = 384, Q = 384, KV = 128;
    auto mat = [&](int64_t r, int64_t cols) { return HostTensor::random(rng, DType::F16, r, cols, 0.05f); };
    m.tok_embd = mat(c.n_vocab, H), m.output = mat(c.n_vocab, H);
    m.output_norm = HostTensor::random(rng, DType::F16, H, 1, 0.1f, 1.0f);
    for (int il = 0; il < c.n_layer; ++il) {
        HostLayer l;
        l.attn_norm = l.ffn_norm = m.output_norm;
        l.wq = mat(Q, H), l.wk = mat(KV, H), l.wv = mat(KV, H), l.wo = mat(H, Q);
        l.w_gate = mat(c.n_ff, H), l.w_up = mat(c.n_ff, H), l.w_down = mat(H, c.n_ff);
        m.layers.push_back(std::move(l));
    }
    pyr::CpuBackend backend(c, m.weights(), 2);
    auto cache = new_cache(backend, c.n_layer, 512);
    const std::vector<int32_t> prompt = random_tokens(rng, 128, c.n_vocab);
    using clock = std::chrono::steady_clock;
    auto t0 = clock::now();
    std::vector<float> logits = run_step(backend, *cache, prompt, 0, nullptr, c.n_vocab);
    auto t1 = clock::now();
    const int n_decode = 64;
    for (int i = 0; i < n_decode; ++i)
        logits = run_step(backend, *cache, {int32_t(i)}, 128 + i, nullptr, c.n_vocab);
    auto t2 = clock::now();
    const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
    const double decode_s = std::chrono::duration<double>(t2 - t1).count();
    MESSAGE("cpu backend (" << std::string(pyr::cpu::kernel_name()) << ", 2 threads), 10 x 384 F16: prefill 128 "
                            << "tokens " << prefill_s * 1e3 << " ms (" << 128 / prefill_s
                            << " tok/s), decode " << n_decode / decode_s << " tok/s");
    {
        KernelChoice kc(/*simd=*/false);
        const int n_generic = 16;
        auto t3 = clock::now();
        for (int i = 0; i < n_generic; ++i)
            logits = run_step(backend, *cache, {int32_t(i)}, 128 + n_decode + i, nullptr, c.n_vocab);
        const double generic_s = std::chrono::duration<double>(clock::now() - t3).count();
        MESSAGE("generic kernels: decode " << n_generic / generic_s << " tok/s");
    }
    CHECK(std::isfinite(logits[0]));
}
