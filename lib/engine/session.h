// Session: one conversation — token history, pending input, sampler, streaming decoder,
// KV cache and its policy. One thread at a time, except cancel(), kv_param() and the memory
// figures (counts(), memory(), layer_positions()).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "kv/kv_cache.h"
#include "kv/kv_policy.h"
#include "tokenizer/tokenizer.h"

namespace pyr {

struct SessionParams {
    int32_t n_ctx = 0;       // 0: the model's max_position_embeddings
    int32_t max_tokens = 256;
    SamplingParams sampling;
    KvParams kv;
};

// The memory figures after the last completed step (a consistent copy; O(layers) to take).
struct MemoryCounts {
    int32_t n_tokens = 0;
    int32_t n_processed = 0;  // of them, through the model so far (chunk by chunk in a prefill)
    uint64_t kv_bytes = 0;
    uint64_t kv_bytes_full = 0;
    std::vector<int32_t> layer_tokens;
    std::vector<uint64_t> layer_bytes;
};

// The counts and which tokens each layer holds (O(layers x tokens) to copy).
struct MemoryStats : MemoryCounts {
    std::vector<std::vector<int32_t>> layer_positions;          // now, ascending
    std::vector<std::vector<int32_t>> prefill_layer_positions;  // after the first prefill
};

enum class StepResult { Token, Done };

class Session {
public:
    Session(std::shared_ptr<Engine> engine, const SessionParams& params);

    // Queue input; throw PYR_ERR_CONTEXT_FULL / PYR_ERR_INVALID_ARGUMENT leaving it unchanged.
    void feed_text(const std::string& text);
    void feed_tokens(const std::vector<int32_t>& tokens);

    // Processes queued input; throws PYR_CANCELLED or an error. Either way the history and
    // the queued input are unchanged, and so is the cache except for the chunks of a long
    // input that completed (the next call goes on after them).
    void prefill() { prefill(nullptr); }
    // Produces one token (Token) or finishes (Done); see pyr_session_next.
    StepResult next();
    void reset();
    // Callable from any thread.
    void cancel();
    // Any thread. counts() never waits; memory() and layer_positions() wait for a step in
    // flight to end (the positions are read from the cache, not copied at every step).
    MemoryCounts counts() const;
    MemoryStats memory() const;
    // Layer il's positions now, or after the first prefill; empty for a layer out of range.
    std::vector<int32_t> layer_positions(int il, bool after_prefill) const;
    // The KV policy's parameter as used (pyr_session_kv_param). Any thread.
    double kv_param(const std::string& name) const;

    int32_t token() const { return token_; }
    const std::string& text() const { return text_; }
    // The last processed token's logits, or null; read back from the device on first use
    // after a step that sampled there (throws pyr::Error if that fails).
    const float* logits() const;
    int32_t n_vocab() const { return int32_t(logits_.size()); }
    int32_t n_ctx() const { return n_ctx_; }
    const std::vector<int32_t>& history() const { return tokens_; }

private:
    void append_input(const std::vector<int32_t>& tokens);
    // prefill(), the last step also picking the next token on the device when `sample`
    void prefill(DeviceSample* sample);
    void run_step(int32_t start, int32_t n, int32_t input_end, DeviceSample* sample);
    void check_cancel();
    bool is_eos(int32_t token) const;
    StepResult finish();
    void publish_memory();

    std::shared_ptr<Engine> engine_;
    SessionParams params_;
    int32_t n_ctx_ = 0;
    Sampler sampler_;
    StreamDecoder decoder_;
    std::unique_ptr<KvPolicy> policy_;
    std::unique_ptr<KvCache> cache_;

    std::vector<int32_t> tokens_;   // history: fed and generated tokens
    int32_t n_generated_ = 0;       // since the last feed
    bool done_ = false;             // finished; stays until more input is fed
    mutable std::vector<float> logits_;  // (n_vocab) of the last processed token
    bool have_logits_ = false;
    mutable bool logits_on_device_ = false;  // logits_ is stale: the backend holds them
    int32_t token_ = -1;
    std::string text_;
    std::atomic<bool> cancel_requested_{false};

    // Held while the cache may change (a step, whichever thread runs its forward; a reset),
    // so that other threads read its positions between steps. Taken before memory_mutex_.
    mutable std::mutex cache_mutex_;
    std::vector<std::vector<int32_t>> prefill_positions_;  // guarded by cache_mutex_
    mutable std::mutex memory_mutex_;  // guards counts_ and policy parameters read by others
    MemoryCounts counts_;
};

}  // namespace pyr
