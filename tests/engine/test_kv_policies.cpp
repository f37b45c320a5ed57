// KV policies through a session: budgets kept exactly, recent windows never dropped,
// generation-phase compression, knob validation, and cancel during a shrinking prefill.
// (The slow, independent implementation of PyramidInfer lives in tests/kv/.)
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <thread>

#include "common/error.h"
#include "engine/engine.h"
#include "engine/session.h"
#include "kv/kv_select.h"
#include "kv/pyramid_plan.h"
#include "support/engine_util.h"

namespace {

const std::string kGqa = std::string(PYR_TEST_DATA_DIR) + "/fixtures/gqa_f16";  // 3 layers


std::unique_ptr<pyr::Session> session_with(std::shared_ptr<pyr::Engine> engine, pyr::KvParams kv,
                                           int max_tokens = 0) {
    pyr::SessionParams sp;
    sp.sampling.temperature = 0.0f;
    sp.max_tokens = max_tokens;
    sp.kv = std::move(kv);
    return std::make_unique<pyr::Session>(std::move(engine), sp);
}

pyr::KvParams policy(const std::string& name, float retention) {
    pyr::KvParams kv;
    kv.policy = name;
    kv.retention = retention;
    return kv;
}

bool contains_all(const std::vector<int32_t>& positions, int32_t from, int32_t to) {
    std::set<int32_t> s(positions.begin(), positions.end());
    for (int32_t p = from; p < to; ++p)
        if (!s.count(p)) return false;
    return true;
}

// Teacher-forces n random tokens through the decode path, one per step.
void decode(pyr::Session& s, int n, int32_t vocab) {
    const auto tokens = pyr_test::random_tokens(n + 1, vocab, 99);
    for (int i = 1; i <= n; ++i) {
        s.feed_tokens({tokens[size_t(i)]});
        s.prefill();
    }
}

}  // namespace

TEST_CASE("selection helpers") {
    CHECK(pyr::top_k_in_order({0.5, 0.9, 0.5, 0.1, 0.9}, 3) == std::vector<int32_t>{0, 1, 4});
    CHECK(pyr::top_k_in_order({1.0, 1.0, 1.0}, 2) == std::vector<int32_t>{0, 1});  // ties: earlier
    CHECK(pyr::max_pool({0, 5, 0, 0, 0, 1}, 3) == std::vector<double>{5, 5, 5, 0, 1, 1});
    CHECK(pyr::max_pool({0, 5, 0}, 1) == std::vector<double>{0, 5, 0});
    // Rows oldest first weigh 1.0, 1.1, 1.2; s_j = (1/3) sum_i w_i rows[i][j].
    const float rows[] = {1, 0, 0, 1, 0, 0, 1, 1, 0};
    auto s = pyr::window_scores(rows, 3, 3, 0, 3, /*weighted=*/true);
    CHECK(s[0] == doctest::Approx((1.0 + 1.1 + 1.2) / 3));
    CHECK(s[1] == doctest::Approx(1.2 / 3));
    CHECK(s[2] == doctest::Approx(0.0));
    // RecentRows: a window of columns from a slot on; newer keys are 0 in older rows.
    pyr::RecentRows recent(2);
    const float r1[] = {0.5f, 0.5f}, r2[] = {0.2f, 0.3f, 0.5f}, r3[] = {0.1f, 0.1f, 0.1f, 0.7f};
    recent.push(r1, 1, 2, /*first=*/1);
    recent.push(r2, 1, 3, 1);
    auto s2 = recent.scores(0, 2, false);
    CHECK(s2[0] == doctest::Approx((0.5 + 0.3) / 2));
    CHECK(s2[1] == doctest::Approx(0.5 / 2));
    recent.push(r3, 1, 4, 1);  // capacity 2: the oldest row leaves
    CHECK(recent.size() == 2);
    auto s3 = recent.scores(1, 3, false);
    CHECK(s3[0] == doctest::Approx((0.5 + 0.1) / 2));
    CHECK(s3[1] == doctest::Approx(0.7 / 2));
    recent.drop_front(2);  // window now starts at slot 3: r2 has nothing left there
    CHECK(recent.scores(0, 1, true)[0] == doctest::Approx(1.2 * 0.7 / 2));
    // The same numbers as window_scores over the 0-padded matrix.
    const float padded[] = {0.3f, 0.5f, 0.0f, 0.1f, 0.1f, 0.7f};
    pyr::RecentRows again(3);
    again.push(r2, 1, 3, 1);
    again.push(r3, 1, 4, 1);
    CHECK(again.scores(0, 3, true) == pyr::window_scores(padded, 2, 3, 0, 3, true));
}

TEST_CASE("RecentRows (a ring of reused rows) scores as a plain list of rows would") {
    // The obvious model: every pushed row's window columns in a list, the oldest dropped
    // beyond capacity, drop_front erasing columns; scores as window_scores over the rows
    // padded with zeros.
    const uint32_t seed = std::random_device{}();
    CAPTURE(seed);
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> prob(0.0f, 1.0f);
    for (int32_t capacity : {1, 3, 5}) {
        pyr::RecentRows ring(capacity);
        std::vector<std::vector<float>> model;
        int32_t n_keys = 4, first = 0;
        for (int op = 0; op < 300; ++op) {
            if (gen() % 5 == 0 && first + 2 <= n_keys) {  // a block leaves the window
                const int32_t n = 1 + int32_t(gen() % 2);
                ring.drop_front(n);
                for (auto& r : model) r.erase(r.begin(), r.begin() + std::min<size_t>(size_t(n), r.size()));
                first += n;
            }
            n_keys += 1;
            const int32_t n_rows = 1 + int32_t(gen() % uint32_t(capacity + 2));  // may pass capacity
            std::vector<float> rows(size_t(n_rows) * size_t(n_keys));
            for (float& f : rows) f = prob(gen);
            ring.push(rows.data(), n_rows, n_keys, first);
            for (int32_t i = 0; i < n_rows; ++i) {
                const float* r = rows.data() + size_t(i) * size_t(n_keys);
                model.emplace_back(r + first, r + n_keys);
                if (int32_t(model.size()) > capacity) model.erase(model.begin());
            }
            REQUIRE(ring.size() == int32_t(model.size()));
            const int32_t width = n_keys - first;
            std::vector<float> padded(model.size() * size_t(width), 0.0f);
            for (size_t i = 0; i < model.size(); ++i)
                std::copy(model[i].begin(), model[i].end(), padded.begin() + ptrdiff_t(i * size_t(width)));
            for (bool weighted : {false, true})
                REQUIRE(ring.scores(0, width, weighted) ==
                        pyr::window_scores(padded.data(), int32_t(model.size()), width, 0, width, weighted));
        }
    }
}

TEST_CASE("top_k_in_order equals the obvious selection for every k, ties included") {
    // The obvious way: order all indices best first (ties: earlier index), take k, sort.
    auto obvious = [](const std::vector<double>& s, int32_t k) {
        std::vector<int32_t> idx(s.size());
        for (size_t i = 0; i < idx.size(); ++i) idx[i] = int32_t(i);
        std::stable_sort(idx.begin(), idx.end(),
                         [&](int32_t a, int32_t b) { return s[size_t(a)] > s[size_t(b)]; });
        idx.resize(size_t(std::max(0, std::min<int32_t>(k, int32_t(s.size())))));
        std::sort(idx.begin(), idx.end());
        return idx;
    };
    const uint32_t seed = std::random_device{}();
    CAPTURE(seed);
    std::mt19937 gen(seed);
    for (int32_t n : {0, 1, 2, 7, 40, 129}) {
        std::vector<double> s(static_cast<size_t>(n));
        std::uniform_int_distribution<int> level(0, 5);  // few distinct values: many ties
        for (double& v : s) v = level(gen) == 5 ? std::numeric_limits<double>::infinity() : level(gen) * 0.25;
        for (int32_t k = -1; k <= n + 1; ++k) {
            CAPTURE(n);
            CAPTURE(k);
            CHECK(pyr::top_k_in_order(s, k) == obvious(s, k));
        }
    }
}

TEST_CASE("peers keep exactly their budget after prefill and through generation") {
    auto engine = pyr_test::open_engine(kGqa);
    const int32_t P = 200, budget = 100, n_layer = engine->config().n_layer;
    const auto prompt = pyr_test::random_tokens(P, 396, 7);
    for (const char* name : {"streaming", "h2o", "snapkv", "pyramidkv", "snapshrink"}) {
        CAPTURE(name);
        pyr::KvParams kv = policy(name, 0.5f);
        kv.gen_e = 8;
        auto s = session_with(engine, kv);
        s->feed_tokens(prompt);
        s->prefill();
        CHECK(s->kv_param("budget") == budget);
        auto m = s->memory();
        int64_t total = 0;
        for (int il = 0; il < n_layer; ++il) {
            const auto& pos = m.prefill_layer_positions[size_t(il)];
            total += int64_t(pos.size());
            CHECK(std::is_sorted(pos.begin(), pos.end()));
            if (std::string(name) == "pyramidkv") {  // 1.5x .. 0.5x the mean, linearly
                CHECK(int32_t(pos.size()) == int32_t(std::lround(budget * (1.5 - il / 2.0))));
            } else {
                CHECK(int32_t(pos.size()) == budget);
            }
        }
        CHECK(total == int64_t(budget) * n_layer);
        if (std::string(name) == "streaming") {
            const auto& pos = m.prefill_layer_positions[0];
            CHECK(contains_all(pos, 0, 4));
            CHECK(contains_all(pos, P - (budget - 4), P));
        }
        if (std::string(name) == "h2o") CHECK(contains_all(m.prefill_layer_positions[1], P - 50, P));
        if (std::string(name) == "snapkv") CHECK(contains_all(m.prefill_layer_positions[2], P - 32, P));
        if (std::string(name) == "snapshrink") {
            // PyramidInfer's recent window W = floor(0.2 P) + 1 stays; shrinking starts at
            // layer 2/5 L = 1, so deeper layers only choose among what layer 1 kept.
            CHECK(s->kv_param("window") == 41);
            CHECK(s->kv_param("shrink_start") == 1);
            for (int il = 0; il < n_layer; ++il) CHECK(contains_all(m.prefill_layer_positions[size_t(il)], P - 41, P));
            const auto& l1 = m.prefill_layer_positions[1];
            for (int32_t p : m.prefill_layer_positions[2]) CHECK(std::binary_search(l1.begin(), l1.end(), p));
        }

        decode(*s, 40, 396);
        m = s->memory();
        const int32_t last = P + 40;
        for (int il = 0; il < n_layer; ++il) {
            const auto& pos = m.layer_positions[size_t(il)];
            CAPTURE(il);
            if (std::string(name) == "streaming" || std::string(name) == "h2o") {
                CHECK(int32_t(pos.size()) == budget);  // a fixed budget
                CHECK(pos.back() == last - 1);
            } else {
                const int32_t window = std::string(name) == "snapshrink" ? 41 : 32;
                CHECK(contains_all(pos, last - window, last));  // the window is never compressed
            }
        }
    }
}

// Above retention 2/3, 1.5x the mean would pass the prompt: PyramidKV's line is drawn in to P
// at layer 0 and 2 x mean - P at the last, so that it keeps what the other peers keep, and
// everything at retention 1.
TEST_CASE("pyramidkv keeps the peers' total at high retention, and everything at 1") {
    auto engine = pyr_test::open_engine(kGqa);
    const int32_t P = 200, n_layer = engine->config().n_layer;
    REQUIRE(n_layer == 3);
    const auto prompt = pyr_test::random_tokens(P, 396, 7);
    for (float t : {0.8f, 1.0f}) {
        CAPTURE(t);
        auto s = session_with(engine, policy("pyramidkv", t));
        s->feed_tokens(prompt);
        s->prefill();
        const int32_t budget = int32_t(std::lround(t * P));  // 160, 200
        std::vector<int32_t> kept;
        for (const auto& pos : s->memory().prefill_layer_positions) kept.push_back(int32_t(pos.size()));
        CHECK(kept == std::vector<int32_t>{P, budget, 2 * budget - P});
    }
}

// A retention given as a float (the C ABI's kv_retention) is solved for as the decimal it was
// written as: P = 200 and 3 layers have a plan of exactly 0.7, which 0.7f (0.699999988) misses.
TEST_CASE("pyramid solves for the decimal a float retention was written as") {
    auto engine = pyr_test::open_engine(kGqa);
    const int32_t P = 200;
    const pyr::PyramidPlan exact = pyr::solve_pyramid_plan(0.7, P, 3, {});
    REQUIRE(exact.retention == 0.7);
    REQUIRE(pyr::solve_pyramid_plan(double(0.7f), P, 3, {}).retention < 0.7);
    auto s = session_with(engine, policy("pyramid", 0.7f));
    s->feed_tokens(pyr_test::random_tokens(P, 396, 8));
    s->prefill();
    CHECK(s->kv_param("planned_retention") == 0.7);
    CHECK(s->kv_param("gamma") == exact.knobs.gamma);
    CHECK(s->kv_param("retention") == 0.7);
}

// Storage that keeps no bytes and fails the retain it is told to (as the GPU's can, out of
// device memory, in a step's after_step).
class FlakyStorage final : public pyr::KvStorage {
public:
    uint64_t bytes_per_token() const override { return 1; }
    void retain(int, const std::vector<int32_t>&) override {
        if (fail_next) {
            fail_next = false;
            pyr::fail(PYR_ERR_OUT_OF_MEMORY, "out of device memory (test)");
        }
    }
    void truncate(int, int32_t) override {}
    uint64_t rows_moved() const override { return 0; }
    bool fail_next = false;
};

TEST_CASE("h2o: a retain failing after a step leaves its scores matching the cache") {
    // Tokens at positions 0 mod 5 get all the attention, every step: heavy hitters from the
    // step they arrive, so none of them may ever be dropped while lighter ones stay. Scores
    // attributed to the wrong slot after a failed retain would drop some.
    const int n_layer = 3;
    const int32_t P = 60;
    auto kv = policy("h2o", 0.5f);
    auto h2o = pyr::make_kv_policy(kv, n_layer);
    auto storage = std::make_unique<FlakyStorage>();
    FlakyStorage& flaky = *storage;
    pyr::KvCache cache(n_layer, std::move(storage));
    auto step = [&](int32_t first, int32_t n) {
        h2o->begin_step(n, first == 0);
        std::vector<int32_t> positions(static_cast<size_t>(n));
        for (int32_t i = 0; i < n; ++i) positions[size_t(i)] = first + i;
        for (int il = 0; il < n_layer; ++il) {
            cache.appended(il, positions.data(), n);
            const pyr::ObservationRequest req = h2o->observe(il);
            REQUIRE(req.column_sums);
            const std::vector<int32_t>& pos = cache.positions(il);
            std::vector<float> sums(pos.size());
            for (size_t j = 0; j < pos.size(); ++j) sums[j] = pos[j] % 5 == 0 ? float(n) : 0.0f;
            pyr::Observation obs;
            obs.n_keys = int32_t(pos.size());
            obs.column_sums = sums.data();
            if (auto keep = h2o->on_layer(il, obs, cache)) cache.retain(il, *keep);
        }
        h2o->after_step(cache);
    };
    step(0, P);
    const int32_t budget = int32_t(h2o->param("budget"));
    REQUIRE(budget == 30);
    bool failed = false;
    for (int32_t t = P; t < P + 25; ++t) {  // heavy ones older than the recent 15: at most 15
        flaky.fail_next = t == P + 3;  // the first retain of that step (layer 0's) fails
        try {
            step(t, 1);
        } catch (const pyr::Error& e) {
            CHECK(e.status() == PYR_ERR_OUT_OF_MEMORY);
            failed = true;
        }
        for (int il = 0; il < n_layer; ++il) {
            CAPTURE(t);
            CAPTURE(il);
            const std::vector<int32_t>& pos = cache.positions(il);
            CHECK(int32_t(pos.size()) <= (t == P + 3 ? budget + 1 : budget));
            std::set<int32_t> kept(pos.begin(), pos.end());
            // every heavy token is still there
            for (int32_t p = 0; p <= t; p += 5) CHECK(kept.count(p) == 1);
        }
    }
    CHECK(failed);
}

TEST_CASE("pyramid: generation compresses every E tokens and never touches the window") {
    auto engine = pyr_test::open_engine(kGqa);
    pyr::KvParams kv = policy("pyramid", 0.5f);
    kv.gen_e = 4;
    kv.min_context = 8;
    auto s = session_with(engine, kv);
    const int32_t P = 120;
    s->feed_tokens(pyr_test::random_tokens(P, 396, 11));
    s->prefill();
    const int32_t W = int32_t(s->kv_param("window"));
    CHECK(W == int32_t(std::floor(s->kv_param("recent_ratio") * P)) + 1);
    const auto after_prefill = s->memory().layer_tokens;  // C_l + W per layer
    const int n_layer = engine->config().n_layer;
    const auto tokens = pyr_test::random_tokens(21, 396, 12);
    for (int step = 1; step <= 20; ++step) {
        s->feed_tokens({tokens[size_t(step)]});
        s->prefill();
        const auto m = s->memory();
        const int32_t processed = P + step, generated = step;
        for (int il = 0; il < n_layer; ++il) {
            CAPTURE(step);
            CAPTURE(il);
            const auto& pos = m.layer_positions[size_t(il)];
            // cache = [compressed | pending | last W]: once E tokens are pending, the block
            // shrinks to k = max(floor(E * 0.9 * g_l), 1) at once.
            const double g = 0.9 * (std::cos(3.14159265358979 * il / n_layer) + 1) / 2 + 0.1;
            const int32_t k = std::max(int32_t(std::floor(kv.gen_e * 0.9 * g)), 1);
            const int32_t blocks = generated / kv.gen_e;
            CHECK(int32_t(pos.size()) == after_prefill[size_t(il)] + generated - blocks * (kv.gen_e - k));
            CHECK(contains_all(pos, processed - W, processed));
        }
    }
}

TEST_CASE("pyramid at retention 1 reproduces full token for token") {
    auto engine = pyr_test::open_engine(PYR_TEST_MODEL_DIR);
    auto full = session_with(engine, policy("full", 0.0f), 24);
    auto pyramid = session_with(engine, policy("pyramid", 1.0f), 24);
    for (auto* s : {full.get(), pyramid.get()}) s->feed_text("def fibonacci(n):");
    std::vector<int32_t> a, b;
    while (full->next() == pyr::StepResult::Token) a.push_back(full->token());
    while (pyramid->next() == pyr::StepResult::Token) b.push_back(pyramid->token());
    CHECK(a == b);
    CHECK(pyramid->memory().kv_bytes == full->memory().kv_bytes);
}

TEST_CASE("bad knobs are rejected with the knob's name") {
    auto engine = pyr_test::open_engine(kGqa);
    auto expect_bad = [&](pyr::KvParams kv, const std::string& needle) {
        try {
            session_with(engine, kv);
            FAIL("accepted " << needle);
        } catch (const pyr::Error& e) {
            CHECK(e.status() == PYR_ERR_INVALID_ARGUMENT);
            CHECK(std::string(e.what()).find(needle) != std::string::npos);
        }
    };
    pyr::KvParams kv = policy("pyramid", 1.5f);
    expect_bad(kv, "kv_retention");
    kv = policy("pyramid", 0.5f);
    kv.rho = -0.1f;
    expect_bad(kv, "kv_rho");
    kv = policy("snapkv", 0.5f);
    kv.pool = 4;
    expect_bad(kv, "kv_pool");
    kv = policy("pyramid", 0.5f);
    kv.prefill_shrink = 2;
    expect_bad(kv, "kv_prefill_shrink");
    expect_bad(policy("lru", 0.5f), "lru");
}

TEST_CASE("a cancelled shrinking prefill leaves the session as before, and then completes") {
    auto engine = pyr_test::open_engine(PYR_TEST_MODEL_DIR);
    const auto prompt = pyr_test::random_tokens(1200, 4096, 5);
    auto reference = session_with(engine, policy("pyramid", 0.5f));
    reference->feed_tokens(prompt);
    const auto t0 = std::chrono::steady_clock::now();
    reference->prefill();
    const auto whole = std::chrono::steady_clock::now() - t0;

    // A cancel half-way through the same prefill. Timing can miss (the prefill may finish
    // first on a busy machine): then start over, a few times.
    auto s = session_with(engine, policy("pyramid", 0.5f));
    bool cancelled = false;
    for (int attempt = 0; attempt < 5 && !cancelled; ++attempt) {
        s->reset();  // also drops a cancel that arrived too late
        s->feed_tokens(prompt);
        std::thread canceller([&] {
            std::this_thread::sleep_for(whole / 2);
            s->cancel();
        });
        try {
            s->prefill();
        } catch (const pyr::Error& e) {
            cancelled = e.status() == PYR_CANCELLED;
        }
        canceller.join();
    }
    REQUIRE(cancelled);
    CHECK(s->memory().kv_bytes == 0);
    CHECK(s->memory().n_tokens == 1200);
    s->prefill();
    CHECK(s->memory().layer_positions == reference->memory().layer_positions);
    CHECK(std::equal(s->logits(), s->logits() + s->n_vocab(), reference->logits()));
}
