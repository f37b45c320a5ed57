// Engine: a loaded model plus the backend that runs it. Read-only after open and shared
// by every session (sessions hold a shared_ptr, so the engine outlives its last session).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "backend/backend.h"
#include "model/model.h"

namespace pyr {

struct EngineParams {
    std::string device = "auto";  // "auto" | "cpu" | "cuda" | "cuda:N"
    int32_t n_threads = 0;        // 0: hardware threads
    uint64_t max_device_bytes = 0;
};

class Engine {
public:
    // Loads the checkpoint in `dir` and starts the backend. Throws pyr::Error.
    static std::shared_ptr<Engine> open(const std::string& dir, const EngineParams& params);

    const Model& model() const { return *model_; }
    const ModelConfig& config() const { return model_->config(); }
    const std::string& device() const { return device_; }

    // Runs one step batch on the backend. Steps of different sessions run one at a time
    // for now (the batching scheduler of DESIGN.md section 7 will merge them here).
    void forward(SequenceStep* batch, int n_seq, const std::atomic<bool>* cancel);
    std::unique_ptr<KvStorage> new_kv_storage(int32_t n_ctx);

    // KV bytes one token takes in one layer, uncompressed, on this engine's backend.
    uint64_t kv_bytes_per_token_layer() const { return kv_bytes_per_token_; }

private:
    std::shared_ptr<const Model> model_;
    std::unique_ptr<Backend> backend_;
    std::string device_;
    std::mutex forward_mutex_;
    uint64_t kv_bytes_per_token_ = 0;
};

// Parses a device string; returns the canonical name ("cpu", "cuda:0") and throws
// PYR_ERR_INVALID_ARGUMENT for malformed ones.
std::string parse_device(const std::string& device);

}  // namespace pyr
