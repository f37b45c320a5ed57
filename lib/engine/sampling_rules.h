// The sampling rules shared by the CPU sampler (sampler.cpp) and the GPU sampling kernel
// (kernels/sampling.cu), written once so that both pick the same token. Plain C++ on raw
// arrays (no std:: containers): nvcc compiles it for the device too.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYR_HD __host__ __device__
#else
#define PYR_HD
#endif

namespace pyr {

// Given the m best candidates best first (ids[0, m), all of them if `complete`) and their
// probabilities (softmax over the whole candidate set: the k best with top-k, else the
// vocabulary), applies min-p and top-p and draws with r = u (scaled by the kept mass),
// walking best first. Returns the token, or -1 when the answer depends on candidates past
// the prefix (a prefix of a longer best-first list then gives either -1 or that list's token).
PYR_HD inline int32_t draw_from_prefix(const double* probs, const int32_t* ids, int32_t m,
                                       bool complete, double u, float top_p, float min_p) {
    if (m <= 0) return -1;
    int32_t n = m;
    bool cut = false;
    // min-p: drop tokens below min_p times the most likely one (always keeps the first).
    if (min_p > 0.0f) {
        const double floor_p = double(min_p) * probs[0];
        int32_t keep = 1;
        while (keep < m && probs[keep] >= floor_p) ++keep;
        if (keep < m) n = keep, cut = true;
    }
    // top-p: the smallest prefix whose mass reaches top_p.
    if (top_p < 1.0f) {
        double mass = 0.0;
        int32_t i = 0;
        while (i < n) {
            mass += probs[i++];
            if (mass >= double(top_p)) break;
        }
        if (mass >= double(top_p)) n = i, cut = true;
    }
    const bool filters = min_p > 0.0f || top_p < 1.0f;
    if (!cut && !complete && filters) return -1;  // a filter may cut further on
    // Nothing cut: every candidate stays, and their probabilities sum to 1.
    double total = 1.0;
    if (cut) {
        total = 0.0;
        for (int32_t i = 0; i < n; ++i) total += probs[i];
    }
    double r = u * total;
    for (int32_t i = 0; i < n; ++i) {
        r -= probs[i];
        if (r < 0.0) return ids[i];
    }
    if (cut || complete) return ids[n - 1];
    return -1;  // the draw lies past the prefix
}

}  // namespace pyr
