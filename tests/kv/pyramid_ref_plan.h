// The slow, obvious PyramidInfer plan and budget solver of DESIGN.md section 5, written from
// the spec text alone (not from lib/kv/) so that the tests can hold the engine against it.
// Quoted lines are the spec's wording.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace pyr_ref {

constexpr double kPi = 3.14159265358979323846;

struct Knobs {
    double rho = 0.9;
    double gamma = 1.0;
    double recent_ratio = 0.2;
    int32_t min_context = 64;
};

struct Plan {
    Knobs knobs;
    int32_t n_prompt = 0;          // P
    int32_t window = 0;            // W
    std::vector<int32_t> context;  // C_l
    double retention = 1.0;
};

// "r_l = ((1 - rho) * (cos(pi * l / L) + 1) / 2 + rho) ^ gamma"
inline double layer_ratio(const Knobs& k, int il, int n_layer) {
    return std::pow((1.0 - k.rho) * (std::cos(kPi * il / n_layer) + 1.0) / 2.0 + k.rho, k.gamma);
}

// "g_l = 0.9 * (cos(pi * l / L) + 1) / 2 + 0.1"
inline double generation_ratio(int il, int n_layer) {
    return 0.9 * (std::cos(kPi * il / n_layer) + 1.0) / 2.0 + 0.1;
}

// "keep k = max(floor(E * 0.9 * g_l), 1)"
inline int32_t generation_keep(int32_t gen_e, int il, int n_layer) {
    return std::max(int32_t(std::floor(gen_e * 0.9 * generation_ratio(il, n_layer))), 1);
}

inline Plan make_plan(int32_t n_prompt, int n_layer, const Knobs& k) {
    Plan p;
    p.knobs = k;
    p.n_prompt = n_prompt;
    // "W = floor(recent_ratio * P) + 1 (the last W prompt tokens)": there are only P of them.
    p.window = std::min(int32_t(std::floor(k.recent_ratio * n_prompt)) + 1, n_prompt);
    // "Context C = P - W. For each layer in order:"
    int32_t c = n_prompt - p.window;
    for (int il = 0; il < n_layer; ++il) {
        const double r = layer_ratio(k, il, n_layer);
        const int32_t nc = int32_t(std::floor(c * r));
        // "if r_l < 1 and nc < C: if nc > min(min_context, C) then C = nc,
        //  else if C > min_context then C = min_context"
        if (r < 1.0 && nc < c) {
            if (nc > std::min(k.min_context, c))
                c = nc;
            else if (c > k.min_context)
                c = k.min_context;
        }
        p.context.push_back(c);  // "C_l = C"
    }
    // "Planned mean retention = sum_l (C_l + W) / (L * P)"
    int64_t kept = 0;
    for (int32_t c_l : p.context) kept += c_l + p.window;
    p.retention = double(kept) / (double(n_layer) * double(n_prompt));
    return p;
}

// Bisection for the largest x in [lo, hi] with ok(x), 40 steps; hi itself when ok(hi) (the
// largest is then exact), lo when nothing is ok.
inline double largest_ok(double lo, double hi, const std::function<bool(double)>& ok) {
    if (ok(hi)) return hi;
    for (int i = 0; i < 40; ++i) {
        const double mid = (lo + hi) / 2.0;
        (ok(mid) ? lo : hi) = mid;
    }
    return lo;
}

// The smallest x in [lo, hi] with ok(x), ok(hi) known; lo when ok(lo).
inline double smallest_ok(double lo, double hi, const std::function<bool(double)>& ok) {
    if (ok(lo)) return lo;
    for (int i = 0; i < 40; ++i) {
        const double mid = (lo + hi) / 2.0;
        (ok(mid) ? hi : lo) = mid;
    }
    return hi;
}

// "Budget knob. kv_retention = t solves the plan". min_context and, for the first two stages,
// recent_ratio come from `start`.
inline Plan solve_plan(double target, int32_t n_prompt, int n_layer, const Knobs& start) {
    Knobs k = start;
    auto reaches = [&](const Knobs& q) {
        return make_plan(n_prompt, n_layer, q).retention <= target;
    };
    // "if rho = 0 (gamma 1) reaches t, bisect rho in [0, 1] for the largest rho whose
    //  planned retention is <= t"
    k.rho = 0.0, k.gamma = 1.0;
    if (reaches(k)) {
        k.rho = largest_ok(0.0, 1.0, [&](double x) { Knobs q = k; q.rho = x; return reaches(q); });
        return make_plan(n_prompt, n_layer, k);
    }
    // "else if gamma = 8 reaches it, bisect gamma in [1, 8] for the smallest such gamma"
    k.gamma = 8.0;
    if (reaches(k)) {
        k.gamma = smallest_ok(1.0, 8.0, [&](double x) { Knobs q = k; q.gamma = x; return reaches(q); });
        return make_plan(n_prompt, n_layer, k);
    }
    // "else, with rho 0 and gamma 8, bisect recent_ratio in [0.01, 0.2] for the largest that
    //  reaches t" (0.01, the closest, when none does)
    k.recent_ratio = largest_ok(0.01, 0.2, [&](double x) {
        Knobs q = k;
        q.recent_ratio = x;
        return reaches(q);
    });
    return make_plan(n_prompt, n_layer, k);
}

}  // namespace pyr_ref
