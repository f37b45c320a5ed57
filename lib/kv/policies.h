// Constructors of the KV policies (one file each); make_kv_policy (kv_policy.cpp) picks one.
#pragma once

#include <memory>

#include "kv/kv_policy.h"

namespace pyr {

std::unique_ptr<KvPolicy> make_pyramid_policy(const KvParams& params, int n_layer);
std::unique_ptr<KvPolicy> make_snapkv_policy(const KvParams& params, int n_layer);
std::unique_ptr<KvPolicy> make_pyramidkv_policy(const KvParams& params, int n_layer);
std::unique_ptr<KvPolicy> make_snapshrink_policy(const KvParams& params, int n_layer);
std::unique_ptr<KvPolicy> make_streaming_policy(const KvParams& params, int n_layer);
std::unique_ptr<KvPolicy> make_h2o_policy(const KvParams& params, int n_layer);

// The peers' token budget per layer for a prompt of n_prompt tokens: round(retention * P),
// at least `floor` and at most P (retention 0 = unset means 0.5).
int32_t peer_budget(const KvParams& params, int32_t n_prompt, int32_t floor);

}  // namespace pyr
