#include "kv/window_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/error.h"

namespace pyr {

WindowPolicy::WindowPolicy(const KvParams& params, int n_layer)
    : params_(params), n_layer_(n_layer), shrink_start_(std::max(params.shrink_start, 0)),
      layers_(size_t(n_layer)), staged_(size_t(n_layer)),
      staged_width_(size_t(n_layer), 0) {}

void WindowPolicy::begin_step(int32_t n_tokens, bool first_prefill) {
    first_prefill_ = first_prefill;
    step_tokens_ = n_tokens;
    for (auto& s : staged_) s.clear();
    if (!first_prefill) return;
    plan(n_tokens);
    planned_ = true;
    for (auto& layer : layers_) layer = Layer{RecentRows(score_rows()), 0};
}

ObservationRequest WindowPolicy::observe(int) const {
    ObservationRequest req;
    if (planned_) req.last_rows = std::min(step_tokens_, score_rows());
    return req;
}

std::optional<std::vector<int32_t>> WindowPolicy::on_layer(int il, const Observation& obs,
                                                           const KvCache& cache) {
    PYR_ASSERT(obs.n_keys == cache.size(il));
    if (!first_prefill_) {  // generation: remember the rows' window columns; after_step decides
        const int32_t first = std::min(layers_[size_t(il)].n_compressed, obs.n_keys);
        std::vector<float>& staged = staged_[size_t(il)];
        staged.clear();
        for (int32_t i = 0; i < obs.n_rows; ++i) {
            const float* r = obs.rows + int64_t(i) * obs.n_keys;
            staged.insert(staged.end(), r + first, r + obs.n_keys);
        }
        staged_width_[size_t(il)] = obs.n_keys - first;
        return std::nullopt;
    }
    std::vector<int32_t> keep = select_prefill(il, obs);
    Layer& layer = layers_[size_t(il)];
    // Everything before the recent window is final now; the window's r slots are the last
    // r kept ones, so generation scores them (and later keys) with the rows from here on.
    const int32_t n = obs.n_keys, r = std::min(recent(il), n);
    layer.rows.push(obs.rows, obs.n_rows, n, n - r);
    layer.n_compressed = int32_t(keep.size()) - r;
    if (int32_t(keep.size()) == n) return std::nullopt;
    return keep;
}

// The first prefill at layer il: the n tokens that entered the layer are `ctx` older ones
// followed by the recent window; keep the best-scored older ones (sinks first) and the window.
std::vector<int32_t> WindowPolicy::select_prefill(int il, const Observation& obs) {
    const int32_t n = obs.n_keys, r = std::min(recent(il), n), ctx = n - r;
    const int32_t keep_ctx = std::clamp(keep_context(il, ctx), 0, ctx);
    std::vector<int32_t> keep;
    if (keep_ctx < ctx) {
        const int32_t rows = std::min(obs.n_rows, score_rows());
        const float* first_row = obs.rows + int64_t(obs.n_rows - rows) * n;
        std::vector<double> s =
            max_pool(window_scores(first_row, rows, n, 0, ctx, weighted_), pool_);
        for (int32_t j = 0; j < std::min(sinks_, ctx); ++j)
            s[size_t(j)] = std::numeric_limits<double>::infinity();
        keep = top_k_in_order(s, keep_ctx);
    } else {
        for (int32_t j = 0; j < ctx; ++j) keep.push_back(j);
    }
    for (int32_t j = ctx; j < n; ++j) keep.push_back(j);
    return keep;
}

void WindowPolicy::after_step(KvCache& cache) {
    if (!planned_) return;
    // Every layer's rows first, then the compressions: one that fails (a retain out of device
    // memory) leaves every layer's rows and counts matching its cache, and a later step
    // compresses what this one could not.
    for (int il = 0; il < n_layer_; ++il) {
        auto& staged = staged_[size_t(il)];
        if (staged.empty()) continue;
        const int32_t width = staged_width_[size_t(il)];  // columns from n_compressed on
        layers_[size_t(il)].rows.push(staged.data(), int32_t(staged.size() / size_t(width)),
                                      width, 0);
        staged.clear();
    }
    first_prefill_ = false;
    for (int il = 0; il < n_layer_; ++il) compress_blocks(il, cache);
}

// Generation: cache = [compressed | pending | recent]; every E pending tokens, keep the
// block_keep best of the oldest E (scored by the recent rows) and count them compressed.
// The rows' window starts at the first pending slot (n_compressed).
void WindowPolicy::compress_blocks(int il, KvCache& cache) {
    const int32_t e = gen_e();
    Layer& layer = layers_[size_t(il)];
    while (e > 0) {
        const int32_t len = cache.size(il);
        const int32_t pending = len - std::min(recent(il), len) - layer.n_compressed;
        if (pending < e) break;
        const int32_t first = layer.n_compressed;
        std::vector<double> s = max_pool(layer.rows.scores(0, e, weighted_), pool_);
        const int32_t k = std::clamp(block_keep(il), 1, e);
        std::vector<int32_t> keep;
        keep.reserve(size_t(len - e + k));
        for (int32_t j = 0; j < first; ++j) keep.push_back(j);
        for (int32_t j : top_k_in_order(s, k)) keep.push_back(first + j);
        for (int32_t j = first + e; j < len; ++j) keep.push_back(j);
        cache.retain(il, keep);
        layer.rows.drop_front(e);  // the block's kept slots are final, the rest are gone
        layer.n_compressed += k;
    }
}

void WindowPolicy::abort_step() {
    for (auto& s : staged_) s.clear();
    if (first_prefill_) planned_ = false;  // the cache is emptied again: start over
    first_prefill_ = false;
}

double WindowPolicy::param(const std::string& name) const {
    if (name == "retention") return as_written(params_.retention);
    if (name == "gen_e") return gen_e();
    if (name == "prefill_shrink") return shrink_ ? 1 : 0;
    if (name == "shrink_start") return shrink_start_;
    if (name == "pool") return pool_;
    if (name == "sinks") return sinks_;
    if (name == "obs_window" && planned_) return score_rows();
    return KvPolicy::param(name);
}

}  // namespace pyr
