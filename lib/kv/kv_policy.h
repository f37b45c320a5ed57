// The keep/drop decision of KV compression. A policy decides WHICH cached tokens each layer
// keeps; the backend measures attention for it and moves the bytes (KvCache::retain).
//
// Protocol, per step of a session (Session drives it, the backend calls on_layer):
//   begin_step(n_tokens, first_prefill)   before the forward
//   for each layer il, after its attention: observe(il) says what the backend must measure,
//     on_layer(il, observation, cache) returns the slots layer il keeps -- only in the
//     session's first prefill (into an empty cache); where shrink_prefill(il) the dropped
//     tokens' hidden states also stop there, so deeper layers compute on fewer tokens
//   after_step(cache)  the step completed: generation-phase compression happens here
//   abort_step()       the step failed or was cancelled: forget what it observed
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kv/kv_cache.h"
#include "kv/kv_params.h"

namespace pyr {

// What the backend must measure at one layer in the current step.
struct ObservationRequest {
    int32_t last_rows = 0;     // attention rows of the step's last queries (head-averaged)
    bool column_sums = false;  // attention summed over all the step's queries (head-averaged)
};

// What it measured, over the layer's cache slots after this step's tokens were appended.
struct Observation {
    int32_t n_rows = 0;
    int32_t n_keys = 0;
    const float* rows = nullptr;         // (n_rows, n_keys) softmax probabilities averaged
                                         // over query heads, oldest query first; keys a
                                         // query cannot see (causal) are 0
    const float* column_sums = nullptr;  // (n_keys) the same summed over every query
};

class KvPolicy {
public:
    virtual ~KvPolicy() = default;
    virtual const char* name() const = 0;

    virtual void begin_step(int32_t n_tokens, bool first_prefill) {}
    virtual ObservationRequest observe(int il) const { return {}; }
    virtual std::optional<std::vector<int32_t>> on_layer(int il, const Observation& obs,
                                                         const KvCache& cache) {
        return std::nullopt;
    }
    // Whether layer il's keep set also drops tokens from the rest of the first prefill.
    virtual bool shrink_prefill(int il) const { return false; }
    // Whether a long prefill may run as several steps (chunks), each a step of this protocol.
    // A first prefill's selection needs the whole prompt, so by default only later ones are
    // chunked; their generation-phase compression then runs after each chunk.
    virtual bool chunked_prefill(bool first_prefill) const { return !first_prefill; }
    virtual void after_step(KvCache& cache) {}
    virtual void abort_step() {}

    // A parameter as used (see pyr_session_kv_param); NaN when unknown or not known yet.
    virtual double param(const std::string& name) const;
};

// Creates the policy for a session of a model with n_layer layers. Throws
// PYR_ERR_INVALID_ARGUMENT naming the bad knob or listing the known policies.
std::unique_ptr<KvPolicy> make_kv_policy(const KvParams& params, int n_layer);

}  // namespace pyr
