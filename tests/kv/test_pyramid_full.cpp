// The reference's forward against HF transformers and the engine's `full` policy (so that
// the pyramid comparisons rest on a correct forward), pyramid at retention 1 against `full`,
// the memory figures, and the generation-phase compression schedule of DESIGN.md section 5
// ("when pending >= E ... keep k = max(floor(E * 0.9 * g_l), 1)") in closed form.
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "pyramid_compare.h"

namespace {

using pyr_ref::Vec;

nlohmann::json read_json(const std::string& path) {
    std::ifstream in(path);
    REQUIRE_MESSAGE(in.good(), "cannot read " << path);
    return nlohmann::json::parse(in);
}

// A reference that keeps everything: rho 1 (no layer shrinks) and no generation compression.
pyr_ref::RefConfig keep_all(int32_t n_prompt, int n_layer) {
    return {pyr_ref::make_plan(n_prompt, n_layer, {1.0, 1.0, 0.2, 64}), 4, 0, true};
}

int count_far(const float* got, const Vec& want, double tol) {
    int bad = 0;
    for (size_t i = 0; i < want.size(); ++i)
        bad += std::fabs(double(got[i]) - want[i]) > tol * (1.0 + std::fabs(want[i]));
    return bad;
}

}  // namespace

TEST_CASE("reference selection: top-k in original order, ties to the earlier token") {
    double gap = 0.0;
    const Vec s{0.1, 0.5, 0.3, 0.5, INFINITY, 0.2};
    CHECK(pyr_ref::keep_top(s, 3, gap) == std::vector<int32_t>{1, 3, 4});
    CHECK(gap == doctest::Approx((0.5 - 0.3) / 0.5));
    CHECK(pyr_ref::keep_top(s, 2, gap) == std::vector<int32_t>{1, 4});  // 1 before 3
    CHECK(gap == 0.0);
    CHECK(pyr_ref::keep_top(s, 6, gap) == std::vector<int32_t>{0, 1, 2, 3, 4, 5});
    CHECK(gap == INFINITY);
    const Vec sinks{INFINITY, INFINITY, INFINITY, 0.9};
    CHECK(pyr_ref::keep_top(sinks, 2, gap) == std::vector<int32_t>{0, 1});
    // s_j = (1/W) sum_i w_i A[i, j], w = linspace(1, 1.2) oldest row first; W = 1: w = 1.
    const std::vector<Vec> rows{{1.0, 0.0}, {0.0, 1.0}, {0.5, 0.5}};
    const Vec w3 = pyr_ref::weighted_scores(rows, 0, 2);
    CHECK(w3[0] == doctest::Approx((1.0 + 0.5 * 1.2) / 3));
    CHECK(w3[1] == doctest::Approx((1.1 + 0.5 * 1.2) / 3));
    CHECK(pyr_ref::weighted_scores({{0.25, 0.75}}, 1, 1) == Vec{0.75});
}

TEST_CASE("reference forward: HF fixtures' logits and greedy tokens") {
    for (const char* name : {"mha_f32", "gqa_f16", "bias_f32", "head_dim_override_bf16"}) {
        CAPTURE(name);
        const std::string dir = pyr_test::kFixtures + "/" + name;
        const nlohmann::json ex = read_json(dir + "/expected.json");
        const pyr_ref::RefModel model = pyr_ref::RefModel::load(dir);
        const auto prompt = ex["prompt_tokens"].get<std::vector<int32_t>>();
        pyr_ref::PyramidReference ref(model, keep_all(int32_t(prompt.size()), model.cfg.n_layer));
        Vec logits = ref.prefill(prompt);
        const auto want = ex["last_logits"].get<std::vector<double>>();
        REQUIRE(logits.size() == want.size());
        for (size_t i = 0; i < want.size(); ++i) REQUIRE(std::fabs(logits[i] - want[i]) <= 2e-4);
        std::vector<int32_t> got;
        for (size_t i = 0; i < ex["greedy"].size(); ++i) {
            got.push_back(pyr_ref::argmax(logits));
            logits = ref.step(got.back());
        }
        CHECK(got == ex["greedy"].get<std::vector<int32_t>>());
    }
}

TEST_CASE("reference forward: the engine's full policy, prefill and decode logits") {
    pyr_test::TempDir dir;
    pyr_test::write_random_llama(dir.path(), {6, 48, 4, 2, 96, 71});
    auto engine = pyr_test::open_engine(dir.path());
    const pyr_ref::RefModel model = pyr_ref::RefModel::load(dir.path());
    const std::vector<int32_t> prompt = pyr_test::random_tokens(150, 396, 5);
    auto session = pyr_test::greedy_session(engine, 20, {}, 200);
    session->feed_tokens(prompt);
    session->prefill();
    pyr_ref::PyramidReference ref(model, keep_all(150, 6));
    Vec logits = ref.prefill(prompt);
    CHECK(count_far(session->logits(), logits, 1e-4) == 0);
    for (int i = 0; i < 20; ++i) {
        CAPTURE(i);
        if (i > 0) logits = ref.step(session->token());
        REQUIRE(session->next() == pyr::StepResult::Token);
        CHECK(count_far(session->logits(), logits, 1e-4) == 0);
        REQUIRE(session->token() == pyr_ref::argmax(logits));
        const pyr::MemoryStats m = session->memory();
        pyr_test::check_engine_state(m, *engine, 150 + i, 1);
        for (int il = 0; il < 6; ++il)
            CHECK(m.layer_positions[size_t(il)] == pyr_test::iota_positions(0, 150 + i));
    }
}

// Retention 1 solves to rho 1 ("the largest rho whose planned retention is <= t"), so the
// prefill drops nothing; pyramid.h adds "1 keeps everything (generation too)". So the session
// is `full`, token for token and position for position, at the default E 16 and at E 0.
TEST_CASE("pyramid at retention 1.0 reproduces full (bundled model, greedy, 32 tokens)") {
    auto engine = pyr_test::open_engine(PYR_TEST_MODEL_DIR);
    std::vector<int32_t> prompt =
        engine->model().tokenizer().encode(pyr_test::kCodeText, /*add_bos=*/true);
    prompt.resize(200);
    struct Run {
        std::vector<int32_t> tokens;
        pyr::MemoryStats mem;
    };
    auto generate = [&](const pyr::KvParams& kv) {
        auto s = pyr_test::greedy_session(engine, 32, kv, 240);
        s->feed_tokens(prompt);
        Run run;
        while (s->next() == pyr::StepResult::Token) run.tokens.push_back(s->token());
        run.mem = s->memory();
        pyr_test::check_engine_state(run.mem, *engine, int32_t(prompt.size() + 31), 1);
        return run;
    };
    const Run full = generate(pyr::KvParams{});
    REQUIRE(full.tokens.size() == 32);
    for (int32_t gen_e : {16, 0}) {
        CAPTURE(gen_e);
        pyr::KvParams kv;
        kv.policy = "pyramid", kv.retention = 1.0f, kv.gen_e = gen_e;
        const Run pyramid = generate(kv);
        for (size_t il = 0; il < pyramid.mem.prefill_layer_positions.size(); ++il) {
            CAPTURE(il);
            CHECK(pyramid.mem.prefill_layer_positions[il].size() == 200);
        }
        CHECK(pyramid.tokens == full.tokens);
        CHECK(pyramid.mem.layer_positions == full.mem.layer_positions);
    }
    // And the reference agrees: nothing dropped, full's tokens.
    pyr_test::CaseSpec cs;
    cs.name = "code retention 1.0", cs.retention = 1.0, cs.prompt = prompt, cs.n_gen = 32;
    const pyr_test::CaseOutcome out =
        pyr_test::run_case(engine, pyr_ref::RefModel::load(PYR_TEST_MODEL_DIR), cs);
    CHECK(out.compressions == 0);
    CHECK(out.generated == full.tokens);
}

// After m generated tokens have been processed, layer l holds C_l + W + m - floor(m / E) *
// (E - k_l) tokens: its context from prefill untouched, then the kept part of each compressed
// block, then the uncompressed tail of the last (m mod E) + W processed tokens.
TEST_CASE("generation-phase compression fires every E tokens per layer, never in the last W") {
    pyr_test::TempDir dir;
    pyr_test::write_random_llama(dir.path(), {6, 48, 4, 2, 96, 72});
    auto engine = pyr_test::open_engine(dir.path());
    const int n_layer = 6;
    for (int32_t gen_e : {0, 1, 4, 5, 16}) {
        CAPTURE(gen_e);
        pyr_test::CaseSpec cs;
        cs.n_prompt = 90, cs.rho = 0.3, cs.min_context = 8, cs.gen_e = gen_e;
        const int32_t n_gen = 50;
        const std::vector<int32_t> prompt = pyr_test::random_tokens(cs.n_prompt, 396, 9);
        auto s = pyr_test::greedy_session(engine, n_gen, pyr_test::kv_params(cs), 200);
        s->feed_tokens(prompt);
        s->prefill();
        const pyr_ref::Plan plan = pyr_test::expected_plan(cs, cs.n_prompt, n_layer);
        const int32_t w = plan.window;
        const std::vector<std::vector<int32_t>> after_prefill = s->memory().layer_positions;
        for (int32_t i = 0; i < n_gen; ++i) {
            if (s->next() != pyr::StepResult::Token) break;
            const int32_t m = i;  // generated tokens processed: each next() processes the last one
            const int32_t processed = cs.n_prompt + m;
            const pyr::MemoryStats mem = s->memory();
            pyr_test::check_engine_state(mem, *engine, processed, w);
            for (int il = 0; il < n_layer; ++il) {
                CAPTURE(i);
                CAPTURE(il);
                const int32_t c_l = plan.context[size_t(il)];
                const int32_t blocks = gen_e > 0 ? m / gen_e : 0;
                const int32_t k_l = gen_e > 0 ? pyr_ref::generation_keep(gen_e, il, n_layer) : 0;
                const std::vector<int32_t>& pos = mem.layer_positions[size_t(il)];
                REQUIRE(int32_t(pos.size()) == c_l + w + m - blocks * (gen_e - k_l));
                // The prefill context is untouched; the tail is every recent processed token.
                const auto& pre = after_prefill[size_t(il)];
                CHECK(std::equal(pre.begin(), pre.begin() + c_l, pos.begin()));
                const int32_t tail = w + (gen_e > 0 ? m % gen_e : m);
                CHECK(std::vector<int32_t>(pos.end() - tail, pos.end()) ==
                      pyr_test::iota_positions(processed - tail, processed));
            }
        }
    }
}
