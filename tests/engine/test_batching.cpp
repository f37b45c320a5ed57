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

// prefill_chunk: the engine's default, or small for the chunking tests (prompts here are short).
std::shared_ptr<pyr::Engine> cpu_engine(int32_t prefill_chunk = pyr::EngineParams().prefill_chunk) {
    pyr::EngineParams ep;
    ep.device = "cpu";
    ep.prefill_chunk = prefill_chunk;
    return pyr::Engine::open(kGqa, ep);
}

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

// Waits (up to 30 s) until `flag` is set: a thread whose forward has returned may not have
// run its next line yet when the engine's leader has moved on.
bool wait_set(const std::atomic<int>& flag) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (flag.load() == 0 && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return flag.load() == 1;
}

// The logits the step's tokens give alone, on a fresh engine.
std::vector<float> alone_logits(const std::vector<int32_t>& tokens) {
    auto engine = cpu_engine();
    OwnStep s(*engine, tokens);
    engine->forward(s.step);
    return s.logits;
}

// After its prefill of `prompt`, `s` holds what a lone session with the same parameters
// holds on a fresh engine (with the same prefill_chunk): the same logits bit for bit, the
// same cached positions per layer.
void check_as_alone(const pyr::Session& s, const pyr::SessionParams& sp,
                    const std::vector<int32_t>& prompt,
                    int32_t prefill_chunk = pyr::EngineParams().prefill_chunk) {
    pyr::Session alone(cpu_engine(prefill_chunk), sp);
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
// "retry alone" or "retry merged" (Engine::BatchFailed) or the status name.
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
            } catch (const pyr::Engine::BatchFailed& e) {
                outcome[i] = e.alone ? "retry alone" : "retry merged";
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

TEST_CASE("a cancel during a merged forward: that step is cancelled, the others retry merged") {
    auto engine = cpu_engine();
    const int32_t vocab = engine->config().n_vocab;
    std::atomic<bool> flags[3] = {{false}, {false}, {false}};
    CancelInFlight canceller(&flags[1]);
    std::vector<std::unique_ptr<OwnStep>> steps;
    for (uint32_t i = 0; i < 3; ++i)
        steps.push_back(std::make_unique<OwnStep>(*engine, random_tokens(6, vocab, 20 + i),
                                                  i == 1 ? &canceller : nullptr, &flags[i]));
    const std::vector<std::string> got = run_merged(*engine, steps);
    CHECK(got == std::vector<std::string>{"retry merged", pyr_status_str(PYR_CANCELLED), "retry merged"});

    // a failure of unknown cause (here a bad token's): each retries alone, where it is known
    std::vector<std::unique_ptr<OwnStep>> with_bad;
    for (uint32_t i = 0; i < 3; ++i)
        with_bad.push_back(std::make_unique<OwnStep>(*engine, random_tokens(6, vocab, 30 + i)));
    with_bad[1]->tokens[3] = vocab;
    CHECK(run_merged(*engine, with_bad) == std::vector<std::string>(3, "retry alone"));

    // alone, a failure is the step's own: an out-of-range token is reported, not retried
    OwnStep bad(*engine, {1, vocab});
    try {
        engine->forward(bad.step, /*alone=*/true);
        FAIL("a bad token was accepted");
    } catch (const pyr::Error& e) {
        CHECK(e.status() == PYR_ERR_INVALID_ARGUMENT);
    }
}

TEST_CASE("sessions: another step's cancel in a merged prefill is rolled back and rerun merged") {
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
    // the holder's forward, the failed merged one, the sessions' reruns: not made to run
    // alone, so one forward when both resubmit before either leads it, else two
    const uint64_t forwards = engine->batch_stats().forwards;
    CHECK(forwards >= 3);
    CHECK(forwards <= 4);
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
    std::atomic<int> returned{0};
    std::thread t([&] {
        try {
            s->prefill();
        } catch (const pyr::Error& e) {
            status = e.status();
        }
        returned = 1;
    });
    wait_for_waiting(*engine, 1);
    s->cancel();
    // the call returns while the forward ahead of it still runs (it waited for it before)
    CHECK(wait_set(returned));
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

// ---- long prefills in chunks -----------------------------------------------------------

TEST_CASE("a long prefill runs in chunks of prefill_chunk and gives what one step gives") {
    const int32_t chunk = 8;
    auto chunked = cpu_engine(chunk);
    auto whole = cpu_engine(0);
    const int32_t vocab = chunked->config().n_vocab;
    const std::vector<int32_t> prompt = random_tokens(30, vocab, 3);
    pyr::SessionParams sp;
    sp.sampling.temperature = 0.0f;
    sp.max_tokens = 6;
    pyr::Session a(chunked, sp), b(whole, sp);
    a.feed_tokens(prompt);
    b.feed_tokens(prompt);
    a.prefill();
    b.prefill();
    CHECK(chunked->batch_stats().forwards == 4);  // 8 + 8 + 8 + 6
    CHECK(chunked->batch_stats().max_tokens == chunk);
    CHECK(whole->batch_stats().forwards == 1);
    // the same attention over the same keys, only in pieces: equal up to float rounding
    float max_diff = 0;
    for (int32_t i = 0; i < vocab; ++i) max_diff = std::max(max_diff, std::abs(a.logits()[i] - b.logits()[i]));
    CHECK(max_diff < 1e-3f);
    CHECK(a.memory().layer_positions == b.memory().layer_positions);
    CHECK(a.memory().prefill_layer_positions == b.memory().prefill_layer_positions);
    std::vector<int32_t> ta, tb;
    while (a.next() == pyr::StepResult::Token) ta.push_back(a.token());
    while (b.next() == pyr::StepResult::Token) tb.push_back(b.token());
    CHECK(ta == tb);
}

TEST_CASE("a compressing policy's first prefill is not split; its later prefills are") {
    const int32_t chunk = 8;
    auto engine = cpu_engine(chunk);
    const int32_t vocab = engine->config().n_vocab;
    pyr::SessionParams sp;
    sp.kv.policy = "pyramid";
    sp.kv.retention = 0.5f;
    pyr::Session s(engine, sp);
    s.feed_tokens(random_tokens(30, vocab, 4));
    s.prefill();
    CHECK(engine->batch_stats().forwards == 1);  // the selection needs the whole prompt
    CHECK(engine->batch_stats().max_tokens == 30);
    const std::vector<int32_t> more = random_tokens(21, vocab, 5);
    s.feed_tokens(std::vector<int32_t>(more.begin() + 1, more.end()));  // 20 tokens, no BOS
    s.prefill();
    CHECK(engine->batch_stats().forwards == 4);  // + 8 + 8 + 4
    const pyr::MemoryStats m = s.memory();
    CHECK(m.n_tokens == 50);
    for (const auto& positions : m.layer_positions) {
        REQUIRE(!positions.empty());
        CHECK(positions.back() == 49);  // the newest token is cached in every layer
    }
}

TEST_CASE("decode steps join a forward with a prefill chunk; a prefill that does not fit waits") {
    const int32_t chunk = 8;
    auto engine = cpu_engine(chunk);
    const int32_t vocab = engine->config().n_vocab;
    GatePolicy gate, gate_b;
    OwnStep holder(*engine, random_tokens(5, vocab, 1), &gate);
    OwnStep prefill_a(*engine, random_tokens(8, vocab, 11));
    OwnStep prefill_b(*engine, random_tokens(8, vocab, 12), &gate_b);
    OwnStep decode(*engine, random_tokens(1, vocab, 13));

    std::thread lead([&] { engine->forward(holder.step); });
    gate.wait_entered();
    std::vector<std::thread> threads;
    std::atomic<int> done[3] = {{0}, {0}, {0}};
    int32_t queued = 0;
    for (OwnStep* st : {&prefill_a, &prefill_b, &decode}) {  // queued in this order
        std::atomic<int>* flag = &done[queued];
        threads.emplace_back([&engine, st, flag] {
            engine->forward(st->step);
            flag->store(1);
        });
        wait_for_waiting(*engine, ++queued);
    }
    gate.release();
    lead.join();
    gate_b.wait_entered();  // prefill_b runs in a forward after prefill_a's, held here...
    CHECK(wait_set(done[0]));
    CHECK(wait_set(done[2]));  // ...and the decode step has overtaken it, with prefill_a
    CHECK(done[1] == 0);
    gate_b.release();
    for (auto& t : threads) t.join();

    const pyr::Engine::BatchStats st = engine->batch_stats();
    CHECK(st.forwards == 3);     // the holder's; prefill_a + decode; prefill_b
    CHECK(st.max_batch == 2);
    CHECK(st.max_tokens == 9);
    for (OwnStep* q : {&prefill_a, &prefill_b, &decode}) CHECK(q->logits == alone_logits(q->tokens));
}

TEST_CASE("sessions: a cancel between chunks keeps the chunks done; the next prefill goes on") {
    const int32_t chunk = 8;
    auto engine = cpu_engine(chunk);
    const int32_t vocab = engine->config().n_vocab;
    pyr::SessionParams sp;
    sp.sampling.temperature = 0.0f;
    pyr::Session s(engine, sp);
    const std::vector<int32_t> prompt = random_tokens(30, vocab, 6);
    s.feed_tokens(prompt);

    // Hold the engine; queue the session's first chunk, then a second held step behind it
    // that does not fit with it (5 + 8 > 8 prefill tokens): the chunk runs alone, the held
    // step leads the next forward, and the session's second chunk waits behind that.
    GatePolicy gate1, gate2;
    OwnStep holder1(*engine, random_tokens(5, vocab, 1), &gate1);
    OwnStep holder2(*engine, random_tokens(5, vocab, 2), &gate2);
    std::thread lead([&] { engine->forward(holder1.step); });
    gate1.wait_entered();
    pyr_status status = PYR_OK;
    std::thread t([&] {
        try {
            s.prefill();
        } catch (const pyr::Error& e) {
            status = e.status();
        }
    });
    wait_for_waiting(*engine, 1);
    std::thread second([&] { engine->forward(holder2.step); });
    wait_for_waiting(*engine, 2);
    gate1.release();
    gate2.wait_entered();            // holder2 runs, held
    wait_for_waiting(*engine, 1);    // the session's second chunk waits
    CHECK(s.counts().layer_tokens[0] == chunk);
    CHECK(s.counts().n_processed == chunk);  // the prefill's progress, seen from here
    s.cancel();
    gate2.release();
    lead.join();
    second.join();
    t.join();
    CHECK(status == PYR_CANCELLED);
    CHECK(s.memory().layer_tokens[0] == chunk);  // the first chunk stays
    CHECK(s.memory().n_processed == chunk);
    CHECK(s.history() == prompt);                // the input is all still there
    CHECK(s.logits() == nullptr);
    s.prefill();                                 // goes on from token 8
    CHECK(s.memory().layer_tokens[0] == 30);
    check_as_alone(s, sp, prompt, chunk);
}
