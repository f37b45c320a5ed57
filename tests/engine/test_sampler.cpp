// Sampler: greedy, determinism per seed, and that each filter removes exactly what it says.
#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <vector>

#include "engine/sampler.h"

using pyr::Sampler;
using pyr::SamplingParams;

namespace {

SamplingParams plain(float temperature, uint64_t seed = 1) {
    SamplingParams p;
    p.temperature = temperature;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repeat_penalty = 1.0f;
    p.seed = seed;
    return p;
}

std::map<int32_t, int> histogram(Sampler& s, const std::vector<float>& logits, int draws) {
    std::map<int32_t, int> h;
    for (int i = 0; i < draws; ++i) ++h[s.sample(logits.data(), int32_t(logits.size()), {})];
    return h;
}

}  // namespace

TEST_CASE("greedy picks the largest logit, ties to the lowest id") {
    Sampler s(plain(0.0f));
    std::vector<float> l = {0.1f, 2.0f, -1.0f, 2.0f};
    CHECK(s.sample(l.data(), 4, {}) == 1);
    std::vector<float> m = {-3.0f, -2.5f, -2.6f};
    CHECK(s.sample(m.data(), 3, {}) == 1);
}

TEST_CASE("same seed, same tokens; another seed, another stream") {
    std::vector<float> l(50);
    for (size_t i = 0; i < l.size(); ++i) l[i] = float(std::sin(double(i)));
    auto draw = [&](uint64_t seed) {
        Sampler s(plain(1.0f, seed));
        std::vector<int32_t> out;
        for (int i = 0; i < 40; ++i) out.push_back(s.sample(l.data(), 50, {}));
        return out;
    };
    CHECK(draw(7) == draw(7));
    CHECK(draw(7) != draw(8));
    Sampler s(plain(1.0f, 7));
    auto first = s.sample(l.data(), 50, {});
    s.reset();
    CHECK(s.sample(l.data(), 50, {}) == first);
}

TEST_CASE("temperature sampling follows the softmax") {
    std::vector<float> l = {0.0f, 1.0f, 2.0f};
    Sampler s(plain(1.0f, 3));
    const int draws = 30000;
    auto h = histogram(s, l, draws);
    double z = 1.0 + std::exp(1.0) + std::exp(2.0);
    for (int32_t id = 0; id < 3; ++id) {
        double expected = std::exp(double(l[size_t(id)])) / z;
        CAPTURE(id);
        CHECK(double(h[id]) / draws == doctest::Approx(expected).epsilon(0.05));
    }
}

TEST_CASE("top-k keeps only the k best") {
    SamplingParams p = plain(5.0f);
    p.top_k = 2;
    Sampler s(p);
    auto h = histogram(s, {3.0f, 0.0f, 2.9f, 1.0f}, 2000);
    CHECK(h.size() == 2);
    CHECK(h.count(0) == 1);
    CHECK(h.count(2) == 1);
    p.top_k = 1;
    Sampler one(p);
    CHECK(histogram(one, {3.0f, 0.0f, 2.9f, 1.0f}, 200).size() == 1);
}

TEST_CASE("top-p keeps the smallest prefix reaching the mass") {
    // probabilities 0.5, 0.3, 0.15, 0.05 (logits = log p)
    std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
    SamplingParams p = plain(1.0f);
    p.top_p = 0.75f;
    Sampler s(p);
    auto h = histogram(s, l, 4000);
    CHECK(h.size() == 2);  // 0.5 + 0.3 >= 0.75
    CHECK(double(h[0]) / 4000 == doctest::Approx(0.5 / 0.8).epsilon(0.06));
}

TEST_CASE("min-p drops tokens below min_p * p_max") {
    std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
    SamplingParams p = plain(1.0f);
    p.min_p = 0.2f;  // threshold 0.1: drops 0.05 only
    Sampler s(p);
    auto h = histogram(s, l, 4000);
    CHECK(h.size() == 3);
    CHECK(h.count(3) == 0);
}

TEST_CASE("repetition penalty lowers recent tokens") {
    SamplingParams p = plain(0.0f);
    p.repeat_penalty = 2.0f;
    p.repeat_last_n = 2;
    Sampler s(p);
    std::vector<float> l = {1.0f, 1.5f, -0.5f};
    CHECK(s.sample(l.data(), 3, {}) == 1);
    CHECK(s.sample(l.data(), 3, {1}) == 0);      // 1.5 / 2 = 0.75 < 1.0
    CHECK(s.sample(l.data(), 3, {1, 2, 2}) == 1);  // 1 is outside the last 2
    std::vector<float> neg = {-1.0f, -1.2f};
    CHECK(s.sample(neg.data(), 2, {0}) == 1);     // -1 * 2 = -2 < -1.2
}
