// The common machinery of the policies that score keys by the attention of a window of
// recent queries (pyramid, snapkv, pyramidkv): per-layer selection in the first prefill and
// generation-phase compression of blocks of E tokens. Subclasses supply the numbers.
#pragma once

#include <vector>

#include "kv/kv_policy.h"
#include "kv/kv_select.h"

namespace pyr {

class WindowPolicy : public KvPolicy {
public:
    WindowPolicy(const KvParams& params, int n_layer);

    void begin_step(int32_t n_tokens, bool first_prefill) override;
    ObservationRequest observe(int il) const override;
    std::optional<std::vector<int32_t>> on_layer(int il, const Observation& obs,
                                                 const KvCache& cache) override;
    bool shrink_prefill(int il) const override { return shrink_ && il >= shrink_start_; }
    void after_step(KvCache& cache) override;
    void abort_step() override;
    double param(const std::string& name) const override;

protected:
    // Called when the first prefill of n_prompt tokens begins.
    virtual void plan(int32_t n_prompt) = 0;
    // The recent tokens layer il always keeps (and that generation leaves uncompressed).
    virtual int32_t recent(int il) const = 0;
    // How many query rows score the keys (<= recent for pyramid; the window for snapkv).
    virtual int32_t score_rows() const = 0;
    // How many of `ctx` older tokens layer il keeps in the first prefill.
    virtual int32_t keep_context(int il, int32_t ctx) const = 0;
    // How many of a block of E pending tokens layer il keeps in generation.
    virtual int32_t block_keep(int il) const = 0;

    KvParams params_;
    int n_layer_;
    bool shrink_ = false;
    int32_t shrink_start_ = 0;  // first layer that shrinks
    bool weighted_ = false;  // PyramidInfer's 1.0 -> 1.2 row weights
    int32_t pool_ = 1;       // max-pool kernel over scores
    int32_t sinks_ = 0;      // first tokens that always stay (+infinity scores)
    bool planned_ = false;

    // The generation block size; retention 1 keeps everything, in generation too.
    int32_t gen_e() const { return params_.lossless() ? 0 : params_.gen_e; }

private:
    std::vector<int32_t> select_prefill(int il, const Observation& obs);
    void compress_blocks(int il, KvCache& cache);

    struct Layer {
        RecentRows rows;
        int32_t n_compressed = 0;  // cache = [compressed | pending | recent]
    };
    std::vector<Layer> layers_;
    std::vector<std::vector<float>> staged_;  // rows observed in the current step, per layer
    std::vector<int32_t> staged_width_;  // their columns: from the layer's n_compressed on
    bool first_prefill_ = false;
    int32_t step_tokens_ = 0;
};

}  // namespace pyr
