// PyramidInfer's per-layer plan (DESIGN.md section 5): how many context tokens each layer
// keeps besides the recent window, and the budget solver that turns a target retention
// into knobs. Depends only on the prompt length, the layer count and the knobs.
#pragma once

#include <cstdint>
#include <vector>

namespace pyr {

struct PyramidKnobs {
    double rho = 0.9;
    double gamma = 1.0;
    double recent_ratio = 0.2;
    int32_t min_context = 64;
};

struct PyramidPlan {
    PyramidKnobs knobs;            // as used (solved when a retention was asked for)
    int32_t n_prompt = 0;          // P
    int32_t window = 0;            // W = floor(recent_ratio * P) + 1, capped at P
    std::vector<int32_t> context;  // C_l per layer: context tokens kept besides the W recent
    double retention = 1.0;        // sum_l (C_l + W) / (L * P)
};

// The plan for a prompt of n_prompt tokens over n_layer layers.
PyramidPlan make_pyramid_plan(int32_t n_prompt, int n_layer, const PyramidKnobs& knobs);

// Solves the knobs for a planned retention <= target, as section 5 says: the largest rho in
// [0, 1] if rho = 0 (gamma 1) reaches it; else the smallest gamma in [1, 8] (rho 0); else the
// largest recent_ratio in [0.01, 0.2] (rho 0, gamma 8); 40 bisection steps each. When even
// that cannot reach the target, returns the plan with recent_ratio 0.01 (the closest).
// min_context is kept from `start`.
PyramidPlan solve_pyramid_plan(double target, int32_t n_prompt, int n_layer,
                               const PyramidKnobs& start);

// The generation-phase keep ratio of layer il: g_l = 0.9 * (cos(pi * il / L) + 1) / 2 + 0.1.
double pyramid_generation_ratio(int il, int n_layer);

}  // namespace pyr
