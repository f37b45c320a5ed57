#include "kv/kv_policy.h"

#include <cfloat>
#include <charconv>
#include <cmath>
#include <limits>

#include "common/error.h"
#include "kv/policies.h"

namespace pyr {

double as_written(float v) {
    if (!std::isfinite(v)) return v;
    char buf[32];
    const auto printed = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::general, FLT_DIG);
    double d = v;
    std::from_chars(buf, printed.ptr, d);  // locale-independent, unlike printf and strtod
    return d;
}

double KvPolicy::param(const std::string&) const {
    return std::numeric_limits<double>::quiet_NaN();
}

namespace {

// "full": keeps everything.
class FullKvPolicy final : public KvPolicy {
public:
    const char* name() const override { return "full"; }
    bool chunked_prefill(bool) const override { return true; }  // chunks change nothing
};

void check_knobs(const KvParams& p) {
    auto bad = [](const std::string& what) { fail(PYR_ERR_INVALID_ARGUMENT, what); };
    auto num = [](double v) { return std::to_string(v); };
    if (!(p.retention >= 0.0f && p.retention <= 1.0f))
        bad("kv_retention must be in (0, 1] (0 = unset), got " + num(p.retention));
    if (!(p.rho >= 0.0f && p.rho <= 1.0f)) bad("kv_rho must be in [0, 1], got " + num(p.rho));
    if (!(p.gamma > 0.0f && std::isfinite(p.gamma))) bad("kv_gamma must be > 0, got " + num(p.gamma));
    if (!(p.recent_ratio > 0.0f && p.recent_ratio <= 1.0f))
        bad("kv_recent_ratio must be in (0, 1], got " + num(p.recent_ratio));
    if (p.min_context < 0) bad("kv_min_context must be >= 0, got " + std::to_string(p.min_context));
    if (p.sinks < 0) bad("kv_sinks must be >= 0, got " + std::to_string(p.sinks));
    if (p.gen_e < 0) bad("kv_gen_e must be >= 0 (0 = off), got " + std::to_string(p.gen_e));
    if (p.prefill_shrink < -1 || p.prefill_shrink > 1)
        bad("kv_prefill_shrink must be -1 (policy default), 0 or 1, got " +
            std::to_string(p.prefill_shrink));
    if (p.shrink_start < -1)
        bad("kv_shrink_start must be >= 0 (-1 = the policy's default), got " +
            std::to_string(p.shrink_start));
    if (p.obs_window < -1) bad("kv_obs_window must be >= -1, got " + std::to_string(p.obs_window));
    if (p.pool < -1 || (p.pool > 1 && p.pool % 2 == 0))
        bad("kv_pool must be an odd kernel size (or -1/0/1 for none), got " + std::to_string(p.pool));
}

}  // namespace

std::unique_ptr<KvPolicy> make_kv_policy(const KvParams& params, int n_layer) {
    check_knobs(params);
    const std::string& name = params.policy;
    if (name.empty() || name == "full") return std::make_unique<FullKvPolicy>();
    if (name == "pyramid") return make_pyramid_policy(params, n_layer);
    if (name == "snapkv") return make_snapkv_policy(params, n_layer);
    if (name == "pyramidkv") return make_pyramidkv_policy(params, n_layer);
    if (name == "snapshrink") return make_snapshrink_policy(params, n_layer);
    if (name == "streaming") return make_streaming_policy(params, n_layer);
    if (name == "h2o") return make_h2o_policy(params, n_layer);
    fail(PYR_ERR_INVALID_ARGUMENT,
         "unknown kv_policy '" + name + "' (known: full, pyramid, streaming, h2o, snapkv, pyramidkv, snapshrink)");
}

}  // namespace pyr
