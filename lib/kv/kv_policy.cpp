#include "kv/kv_policy.h"

#include <cmath>
#include <limits>

#include "common/error.h"

namespace pyr {

double KvPolicy::param(const std::string&) const {
    return std::numeric_limits<double>::quiet_NaN();
}

namespace {

// "full": keeps everything.
class FullKvPolicy final : public KvPolicy {
public:
    const char* name() const override { return "full"; }
};

}  // namespace

std::unique_ptr<KvPolicy> make_kv_policy(const KvParams& params, int n_layer) {
    if (params.policy.empty() || params.policy == "full") return std::make_unique<FullKvPolicy>();
    fail(PYR_ERR_INVALID_ARGUMENT,
         "unknown kv_policy '" + params.policy +
             "' (known: full, pyramid, streaming, h2o, snapkv, pyramidkv)");
}

}  // namespace pyr
