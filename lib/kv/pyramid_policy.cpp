// PyramidInfer (DESIGN.md section 5): deeper layers keep fewer context tokens, chosen by the
// weighted attention of the W most recent prompt tokens; the prefill sequence shrinks with
// them; generation compresses every E new tokens by the layer's ratio g_l.
#include <cmath>

#include "kv/policies.h"
#include "kv/pyramid_plan.h"
#include "kv/window_policy.h"

namespace pyr {

namespace {

class PyramidPolicy final : public WindowPolicy {
public:
    PyramidPolicy(const KvParams& p, int n_layer) : WindowPolicy(p, n_layer) {
        shrink_ = p.prefill_shrink != 0;  // on unless switched off
        weighted_ = true;
        pool_ = p.pool > 1 ? p.pool : 1;
        sinks_ = p.sinks;
        knobs_.rho = as_written(p.rho);
        knobs_.gamma = as_written(p.gamma);
        knobs_.recent_ratio = as_written(p.recent_ratio);
        knobs_.min_context = p.min_context;
    }
    const char* name() const override { return "pyramid"; }

    double param(const std::string& name) const override {
        const PyramidKnobs& k = planned_ ? plan_.knobs : knobs_;
        if (name == "rho") return k.rho;
        if (name == "gamma") return k.gamma;
        if (name == "recent_ratio") return k.recent_ratio;
        if (name == "min_context") return params_.min_context;
        if (planned_ && name == "window") return plan_.window;
        if (planned_ && name == "planned_retention") return plan_.retention;
        return WindowPolicy::param(name);
    }

protected:
    void plan(int32_t n_prompt) override {
        plan_ = params_.retention > 0.0f
                    ? solve_pyramid_plan(as_written(params_.retention), n_prompt, n_layer_, knobs_)
                    : make_pyramid_plan(n_prompt, n_layer_, knobs_);
    }
    int32_t recent(int) const override { return plan_.window; }
    // The paper scores with all W recent rows; kv_obs_window > 0 scores with fewer.
    int32_t score_rows() const override {
        return params_.obs_window > 0 ? std::min(params_.obs_window, plan_.window) : plan_.window;
    }
    int32_t keep_context(int il, int32_t ctx) const override {
        return std::min(plan_.context[size_t(il)], ctx);
    }
    int32_t block_keep(int il) const override {
        const double g = pyramid_generation_ratio(il, n_layer_);
        return std::max(int32_t(std::floor(gen_e() * 0.9 * g)), 1);
    }

private:
    PyramidKnobs knobs_;  // as the session gave them (kv_params.h: as_written)
    PyramidPlan plan_;
};

}  // namespace

std::unique_ptr<KvPolicy> make_pyramid_policy(const KvParams& params, int n_layer) {
    return std::make_unique<PyramidPolicy>(params, n_layer);
}

}  // namespace pyr
