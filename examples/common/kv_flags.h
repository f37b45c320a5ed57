// kv_flags.h — the KV-cache policy flags shared by pyramid-cli and pyramid-eval, so both
// tools spell, check and report the policy the same way. Header-only, C API only.
//
//   KvFlags kv;                                   // wraps pyr_session_params' kv_* fields
//   if (kv_flag_takes_value(arg)) { std::string err = kv.set(arg, value); ... }
//   kv.apply(&session_params);                     // before pyr_session_create
//   nlohmann::json j = kv_json(session, kv.policy); // after the first prefill
#ifndef PYRAMID_EXAMPLES_KV_FLAGS_H
#define PYRAMID_EXAMPLES_KV_FLAGS_H

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <nlohmann/json.hpp>

#include "pyramid.h"

namespace pyr_examples {

const char* const kKvUsage =
    "  --kv-policy NAME     full (default) | pyramid | streaming | h2o | snapkv | pyramidkv |\n"
    "                       snapshrink\n"
    "  --kv-retention T     target mean retention in (0, 1]: pyramid solves rho, gamma,\n"
    "                       recent_ratio for it; the peers' budget (default: unset; peers 0.5)\n"
    "  --kv-rho R           pyramid: deepest layer's retention floor, [0, 1] (default 0.9)\n"
    "  --kv-gamma G         pyramid: layer-curve exponent, > 0 (default 1)\n"
    "  --kv-recent-ratio R  pyramid: recent window W = floor(R * P) + 1, [0, 1] (default 0.2)\n"
    "  --kv-min-context N   pyramid: fewest context tokens a layer keeps (default 64)\n"
    "  --kv-sinks N         pyramid, streaming: first tokens always kept (default 4)\n"
    "  --kv-gen-e N         compress generated tokens every N; 0 = never (default 16)\n"
    "  --kv-prefill-shrink on|off\n"
    "                       deeper layers compute on the kept tokens only\n"
    "                       (default: on for pyramid and snapshrink, off for the others)\n"
    "  --kv-shrink-start L  with shrinking, the first layer that shrinks; earlier layers\n"
    "                       prune only their caches (default: snapshrink 2/5 of the layers, 0)\n"
    "  --kv-obs-window N    queries that score the keys (snapkv/pyramidkv default 32)\n"
    "  --kv-pool K          odd max-pool kernel over the key scores (snapkv/pyramidkv 7)\n";

// The names pyr_session_kv_param knows, in the order the JSON reports them.
const char* const kKvParamNames[] = {
    "rho",        "gamma",        "recent_ratio", "min_context", "sinks",
    "gen_e",      "window",       "prefill_shrink", "shrink_start", "obs_window",
    "pool",       "retention",    "planned_retention", "budget"};

// Parses a whole string as a finite number; false on junk, overflow or NaN.
inline bool kv_parse_double(const std::string& s, double* out) {
    char* end = nullptr;
    errno = 0;
    double v = std::strtod(s.c_str(), &end);
    if (s.empty() || *end != '\0' || errno != 0 || !std::isfinite(v)) return false;
    *out = v;
    return true;
}

inline bool kv_parse_int(const std::string& s, int32_t* out) {
    double v = 0;
    if (!kv_parse_double(s, &v) || v != std::floor(v) || std::fabs(v) > 2e9) return false;
    *out = int32_t(v);
    return true;
}

// A byte count: digits, optionally with a binary suffix K, M, G or T ("40G" = 40 GiB), as
// memory budgets are usually thought of; false on junk or overflow.
inline bool parse_byte_count(const std::string& s, uint64_t* out) {
    static const char suffixes[] = "KMGT";
    const char* suffix = s.size() >= 2 ? std::strchr(suffixes, std::toupper(s.back())) : nullptr;
    const std::string digits = suffix ? s.substr(0, s.size() - 1) : s;
    const int shift = suffix ? 10 * int(suffix - suffixes + 1) : 0;
    char* end = nullptr;
    errno = 0;
    const unsigned long long n = std::strtoull(digits.c_str(), &end, 10);
    if (digits.empty() || digits[0] == '-' || *end != '\0' || errno != 0 ||
        n > (UINT64_MAX >> shift))
        return false;
    *out = uint64_t(n) << shift;
    return true;
}

inline bool kv_flag_takes_value(const std::string& flag) {
    static const char* const flags[] = {
        "--kv-policy",   "--kv-retention",     "--kv-rho",           "--kv-gamma",
        "--kv-recent-ratio", "--kv-min-context", "--kv-sinks",       "--kv-gen-e",
        "--kv-prefill-shrink", "--kv-shrink-start", "--kv-obs-window", "--kv-pool"};
    for (const char* f : flags)
        if (flag == f) return true;
    return false;
}

// The policy flags as the user gave them, on top of pyr_session_params_init's defaults.
struct KvFlags {
    std::string policy = "full";
    pyr_session_params defaults{};  // only the kv_* fields are used

    KvFlags() { pyr_session_params_init(&defaults); }

    // Applies one flag; returns "" or a message naming the flag and the bad value.
    std::string set(const std::string& flag, const std::string& v) {
        pyr_session_params& p = defaults;
        double d = 0;
        int32_t i = 0;
        auto bad = [&](const char* want) { return flag + " expects " + want + ", got '" + v + "'"; };
        if (flag == "--kv-policy") {
            static const char* const known[] = {"full",   "pyramid",   "streaming", "h2o",
                                                "snapkv", "pyramidkv", "snapshrink"};
            for (const char* k : known) {
                if (v != k) continue;
                policy = v;
                return "";
            }
            return bad("one of full, pyramid, streaming, h2o, snapkv, pyramidkv, snapshrink");
        } else if (flag == "--kv-prefill-shrink") {
            if (v != "on" && v != "off") return bad("on or off");
            p.kv_prefill_shrink = v == "on" ? 1 : 0;
        } else if (flag == "--kv-retention") {
            if (!kv_parse_double(v, &d) || !(d > 0 && d <= 1)) return bad("a number in (0, 1]");
            p.kv_retention = float(d);
        } else if (flag == "--kv-rho" || flag == "--kv-recent-ratio") {
            if (!kv_parse_double(v, &d) || !(d >= 0 && d <= 1)) return bad("a number in [0, 1]");
            (flag == "--kv-rho" ? p.kv_rho : p.kv_recent_ratio) = float(d);
        } else if (flag == "--kv-gamma") {
            if (!kv_parse_double(v, &d) || !(d > 0)) return bad("a number > 0");
            p.kv_gamma = float(d);
        } else if (flag == "--kv-pool") {
            if (!kv_parse_int(v, &i) || i < 1 || i % 2 == 0) return bad("an odd integer >= 1");
            p.kv_pool = i;
        } else if (flag == "--kv-shrink-start") {
            if (!kv_parse_int(v, &i) || i < 0) return bad("an integer >= 0");
            p.kv_shrink_start = i;
        } else if (flag == "--kv-obs-window") {
            if (!kv_parse_int(v, &i) || i < 1) return bad("an integer >= 1");
            p.kv_obs_window = i;
        } else if (flag == "--kv-min-context" || flag == "--kv-sinks" || flag == "--kv-gen-e") {
            if (!kv_parse_int(v, &i) || i < 0) return bad("an integer >= 0");
            int32_t& field = flag == "--kv-min-context" ? p.kv_min_context
                             : flag == "--kv-sinks"     ? p.kv_sinks
                                                        : p.kv_gen_e;
            field = i;
        } else {
            return "unknown option '" + flag + "'";
        }
        return "";
    }

    // Copies the kv_* fields into `out`; kv_policy points into this object.
    void apply(pyr_session_params* out) const {
        out->kv_policy = policy.c_str();
        out->kv_retention = defaults.kv_retention;
        out->kv_rho = defaults.kv_rho;
        out->kv_gamma = defaults.kv_gamma;
        out->kv_recent_ratio = defaults.kv_recent_ratio;
        out->kv_min_context = defaults.kv_min_context;
        out->kv_sinks = defaults.kv_sinks;
        out->kv_gen_e = defaults.kv_gen_e;
        out->kv_prefill_shrink = defaults.kv_prefill_shrink;
        out->kv_shrink_start = defaults.kv_shrink_start;
        out->kv_obs_window = defaults.kv_obs_window;
        out->kv_pool = defaults.kv_pool;
    }
};

// {"policy": name, <every parameter the session reports that is not NaN>}. Integral values
// are written as integers ("sinks": 4), the others to 7 significant digits: the knobs are
// floats, and 0.2f printed as a double would read 0.20000000298023224.
inline nlohmann::json kv_json(const pyr_session* session, const std::string& policy) {
    nlohmann::json j = {{"policy", policy}};
    for (const char* name : kKvParamNames) {
        double v = pyr_session_kv_param(session, name);
        if (std::isnan(v)) continue;
        if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15) {
            j[name] = int64_t(v);
        } else {
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.7g", v);
            j[name] = std::strtod(buf, nullptr);
        }
    }
    return j;
}

// kv_bytes / kv_bytes_full now; 1 when nothing has been processed yet.
inline double kv_retention_now(const pyr_session* session) {
    uint64_t full = pyr_session_kv_bytes_full(session);
    return full ? double(pyr_session_kv_bytes(session)) / double(full) : 1.0;
}

}  // namespace pyr_examples

#endif  // PYRAMID_EXAMPLES_KV_FLAGS_H
