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

// Sets its step's cancel flag when the forward reaches the step's first layer: a cancel
// that arrives while a merged forward runs.
class CancelInFlight : public pyr::KvPolicy {
public:
    explicit CancelInFlight(std::atomic<bool>* flag) : flag_(flag) {}
    const char* name() const override { return "cancel-in-flight"; }
    pyr::ObservationRequest observe(int il) const override {
        if (il == 0) flag_->store(true);
        return {};
    }

private:
    std::atomic<bool>* flag_;
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

// After its prefill of `prompt`, `s` holds what a lone session with the same parameters
// holds on a fresh engine: the same logits bit for bit, the same cached positions per layer.
void check_as_alone(const pyr::Session& s, const pyr::SessionParams& sp,
                    const std::vector<int32_t>& prompt) {
    pyr::Session alone(cpu_engine(), sp);
    alone.feed_tokens(prompt);
    alone.prefill();
    CHECK(std::equal(alone.logits(), alone.logits() + alone.n_vocab(), s.logits()));
    CHECK(alone.memory().layer_positions == s.memory().layer_positions);
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

namespace {

// Runs `steps` queued behind a held forward, all together; returns what each got: "ok",
// "retry" (Engine::BatchFailed) or the status name.
std::vector<std::string> run_merged(pyr::Engine& engine, std::vector<std::unique_ptr<OwnStep>>& steps,
                                    std::atomic<bool>* cancel_while_waiting = nullptr) {
    GatePolicy gate;
    OwnStep holder(engine, random_tokens(5, engine.config().n_vocab, 1), &gate);
    std::thread lead([&] { engine.forward(holder.step); });
    gate.wait_entered();
    std::vector<std::string> outcome(steps.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < steps.size(); ++i)
        threads.emplace_back([&, i] {
            try {
                engine.forward(steps[i]->step);
                outcome[i] = "ok";
            } catch (const pyr::Engine::BatchFailed&) {
                outcome[i] = "retry";
            } catch (const pyr::Error& e) {
                outcome[i] = pyr_status_str(e.status());
            }
        });
    wait_for_waiting(engine, int32_t(steps.size()));
    if (cancel_while_waiting) cancel_while_waiting->store(true);
    gate.release();
    lead.join();
    for (auto& t : threads) t.join();
    return outcome;
}

}  // namespace

TEST_CASE("a step cancelled while it waits is answered without running; the others run") {
    auto engine = cpu_engine();
    const int32_t vocab = engine->config().n_vocab;
    std::atomic<bool> flags[3] = {{false}, {false}, {false}};
    std::vector<std::unique_ptr<OwnStep>> steps;
    for (uint32_t i = 0; i < 3; ++i)
        steps.push_back(std::make_unique<OwnStep>(*engine, random_tokens(6, vocab, 20 + i), nullptr, &flags[i]));
    const std::vector<std::string> got = run_merged(*engine, steps, &flags[1]);
    CHECK(got == std::vector<std::string>{"ok", pyr_status_str(PYR_CANCELLED), "ok"});
    CHECK(steps[1]->cache->size(0) == 0);  // never ran
    CHECK(steps[0]->logits == alone_logits(steps[0]->tokens));
    CHECK(steps[2]->logits == alone_logits(steps[2]->tokens));
    CHECK(engine->batch_stats().forwards == 2);  // the holder's and the merged one
}

TEST_CASE("a cancel during a merged forward: that step is cancelled, the others are told to retry") {
    auto engine = cpu_engine();
    const int32_t vocab = engine->config().n_vocab;
    std::atomic<bool> flags[3] = {{false}, {false}, {false}};
    CancelInFlight canceller(&flags[1]);
    std::vector<std::unique_ptr<OwnStep>> steps;
    for (uint32_t i = 0; i < 3; ++i)
        steps.push_back(std::make_unique<OwnStep>(*engine, random_tokens(6, vocab, 20 + i),
                                                  i == 1 ? &canceller : nullptr, &flags[i]));
    const std::vector<std::string> got = run_merged(*engine, steps);
    CHECK(got == std::vector<std::string>{"retry", pyr_status_str(PYR_CANCELLED), "retry"});

    // alone, a failure is the step's own: an out-of-range token is reported, not retried
    OwnStep bad(*engine, {1, vocab});
    try {
        engine->forward(bad.step, /*alone=*/true);
        FAIL("a bad token was accepted");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_ERR_INVALID_ARGUMENT);
    }
}

TEST_CASE("sessions: another step's failure in a merged prefill is rolled back and rerun alone") {
    auto engine = cpu_engine();
    const int32_t vocab = engine->config().n_vocab;
    GatePolicy gate;
    OwnStep holder(*engine, random_tokens(5, vocab, 1), &gate);
    std::atomic<bool> flag{false};
    CancelInFlight canceller(&flag);
    OwnStep failing(*engine, random_tokens(8, vocab, 2), &canceller, &flag);
    pyr::SessionParams sp;
    sp.sampling.temperature = 0.0f;
    sp.kv.policy = "pyramid";  // prunes in the first prefill: the rollback must undo it
    sp.kv.retention = 0.5f;
    std::vector<std::unique_ptr<pyr::Session>> sessions;
    std::vector<std::vector<int32_t>> prompts;
    for (uint32_t i = 0; i < 2; ++i) {
        sessions.push_back(std::make_unique<pyr::Session>(engine, sp));
        prompts.push_back(random_tokens(40, vocab, 30 + i));
        sessions.back()->feed_tokens(prompts.back());
    }

    std::thread lead([&] { engine->forward(holder.step); });
    gate.wait_entered();
    std::vector<std::thread> threads;
    std::vector<pyr_status> status(2, PYR_OK);
    for (size_t i = 0; i < 2; ++i)
        threads.emplace_back([&, i] {
            try {
                sessions[i]->prefill();
            } catch (const pyr::Error& e) {
                status[i] = e.status();
            }
        });
    pyr_status failing_status = PYR_OK;
    threads.emplace_back([&] {
        try {
            engine->forward(failing.step);
        } catch (const pyr::Error& e) {
            failing_status = e.status();
        }
    });
    wait_for_waiting(*engine, 3);
    gate.release();
    lead.join();
    for (auto& t : threads) t.join();

    CHECK(failing_status == PYR_CANCELLED);
    CHECK(status[0] == PYR_OK);
    CHECK(status[1] == PYR_OK);
    // the holder's forward, the failed merged one, each session's rerun alone
    CHECK(engine->batch_stats().forwards == 4);
    // each session holds what it would hold had it run alone
    for (size_t i = 0; i < 2; ++i) {
        CAPTURE(i);
        check_as_alone(*sessions[i], sp, prompts[i]);
    }
}

TEST_CASE("sessions: a session cancelled while its prefill waits keeps its input and runs later") {
    auto engine = cpu_engine();
    const int32_t vocab = engine->config().n_vocab;
    GatePolicy gate;
    OwnStep holder(*engine, random_tokens(5, vocab, 1), &gate);
    pyr::SessionParams sp;
    sp.sampling.temperature = 0.0f;
    auto s = std::make_unique<pyr::Session>(engine, sp);
    const std::vector<int32_t> prompt = random_tokens(20, vocab, 7);
    s->feed_tokens(prompt);
    std::thread lead([&] { engine->forward(holder.step); });
    gate.wait_entered();
    pyr_status status = PYR_OK;
    std::thread t([&] {
        try {
            s->prefill();
        } catch (const pyr::Error& e) {
            status = e.status();
        }
    });
    wait_for_waiting(*engine, 1);
    s->cancel();
    gate.release();
    lead.join();
    t.join();
    CHECK(status == PYR_CANCELLED);
    CHECK(s->memory().kv_bytes == 0);  // as before the call, the input still queued
    s->prefill();
    check_as_alone(*s, sp, prompt);
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
