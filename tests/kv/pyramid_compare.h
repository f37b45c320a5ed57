// Runs one pyramid case on the engine (a greedy CPU session) and on the reference
// (pyramid_reference.h) side by side: the plan, the kept positions of every layer right after
// the prefill and after every generated token, the greedy tokens, and the memory figures.
//
// Float (engine) and double (reference) can choose differently where two candidates score
// almost the same. On the first difference the case stops; it passes only when the
// reference's decision there had a relative score gap below kNearTie (then it is counted and
// reported as a near-tie), and fails otherwise.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "kv_test_util.h"
#include "pyramid_reference.h"

namespace pyr_test {

constexpr double kNearTie = 1e-4;

struct CaseSpec {
    std::string name;
    int32_t n_prompt = 100;
    // The knobs as a user writes them (the session gets them as the C ABI's floats)
    double retention = 0.0;  // > 0: the knobs are solved for it
    double rho = 0.9, gamma = 1.0, recent_ratio = 0.2;
    int32_t min_context = 64, sinks = 4, gen_e = 16;
    bool shrink = true;
    int32_t n_gen = 40;
    uint32_t seed = 1;                 // of the random prompt
    std::vector<int32_t> prompt = {};  // used instead when not empty
};

struct CaseOutcome {
    int32_t tokens = 0;       // generated tokens compared
    int near_ties = 0;        // accepted differences (the case stopped there)
    int compressions = 0;     // generation-phase compression events (reference)
    bool stopped = false;     // the case stopped before n_gen tokens
    bool eos = false;         // ... because the model chose EOS
    std::vector<int32_t> generated;  // the reference's greedy tokens (all n_gen of them)
};

inline pyr::KvParams kv_params(const CaseSpec& cs) {
    pyr::KvParams kv;
    kv.policy = "pyramid";
    kv.retention = float(cs.retention);
    kv.rho = float(cs.rho), kv.gamma = float(cs.gamma), kv.recent_ratio = float(cs.recent_ratio);
    kv.min_context = cs.min_context, kv.sinks = cs.sinks, kv.gen_e = cs.gen_e;
    kv.prefill_shrink = cs.shrink ? 1 : 0;
    return kv;
}

// The plan the spec asks for: the knobs as written (a session's floats mean these decimals),
// or solved for the retention target.
inline pyr_ref::Plan expected_plan(const CaseSpec& cs, int32_t n_prompt, int n_layer) {
    pyr_ref::Knobs k{cs.rho, cs.gamma, cs.recent_ratio, cs.min_context};
    if (cs.retention > 0.0) return pyr_ref::solve_plan(cs.retention, n_prompt, n_layer, k);
    return pyr_ref::make_plan(n_prompt, n_layer, k);
}

inline std::string describe_difference(const std::vector<int32_t>& got, const std::vector<int32_t>& want) {
    std::ostringstream os;
    os << "engine keeps " << got.size() << ", reference " << want.size() << "; only engine:";
    int shown = 0;
    for (int32_t p : got)
        if (std::find(want.begin(), want.end(), p) == want.end() && shown++ < 8) os << ' ' << p;
    os << "; only reference:";
    shown = 0;
    for (int32_t p : want)
        if (std::find(got.begin(), got.end(), p) == got.end() && shown++ < 8) os << ' ' << p;
    return os.str();
}

// The memory figures add up: per layer bytes = tokens x bytes per token, their sum is
// kv_bytes, kv_bytes_full = processed tokens x layers x bytes per token; and every layer keeps
// its positions ascending with the last W processed tokens at the end.
inline void check_engine_state(const pyr::MemoryStats& m, const pyr::Engine& engine,
                               int32_t n_processed, int32_t window) {
    const pyr::ModelConfig& c = engine.config();
    const uint64_t bpt = engine.kv_bytes_per_token_layer();
    const uint64_t elems = 2ull * uint64_t(c.n_head_kv) * uint64_t(c.head_dim);
    CHECK((bpt == 2 * elems || bpt == 4 * elems));
    REQUIRE(int(m.layer_tokens.size()) == c.n_layer);
    REQUIRE(int(m.layer_positions.size()) == c.n_layer);
    uint64_t sum = 0;
    const std::vector<int32_t> recent = iota_positions(n_processed - window, n_processed);
    for (int il = 0; il < c.n_layer; ++il) {
        const std::vector<int32_t>& pos = m.layer_positions[size_t(il)];
        CHECK(m.layer_tokens[size_t(il)] == int32_t(pos.size()));
        CHECK(m.layer_bytes[size_t(il)] == uint64_t(pos.size()) * bpt);
        sum += m.layer_bytes[size_t(il)];
        CHECK(std::is_sorted(pos.begin(), pos.end()));
        CHECK(std::adjacent_find(pos.begin(), pos.end()) == pos.end());
        REQUIRE(pos.size() >= recent.size());
        CHECK_MESSAGE(std::equal(recent.begin(), recent.end(), pos.end() - window),
                      "layer " << il << " lost part of the last " << window << " tokens");
    }
    CHECK(m.kv_bytes == sum);
    CHECK(m.kv_bytes_full == uint64_t(n_processed) * uint64_t(c.n_layer) * bpt);
}

// Compares every layer; on the first layer that differs, accepts a near-tie of the
// reference's decision at that layer and step (step -1: prefill). Returns whether all agree.
inline bool compare_layers(const std::vector<std::vector<int32_t>>& got,
                           const pyr_ref::PyramidReference& ref, bool after_prefill,
                           int32_t step, CaseOutcome& out) {
    REQUIRE(got.size() == ref.layers.size());
    for (size_t il = 0; il < got.size(); ++il) {
        const std::vector<int32_t>& want =
            after_prefill ? ref.prefill_positions[il] : ref.layers[il].pos;
        CAPTURE(il);
        CHECK_MESSAGE(got[il].size() == want.size(), "cache length differs");
        if (got[il] == want) continue;
        double gap = INFINITY;
        for (const pyr_ref::Decision& d : ref.decisions)
            if (d.il == int(il) && d.step == step) gap = std::min(gap, d.rel_gap);
        if (gap < kNearTie) {
            MESSAGE("near-tie at layer " << il << " step " << step << " (relative gap " << gap
                                         << "): " << describe_difference(got[il], want));
            ++out.near_ties;
        } else {
            FAIL_CHECK("kept positions differ at layer " << il << " step " << step
                       << " (reference boundary gap " << gap << "): "
                       << describe_difference(got[il], want));
        }
        return false;
    }
    return true;
}

// Runs the case; `ref_model` is the engine's checkpoint read by the reference.
inline CaseOutcome run_case(const std::shared_ptr<pyr::Engine>& engine,
                            const pyr_ref::RefModel& ref_model, const CaseSpec& cs) {
    CAPTURE(cs.name);
    CaseOutcome out;
    const int n_layer = engine->config().n_layer;
    const std::vector<int32_t> prompt =
        cs.prompt.empty() ? random_tokens(cs.n_prompt, engine->config().n_vocab, cs.seed) : cs.prompt;
    const int32_t n_prompt = int32_t(prompt.size());
    auto session = greedy_session(engine, cs.n_gen, kv_params(cs), n_prompt + cs.n_gen + 1);
    session->feed_tokens(prompt);
    session->prefill();

    // The plan and the knobs as used.
    const pyr_ref::Plan plan = expected_plan(cs, n_prompt, n_layer);
    CHECK(session->kv_param("window") == plan.window);
    CHECK(session->kv_param("rho") == doctest::Approx(plan.knobs.rho).epsilon(1e-9));
    CHECK(session->kv_param("gamma") == doctest::Approx(plan.knobs.gamma).epsilon(1e-9));
    CHECK(session->kv_param("recent_ratio") == doctest::Approx(plan.knobs.recent_ratio).epsilon(1e-9));
    CHECK(session->kv_param("planned_retention") == doctest::Approx(plan.retention).epsilon(1e-12));

    // pyramid.h: "[kv_retention] 1 keeps everything (generation too)".
    const int32_t gen_e = cs.retention >= 1.0 ? 0 : cs.gen_e;
    pyr_ref::PyramidReference ref(ref_model, {plan, cs.sinks, gen_e, cs.shrink});
    pyr_ref::Vec logits = ref.prefill(prompt);
    pyr::MemoryStats mem = session->memory();
    REQUIRE(int(mem.prefill_layer_positions.size()) == n_layer);
    for (int il = 0; il < n_layer; ++il)  // exactly the plan's counts, near-ties or not
        CHECK(mem.prefill_layer_positions[size_t(il)].size() ==
              size_t(plan.context[size_t(il)] + plan.window));
    check_engine_state(mem, *engine, n_prompt, plan.window);
    out.stopped = !compare_layers(mem.prefill_layer_positions, ref, true, -1, out);
    int32_t logits_for = 0;  // the index of the token `logits` choose

    for (int32_t i = 0; i < cs.n_gen && !out.stopped; ++i) {
        if (i > 0) logits = ref.step(out.generated.back());  // the engine does in next()
        logits_for = i;
        const int32_t want = pyr_ref::argmax(logits);
        const pyr::StepResult r = session->next();
        CAPTURE(i);
        if (session->token() != want) {
            const double gap = pyr_ref::top2_rel_gap(logits);
            if (gap < kNearTie) {
                MESSAGE("near-tie of the logits at token " << i << " (relative gap " << gap << ")");
                ++out.near_ties;
            } else {
                FAIL_CHECK("token " << i << ": engine " << session->token() << ", reference "
                                    << want << " (logit gap " << gap << ")");
            }
            out.stopped = true;
            break;
        }
        ++out.tokens;
        out.generated.push_back(want);
        mem = session->memory();
        check_engine_state(mem, *engine, n_prompt + i, plan.window);
        if (!compare_layers(mem.layer_positions, ref, false, i - 1, out)) out.stopped = true;
        if (r == pyr::StepResult::Done) {
            out.stopped = out.eos = i + 1 < cs.n_gen;
            break;
        }
    }
    // The reference alone to the end, so that `generated` is what the spec generates.
    const std::vector<int32_t>& eos = engine->config().eos_token_ids;
    while (!out.eos && int32_t(out.generated.size()) < cs.n_gen) {
        if (int32_t(out.generated.size()) > logits_for) {
            logits = ref.step(out.generated.back());
            logits_for = int32_t(out.generated.size());
        }
        out.generated.push_back(pyr_ref::argmax(logits));
        out.eos = std::find(eos.begin(), eos.end(), out.generated.back()) != eos.end();
    }
    for (const pyr_ref::Decision& d : ref.decisions) out.compressions += d.step >= 0;
    return out;
}

}  // namespace pyr_test
