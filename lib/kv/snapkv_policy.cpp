// SnapKV and PyramidKV: keys scored by the attention of the last obs_window queries (32),
// max-pooled (kernel 7) so that neighbourhoods survive; SnapKV gives every layer the same
// budget, PyramidKV a budget linear over layers from 1.5x to 0.5x the mean. Both compute the
// full prefill and prune per layer (prefill_shrink off) unless asked to shrink. In generation
// they compress each block of E tokens to the same ratio, so the retention holds.
//
// snapshrink (ours; docs/quality.md has the measurements): SnapKV's budget and scoring, but
// (a) the prefill shrinks, from a middle layer on (shrink_start, default 2/5 of the layers):
// a token dropped by the shallow layers' mostly local attention would be lost for the deeper
// layers where retrieval attention forms, so the shallow layers prune only their caches; and
// (b) PyramidInfer's recent window W = floor(recent_ratio * P) + 1 stays uncompressed, which
// keeps the local context that perplexity depends on, while the last 32 queries still score.
#include <algorithm>
#include <cmath>

#include "kv/policies.h"
#include "kv/window_policy.h"

namespace pyr {

namespace {

class SnapKvPolicy final : public WindowPolicy {
public:
    enum class Kind { SnapKv, PyramidKv, SnapShrink };

    SnapKvPolicy(const KvParams& p, int n_layer, Kind kind) : WindowPolicy(p, n_layer), kind_(kind) {
        shrink_ = kind == Kind::SnapShrink ? p.prefill_shrink != 0 : p.prefill_shrink == 1;
        if (kind == Kind::SnapShrink && p.shrink_start < 0) shrink_start_ = 2 * n_layer / 5;
        pool_ = p.pool >= 0 ? std::max(p.pool, 1) : 7;
        window_ = p.obs_window > 0 ? p.obs_window : 32;
        recent_ratio_ = as_written(p.recent_ratio);
    }
    const char* name() const override {
        return kind_ == Kind::PyramidKv ? "pyramidkv" : kind_ == Kind::SnapKv ? "snapkv" : "snapshrink";
    }

    double param(const std::string& name) const override {
        if (name == "retention") return params_.peer_retention();
        if (planned_ && name == "budget") return budget_;
        if (planned_ && name == "window") return recent(0);
        if (kind_ == Kind::SnapShrink && name == "recent_ratio") return recent_ratio_;
        return WindowPolicy::param(name);
    }

protected:
    void plan(int32_t n_prompt) override {
        n_prompt_ = n_prompt;
        budget_ = peer_budget(params_, n_prompt, 1);
    }
    int32_t recent(int il) const override {
        int32_t r = window_;
        if (kind_ == Kind::SnapShrink)
            r = std::max(r, int32_t(std::floor(recent_ratio_ * n_prompt_)) + 1);
        return std::min(r, layer_budget(il));
    }
    int32_t score_rows() const override { return window_; }
    int32_t keep_context(int il, int32_t) const override {
        return layer_budget(il) - recent(il);
    }
    int32_t block_keep(int il) const override {
        double ratio = n_prompt_ > 0 ? double(layer_budget(il)) / n_prompt_ : 1.0;
        return std::max(int32_t(std::lround(gen_e() * ratio)), 1);
    }

private:
    // PyramidKV: linear from 1.5x the mean budget at layer 0 to 0.5x at the last, the ends
    // drawn in to P and 2 x mean - P when 1.5x would pass the prompt (above retention 2/3), so
    // the layers keep what the other peers keep in total, and all of it at retention 1.
    int32_t layer_budget(int il) const {
        if (kind_ != Kind::PyramidKv || n_layer_ == 1) return budget_;
        const double half_span = std::min(0.5 * budget_, double(n_prompt_ - budget_));
        const double b = budget_ + half_span * (1.0 - 2.0 * il / (n_layer_ - 1));
        return std::clamp(int32_t(std::lround(b)), 1, n_prompt_);
    }

    Kind kind_;
    int32_t window_ = 32;
    double recent_ratio_ = 0.2;  // snapshrink's W = floor(ratio * P) + 1
    int32_t n_prompt_ = 0;
    int32_t budget_ = 0;
};

}  // namespace

std::unique_ptr<KvPolicy> make_snapkv_policy(const KvParams& params, int n_layer) {
    return std::make_unique<SnapKvPolicy>(params, n_layer, SnapKvPolicy::Kind::SnapKv);
}

std::unique_ptr<KvPolicy> make_pyramidkv_policy(const KvParams& params, int n_layer) {
    return std::make_unique<SnapKvPolicy>(params, n_layer, SnapKvPolicy::Kind::PyramidKv);
}

std::unique_ptr<KvPolicy> make_snapshrink_policy(const KvParams& params, int n_layer) {
    return std::make_unique<SnapKvPolicy>(params, n_layer, SnapKvPolicy::Kind::SnapShrink);
}

int32_t peer_budget(const KvParams& params, int32_t n_prompt, int32_t floor) {
    const double t = params.peer_retention();
    return std::clamp(int32_t(std::lround(t * n_prompt)), std::min(floor, n_prompt), n_prompt);
}

}  // namespace pyr
