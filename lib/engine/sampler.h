// Token sampling from logits: repetition penalty, then greedy or
// top-k -> temperature -> softmax -> min-p -> top-p -> draw.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace pyr {

struct SamplingParams {
    float temperature = 0.8f;    // <= 0: greedy
    int32_t top_k = 40;          // 0: off
    float top_p = 0.95f;         // 1: off
    float min_p = 0.05f;         // 0: off
    float repeat_penalty = 1.0f; // 1: off
    int32_t repeat_last_n = 64;  // 0: whole history
    uint64_t seed = 0;
};

// What a device needs to pick the token sample() would pick from the same logits.
struct SampleDraw {
    double u = 0.0;                   // the uniform number sample() would draw (0 when greedy)
    std::vector<int32_t> penalized;   // distinct token ids the repetition penalty applies to
};

class Sampler {
public:
    explicit Sampler(const SamplingParams& params);

    // Restarts the random stream from the seed.
    void reset();
    // Picks the next token from `logits` (n_vocab raw values); `history` feeds the
    // repetition penalty. Deterministic for a given seed and call sequence. Greedy
    // (temperature <= 0) takes the largest penalized logit, the lowest id on ties, NaN
    // counting as -inf (all NaN: 0); it draws no random number.
    int32_t sample(const float* logits, int32_t n_vocab, const std::vector<int32_t>& history);

    const SamplingParams& params() const { return params_; }
    // The next draw, without consuming it: sample() is peek(), advance(), sample_with().
    SampleDraw peek(const std::vector<int32_t>& history, int32_t n_vocab) const;
    // Consumes the draw peek() reported (no-op when greedy: greedy draws nothing).
    void advance();
    // The token sample() picks with `draw` (from peek); the random stream is untouched.
    int32_t sample_with(const float* logits, int32_t n_vocab, const SampleDraw& draw);

private:
    bool greedy() const { return params_.temperature <= 0.0f; }
    // The first index of the window of `history` the repetition penalty looks at.
    size_t penalty_window(size_t n) const;
    const float* penalized(const float* raw, int32_t n_vocab, const SampleDraw& draw);
    const float* without_nan(const float* l, int32_t n_vocab);

    SamplingParams params_;
    std::mt19937_64 rng_;
    // Working buffers, kept between calls: a vocabulary-sized allocation per token costs
    // more than greedy decoding itself.
    std::vector<float> logits_;
    std::vector<double> weights_;
    std::vector<int32_t> ids_;    // candidates, best first
    std::vector<double> probs_;   // their probabilities
    mutable std::vector<bool> seen_;  // peek's: ids already in the penalty list
};

}  // namespace pyr
