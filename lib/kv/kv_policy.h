// The hook where KV compression plugs in: a policy decides WHICH cached tokens each layer
// keeps; the backend (through KvCache::retain) moves the bytes.
#pragma once

#include <memory>
#include <string>

#include "kv/kv_cache.h"

namespace pyr {

class KvPolicy {
public:
    virtual ~KvPolicy() = default;
    virtual const char* name() const = 0;
    // Called after every completed forward step of the session (prefill or decode), with
    // the session's cache; a policy prunes layers here via cache.retain().
    virtual void after_step(KvCache& cache) = 0;
};

// "full": keeps everything.
class FullKvPolicy final : public KvPolicy {
public:
    const char* name() const override { return "full"; }
    void after_step(KvCache&) override {}
};

// Creates the policy named `name`; PYR_ERR_INVALID_ARGUMENT listing the known names otherwise.
std::unique_ptr<KvPolicy> make_kv_policy(const std::string& name);

}  // namespace pyr
