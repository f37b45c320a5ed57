#include "engine/session.h"

#include <algorithm>
#include <numeric>

#include "common/error.h"
#include "common/log.h"

namespace pyr {

Session::Session(std::shared_ptr<Engine> engine, const SessionParams& params)
    : engine_(std::move(engine)),
      params_(params),
      sampler_(params.sampling),
      decoder_(engine_->model().tokenizer()) {
    const ModelConfig& cfg = engine_->config();
    if (params.n_ctx < 0)
        fail(PYR_ERR_INVALID_ARGUMENT, "n_ctx must be >= 0, got " + std::to_string(params.n_ctx));
    if (params.max_tokens < 0)
        fail(PYR_ERR_INVALID_ARGUMENT,
             "max_tokens must be >= 0, got " + std::to_string(params.max_tokens));
    n_ctx_ = params.n_ctx > 0 ? params.n_ctx : cfg.n_ctx_train;
    if (n_ctx_ <= 0) n_ctx_ = 4096;
    if (n_ctx_ > cfg.n_ctx_train && cfg.n_ctx_train > 0)
        PYR_LOG_WARN("n_ctx " + std::to_string(n_ctx_) + " exceeds the model's trained " +
                     std::to_string(cfg.n_ctx_train) + " positions; quality may drop");
    policy_ = make_kv_policy(params.kv, cfg.n_layer);
    logits_.assign(size_t(cfg.n_vocab), 0.0f);
    cache_ = std::make_unique<KvCache>(cfg.n_layer, engine_->new_kv_storage(n_ctx_));
    publish_memory();
}

void Session::append_input(const std::vector<int32_t>& tokens) {
    size_t total = tokens_.size() + tokens.size();
    if (total > size_t(n_ctx_))
        fail(PYR_ERR_CONTEXT_FULL,
             "input of " + std::to_string(tokens.size()) + " tokens does not fit: the session " +
                 "holds " + std::to_string(tokens_.size()) + " of its " + std::to_string(n_ctx_) +
                 " context tokens (n_ctx)");
    tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
    n_generated_ = 0;
    done_ = false;
    decoder_.reset(tokens_.empty() ? -1 : tokens_.back());
    publish_memory();
}

void Session::feed_text(const std::string& text) {
    const Tokenizer& tok = engine_->model().tokenizer();
    append_input(tok.encode(text, /*add_bos=*/tokens_.empty()));
}

void Session::feed_tokens(const std::vector<int32_t>& tokens) {
    int32_t n_vocab = engine_->config().n_vocab;
    for (size_t i = 0; i < tokens.size(); ++i)
        if (tokens[i] < 0 || tokens[i] >= n_vocab)
            fail(PYR_ERR_INVALID_ARGUMENT, "token " + std::to_string(i) + " has id " +
                                               std::to_string(tokens[i]) + ", outside [0, " +
                                               std::to_string(n_vocab) + ")");
    append_input(tokens);
}

void Session::cancel() {
    cancel_requested_.store(true);
    engine_->wake_waiting_steps();  // a step waiting for another's forward leaves at once
}

void Session::check_cancel() {
    if (cancel_requested_.exchange(false)) fail(PYR_CANCELLED, "cancelled");
}

// Runs the queued input through the model. Input longer than the engine's prefill_chunk
// goes as several steps of at most that many tokens when the policy allows it (its result
// must not depend on seeing the whole input at once: see KvPolicy::chunked_prefill), so
// that other sessions' steps join the forwards in between (DESIGN.md section 7).
void Session::prefill(DeviceSample* sample) {
    check_cancel();
    const int32_t start = cache_->n_processed();
    const int32_t n = int32_t(tokens_.size()) - start;
    if (n <= 0) return;
    const int32_t chunk = engine_->prefill_chunk();
    const bool chunked = chunk > 0 && policy_->chunked_prefill(start == 0);
    have_logits_ = false;
    for (int32_t done = 0; done < n;) {
        const int32_t m = chunked ? std::min(chunk, n - done) : n - done;
        try {
            run_step(start + done, m, start + n, sample);  // throws; earlier chunks stay
        } catch (...) {
            publish_memory();  // a step whose compression failed after it still counts
            throw;
        }
        done += m;
        publish_memory();  // memory() follows a long prefill chunk by chunk
    }
}

// One forward over tokens [start, start + n) of the history, a chunk of the input that ends
// at input_end; the input's last chunk gives the last token's logits (left on the device when
// `sample` picks the next token there). On failure or cancel the session is as before the
// step (the tokens stay queued) and the error is thrown.
void Session::run_step(int32_t start, int32_t n, int32_t input_end, DeviceSample* sample) {
    const bool want_logits = start + n == input_end;
    if (!want_logits) sample = nullptr;
    std::vector<int32_t> positions(static_cast<size_t>(n));
    std::iota(positions.begin(), positions.end(), start);
    SequenceStep step;
    step.tokens = tokens_.data() + start;
    step.positions = positions.data();
    step.n_tokens = n;
    step.rope_len = input_end;  // a chunk's dynamic RoPE scaling is the whole input's, as in HF
    step.cache = cache_.get();
    step.policy = policy_.get();
    step.logits = want_logits && !sample ? logits_.data() : nullptr;
    step.sample = sample;
    step.cancel = &cancel_requested_;

    std::lock_guard<std::mutex> cache_lock(cache_mutex_);
    const bool first_prefill = start == 0;
    const std::vector<int32_t> sizes_before = cache_->sizes();
    // Leaves the session as before the step: no partial appends or prunes (a first prefill
    // starts from an empty cache, so truncating undoes its pruning too); the policy forgets
    // the step.
    auto roll_back = [&] {
        cache_->truncate(sizes_before);
        std::lock_guard<std::mutex> lock(memory_mutex_);
        policy_->abort_step();
    };
    bool alone = false;
    for (;;) {
        try {
            {
                std::lock_guard<std::mutex> lock(memory_mutex_);  // kv_param() reads the policy
                policy_->begin_step(n, first_prefill);
            }
            engine_->forward(step, alone);
            break;
        } catch (const Engine::BatchFailed& e) {
            roll_back();  // another session's step may have failed the merged forward
            alone = e.alone;
        } catch (const Error& e) {
            roll_back();  // the chunks before this one stay processed
            // a cancel is used up by the call it stops; one that came during a step failing
            // for another reason stays for the next call
            if (e.status() == PYR_CANCELLED) cancel_requested_.store(false);
            throw;
        } catch (...) {
            roll_back();
            throw;
        }
    }
    // The step has happened, whatever its compression below does: a failure there (a retain
    // out of device memory) is thrown, and the next call samples from this step's logits
    // (the policy compresses the rest after a later step).
    cache_->set_n_processed(start + n);
    if (want_logits) {  // the input's last step
        logits_on_device_ = sample != nullptr;
        have_logits_ = true;
        if (prefill_positions_.empty())  // the first prefill has completed
            for (int il = 0; il < cache_->n_layer(); ++il)
                prefill_positions_.push_back(cache_->positions(il));
    }
    {
        std::lock_guard<std::mutex> lock(memory_mutex_);
        policy_->after_step(*cache_);
    }
}

bool Session::is_eos(int32_t token) const {
    const auto& eos = engine_->config().eos_token_ids;
    return std::find(eos.begin(), eos.end(), token) != eos.end();
}

StepResult Session::finish() {
    done_ = true;
    text_ = decoder_.flush();
    return StepResult::Done;
}

StepResult Session::next() {
    text_.clear();
    token_ = -1;
    if (done_) return StepResult::Done;
    if (tokens_.empty())
        fail(PYR_ERR_STATE, "nothing to generate from: feed a prompt first");
    if (params_.max_tokens > 0 && n_generated_ >= params_.max_tokens) return finish();
    if (tokens_.size() >= size_t(n_ctx_)) {
        PYR_LOG_INFO("context full (" + std::to_string(n_ctx_) + " tokens): generation stops");
        return finish();
    }
    // The token is picked on the device where the backend can (only its id comes back),
    // else here from the logits, with the same random number either way.
    const int32_t n_vocab = int32_t(logits_.size());
    const SampleDraw draw = sampler_.peek(tokens_, n_vocab);
    DeviceSample on_device;
    if (engine_->samples_on_device()) {
        const SamplingParams& p = sampler_.params();
        on_device.temperature = p.temperature;
        on_device.top_k = p.top_k;
        on_device.top_p = p.top_p;
        on_device.min_p = p.min_p;
        on_device.repeat_penalty = p.repeat_penalty;
        on_device.u = draw.u;
        on_device.penalized = draw.penalized.data();
        on_device.n_penalized = int32_t(draw.penalized.size());
    }
    prefill(engine_->samples_on_device() ? &on_device : nullptr);
    check_cancel();
    int32_t t = on_device.token;  // -1 unless this step's forward picked it
    if (t < 0) {
        const float* l = logits();
        t = sampler_.sample_with(l ? l : logits_.data(), n_vocab, draw);
    }
    sampler_.advance();
    tokens_.push_back(t);
    ++n_generated_;
    token_ = t;
    publish_memory();
    if (is_eos(t)) return finish();
    text_ = decoder_.push(t);
    return StepResult::Token;
}

void Session::reset() {
    // The new cache and policy first: out of memory (a device cache's page tables) leaves the
    // session as it was. The old cache's memory goes back when the new one takes its place.
    const int n_layer = engine_->config().n_layer;
    auto cache = std::make_unique<KvCache>(n_layer, engine_->new_kv_storage(n_ctx_));
    auto policy = make_kv_policy(params_.kv, n_layer);
    {
        std::lock_guard<std::mutex> cache_lock(cache_mutex_);
        cache_ = std::move(cache);
        prefill_positions_.clear();
        std::lock_guard<std::mutex> lock(memory_mutex_);
        policy_ = std::move(policy);
    }
    tokens_.clear();
    n_generated_ = 0;
    done_ = false;
    have_logits_ = false;
    logits_on_device_ = false;
    token_ = -1;
    text_.clear();
    sampler_.reset();
    decoder_.reset(-1);
    cancel_requested_.store(false);
    publish_memory();
}

void Session::publish_memory() {
    MemoryCounts m;
    m.n_tokens = int32_t(tokens_.size());
    m.n_processed = cache_->n_processed();
    m.kv_bytes = cache_->bytes();
    m.kv_bytes_full = cache_->bytes_full();
    for (int il = 0; il < cache_->n_layer(); ++il) {
        m.layer_tokens.push_back(cache_->size(il));
        m.layer_bytes.push_back(cache_->bytes(il));
    }
    std::lock_guard<std::mutex> lock(memory_mutex_);
    counts_ = std::move(m);
}

const float* Session::logits() const {
    if (!have_logits_) return nullptr;
    if (logits_on_device_) {
        engine_->read_logits(*cache_, logits_.data());
        logits_on_device_ = false;
    }
    return logits_.data();
}

double Session::kv_param(const std::string& name) const {
    std::lock_guard<std::mutex> lock(memory_mutex_);
    return policy_->param(name);
}

MemoryCounts Session::counts() const {
    std::lock_guard<std::mutex> lock(memory_mutex_);
    return counts_;
}

MemoryStats Session::memory() const {
    std::lock_guard<std::mutex> cache_lock(cache_mutex_);
    MemoryStats m;
    static_cast<MemoryCounts&>(m) = counts();
    for (int il = 0; il < cache_->n_layer(); ++il) m.layer_positions.push_back(cache_->positions(il));
    m.prefill_layer_positions = prefill_positions_;
    return m;
}

std::vector<int32_t> Session::layer_positions(int il, bool after_prefill) const {
    std::lock_guard<std::mutex> cache_lock(cache_mutex_);
    if (after_prefill)
        return il >= 0 && size_t(il) < prefill_positions_.size() ? prefill_positions_[size_t(il)]
                                                                  : std::vector<int32_t>{};
    return il >= 0 && il < cache_->n_layer() ? cache_->positions(il) : std::vector<int32_t>{};
}

}  // namespace pyr
