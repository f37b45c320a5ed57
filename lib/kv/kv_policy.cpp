#include "kv/kv_policy.h"

#include "common/error.h"

namespace pyr {

std::unique_ptr<KvPolicy> make_kv_policy(const std::string& name) {
    if (name.empty() || name == "full") return std::make_unique<FullKvPolicy>();
    fail(PYR_ERR_INVALID_ARGUMENT,
         "unknown kv_policy '" + name + "' (this build knows: full)");
}

}  // namespace pyr
