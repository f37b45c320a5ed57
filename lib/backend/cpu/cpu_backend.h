// The CPU backend: the reference LLaMA forward pass (fp32 math, threaded matmuls) and its
// KV storage (fp32, per layer, token-major).
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_ops.h"
#include "common/thread_pool.h"

namespace pyr {

// The bytes the sessions' KV caches hold on the CPU backend, against max_device_bytes
// (0 = no limit): admission by memory. Any thread.
class KvBudget {
public:
    explicit KvBudget(uint64_t limit) : limit_(limit) {}
    // Counts `bytes` more if that stays within the limit.
    bool try_take(uint64_t bytes);
    // The same, or throws PYR_ERR_OUT_OF_MEMORY (nothing counted) past the limit.
    void take(uint64_t bytes);
    void give_back(uint64_t bytes) noexcept;
    uint64_t limit() const { return limit_; }
    uint64_t used() const;
    uint64_t peak() const;  // the most used at once

private:
    mutable std::mutex mutex_;
    const uint64_t limit_;
    uint64_t used_ = 0, peak_ = 0;
};

// Keys and values of one session, per layer, fp32, token-major: k, v (n_tokens, kv_dim)
// with kv_dim = n_head_kv * head_dim. A layer holds room for its tokens and an eighth more
// (at least 16 tokens; room_for), up to n_ctx: only as far as the tokens that reach it (a
// shrinking prefill gives deeper layers fewer), and it gives room back when compressed. The
// room it holds counts against the backend's KvBudget until it is destroyed.
class CpuKvStorage final : public KvStorage {
public:
    // budget null: no limit, nothing counted.
    CpuKvStorage(int n_layer, int32_t n_ctx, int32_t kv_dim,
                 std::shared_ptr<KvBudget> budget = nullptr);
    ~CpuKvStorage() override;
    CpuKvStorage(const CpuKvStorage&) = delete;
    CpuKvStorage& operator=(const CpuKvStorage&) = delete;

    uint64_t bytes_per_token() const override;
    void retain(int il, const std::vector<int32_t>& keep) override;
    void truncate(int il, int32_t n) override;
    uint64_t rows_moved() const override { return rows_moved_; }

    // Appends n tokens to layer il: k, v (n, kv_dim). Past the budget it throws
    // PYR_ERR_OUT_OF_MEMORY with the layer unchanged (the step is then rolled back, and
    // truncate() gives the room the step took back). Past n_ctx is an internal error (the
    // engine checks the context first).
    void append(int il, const float* k, const float* v, int32_t n);
    int32_t size(int il) const {
        const Layer& l = layers_[size_t(il)];
        return int32_t(l.k.size() / size_t(kv_dim_)) - l.start;
    }
    const float* keys(int il) const { return live(il, false); }   // (size, kv_dim)
    const float* values(int il) const { return live(il, true); }  // (size, kv_dim)
    int32_t kv_dim() const { return kv_dim_; }

private:
    // The tokens are rows [start, start + size) of k and v (each (rows, kv_dim), rows =
    // k.size() / kv_dim): a retain that drops rows near the front moves the rows before them
    // forward instead of all those after them (streaming drops the token after its sinks
    // each step: 4 rows move, not the whole window); the gap is reused when the layer grows.
    struct Layer {
        std::vector<float> k, v;
        int32_t start = 0;
    };
    const float* live(int il, bool value) const {
        const Layer& l = layers_[size_t(il)];
        return (value ? l.v : l.k).data() + size_t(l.start) * size_t(kv_dim_);
    }
    void close_gap(Layer& layer);  // the tokens moved to the front: start = 0
    int32_t capacity(int il) const;
    uint64_t held_bytes(int il) const;  // the layer's room, as counted in budget_
    int32_t room_for(int32_t tokens) const;  // tokens plus the spare room kept
    // Grows layer il to hold n_new more tokens, counting the bytes first.
    void make_room(int il, int32_t n_new);
    void shrink_room(int il, int32_t tokens);  // never throws: truncate() runs in rollbacks
    void release_spare_room(int il);           // the same

    std::vector<Layer> layers_;
    int32_t n_ctx_;
    int32_t kv_dim_;
    std::shared_ptr<KvBudget> budget_;
    uint64_t rows_moved_ = 0;
};

// The reference backend. `config` and `weights` are views whose data must outlive the
// backend; `owner` (may be null) is kept alive for that (the Model when made from one).
// Tests build it directly from in-memory weights.
class CpuBackend final : public Backend {
public:
    CpuBackend(const ModelConfig& config, const ModelWeights& weights, int n_threads,
               std::shared_ptr<const void> owner = nullptr, uint64_t max_kv_bytes = 0);

    std::string device_name() const override { return "cpu"; }
    std::unique_ptr<KvStorage> new_kv_storage(int32_t n_ctx) override;
    uint64_t kv_storage_bytes(int32_t n_ctx) const override;
    DeviceMemory device_memory() const override;  // the KV caches' room (host memory)
    // As Backend::forward; a step with logits == nullptr skips the output head (a prefill
    // chunk whose logits nobody needs). Callers may be on any thread; calls serialise.
    void forward(SequenceStep* batch, int n_seq) override;

private:
    struct Scratch {
        std::vector<float> x, xn, q, k, v, att, tmp, gate, up, cos, sin;
        std::vector<int32_t> pos;               // (n) positions of the tokens still in flight
        std::vector<float> probs, col_sums;     // per-head observations for the KV policy
        std::vector<float> obs_rows, obs_sums;  // the same averaged over heads
    };
    void check_step(const SequenceStep& step) const;
    void resize_scratch(int32_t n_tokens);
    // `step` is one of the batch's steps; the batch's cancel flags are checked per layer.
    void forward_sequence(const SequenceStep& step, const SequenceStep* batch, int n_seq);
    void prepare_observation(const ObservationRequest& req, int32_t n, cpu::AttentionArgs& args);
    Observation finish_observation(const ObservationRequest& req, int32_t n_rows, int32_t n_kv);
    int32_t shrink_rows(const std::vector<int32_t>& keep, int32_t first_new, int32_t n);

    std::shared_ptr<const void> owner_;
    ModelConfig config_;
    ModelWeights weights_;
    ThreadPool pool_;
    std::mutex mutex_;  // one forward at a time: the scratch is shared
    Scratch s_;
    std::shared_ptr<KvBudget> kv_budget_;
};

}  // namespace pyr
