// The timed runs: B sequences, each with its own KvCache and policy driven as Session drives
// them, a batched prefill and batched decode steps; and the batch-max search.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <mutex>
#include <optional>

#include "bench.h"
#include "common/error.h"
#include "kv/kv_cache.h"
#include "kv/kv_policy.h"

// Decode steps are marked as NVTX ranges named "decode", so that a profiler can take them
// alone (tools/gpu_check.sh profile: ncu --nvtx --nvtx-include "decode/"). Header-only.
#if __has_include(<nvtx3/nvToolsExt.h>)
#include <nvtx3/nvToolsExt.h>
#define PYR_RANGE_PUSH(name) nvtxRangePushA(name)
#define PYR_RANGE_POP() nvtxRangePop()
#else
#define PYR_RANGE_PUSH(name) ((void)0)
#define PYR_RANGE_POP() ((void)0)
#endif

namespace bench {

namespace {

// ---- the timed policy -----------------------------------------------------------------

// Forwards every call to the real policy and adds up the wall time spent in on_layer: the
// host-side keep/drop decisions inside the forward (between layers in a first prefill, at
// its end later on the CUDA backend), which run one after another. after_step, between
// steps, runs for all sequences at once on the host threads (after_steps) and is clocked
// there.
class TimedPolicy final : public pyr::KvPolicy {
public:
    explicit TimedPolicy(std::unique_ptr<pyr::KvPolicy> inner) : inner_(std::move(inner)) {}

    const char* name() const override { return inner_->name(); }
    void begin_step(int32_t n_tokens, bool first_prefill) override {
        inner_->begin_step(n_tokens, first_prefill);
    }
    pyr::ObservationRequest observe(int il) const override { return inner_->observe(il); }
    std::optional<std::vector<int32_t>> on_layer(int il, const pyr::Observation& obs,
                                                 const pyr::KvCache& cache) override {
        const Clock::time_point t0 = Clock::now();
        auto keep = inner_->on_layer(il, obs, cache);
        seconds_ += seconds_since(t0);
        return keep;
    }
    bool shrink_prefill(int il) const override { return inner_->shrink_prefill(il); }
    void after_step(pyr::KvCache& cache) override { inner_->after_step(cache); }
    void abort_step() override { inner_->abort_step(); }
    double param(const std::string& name) const override { return inner_->param(name); }

    // The time accumulated since the last call.
    double take_seconds() {
        const double s = seconds_;
        seconds_ = 0;
        return s;
    }

private:
    std::unique_ptr<pyr::KvPolicy> inner_;
    double seconds_ = 0;
};

// ---- one run --------------------------------------------------------------------------

int32_t argmax(const std::vector<float>& v) {
    return int32_t(std::max_element(v.begin(), v.end()) - v.begin());
}

struct Sequence {
    std::unique_ptr<pyr::KvCache> cache;
    std::unique_ptr<TimedPolicy> policy;
    std::vector<int32_t> prompt;
    std::vector<float> logits;  // of the last token fed (when the host picks the next token)
    pyr::DeviceSample pick;     // greedy on the device, where the backend samples there
    int32_t next_token() const { return pick.token >= 0 ? pick.token : argmax(logits); }
    // The step's outputs: the token picked on the device (only its id comes back, as in a
    // Session), or the logits for the host's argmax.
    void wants_next(pyr::SequenceStep& step, bool on_device) {
        pick.token = -1;
        step.logits = on_device ? nullptr : logits.data();
        step.sample = on_device ? &pick : nullptr;
    }
};


uint64_t rows_moved(const std::vector<Sequence>& seqs) {
    uint64_t n = 0;
    for (const Sequence& s : seqs) n += s.cache->storage().rows_moved();
    return n;
}

KvBytes kv_bytes(const std::vector<Sequence>& seqs) {
    KvBytes k;
    for (const Sequence& s : seqs) k.bytes += s.cache->bytes(), k.full += s.cache->bytes_full();
    return k;
}

std::vector<Sequence> new_sequences(pyr::Backend& backend, const pyr::ModelConfig& c,
                                    const pyr::KvParams& kv, int32_t batch, int32_t n_prompt,
                                    int32_t n_ctx, std::mt19937_64& rng) {
    // Ids 0..2 are usually <unk>, <s>, </s>: leave them out of the prompts.
    std::uniform_int_distribution<int32_t> token(3, c.n_vocab - 1);
    std::vector<Sequence> seqs(static_cast<size_t>(batch));
    for (Sequence& s : seqs) {
        s.cache = std::make_unique<pyr::KvCache>(c.n_layer, backend.new_kv_storage(n_ctx));
        s.policy = std::make_unique<TimedPolicy>(pyr::make_kv_policy(kv, c.n_layer));
        s.prompt.resize(size_t(n_prompt));
        for (int32_t& t : s.prompt) t = token(rng);
        s.logits.assign(size_t(c.n_vocab), 0.0f);
    }
    return seqs;
}

double take_selection_seconds(std::vector<Sequence>& seqs) {
    double s = 0;
    for (Sequence& q : seqs) s += q.policy->take_seconds();
    return s;
}

// Sequences [first, end) have processed n tokens: their after_step, spread over the host
// threads as the engine's sessions run theirs, each on its own thread (the caches' storage
// is safe for that). Returns the wall time it took; the first error is rethrown.
double after_steps(pyr::ThreadPool& host, std::vector<Sequence>& seqs, size_t first, size_t end,
                   int32_t n) {
    const Clock::time_point t0 = Clock::now();
    std::mutex mutex;
    std::exception_ptr error;
    host.parallel_for(int64_t(end - first), [&](int64_t b, int64_t e) {
        try {
            for (int64_t i = b; i < e; ++i) {
                Sequence& s = seqs[first + size_t(i)];
                s.cache->set_n_processed(n);
                s.policy->after_step(*s.cache);
            }
        } catch (...) {
            std::lock_guard<std::mutex> lock(mutex);
            if (!error) error = std::current_exception();
        }
    });
    if (error) std::rethrow_exception(error);
    return seconds_since(t0);
}

// The first prefill of every sequence, as Session::prefill does it for one: in one batched
// forward, or `group` sequences per forward (0: all).
void run_prefill(pyr::Backend& backend, pyr::ThreadPool& host, std::vector<Sequence>& seqs,
                 int32_t n_prompt, int32_t group, RunResult& r) {
    std::vector<int32_t> positions(static_cast<size_t>(n_prompt));
    for (int32_t i = 0; i < n_prompt; ++i) positions[size_t(i)] = i;
    std::vector<pyr::SequenceStep> steps(seqs.size());
    for (size_t i = 0; i < seqs.size(); ++i) {
        Sequence& s = seqs[i];
        steps[i] = {s.prompt.data(), positions.data(), n_prompt, s.cache.get(), s.policy.get()};
        s.wants_next(steps[i], backend.samples_on_device());
    }
    const size_t per_forward = group > 0 ? size_t(group) : seqs.size();
    const Clock::time_point t0 = Clock::now();
    double after_s = 0;
    for (size_t first = 0; first < seqs.size(); first += per_forward) {
        const size_t end = std::min(seqs.size(), first + per_forward);
        for (size_t i = first; i < end; ++i) seqs[i].policy->begin_step(n_prompt, true);
        const Clock::time_point tf = Clock::now();
        backend.forward(steps.data() + first, int(end - first));
        r.prefill_forward_s += seconds_since(tf);
        r.kv_held_max = std::max(r.kv_held_max, backend.device_memory().kv);
        after_s += after_steps(host, seqs, first, end, n_prompt);
    }
    r.prefill_s = seconds_since(t0);
    r.prefill_select_s = take_selection_seconds(seqs) + after_s;
    r.kv_prefill = kv_bytes(seqs);
}

// n_gen greedy steps, all sequences in one batched forward per step.
void run_decode(pyr::Backend& backend, pyr::ThreadPool& host, std::vector<Sequence>& seqs,
                int32_t n_prompt, int32_t n_gen, RunResult& r) {
    const size_t n = seqs.size();
    std::vector<int32_t> tokens(n), positions(n);
    std::vector<pyr::SequenceStep> steps(n);
    double kv_read = 0, after_s = 0;
    const Clock::time_point t0 = Clock::now();
    for (int32_t g = 0; g < n_gen; ++g) {
        const Clock::time_point ts = Clock::now();
        for (size_t i = 0; i < n; ++i) {
            Sequence& s = seqs[i];
            tokens[i] = s.next_token();
            positions[i] = n_prompt + g;
            steps[i] = {&tokens[i], &positions[i], 1, s.cache.get(), s.policy.get()};
            s.wants_next(steps[i], backend.samples_on_device());
            s.policy->begin_step(1, false);
        }
        const Clock::time_point tf = Clock::now();
        PYR_RANGE_PUSH("decode");
        backend.forward(steps.data(), int(n));
        PYR_RANGE_POP();
        r.decode_forward_s += seconds_since(tf);
        // Before after_step compresses: the cache as this step's attention read it.
        kv_read += double(kv_bytes(seqs).bytes);
        r.kv_held_max = std::max(r.kv_held_max, backend.device_memory().kv);
        after_s += after_steps(host, seqs, 0, n, n_prompt + g + 1);
        r.step_s.push_back(seconds_since(ts));
    }
    r.decode_s = seconds_since(t0);
    r.decode_select_s = take_selection_seconds(seqs) + after_s;
    r.mean_kv_read = n_gen > 0 ? kv_read / n_gen : 0.0;
    r.kv_end = kv_bytes(seqs);
}

// The policy's parameters as it used them (what pyr_session_kv_param reports).
nlohmann::json policy_params(const pyr::KvPolicy& p) {
    nlohmann::json j = nlohmann::json::object();
    for (const char* name : pyr_examples::kKvParamNames) {
        const double v = p.param(name);
        if (!std::isnan(v)) j[name] = tidy(v);
    }
    return j;
}

// ---- batch max ------------------------------------------------------------------------

}  // namespace

// A knob for JSON: integral values as integers, the others to 7 significant digits (the
// knobs are floats: 0.2f written as a double would read 0.20000000298023224).
nlohmann::json tidy(double v) {
    if (!std::isfinite(v)) return nullptr;
    if (v == std::floor(v) && std::fabs(v) < 1e15) return int64_t(v);
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.7g", v);
    return std::strtod(buf, nullptr);
}

RunResult run_once(Target& t, const pyr::KvParams& kv, int32_t batch, int32_t n_prompt,
                   int32_t prefill_batch, int32_t n_gen, std::mt19937_64& rng) {
    std::vector<Sequence> seqs =
        new_sequences(*t.backend, t.config, kv, batch, n_prompt, n_prompt + n_gen, rng);
    RunResult r;
    const pyr::BackendStats start = t.backend->stats();
    run_prefill(*t.backend, *t.host, seqs, n_prompt, prefill_batch, r);
    const pyr::BackendStats before = t.backend->stats();
    r.rows_moved_prefill = rows_moved(seqs);
    run_decode(*t.backend, *t.host, seqs, n_prompt, n_gen, r);
    const pyr::BackendStats after = t.backend->stats();
    r.rows_moved_decode = rows_moved(seqs) - r.rows_moved_prefill;
    r.row_bytes = seqs.front().cache->storage().bytes_per_token();
    r.steps = {after.graph_replays - before.graph_replays,
               after.graph_captures - before.graph_captures,
               after.direct_decode_steps - before.direct_decode_steps};
    r.steps.prefill_attention_tensor_cores =
        before.prefill_attention_tensor_cores - start.prefill_attention_tensor_cores;
    r.steps.prefill_attention_cuda_cores =
        before.prefill_attention_cuda_cores - start.prefill_attention_cuda_cores;
    r.memory = t.backend->device_memory();
    r.params = policy_params(*seqs.front().policy);
    return r;
}

// The largest batch whose whole run (prefill, then G steps) fits the backend's memory limit.
// A run of one sequence gives the most KV memory a sequence holds and the scratch (working
// buffers) for one; a prefill of two, the scratch each more sequence adds. Runs are tried at
// the batch that leaves room for, then 1/16 fewer after each out-of-memory, until one fits.
// The estimate is a little high where buffers grow in doublings or a compressing prefill
// holds a layer's whole prompt for a moment; low only where a compressing policy keeps a
// little less for other prompts than for the first. Returns the batch found.
int32_t find_max_batch(Target& t, const pyr::KvParams& kv, int32_t n_prompt,
                       int32_t prefill_batch, int32_t n_gen, std::mt19937_64& rng,
                       BatchSearch& search) {
    std::fprintf(stderr, "pyramid-bench: batch max: one sequence, then a prefill of two...\n");
    const RunResult one = run_once(t, kv, 1, n_prompt, 0, n_gen, rng);
    const RunResult two = run_once(t, kv, 2, n_prompt, 0, 0, rng);
    search.limit = one.memory.limit;
    search.weights = one.memory.weights;
    search.kv_per_sequence = std::max<uint64_t>(one.kv_held_max, 1);
    search.scratch = one.memory.scratch;
    search.scratch_per_sequence = two.memory.scratch > one.memory.scratch
                                      ? two.memory.scratch - one.memory.scratch : 0;
    if (search.limit == 0)
        pyr::fail(PYR_ERR_INVALID_ARGUMENT, "--batch max: the backend reports no memory limit");
    // weights + scratch + (B - 1) * scratch_per_sequence + B * kv_per_sequence <= limit, where
    // the scratch grows with the sequences prefilled together (prefill_batch: no further)
    const uint64_t first = search.weights + search.scratch + search.kv_per_sequence;
    const uint64_t room = search.limit > first ? search.limit - first : 0;
    uint64_t more = room / (search.kv_per_sequence + search.scratch_per_sequence);
    if (prefill_batch > 0 && more + 1 > uint64_t(prefill_batch)) {
        const uint64_t grown = uint64_t(prefill_batch - 1) * search.scratch_per_sequence;
        if (room > grown) more = (room - grown) / search.kv_per_sequence;
    }
    search.estimate = int32_t(std::min<uint64_t>(more + 1, kMaxBatch));
    for (int32_t b = search.estimate;;) {
        std::fprintf(stderr, "pyramid-bench: batch max: trying %d sequences (each %.2f MiB KV "
                             "and %.2f MiB scratch; limit %.1f MiB)...\n",
                     b, double(search.kv_per_sequence) / 1048576,
                     double(search.scratch_per_sequence) / 1048576, double(search.limit) / 1048576);
        try {
            run_once(t, kv, b, n_prompt, prefill_batch, n_gen, rng);
            search.tries.push_back({b, true, ""});
            return b;
        } catch (const pyr::Error& e) {
            if (e.status() != PYR_ERR_OUT_OF_MEMORY || b == 1) throw;
            search.tries.push_back({b, false, e.what()});
            b -= std::max(1, b / 16);
        }
    }
}

}  // namespace bench
