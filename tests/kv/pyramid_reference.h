// PyramidInfer, the slow and obvious way (DESIGN.md section 5, "Selection" and "Generation"):
// a double-precision forward that builds each layer's full attention probabilities, scores
// and keeps tokens exactly as the spec words it. Written from the spec alone, to be held
// against the engine (tests/kv/test_pyramid_engine.cpp). Quoted lines are the spec's.
//
//   PyramidReference ref(model, config);
//   Vec logits = ref.prefill(prompt);           // the first prefill, compressed per layer
//   logits = ref.step(token);                   // one generated token, then compression
//   ref.layers[il].pos                          // kept original positions, ascending
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "pyramid_ref_model.h"
#include "pyramid_ref_plan.h"

namespace pyr_ref {

struct RefConfig {
    Plan plan;                  // C_l and W
    int32_t sinks = 4;
    int32_t gen_e = 16;         // E; 0 = no generation-phase compression
    bool prefill_shrink = true;
};

// One keep decision: which layer, the step (-1 = prefill) and the relative score gap at the
// boundary between the last kept and the first dropped candidate (inf: nothing was dropped,
// or the boundary was at a sink).
struct Decision {
    int il = 0;
    int32_t step = -1;
    double rel_gap = INFINITY;
};

// The `keep` best of `scores`, in original (ascending) order. "higher score first, then the
// earlier token". Sets `rel_gap` to the gap at the boundary.
inline std::vector<int32_t> keep_top(const Vec& scores, int32_t keep, double& rel_gap) {
    std::vector<int32_t> order(scores.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return scores[size_t(a)] > scores[size_t(b)]; });
    rel_gap = INFINITY;
    if (keep < int32_t(order.size()) && keep > 0) {
        const double a = scores[size_t(order[size_t(keep - 1)])];
        const double b = scores[size_t(order[size_t(keep)])];
        const double scale = std::max(std::fabs(a), std::fabs(b));
        if (std::isfinite(a)) rel_gap = scale > 0.0 ? (a - b) / scale : 0.0;
    }
    order.resize(size_t(std::min<int32_t>(keep, int32_t(order.size()))));
    std::sort(order.begin(), order.end());
    return order;
}

// "s_j = (1/W) * sum_i w_i * Abar[i, j], w_i = 1 + 0.2 * i / (W - 1) (linspace 1.0 -> 1.2,
// oldest row first)", for the keys j in [first, first + n).
inline Vec weighted_scores(const std::vector<Vec>& rows, size_t first, size_t n) {
    const size_t w = rows.size();
    Vec s(n, 0.0);
    for (size_t i = 0; i < w; ++i) {
        const double wi = w == 1 ? 1.0 : 1.0 + 0.2 * double(i) / double(w - 1);
        for (size_t j = 0; j < n; ++j) s[j] += wi * rows[i][first + j];
    }
    for (double& v : s) v /= double(w);
    return s;
}

// One layer's cache: [compressed | pending | last W], keys after RoPE at original positions.
struct LayerCache {
    std::vector<int32_t> pos;  // original positions, ascending
    std::vector<Vec> k, v;     // (len, n_head_kv * head_dim)
    std::vector<Vec> rows;     // (W, len): head-averaged attention of the last W queries
    int32_t n_compressed = 0;

    int32_t len() const { return int32_t(pos.size()); }
    // Keeps the slots `keep` (ascending): keys, values, positions and the rows' columns.
    void retain(const std::vector<int32_t>& keep) {
        auto pick = [&](auto& xs) {
            std::remove_reference_t<decltype(xs)> out;
            for (int32_t s : keep) out.push_back(xs[size_t(s)]);
            xs = std::move(out);
        };
        pick(pos), pick(k), pick(v);
        for (Vec& row : rows) pick(row);
    }
};

class PyramidReference {
public:
    PyramidReference(const RefModel& model, const RefConfig& config)
        : layers(size_t(model.cfg.n_layer)), m_(model), cfg_(config) {}

    std::vector<LayerCache> layers;
    std::vector<std::vector<int32_t>> prefill_positions;  // per layer, right after prefill
    std::vector<Decision> decisions;                      // every keep decision so far
    int32_t n_processed = 0;

    // ---- prefill: "Selection at layer l" ----------------------------------------------
    Vec prefill(const std::vector<int32_t>& prompt) {
        const int32_t n_prompt = int32_t(prompt.size());
        const int32_t w = cfg_.plan.window;
        REQUIRE(cfg_.plan.n_prompt == n_prompt);
        std::vector<int32_t> pos(prompt.size());  // the tokens entering the layer
        std::iota(pos.begin(), pos.end(), 0);
        std::vector<Vec> x;
        for (int32_t t : prompt) x.push_back(embed(m_, t));
        for (int il = 0; il < m_.cfg.n_layer; ++il) {
            // "Compute layer l over the tokens that entered it (n of them: ctx context
            // tokens followed by the W recent ones)", each at its original position.
            const size_t n = pos.size();
            const int32_t ctx = int32_t(n) - w;
            std::vector<Vec> q, k, v;
            for (size_t t = 0; t < n; ++t) {
                Qkv r = project_qkv(m_, il, x[t], pos[t]);
                q.push_back(std::move(r.q)), k.push_back(std::move(r.k)), v.push_back(std::move(r.v));
            }
            // The full causal attention; "the softmax attention probabilities of the last W
            // queries (each over all keys present, causal), average over query heads": Abar.
            std::vector<Vec> out(n), abar;
            for (size_t t = 0; t < n; ++t) {
                Vec probs;
                out[t] = finish_block(m_, il, x[t], attend(m_, q[t], k, v, t + 1, probs));
                if (t >= n - size_t(w)) abar.push_back(std::move(probs));
            }
            // "score each context key j < ctx"; "The first min(sinks, ctx) tokens get
            // +infinity. Keep the top C_l context tokens (if C_l < ctx), in original order,
            // plus the W recent ones."
            Vec s = weighted_scores(abar, 0, size_t(ctx));
            for (int32_t j = 0; j < std::min(cfg_.sinks, ctx); ++j) s[size_t(j)] = INFINITY;
            Decision d{il, -1, INFINITY};
            std::vector<int32_t> keep = keep_top(s, std::min(cfg_.plan.context[size_t(il)], ctx), d.rel_gap);
            decisions.push_back(d);
            const int32_t n_context_kept = int32_t(keep.size());
            for (int32_t j = ctx; j < int32_t(n); ++j) keep.push_back(j);
            // "Layer l's cache holds only the kept tokens' keys and values"; its rows are the
            // last W queries' rows restricted to the kept keys (not renormalised).
            LayerCache& c = layers[size_t(il)];
            c.pos = pos, c.k = std::move(k), c.v = std::move(v), c.rows = std::move(abar);
            c.retain(keep);
            c.n_compressed = n_context_kept;
            prefill_positions.push_back(c.pos);
            // "With prefill_shrink on, only the kept tokens' hidden states and positions go
            // on to layer l+1"; off: "every layer computes on all P tokens".
            if (cfg_.prefill_shrink) {
                std::vector<Vec> x_next;
                for (int32_t j : keep) x_next.push_back(std::move(out[size_t(j)]));
                x = std::move(x_next);
                pos = c.pos;
            } else {
                x = std::move(out);
            }
        }
        n_processed = n_prompt;
        after_step(-1);
        return final_logits(m_, x.back());
    }

    // ---- generation: "New tokens take their true positions" ------------------------------
    Vec step(int32_t token) {
        const int32_t p = n_processed;
        Vec x = embed(m_, token);
        for (int il = 0; il < m_.cfg.n_layer; ++il) {
            LayerCache& c = layers[size_t(il)];
            Qkv r = project_qkv(m_, il, x, p);
            c.pos.push_back(p), c.k.push_back(std::move(r.k)), c.v.push_back(std::move(r.v));
            Vec probs;
            const Vec attn = attend(m_, r.q, c.k, c.v, c.k.size(), probs);
            x = finish_block(m_, il, x, attn);
            // "Each layer keeps the head-averaged attention rows of its last W queries (a new
            // key's column is 0 in older rows)."
            for (Vec& row : c.rows) row.push_back(0.0);
            c.rows.push_back(std::move(probs));
            if (int32_t(c.rows.size()) > cfg_.plan.window) c.rows.erase(c.rows.begin());
        }
        ++n_processed;
        after_step(p - cfg_.plan.n_prompt);
        return final_logits(m_, x);
    }

private:
    // "After a step, pending = len - W - n_compressed; when pending >= E, score the first E
    // pending tokens with the same weighted mean over the W rows, keep
    // k = max(floor(E * 0.9 * g_l), 1) of them in order, and add k to n_compressed.
    // Each layer compares against its own cache length."
    void after_step(int32_t step) {
        const int32_t e = cfg_.gen_e, w = cfg_.plan.window;
        if (e <= 0) return;
        for (int il = 0; il < m_.cfg.n_layer; ++il) {
            LayerCache& c = layers[size_t(il)];
            while (c.len() - w - c.n_compressed >= e) {
                const Vec s = weighted_scores(c.rows, size_t(c.n_compressed), size_t(e));
                Decision d{il, step, INFINITY};
                const std::vector<int32_t> best =
                    keep_top(s, generation_keep(e, il, m_.cfg.n_layer), d.rel_gap);
                decisions.push_back(d);
                std::vector<int32_t> keep(size_t(c.n_compressed));
                std::iota(keep.begin(), keep.end(), 0);
                for (int32_t j : best) keep.push_back(c.n_compressed + j);
                for (int32_t j = c.n_compressed + e; j < c.len(); ++j) keep.push_back(j);
                c.retain(keep);
                c.n_compressed += int32_t(best.size());
            }
        }
    }

    const RefModel& m_;
    RefConfig cfg_;
};

}  // namespace pyr_ref
