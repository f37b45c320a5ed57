// H2O (heavy-hitter oracle): every key accumulates the attention it receives from every
// query (averaged over heads); a layer keeps the recent half of its budget and the heaviest
// hitters among the older tokens, with a fixed budget per layer (round(retention * P)) in
// prefill and generation.
#include <algorithm>

#include "common/error.h"
#include "kv/kv_select.h"
#include "kv/policies.h"

namespace pyr {

namespace {

class H2oPolicy final : public KvPolicy {
public:
    H2oPolicy(const KvParams& p, int n_layer)
        : params_(p), n_layer_(n_layer), acc_(size_t(n_layer)), staged_(size_t(n_layer)) {}
    const char* name() const override { return "h2o"; }

    void begin_step(int32_t n_tokens, bool first_prefill) override {
        first_prefill_ = first_prefill;
        for (auto& s : staged_) s.clear();
        if (!first_prefill) return;
        budget_ = peer_budget(params_, n_tokens, 2);
        for (auto& a : acc_) a.clear();
    }
    ObservationRequest observe(int) const override {
        ObservationRequest req;
        req.column_sums = budget_ > 0;
        return req;
    }
    std::optional<std::vector<int32_t>> on_layer(int il, const Observation& obs,
                                                 const KvCache& cache) override {
        PYR_ASSERT(obs.column_sums && obs.n_keys == cache.size(il));
        staged_[size_t(il)].assign(obs.column_sums, obs.column_sums + obs.n_keys);
        if (!first_prefill_) return std::nullopt;
        add_staged(il);
        if (lossless() || cache.size(il) <= budget_) return std::nullopt;
        std::vector<int32_t> keep = heavy_and_recent(il, cache.size(il));
        retain_scores(il, keep);
        return keep;
    }
    bool shrink_prefill(int il) const override {
        return params_.prefill_shrink == 1 && il >= std::max(params_.shrink_start, 0);
    }
    void after_step(KvCache& cache) override {
        if (budget_ == 0) return;
        // Every layer's scores first, then the retains, each before its scores follow it: a
        // retain that fails (out of device memory) leaves every layer's scores matching its
        // cache, and a later step trims what this one could not.
        if (!first_prefill_)
            for (int il = 0; il < n_layer_; ++il) add_staged(il);
        first_prefill_ = false;
        for (int il = 0; il < n_layer_; ++il) {
            if (lossless() || cache.size(il) <= budget_) continue;
            std::vector<int32_t> keep = heavy_and_recent(il, cache.size(il));
            cache.retain(il, keep);
            retain_scores(il, keep);
        }
    }
    void abort_step() override {
        for (auto& s : staged_) s.clear();
        if (first_prefill_) budget_ = 0;
        first_prefill_ = false;
    }
    double param(const std::string& name) const override {
        if (name == "retention") return params_.peer_retention();
        if (name == "prefill_shrink") return params_.prefill_shrink == 1 ? 1 : 0;
        if (name == "shrink_start") return std::max(params_.shrink_start, 0);
        if (name == "budget" && budget_ > 0) return budget_;
        return KvPolicy::param(name);
    }

private:
    bool lossless() const { return params_.lossless(); }
    // Adds the step's column sums to the layer's accumulated scores (new keys start at 0).
    void add_staged(int il) {
        auto& acc = acc_[size_t(il)];
        auto& staged = staged_[size_t(il)];
        if (acc.size() < staged.size()) acc.resize(staged.size(), 0.0);
        for (size_t j = 0; j < staged.size(); ++j) acc[j] += staged[j];
        staged.clear();
    }
    // The recent half of the budget plus the heaviest older tokens, in cache order.
    std::vector<int32_t> heavy_and_recent(int il, int32_t n) const {
        const int32_t recent = budget_ / 2, older = n - recent;
        std::vector<double> older_scores(acc_[size_t(il)].begin(),
                                         acc_[size_t(il)].begin() + older);
        std::vector<int32_t> keep = top_k_in_order(older_scores, budget_ - recent);
        for (int32_t j = older; j < n; ++j) keep.push_back(j);
        return keep;
    }
    void retain_scores(int il, const std::vector<int32_t>& keep) {
        auto& acc = acc_[size_t(il)];
        std::vector<double> kept;
        for (int32_t j : keep) kept.push_back(acc[size_t(j)]);
        acc = std::move(kept);
    }

    KvParams params_;
    int n_layer_;
    std::vector<std::vector<double>> acc_;   // per layer, per cache slot
    std::vector<std::vector<float>> staged_;  // this step's column sums per layer
    bool first_prefill_ = false;
    int32_t budget_ = 0;
};

}  // namespace

std::unique_ptr<KvPolicy> make_h2o_policy(const KvParams& params, int n_layer) {
    return std::make_unique<H2oPolicy>(params, n_layer);
}

}  // namespace pyr
