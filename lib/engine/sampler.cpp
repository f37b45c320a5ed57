#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/sampling_rules.h"

namespace pyr {

namespace {

// 53 random bits -> [0, 1); unlike std::uniform_real_distribution this is the same on
// every standard library, so a seed gives the same tokens everywhere.
double unit_interval(uint64_t bits) { return double(bits >> 11) * (1.0 / 9007199254740992.0); }

}  // namespace

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

void Sampler::reset() { rng_.seed(params_.seed); }

size_t Sampler::penalty_window(size_t n) const {
    return params_.repeat_last_n > 0 && size_t(params_.repeat_last_n) < n
               ? n - size_t(params_.repeat_last_n)
               : 0;
}

SampleDraw Sampler::peek(const std::vector<int32_t>& history, int32_t n_vocab) const {
    SampleDraw d;
    if (!greedy()) {
        std::mt19937_64 next = rng_;  // a copy: the stream itself does not move
        d.u = unit_interval(next());
    }
    if (params_.repeat_penalty != 1.0f && n_vocab > 0) {
        seen_.assign(size_t(n_vocab), false);
        for (size_t i = penalty_window(history.size()); i < history.size(); ++i) {
            const int32_t t = history[i];
            if (t < 0 || t >= n_vocab || seen_[size_t(t)]) continue;
            seen_[size_t(t)] = true;
            d.penalized.push_back(t);
        }
    }
    return d;
}

void Sampler::advance() {
    if (!greedy()) rng_.discard(1);
}

// The logits with the repetition penalty applied to the draw's ids: `raw` itself when there
// is none.
const float* Sampler::penalized(const float* raw, int32_t n_vocab, const SampleDraw& draw) {
    if (draw.penalized.empty()) return raw;
    logits_.assign(raw, raw + n_vocab);
    for (int32_t t : draw.penalized) {
        float& l = logits_[size_t(t)];
        l = l > 0 ? l / params_.repeat_penalty : l * params_.repeat_penalty;
    }
    return logits_.data();
}

// `l` with NaN (a broken checkpoint) made -inf, so that sorting by value stays well defined.
const float* Sampler::without_nan(const float* l, int32_t n_vocab) {
    int32_t nan = 0;
    for (int32_t i = 0; i < n_vocab; ++i) nan |= l[i] != l[i];
    if (!nan) return l;
    if (l != logits_.data()) logits_.assign(l, l + n_vocab);
    for (float& x : logits_)
        if (x != x) x = -std::numeric_limits<float>::infinity();
    return logits_.data();
}

namespace {

// The lowest id of the largest value, NaN counting as -inf (all -inf or NaN: 0). The
// maximum is taken in 16 lanes, a loop the compiler vectorises (std::max_element is not:
// 2.5x slower over 32000 logits); `x > lane ? x : lane` never lets a NaN in.
int32_t argmax(const float* v, int32_t n) {
    constexpr int32_t kLanes = 16;
    float lane[kLanes];
    std::fill(lane, lane + kLanes, -std::numeric_limits<float>::infinity());
    int32_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int32_t j = 0; j < kLanes; ++j) lane[j] = v[i + j] > lane[j] ? v[i + j] : lane[j];
    float best = -std::numeric_limits<float>::infinity();
    for (float x : lane) best = x > best ? x : best;
    for (; i < n; ++i) best = v[i] > best ? v[i] : best;
    if (best == -std::numeric_limits<float>::infinity()) return 0;  // every value -inf or NaN
    return int32_t(std::find(v, v + n, best) - v);
}

}  // namespace

int32_t Sampler::sample(const float* raw, int32_t n_vocab, const std::vector<int32_t>& history) {
    const SampleDraw draw = peek(history, n_vocab);
    advance();
    return sample_with(raw, n_vocab, draw);
}

// Repetition penalty, then greedy, or top-k -> softmax(logit / temperature) -> min-p ->
// top-p -> a draw walking the candidates best first. Without top-k only the best few are
// sorted: candidates whose softmax weight is at least a threshold form a best-first prefix,
// and the threshold drops until that prefix decides the token.
// The draw itself (min-p, top-p, the walk) is draw_from_prefix (sampling_rules.h), shared
// with the GPU kernel (kernels/sampling.cu).
int32_t Sampler::sample_with(const float* raw, int32_t n_vocab, const SampleDraw& draw) {
    const float* l = penalized(raw, n_vocab, draw);
    if (greedy()) return argmax(l, n_vocab);  // ties: the lowest id
    l = without_nan(l, n_vocab);

    auto better = [l](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); };
    const bool top_k = params_.top_k > 0 && params_.top_k < n_vocab;
    if (top_k) {  // the k best, in order
        ids_.resize(size_t(n_vocab));
        for (int32_t i = 0; i < n_vocab; ++i) ids_[size_t(i)] = i;
        const auto k = std::ptrdiff_t(params_.top_k);
        std::partial_sort(ids_.begin(), ids_.begin() + k, ids_.end(), better);
        ids_.resize(size_t(k));
    }
    const double max_logit = l[top_k ? ids_[0] : argmax(l, n_vocab)];
    const double t = params_.temperature;
    auto weight = [&](int32_t id) { return std::exp((double(l[id]) - max_logit) / t); };
    auto pick = [&](bool complete) {
        return draw_from_prefix(probs_.data(), ids_.data(), int32_t(probs_.size()), complete,
                                draw.u, params_.top_p, params_.min_p);
    };

    if (top_k) {  // softmax over the k best, summed best first, in double
        probs_.clear();
        double sum = 0.0;
        for (int32_t id : ids_) {
            probs_.push_back(weight(id));
            sum += probs_.back();
        }
        for (double& p : probs_) p /= sum;
        return pick(true);  // complete: always a token
    }

    // Softmax over the whole vocabulary, summed in id order.
    weights_.resize(size_t(n_vocab));
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) sum += weights_[size_t(i)] = weight(i);
    for (double threshold = 1.0 / 16;; threshold /= 256) {
        const bool all = threshold < 1e-60;  // (NaN weights from infinite logits too)
        ids_.clear();
        for (int32_t i = 0; i < n_vocab; ++i)
            if (all || weights_[size_t(i)] >= threshold) ids_.push_back(i);
        std::sort(ids_.begin(), ids_.end(), better);
        probs_.clear();
        for (int32_t id : ids_) probs_.push_back(weights_[size_t(id)] / sum);
        const int32_t token = pick(all);
        if (token >= 0) return token;
    }
}

}  // namespace pyr
