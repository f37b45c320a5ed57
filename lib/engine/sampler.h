// Token sampling from logits: repetition penalty, then greedy or
// top-k -> temperature -> softmax -> min-p -> top-p -> draw.
#pragma once

#include <cstdint>
#include <optional>
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

class Sampler {
public:
    explicit Sampler(const SamplingParams& params);

    // Restarts the random stream from the seed.
    void reset();
    // Picks the next token from `logits` (n_vocab raw values); `history` feeds the
    // repetition penalty. Deterministic for a given seed and call sequence.
    int32_t sample(const float* logits, int32_t n_vocab, const std::vector<int32_t>& history);

private:
    const float* penalized(const float* raw, int32_t n_vocab, const std::vector<int32_t>& history);
    const float* without_nan(const float* l, int32_t n_vocab);
    std::optional<int32_t> draw_from_prefix(bool complete, double u);
    double uniform01();

    SamplingParams params_;
    std::mt19937_64 rng_;
    // Working buffers, kept between calls: a vocabulary-sized allocation per token costs
    // more than greedy decoding itself.
    std::vector<float> logits_;
    std::vector<double> weights_;
    std::vector<int32_t> ids_;    // candidates, best first
    std::vector<double> probs_;   // their probabilities
    std::vector<bool> seen_;
};

}  // namespace pyr
