// The engine's batching scheduler (DESIGN.md section 7): steps submitted while a forward
// runs go through the backend together, each gets what it would get alone, a cancel or a
// failure in a merged forward costs the other steps nothing, and concurrent sessions
// generate what they generate one at a time.
#include <doctest/doctest.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <numeric>
#include <thread>

#include "common/error.h"
#include "engine/engine.h"
#include "engine/session.h"
#include "support/engine_util.h"

namespace {

using pyr_test::random_tokens;

const std::string kGqa = std::string(PYR_TEST_DATA_DIR) + "/fixtures/gqa_f16";  // 3 layers

std::shared_ptr<pyr::Engine> cpu_engine() { return pyr_test::open_engine(kGqa); }

// Holds the forward that runs it at its first layer until release(): the test can then
// queue other steps behind it, deterministically.
class GatePolicy : public pyr::KvPolicy {
public:
    const char* name() const override { return "gate"; }
    pyr::ObservationRequest observe(int il) const override {
        if (il != 0) return {};
        std::unique_lock<std::mutex> lock(mutex_);
        entered_ = true;
        changed_.notify_all();
        changed_.wait(lock, [&] { return released_; });
        return {};
    }
    void wait_entered() {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return entered_; });
    }
    void release() {
        std::lock_guard<std::mutex> lock(mutex_);
        released_ = true;
        changed_.notify_all();
    }

private:
    mutable std::mutex mutex_;
    mutable std::condition_variable changed_;
    mutable bool entered_ = false;
    bool released_ = false;
};

// One prefill step of `tokens` into a fresh cache of its own.
struct OwnStep {
    std::vector<int32_t> tokens, positions;
    std::unique_ptr<pyr::KvCache> cache;
    std::vector<float> logits;
    pyr::SequenceStep step;

    OwnStep(pyr::Engine& engine, std::vector<int32_t> t, pyr::KvPolicy* policy = nullptr,
            const std::atomic<bool>* cancel = nullptr)
        : tokens(std::move(t)), positions(tokens.size()) {
        std::iota(positions.begin(), positions.end(), 0);
        cache = std::make_unique<pyr::KvCache>(engine.config().n_layer, engine.new_kv_storage(64));
        logits.assign(size_t(engine.config().n_vocab), 0.0f);
        step.tokens = tokens.data();
        step.positions = positions.data();
        step.n_tokens = int32_t(tokens.size());
        step.cache = cache.get();
        step.policy = policy;
        step.logits = logits.data();
        step.cancel = cancel;
    }
};

// Waits (bounded) until `n` steps queue behind the running forward.
void wait_for_waiting(const pyr::Engine& engine, int32_t n) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (engine.batch_stats().waiting < n && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    REQUIRE(engine.batch_stats().waiting == n);
}

// The logits the step's tokens give alone, on a fresh engine.
std::vector<float> alone_logits(const std::vector<int32_t>& tokens) {
    auto engine = cpu_engine();
    OwnStep s(*engine, tokens);
    engine->forward(s.step);
    return s.logits;
}

}  // namespace

TEST_CASE("steps queued behind a forward run as one batch and each gets its own logits") {
    auto engine = cpu_engine();
    const int32_t vocab = engine->config().n_vocab;
    GatePolicy gate;
    OwnStep holder(*engine, random_tokens(5, vocab, 1), &gate);
    std::vector<std::unique_ptr<OwnStep>> queued;
    for (uint32_t i = 0; i < 3; ++i)  // ragged: 7, 10, 13 tokens
        queued.push_back(std::make_unique<OwnStep>(*engine, random_tokens(7 + 3 * int32_t(i), vocab, 10 + i)));

    std::thread lead([&] { engine->forward(holder.step); });
    gate.wait_entered();
    std::vector<std::thread> threads;
    for (auto& q : queued) threads.emplace_back([&engine, &q] { engine->forward(q->step); });
    wait_for_waiting(*engine, 3);
    gate.release();
    lead.join();
    for (auto& t : threads) t.join();

    const pyr::Engine::BatchStats st = engine->batch_stats();
    CHECK(st.forwards == 2);
    CHECK(st.steps == 4);
    CHECK(st.max_batch == 3);
    CHECK(st.waiting == 0);
    for (auto& q : queued) {
        CHECK(q->logits == alone_logits(q->tokens));  // the CPU backend: bit for bit
        CHECK(q->cache->size(0) == q->step.n_tokens);
    }
}

TEST_CASE("a cancel in a merged forward: that step is cancelled, the others are told to retry") {
    auto engine = cpu_engine();
    const int32_t vocab = engine->config().n_vocab;
    GatePolicy gate;
    OwnStep holder(*engine, random_tokens(5, vocab, 1), &gate);
    std::atomic<bool> flags[3] = {{false}, {true}, {false}};  // the middle one is cancelled
    std::vector<std::unique_ptr<OwnStep>> queued;
    for (uint32_t i = 0; i < 3; ++i)
        queued.push_back(std::make_unique<OwnStep>(*engine, random_tokens(6, vocab, 20 + i), nullptr, &flags[i]));

    std::thread lead([&] { engine->forward(holder.step); });
    gate.wait_entered();
    std::vector<std::thread> threads;
    std::vector<std::string> outcome(3);
    for (size_t i = 0; i < 3; ++i)
        threads.emplace_back([&, i] {
            try {
                engine->forward(queued[i]->step);
                outcome[i] = "ok";
            } catch (const pyr::Engine::BatchFailed&) {
                outcome[i] = "retry";
            } catch (const pyr::Error& e) {
                outcome[i] = pyr_status_str(e.status());
            }
        });
    wait_for_waiting(*engine, 3);
    gate.release();
    lead.join();
    for (auto& t : threads) t.join();
    CHECK(outcome[0] == "retry");
    CHECK(outcome[1] == pyr_status_str(PYR_CANCELLED));
    CHECK(outcome[2] == "retry");

    // alone, a failure is the step's own: an out-of-range token is reported, not retried
    OwnStep bad(*engine, {1, vocab});
    try {
        engine->forward(bad.step, /*alone=*/true);
        FAIL("a bad token was accepted");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_ERR_INVALID_ARGUMENT);
    }
}

TEST_CASE("sessions: a cancel in a merged prefill rolls back that session only") {
    auto engine = cpu_engine();
    const int32_t vocab = engine->config().n_vocab;
    GatePolicy gate;
    OwnStep holder(*engine, random_tokens(5, vocab, 1), &gate);
    pyr::SessionParams sp;
    sp.sampling.temperature = 0.0f;
    sp.kv.policy = "pyramid";  // prunes in the first prefill: the rollback must undo it
    sp.kv.retention = 0.5f;
    std::vector<std::unique_ptr<pyr::Session>> sessions;
    std::vector<std::vector<int32_t>> prompts;
    for (uint32_t i = 0; i < 3; ++i) {
        sessions.push_back(std::make_unique<pyr::Session>(engine, sp));
        prompts.push_back(random_tokens(40, vocab, 30 + i));
        sessions.back()->feed_tokens(prompts.back());
    }

    std::thread lead([&] { engine->forward(holder.step); });
    gate.wait_entered();
    std::vector<std::thread> threads;
    std::vector<pyr_status> status(3, PYR_OK);
    for (size_t i = 0; i < 3; ++i)
        threads.emplace_back([&, i] {
            try {
                sessions[i]->prefill();
            } catch (const pyr::Error& e) {
                status[i] = e.status();
            }
        });
    wait_for_waiting(*engine, 3);
    sessions[1]->cancel();
    gate.release();
    lead.join();
    for (auto& t : threads) t.join();

    CHECK(status[0] == PYR_OK);
    CHECK(status[1] == PYR_CANCELLED);
    CHECK(status[2] == PYR_OK);
    CHECK(sessions[1]->memory().kv_bytes == 0);  // as before the call, input still queued
    sessions[1]->prefill();                      // and it completes afterwards

    // each session holds what it would hold had it run alone
    for (size_t i = 0; i < 3; ++i) {
        CAPTURE(i);
        pyr::Session alone(cpu_engine(), sp);
        alone.feed_tokens(prompts[i]);
        alone.prefill();
        CHECK(std::equal(alone.logits(), alone.logits() + vocab, sessions[i]->logits()));
        CHECK(alone.memory().layer_positions == sessions[i]->memory().layer_positions);
    }
    // the holder, the failed merged forward, the two retries alone, the later prefill
    CHECK(engine->batch_stats().forwards == 5);
}

TEST_CASE("concurrent sessions generate the tokens they generate one at a time") {
    auto engine = cpu_engine();
    const int32_t vocab = engine->config().n_vocab;
    const char* policies[] = {"full", "pyramid", "snapkv", "h2o", "streaming"};
    const int n = 5, n_gen = 12;
    auto make = [&](const std::shared_ptr<pyr::Engine>& e, int i) {
        pyr::SessionParams sp;
        sp.sampling.temperature = 0.0f;
        sp.max_tokens = n_gen;
        sp.kv.policy = policies[i];
        sp.kv.retention = 0.5f;
        auto s = std::make_unique<pyr::Session>(e, sp);
        s->feed_tokens(random_tokens(24 + 5 * i, vocab, 40 + uint32_t(i)));
        return s;
    };
    auto generate = [&](pyr::Session& s) {
        std::vector<int32_t> out;
        while (s.next() == pyr::StepResult::Token) out.push_back(s.token());
        return out;
    };

    std::vector<std::vector<int32_t>> together(n);
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i)
        threads.emplace_back([&, i] {
            auto s = make(engine, i);
            together[size_t(i)] = generate(*s);
        });
    for (auto& t : threads) t.join();

    auto serial_engine = cpu_engine();
    for (int i = 0; i < n; ++i) {
        CAPTURE(policies[i]);
        auto s = make(serial_engine, i);
        CHECK(generate(*s) == together[size_t(i)]);
    }
    // a forward per token sampled: n_gen, or fewer and the end-of-sequence token
    uint64_t expected_steps = 0;
    for (const auto& out : together) expected_steps += out.size() + (int(out.size()) < n_gen);
    const pyr::Engine::BatchStats st = engine->batch_stats();
    CHECK(st.steps == expected_steps);
    MESSAGE("5 concurrent sessions: " << st.steps << " steps in " << st.forwards
                                      << " forwards, largest batch " << st.max_batch);
}
