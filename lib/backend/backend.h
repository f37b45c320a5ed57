// The Backend interface: runs the model forward for a step batch of sequences. The CPU
// backend (backend/cpu/) is the reference; the CUDA backend implements the same interface.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "kv/kv_cache.h"
#include "kv/kv_policy.h"
#include "model/model.h"

namespace pyr {

// The next token picked on the device as the session's Sampler would pick it from the same
// logits (engine/sampler.h: its settings and SampleDraw), so that only a token id comes back.
struct DeviceSample {
    float temperature = 0.0f;  // <= 0: greedy
    int32_t top_k = 0;
    float top_p = 1.0f, min_p = 0.0f, repeat_penalty = 1.0f;
    double u = 0.0;                      // the sampler's next uniform number
    const int32_t* penalized = nullptr;  // distinct ids the repetition penalty applies to
    int32_t n_penalized = 0;
    int32_t token = -1;  // out: the token, or -1: the device could not decide (rare: a flat
                         // distribution without top-k); sample on the host from the logits
};

// One sequence's part of a step: tokens to process now (a prefill chunk or one decode
// token) at their original positions, appended to its cache.
struct SequenceStep {
    const int32_t* tokens = nullptr;
    const int32_t* positions = nullptr;  // absolute positions, one per token
    int32_t n_tokens = 0;
    KvCache* cache = nullptr;
    KvPolicy* policy = nullptr;          // measures and prunes per layer (kv_policy.h); may be null
    float* logits = nullptr;             // out: (n_vocab) logits of the last token, on the host
    const std::atomic<bool>* cancel = nullptr;  // the owner's cancel flag; may be null
    DeviceSample* sample = nullptr;      // pick the next token on the device (see below); may be null
    // With neither logits nor sample the output head is skipped. With sample, on a backend
    // that samples on its device (Backend::samples_on_device), the next token is picked there
    // and, unless `logits` is set too, the logits stay on the device: Backend::read_logits.
    // The sequence length dynamic RoPE scaling sees (rope.h): the end of the whole input this
    // step is a chunk of, as one HF forward over that input would see it; 0 = its last
    // position + 1. rope_seq_len() reads it.
    int32_t rope_len = 0;
};

// The seq_len of rope_inv_freq for a step (SequenceStep::rope_len).
inline int32_t rope_seq_len(const SequenceStep& step) {
    if (step.rope_len > 0) return step.rope_len;
    int32_t max_pos = 0;
    for (int32_t i = 0; i < step.n_tokens; ++i) max_pos = std::max(max_pos, step.positions[i]);
    return max_pos + 1;
}

// Memory a backend holds, by use, the most it held together (peak) and what it may hold
// together (limit: max_device_bytes, or the device's memory; 0 = no limit). On the CPU
// backend only the KV caches count (host memory; the weights are mapped from the checkpoint):
// weights and scratch are 0 there and limit is max_kv_bytes.
struct DeviceMemory {
    uint64_t weights = 0, kv = 0, scratch = 0, peak = 0;
    uint64_t limit = 0;
};

// How a backend ran its steps, for benchmarks and tests (0 where it does not apply): decode
// steps replayed from CUDA graphs, captured into new ones, launched kernel by kernel; tokens
// picked on the device, and of them those it left to the host (DeviceSample::token -1).
struct BackendStats {
    uint64_t graph_replays = 0, graph_captures = 0, direct_decode_steps = 0;
    uint64_t device_samples = 0, undecided_samples = 0;
    // attention launches of a prefill (some sequence with more than one query), by kernel
    uint64_t prefill_attention_tensor_cores = 0, prefill_attention_cuda_cores = 0;
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string device_name() const = 0;
    virtual DeviceMemory device_memory() const { return {}; }
    virtual BackendStats stats() const { return {}; }

    // Whether forward() picks tokens on the device for steps with a DeviceSample.
    virtual bool samples_on_device() const { return false; }
    // Copies into out (n_vocab) the logits that the last step of `cache`'s sequence left on
    // the device (a step with a sample and no host logits). Throws pyr::Error.
    virtual void read_logits(KvCache& cache, float* out);

    // Empty storage for one session's cache of at most n_ctx tokens per layer.
    virtual std::unique_ptr<KvStorage> new_kv_storage(int32_t n_ctx) = 0;
    // The bytes such a storage holds when every layer holds n_ctx tokens (what the memory
    // budget counts: on a GPU whole pages, their page tables and, when the GPU samples, the
    // session's last logits).
    virtual uint64_t kv_storage_bytes(int32_t n_ctx) const = 0;

    // Runs every sequence of the batch through all layers, appending their keys/values
    // (after RoPE) to each cache and writing the last token's logits. After each layer's
    // attention it measures what step.policy->observe(il) asks, calls on_layer and applies
    // the returned keep set (and, with shrink_prefill, drops the dropped tokens' hidden
    // states so that deeper layers compute on the kept ones only). Checks the steps' cancel
    // flags at every layer boundary and throws pyr::Error(PYR_CANCELLED) when any is set;
    // then the caches may hold partial appends, which the caller rolls back with
    // KvCache::truncate.
    virtual void forward(SequenceStep* batch, int n_seq) = 0;
};

// Checks one step of a batch against the model (token ids, positions, a cache of the right
// depth); throws PYR_ERR_INVALID_ARGUMENT naming `who` and the bad value.
void check_sequence_step(const ModelConfig& config, const SequenceStep& step, const char* who);

// Whether the step's owner asked to cancel it.
inline bool cancel_requested(const SequenceStep& step) {
    return step.cancel && step.cancel->load(std::memory_order_relaxed);
}
// Throws pyr::Error(PYR_CANCELLED) when the cancel flag of any step of the batch is set: the
// backends call it at every layer boundary.
void check_cancel(const SequenceStep* batch, int n_seq);

// The CPU backend over `model` with n_threads workers (0 = hardware threads); the sessions'
// KV caches may hold at most max_kv_bytes together (0 = no limit; past it a step fails with
// PYR_ERR_OUT_OF_MEMORY). The weights are mapped from the checkpoint and not counted.
std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<const Model> model, int n_threads,
                                          uint64_t max_kv_bytes = 0);

// CUDA devices usable by this build: 0 without a device, a driver, or CUDA support compiled in.
int cuda_device_count();
// The CUDA backend on device `device` with a memory budget (0 = the device's memory); throws
// PYR_ERR_UNSUPPORTED when the build or the machine has no such device, PYR_ERR_OUT_OF_MEMORY
// when the weights do not fit the budget.
std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<const Model> model, int device,
                                           uint64_t max_device_bytes);
// The same with random weights of `config`'s shapes made on the device (pyramid-bench).
std::unique_ptr<Backend> make_cuda_backend_random(const ModelConfig& config, bool bf16,
                                                  uint64_t seed, int device,
                                                  uint64_t max_device_bytes);

}  // namespace pyr
