#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace pyr {

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

void Sampler::reset() { rng_.seed(params_.seed); }

// 53 random bits -> [0, 1); unlike std::uniform_real_distribution this is the same on
// every standard library, so a seed gives the same tokens everywhere.
double Sampler::uniform01() { return double(rng_() >> 11) * (1.0 / 9007199254740992.0); }

// The logits with the repetition penalty applied: `raw` itself when there is none.
const float* Sampler::penalized(const float* raw, int32_t n_vocab,
                                const std::vector<int32_t>& history) {
    if (params_.repeat_penalty == 1.0f || history.empty()) return raw;
    logits_.assign(raw, raw + n_vocab);
    size_t n = history.size();
    size_t first = params_.repeat_last_n > 0 && size_t(params_.repeat_last_n) < n
                       ? n - size_t(params_.repeat_last_n)
                       : 0;
    seen_.assign(size_t(n_vocab), false);
    for (size_t i = first; i < n; ++i) {
        int32_t t = history[i];
        if (t < 0 || t >= n_vocab || seen_[size_t(t)]) continue;
        seen_[size_t(t)] = true;
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

// The lowest id of the largest value. The maximum is taken in 16 lanes, a loop the
// compiler vectorises (std::max_element is not: 2.5x slower over 32000 logits).
int32_t argmax(const float* v, int32_t n) {
    constexpr int32_t kLanes = 16;
    float lane[kLanes];
    std::fill(lane, lane + kLanes, v[0]);
    int32_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int32_t j = 0; j < kLanes; ++j) lane[j] = std::max(lane[j], v[i + j]);
    float best = *std::max_element(lane, lane + kLanes);
    for (; i < n; ++i) best = std::max(best, v[i]);
    const float* at = std::find(v, v + n, best);
    return at == v + n ? 0 : int32_t(at - v);  // not found: NaN
}

}  // namespace

// Given the best candidates in order (ids_[0, m), all of them if `complete`) and their
// probabilities, applies min-p and top-p and draws with r0 = u (scaled by the kept mass).
// Returns nothing when the answer depends on candidates past the prefix.
std::optional<int32_t> Sampler::draw_from_prefix(bool complete, double u) {
    const size_t m = probs_.size();
    if (m == 0) return std::nullopt;
    size_t n = m;
    bool cut = false;
    // min-p: drop tokens below min_p times the most likely one (always keeps the first).
    if (params_.min_p > 0.0f) {
        const double floor = double(params_.min_p) * probs_[0];
        size_t keep = 1;
        while (keep < m && probs_[keep] >= floor) ++keep;
        if (keep < m) n = keep, cut = true;
    }
    // top-p: the smallest prefix whose mass reaches top_p.
    if (params_.top_p < 1.0f) {
        double mass = 0.0;
        size_t i = 0;
        while (i < n) {
            mass += probs_[i++];
            if (mass >= double(params_.top_p)) break;
        }
        if (mass >= double(params_.top_p)) n = i, cut = true;
    }
    const bool filters = params_.min_p > 0.0f || params_.top_p < 1.0f;
    if (!cut && !complete && filters) return std::nullopt;  // a filter may cut further on
    // Nothing cut: every candidate stays, and their probabilities sum to 1.
    double total = 1.0;
    if (cut) {
        total = 0.0;
        for (size_t i = 0; i < n; ++i) total += probs_[i];
    }
    double r = u * total;
    for (size_t i = 0; i < n; ++i) {
        r -= probs_[i];
        if (r < 0.0) return ids_[i];
    }
    if (cut || complete) return ids_[n - 1];
    return std::nullopt;  // the draw lies past the prefix
}

// Repetition penalty, then greedy, or top-k -> softmax(logit / temperature) -> min-p ->
// top-p -> a draw walking the candidates best first. Without top-k only the best few are
// sorted: candidates whose softmax weight is at least a threshold form a best-first prefix,
// and the threshold drops until that prefix decides the token.
int32_t Sampler::sample(const float* raw, int32_t n_vocab, const std::vector<int32_t>& history) {
    const float* l = penalized(raw, n_vocab, history);
    if (params_.temperature <= 0.0f) return argmax(l, n_vocab);  // ties: the lowest id
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
    const double u = uniform01();

    if (top_k) {  // softmax over the k best, summed best first, in double
        probs_.clear();
        double sum = 0.0;
        for (int32_t id : ids_) {
            probs_.push_back(weight(id));
            sum += probs_.back();
        }
        for (double& p : probs_) p /= sum;
        return *draw_from_prefix(true, u);
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
        if (auto token = draw_from_prefix(all, u)) return *token;
    }
}

}  // namespace pyr
