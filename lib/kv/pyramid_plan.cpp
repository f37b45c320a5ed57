#include "kv/pyramid_plan.h"

#include <algorithm>
#include <cmath>

namespace pyr {

namespace {
constexpr double kPi = 3.14159265358979323846;
constexpr int kBisectionSteps = 40;
}  // namespace

PyramidPlan make_pyramid_plan(int32_t n_prompt, int n_layer, const PyramidKnobs& knobs) {
    PyramidPlan plan;
    plan.knobs = knobs;
    plan.n_prompt = n_prompt;
    plan.window = std::min(int32_t(std::floor(knobs.recent_ratio * n_prompt)) + 1, n_prompt);
    int32_t c = n_prompt - plan.window;
    const int32_t min_ctx = knobs.min_context;
    for (int il = 0; il < n_layer; ++il) {
        const double curve = (std::cos(kPi * il / n_layer) + 1.0) / 2.0;
        const double r = std::pow((1.0 - knobs.rho) * curve + knobs.rho, knobs.gamma);
        const int32_t nc = int32_t(std::floor(c * r));
        if (r < 1.0 && nc < c) {
            if (nc > std::min(min_ctx, c))
                c = nc;
            else if (c > min_ctx)
                c = min_ctx;  // clamp (the reference code skips the step instead)
        }
        plan.context.push_back(c);
    }
    int64_t kept = 0;
    for (int32_t cl : plan.context) kept += cl + plan.window;
    plan.retention = n_prompt > 0 && n_layer > 0 ? double(kept) / (double(n_layer) * n_prompt) : 1.0;
    return plan;
}

PyramidPlan solve_pyramid_plan(double target, int32_t n_prompt, int n_layer,
                               const PyramidKnobs& start) {
    PyramidKnobs k = start;
    auto plan_with = [&](double rho, double gamma, double recent) {
        k.rho = rho;
        k.gamma = gamma;
        k.recent_ratio = recent;
        return make_pyramid_plan(n_prompt, n_layer, k);
    };
    auto reaches = [&](const PyramidPlan& p) { return p.retention <= target; };

    // Each search tests its far end first: bisection alone never returns the end itself,
    // and at a target of 1 the answer is rho = 1 exactly (keep everything).
    if (reaches(plan_with(0.0, 1.0, start.recent_ratio))) {  // largest rho in [0, 1]
        if (reaches(plan_with(1.0, 1.0, start.recent_ratio))) return plan_with(1.0, 1.0, start.recent_ratio);
        double lo = 0.0, hi = 1.0;
        for (int i = 0; i < kBisectionSteps; ++i) {
            double mid = (lo + hi) / 2;
            (reaches(plan_with(mid, 1.0, start.recent_ratio)) ? lo : hi) = mid;
        }
        return plan_with(lo, 1.0, start.recent_ratio);
    }
    if (reaches(plan_with(0.0, 8.0, start.recent_ratio))) {  // smallest gamma in [1, 8]
        double lo = 1.0, hi = 8.0;
        for (int i = 0; i < kBisectionSteps; ++i) {
            double mid = (lo + hi) / 2;
            (reaches(plan_with(0.0, mid, start.recent_ratio)) ? hi : lo) = mid;
        }
        return plan_with(0.0, hi, start.recent_ratio);
    }
    if (reaches(plan_with(0.0, 8.0, 0.2))) return plan_with(0.0, 8.0, 0.2);
    double lo = 0.01, hi = 0.2;  // largest recent_ratio in [0.01, 0.2]
    for (int i = 0; i < kBisectionSteps; ++i) {
        double mid = (lo + hi) / 2;
        (reaches(plan_with(0.0, 8.0, mid)) ? lo : hi) = mid;
    }
    return plan_with(0.0, 8.0, lo);
}

double pyramid_generation_ratio(int il, int n_layer) {
    return 0.9 * (std::cos(kPi * il / n_layer) + 1.0) / 2.0 + 0.1;
}

}  // namespace pyr
