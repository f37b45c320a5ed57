// The PyramidInfer plan and budget solver (DESIGN.md section 5 "Plan", "Budget knob"): the
// test reference (pyramid_ref_plan.h) against values worked out by hand, then the engine's
// lib/kv/pyramid_plan.h against the reference over a grid of prompt lengths, layer counts
// and knobs. To add a hand case: work it out in a comment first, then add it to the list.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <sstream>
#include <vector>

#include "kv/kv_params.h"
#include "kv/pyramid_plan.h"
#include "pyramid_ref_plan.h"

namespace {

const std::vector<int32_t> kPrompts{1, 2, 5, 64, 100, 333, 1024, 2230, 4096};
const std::vector<int> kLayers{1, 2, 3, 10, 32, 40};

pyr::PyramidKnobs engine_knobs(const pyr_ref::Knobs& k) {
    pyr::PyramidKnobs e;
    e.rho = k.rho, e.gamma = k.gamma, e.recent_ratio = k.recent_ratio;
    e.min_context = k.min_context;
    return e;
}

// Every field of the engine's plan equals the reference's (retention within 1e-12).
void check_same_plan(const pyr::PyramidPlan& got, const pyr_ref::Plan& want) {
    CHECK(got.n_prompt == want.n_prompt);
    CHECK(got.window == want.window);
    CHECK(got.context == want.context);
    CHECK(std::fabs(got.retention - want.retention) <= 1e-12);
}

struct HandCase {
    const char* what;
    int32_t n_prompt;
    int n_layer;
    pyr_ref::Knobs knobs;
    int32_t window;
    std::vector<int32_t> context;
    double retention;
};

}  // namespace

// Worked by hand (cos(pi/4) = 0.70710678):
// 1. P=100, L=4, rho 0.5, gamma 1, recent 0.2, min_context 10: W = floor(20)+1 = 21, C = 79.
//    r_0 = 0.5*(1+1)/2+0.5 = 1 -> no change, C_0 = 79.
//    r_1 = 0.5*(1.70710678)/2+0.5 = 0.92677670 -> floor(79*0.9267767 = 73.22) = 73 > 10: 73.
//    r_2 = 0.5*(1+0)/2+0.5 = 0.75 -> floor(73*0.75 = 54.75) = 54.
//    r_3 = 0.5*(0.29289322)/2+0.5 = 0.57322330 -> floor(54*0.5732233 = 30.95) = 30.
//    retention = (79+73+54+30 + 4*21) / 400 = 320/400 = 0.8.
// 2. The clamp fires. P=100, L=4, rho 0, gamma 1, recent 0.2, min_context 40: W 21, C 79.
//    r_1 = 0.85355339 -> floor(67.43) = 67 > min(40, 79): 67.
//    r_2 = 0.5 -> nc = floor(33.5) = 33, not > min(40, 67) = 40; C = 67 > 40: clamp to 40.
//    r_3 = 0.14644661 -> nc = 5, not > min(40, 40); C = 40 is not > 40: stays 40.
//    retention = (79+67+40+40 + 84) / 400 = 0.775.
// 3. C <= min_context: C stays. P=50, L=3, rho 0, gamma 1, recent 0.2, min_context 64:
//    W = floor(10)+1 = 11, C = 39. r_1 = (1+0.5)/2 = 0.75 -> nc = 29, not > min(64, 39) = 39;
//    C = 39 is not > 64: stays. r_2 = 0.25 -> nc = 9: stays. C = [39, 39, 39], retention 1.
// 4. gamma. P=64, L=2, rho 0.9, gamma 2, recent 0.1, min_context 0: W = floor(6.4)+1 = 7,
//    C = 57. r_0 = 1. r_1 = (0.1*(1+0)/2+0.9)^2 = 0.95^2 = 0.9025 -> floor(51.44) = 51.
//    retention = (57+51 + 2*7) / 128 = 122/128 = 0.953125.
// 5. One token: W = floor(0.2)+1 = 1, C = 0 everywhere, retention 1.
// 6. W capped at P: P=3, recent 1.0: floor(3)+1 = 4 -> 3, C = 0.
// 7. min_context 0 and a steep curve: P=20, L=3, rho 0, gamma 1, recent 0.2, min_context 0:
//    W = 5, C = 15. r_1 = (1+0.5)/2 = 0.75 -> floor(11.25) = 11 > min(0, 15) = 0: 11.
//    r_2 = (1-0.5)/2 = 0.25 -> floor(2.75) = 2 > 0: 2. retention = (15+11+2 + 15)/60 = 43/60.
TEST_CASE("pyramid plan: the reference against hand-computed plans") {
    const std::vector<HandCase> cases{
        {"rho 0.5", 100, 4, {0.5, 1.0, 0.2, 10}, 21, {79, 73, 54, 30}, 0.8},
        {"clamp to min_context", 100, 4, {0.0, 1.0, 0.2, 40}, 21, {79, 67, 40, 40}, 0.775},
        {"C <= min_context stays", 50, 3, {0.0, 1.0, 0.2, 64}, 11, {39, 39, 39}, 1.0},
        {"gamma 2", 64, 2, {0.9, 2.0, 0.1, 0}, 7, {57, 51}, 0.953125},
        {"one token", 1, 3, {0.9, 1.0, 0.2, 64}, 1, {0, 0, 0}, 1.0},
        {"W capped at P", 3, 2, {0.5, 1.0, 1.0, 0}, 3, {0, 0}, 1.0},
        {"min_context 0", 20, 3, {0.0, 1.0, 0.2, 0}, 5, {15, 11, 2}, 43.0 / 60.0},
    };
    for (const HandCase& hc : cases) {
        CAPTURE(hc.what);
        const pyr_ref::Plan p = pyr_ref::make_plan(hc.n_prompt, hc.n_layer, hc.knobs);
        CHECK(p.window == hc.window);
        CHECK(p.context == hc.context);
        CHECK(p.retention == doctest::Approx(hc.retention).epsilon(1e-15));
        check_same_plan(pyr::make_pyramid_plan(hc.n_prompt, hc.n_layer, engine_knobs(hc.knobs)), p);
    }
    // The figures of section 5 at P = 1024: the reference config (rho 0.9) keeps about 74 %
    // at 32 layers and 89 % at 10. Its "a plain rho cannot go below about 61 % on a 10-layer
    // model" is what the reference code's skip gives (C stuck at 187 from layer 6 on); the
    // clamp of section 5 takes layers 6..9 to min_context 64: 56.4 %.
    CHECK(pyr_ref::make_plan(1024, 32, {}).retention == doctest::Approx(0.742248535));
    CHECK(pyr_ref::make_plan(1024, 10, {}).retention == doctest::Approx(0.892871094));
    const pyr_ref::Plan plain = pyr_ref::make_plan(1024, 10, {0.0, 1.0, 0.2, 64});
    CHECK(plain.context == std::vector<int32_t>{819, 798, 721, 572, 374, 187, 64, 64, 64, 64});
    CHECK(plain.retention == doctest::Approx(0.564160156));
}

TEST_CASE("pyramid plan: the engine's plan equals the reference over a grid") {
    int n_cases = 0, n_bad = 0;
    for (int32_t n_prompt : kPrompts)
        for (int n_layer : kLayers)
            for (double rho : {0.0, 0.5, 0.9, 1.0})
                for (double gamma : {1.0, 2.0, 8.0})
                    for (double recent : {0.01, 0.2, 0.5})
                        for (int32_t min_context : {0, 64, 1000}) {
                            const pyr_ref::Knobs k{rho, gamma, recent, min_context};
                            const pyr_ref::Plan want = pyr_ref::make_plan(n_prompt, n_layer, k);
                            const pyr::PyramidPlan got =
                                pyr::make_pyramid_plan(n_prompt, n_layer, engine_knobs(k));
                            ++n_cases;
                            const bool same = got.window == want.window &&
                                              got.context == want.context &&
                                              std::fabs(got.retention - want.retention) <= 1e-12;
                            if (!same && ++n_bad <= 10) {  // the first few, in full
                                CAPTURE(n_prompt);
                                CAPTURE(n_layer);
                                CAPTURE(rho);
                                CAPTURE(gamma);
                                CAPTURE(recent);
                                CAPTURE(min_context);
                                check_same_plan(got, want);
                            }
                            // Invariants of the spec's loop: C_l never grows, and never goes
                            // below min(min_context, P - W).
                            for (size_t il = 0; il < want.context.size(); ++il) {
                                const int32_t c0 = n_prompt - want.window;
                                REQUIRE(want.context[il] >= std::min(min_context, c0));
                                if (il > 0) REQUIRE(want.context[il] <= want.context[il - 1]);
                            }
                        }
    CHECK_MESSAGE(n_bad == 0, n_bad << " of " << n_cases << " plans differ");
}

TEST_CASE("pyramid plan: generation ratio g_l") {
    for (int n_layer : kLayers)
        for (int il = 0; il < n_layer; ++il)
            CHECK(std::fabs(pyr::pyramid_generation_ratio(il, n_layer) -
                            pyr_ref::generation_ratio(il, n_layer)) <= 1e-15);
    CHECK(pyr_ref::generation_ratio(0, 4) == doctest::Approx(1.0));
    // k = max(floor(E * 0.9 * g_l), 1): E 16 at layer 0 keeps floor(14.4) = 14; the last of
    // 4 layers has g = 0.9*(1-0.7071)/2+0.1 = 0.2318 -> floor(3.34) = 3; E 2 there keeps 1.
    CHECK(pyr_ref::generation_keep(16, 0, 4) == 14);
    CHECK(pyr_ref::generation_keep(16, 3, 4) == 3);
    CHECK(pyr_ref::generation_keep(2, 3, 4) == 1);
}

TEST_CASE("pyramid plan: the budget solver") {
    int n_cases = 0, n_bad = 0, n_unreachable = 0;
    std::map<double, int> bad_by_target;
    for (int32_t n_prompt : kPrompts)
        for (int n_layer : kLayers)
            for (int32_t min_context : {0, 64, 1000})
                for (int it = 2; it <= 20; ++it) {
                    const double target = 0.05 * it;  // 0.1 .. 1.0
                    pyr_ref::Knobs start;
                    start.min_context = min_context;
                    const pyr_ref::Plan want = pyr_ref::solve_plan(target, n_prompt, n_layer, start);
                    const pyr::PyramidPlan got =
                        pyr::solve_pyramid_plan(target, n_prompt, n_layer, engine_knobs(start));
                    CAPTURE(n_prompt);
                    CAPTURE(n_layer);
                    CAPTURE(min_context);
                    CAPTURE(target);
                    ++n_cases;
                    // The reference's own contract: <= target, or stage 3 ran out at 0.01.
                    if (want.retention > target) {
                        ++n_unreachable;
                        REQUIRE(want.knobs.recent_ratio == 0.01);
                        REQUIRE(want.knobs.rho == 0.0);
                        REQUIRE(want.knobs.gamma == 8.0);
                    }
                    const bool same = std::fabs(got.knobs.rho - want.knobs.rho) <= 1e-9 &&
                                      std::fabs(got.knobs.gamma - want.knobs.gamma) <= 1e-9 &&
                                      std::fabs(got.knobs.recent_ratio - want.knobs.recent_ratio) <= 1e-9 &&
                                      got.knobs.min_context == min_context &&
                                      got.window == want.window && got.context == want.context;
                    if (!same) ++bad_by_target[0.05 * it];
                    if (!same && ++n_bad <= 10) {
                        CHECK(got.knobs.rho == doctest::Approx(want.knobs.rho).epsilon(1e-9));
                        CHECK(got.knobs.gamma == doctest::Approx(want.knobs.gamma).epsilon(1e-9));
                        CHECK(got.knobs.recent_ratio ==
                              doctest::Approx(want.knobs.recent_ratio).epsilon(1e-9));
                        check_same_plan(got, want);
                    }
                    if (want.retention <= target) CHECK(got.retention <= target);
                }
    MESSAGE(n_cases << " solves, " << n_unreachable << " targets below what recent_ratio 0.01 reaches");
    std::ostringstream by_target;
    for (const auto& [target, n] : bad_by_target) by_target << " " << n << " at " << target << ";";
    CHECK_MESSAGE(n_bad == 0, n_bad << " of " << n_cases << " solved plans differ:" << by_target.str());
}

TEST_CASE("pyramid plan: solver stages and the exact ends") {
    // Target 1: rho = 1 keeps everything, so the largest rho is 1 itself (a bisection that
    // never tries the end would stop at 1 - 2^-40 and drop a token per layer).
    const pyr_ref::Plan full = pyr_ref::solve_plan(1.0, 300, 10, {});
    CHECK(full.knobs.rho == 1.0);
    CHECK(full.retention == 1.0);
    const pyr::PyramidPlan got = pyr::solve_pyramid_plan(1.0, 300, 10, {});
    CHECK(got.retention == 1.0);
    CHECK(got.context == std::vector<int32_t>(10, 300 - 61));
    // Stage 1 (rho), 2 (gamma), 3 (recent_ratio) at P = 1024, 10 layers.
    const pyr_ref::Plan s1 = pyr_ref::solve_plan(0.7, 1024, 10, {});
    CHECK(s1.knobs.gamma == 1.0);
    CHECK(s1.knobs.rho > 0.0);
    const pyr_ref::Plan s2 = pyr_ref::solve_plan(0.5, 1024, 10, {});
    CHECK(s2.knobs.rho == 0.0);
    CHECK(s2.knobs.gamma > 1.0);
    const pyr_ref::Plan s3 = pyr_ref::solve_plan(0.3, 1024, 10, {});
    CHECK(s3.knobs.gamma == 8.0);
    CHECK(s3.knobs.recent_ratio < 0.2);
    CHECK(s1.retention <= 0.7);
    CHECK(s2.retention <= 0.5);
    CHECK(s3.retention <= 0.3);
}

TEST_CASE("pyramid plan: a float knob is the decimal it was written as") {
    for (double d : {0.7, 0.9, 0.2, 0.3, 0.45, 0.001, 0.123456, 1.0, 0.5, 0.0})
        CHECK(pyr::as_written(float(d)) == d);
    CHECK(pyr::as_written(0.1f + 0.2f) == 0.3);  // float arithmetic's last-bit noise, too
}
