// StreamingLLM: the first `sinks` tokens plus the most recent ones, up to a fixed budget per
// layer (round(retention * P)), in prefill and in generation. Needs no attention scores.
#include <algorithm>

#include "kv/policies.h"

namespace pyr {

namespace {

class StreamingPolicy final : public KvPolicy {
public:
    StreamingPolicy(const KvParams& p, int n_layer) : params_(p), n_layer_(n_layer) {}
    const char* name() const override { return "streaming"; }

    void begin_step(int32_t n_tokens, bool first_prefill) override {
        first_prefill_ = first_prefill;
        if (first_prefill) budget_ = peer_budget(params_, n_tokens, params_.sinks + 1);
    }
    std::optional<std::vector<int32_t>> on_layer(int il, const Observation&,
                                                 const KvCache& cache) override {
        if (!first_prefill_ || lossless() || cache.size(il) <= budget_) return std::nullopt;
        return sinks_and_recent(cache.size(il));
    }
    bool shrink_prefill(int il) const override {
        return params_.prefill_shrink == 1 && il >= std::max(params_.shrink_start, 0);
    }
    void after_step(KvCache& cache) override {
        if (budget_ == 0 || lossless()) return;
        for (int il = 0; il < n_layer_; ++il)
            if (cache.size(il) > budget_) cache.retain(il, sinks_and_recent(cache.size(il)));
        first_prefill_ = false;
    }
    void abort_step() override {
        if (first_prefill_) budget_ = 0;
        first_prefill_ = false;
    }
    double param(const std::string& name) const override {
        if (name == "retention") return params_.peer_retention();
        if (name == "sinks") return params_.sinks;
        if (name == "prefill_shrink") return params_.prefill_shrink == 1 ? 1 : 0;
        if (name == "shrink_start") return std::max(params_.shrink_start, 0);
        if (name == "budget" && budget_ > 0) return budget_;
        return KvPolicy::param(name);
    }

private:
    bool lossless() const { return params_.lossless(); }
    std::vector<int32_t> sinks_and_recent(int32_t n) const {
        const int32_t sinks = std::min(params_.sinks, budget_);
        std::vector<int32_t> keep;
        keep.reserve(size_t(budget_));
        for (int32_t j = 0; j < sinks; ++j) keep.push_back(j);
        for (int32_t j = n - (budget_ - sinks); j < n; ++j) keep.push_back(j);
        return keep;
    }

    KvParams params_;
    int n_layer_;
    bool first_prefill_ = false;
    int32_t budget_ = 0;  // 0 until the first prefill
};

}  // namespace

std::unique_ptr<KvPolicy> make_streaming_policy(const KvParams& params, int n_layer) {
    return std::make_unique<StreamingPolicy>(params, n_layer);
}

}  // namespace pyr
