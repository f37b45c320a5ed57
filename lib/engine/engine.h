// Engine: a loaded model plus the backend that runs it. Read-only after open and shared
// by every session (sessions hold a shared_ptr, so the engine outlives its last session).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>

#include "backend/backend.h"
#include "model/model.h"

namespace pyr {

struct EngineParams {
    std::string device = "auto";  // "auto" | "cpu" | "cuda" | "cuda:N"
    int32_t n_threads = 0;        // 0: hardware threads
    uint64_t max_device_bytes = 0;  // 0: none; CUDA: weights + KV + scratch; CPU: KV caches
    // Tokens of prefill per forward: a longer prefill runs in chunks of this size (where its
    // KV policy allows), and a forward takes waiting prefills up to this many tokens, so that
    // decode steps riding along are not held up long. 0: no limit, no chunks.
    int32_t prefill_chunk = 512;
};

class Engine {
public:
    // Loads the checkpoint in `dir` and starts the backend. Throws pyr::Error.
    static std::shared_ptr<Engine> open(const std::string& dir, const EngineParams& params);

    const Model& model() const { return *model_; }
    const ModelConfig& config() const { return model_->config(); }
    const std::string& device() const { return device_; }

    // Runs one session's step. Steps that other threads submit while a forward is running
    // wait and then go through the backend together, in one batched forward (continuous
    // batching, DESIGN.md section 7): sessions join and leave between steps. A forward takes
    // every waiting decode step (one token) and, in order, the waiting prefill steps that
    // fit in prefill_chunk tokens together (at least one). With alone, the step gets a
    // forward of its own. Throws pyr::Error when the step fails (its cancel flag gives
    // PYR_CANCELLED, at once if it is set while the step waits), or BatchFailed when a merged
    // forward failed for another step: the caller rolls the step back and submits it again,
    // alone when the cause is unknown (a cancel's is known: merged again).
    struct BatchFailed {
        bool alone = true;
    };
    void forward(const SequenceStep& step, bool alone = false);
    // Wakes the steps waiting for a forward, so that a cancelled one leaves (Session::cancel).
    void wake_waiting_steps();

    // Counts since open: batches taken (forwards; a batch whose steps were all cancelled
    // while they waited runs nothing) and the steps in them (steps / forwards is the mean
    // batch), the largest batch in steps and in tokens, and the steps waiting now. Any thread.
    struct BatchStats {
        uint64_t forwards = 0, steps = 0;
        int32_t max_batch = 0, max_tokens = 0, waiting = 0;
    };
    BatchStats batch_stats() const;

    std::unique_ptr<KvStorage> new_kv_storage(int32_t n_ctx);
    // Tokens picked on the device (SequenceStep::sample), logits left there (read_logits).
    bool samples_on_device() const { return samples_on_device_; }
    void read_logits(KvCache& cache, float* out) { backend_->read_logits(cache, out); }
    BackendStats backend_stats() const { return backend_->stats(); }

    // EngineParams::prefill_chunk as given (0: none).
    int32_t prefill_chunk() const { return prefill_chunk_; }

    // KV bytes one token takes in one layer, uncompressed, on this engine's backend.
    uint64_t kv_bytes_per_token_layer() const { return kv_bytes_per_token_; }
    // What a session's KV storage holds at n_ctx tokens in every layer (its worst case under
    // the memory budget), and the device memory the backend holds now (0s on the CPU).
    uint64_t kv_storage_bytes(int32_t n_ctx) const { return backend_->kv_storage_bytes(n_ctx); }
    DeviceMemory device_memory() const { return backend_->device_memory(); }

private:
    struct Request;
    void run_batch(Request* const* batch, size_t n) noexcept;

    std::shared_ptr<const Model> model_;
    std::unique_ptr<Backend> backend_;
    std::string device_;
    // the scheduler: a submitting thread finding no forward running leads the next one,
    // taking the waiting steps in order
    mutable std::mutex queue_mutex_;
    std::condition_variable queue_changed_;
    std::deque<Request*> queue_;
    bool running_ = false;
    BatchStats stats_;
    uint64_t kv_bytes_per_token_ = 0;
    int32_t prefill_chunk_ = 0;
    bool samples_on_device_ = false;
};

// Parses a device string; returns the canonical name ("cpu", "cuda:0") and throws
// PYR_ERR_INVALID_ARGUMENT for malformed ones.
std::string parse_device(const std::string& device);

}  // namespace pyr
