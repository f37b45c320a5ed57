// The KV compression knobs of a session (pyr_session_params.kv_*), before any solving.
#pragma once

#include <cstdint>
#include <string>

namespace pyr {

// A knob as the decimal it was written as. The C ABI's floats hold 0.7 as 0.699999988..., and
// a plan whose retention is exactly 0.7 must meet a target of 0.7 (DESIGN.md: "<= t"); the
// float rounded to 6 significant digits (FLT_DIG: every decimal of up to 6 digits survives
// the trip through a float) is that decimal.
double as_written(float v);

struct KvParams {
    std::string policy = "full";  // full | pyramid | streaming | h2o | snapkv | pyramidkv | snapshrink
    float retention = 0.0f;       // target mean retention; 0 = unset
    float rho = 0.9f;
    float gamma = 1.0f;
    float recent_ratio = 0.2f;
    int32_t min_context = 64;
    int32_t sinks = 4;
    int32_t gen_e = 16;           // 0 = no generation-phase compression
    int32_t prefill_shrink = -1;  // -1 = the policy's default
    int32_t shrink_start = -1;    // first layer whose selection shrinks the prefill; -1 = default
    int32_t obs_window = -1;      // -1 = the policy's default
    int32_t pool = -1;            // -1 = the policy's default

    // Retention 1 keeps everything, in generation too.
    bool lossless() const { return retention >= 1.0f; }
    // The peers' target: unset (0) means 0.5.
    double peer_retention() const { return retention > 0.0f ? as_written(retention) : 0.5; }
};

}  // namespace pyr
