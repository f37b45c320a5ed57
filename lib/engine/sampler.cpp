#include "engine/sampler.h"

#include <algorithm>
#include <cmath>

namespace pyr {

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

void Sampler::reset() { rng_.seed(params_.seed); }

// 53 random bits -> [0, 1); unlike std::uniform_real_distribution this is the same on
// every standard library, so a seed gives the same tokens everywhere.
double Sampler::uniform01() { return double(rng_() >> 11) * (1.0 / 9007199254740992.0); }

void Sampler::apply_repeat_penalty(std::vector<float>& logits,
                                   const std::vector<int32_t>& history) const {
    if (params_.repeat_penalty == 1.0f || history.empty()) return;
    size_t n = history.size();
    size_t first = params_.repeat_last_n > 0 && size_t(params_.repeat_last_n) < n
                       ? n - size_t(params_.repeat_last_n)
                       : 0;
    std::vector<bool> seen(logits.size(), false);
    for (size_t i = first; i < n; ++i) {
        int32_t t = history[i];
        if (t < 0 || size_t(t) >= logits.size() || seen[size_t(t)]) continue;
        seen[size_t(t)] = true;
        float& l = logits[size_t(t)];
        l = l > 0 ? l / params_.repeat_penalty : l * params_.repeat_penalty;
    }
}

int32_t Sampler::sample(const float* raw, int32_t n_vocab, const std::vector<int32_t>& history) {
    std::vector<float> logits(raw, raw + n_vocab);
    apply_repeat_penalty(logits, history);

    if (params_.temperature <= 0.0f)  // greedy; ties go to the lowest id
        return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());

    std::vector<Candidate> cand(static_cast<size_t>(n_vocab));
    for (int32_t i = 0; i < n_vocab; ++i) cand[size_t(i)] = {i, logits[size_t(i)]};
    auto by_value = [](const Candidate& a, const Candidate& b) {
        return a.value > b.value || (a.value == b.value && a.id < b.id);
    };
    size_t keep = cand.size();
    if (params_.top_k > 0 && size_t(params_.top_k) < keep) keep = size_t(params_.top_k);
    std::partial_sort(cand.begin(), cand.begin() + std::ptrdiff_t(keep), cand.end(), by_value);
    cand.resize(keep);

    // Softmax of logit / temperature, in double for a stable sum.
    double max_logit = cand[0].value, sum = 0.0;
    std::vector<double> prob(cand.size());
    for (size_t i = 0; i < cand.size(); ++i) {
        prob[i] = std::exp((double(cand[i].value) - max_logit) / params_.temperature);
        sum += prob[i];
    }
    for (double& p : prob) p /= sum;

    // min-p: drop tokens below min_p times the most likely one (always keeps the first).
    size_t n = prob.size();
    if (params_.min_p > 0.0f)
        while (n > 1 && prob[n - 1] < double(params_.min_p) * prob[0]) --n;
    // top-p: the smallest prefix whose mass reaches top_p.
    if (params_.top_p < 1.0f) {
        double mass = 0.0;
        size_t i = 0;
        while (i < n) {
            mass += prob[i++];
            if (mass >= double(params_.top_p)) break;
        }
        n = i;
    }
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) total += prob[i];
    double r = uniform01() * total;
    for (size_t i = 0; i < n; ++i) {
        r -= prob[i];
        if (r < 0.0) return cand[i].id;
    }
    return cand[n - 1].id;
}

}  // namespace pyr
