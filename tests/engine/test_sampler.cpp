// Sampler: greedy, determinism per seed, and that each filter removes exactly what it says.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
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

namespace {

// The pipeline written the obvious way: sort every candidate, softmax over them summed best
// first, cut, draw. The Sampler sorts only what it needs; both draw one number per token.
int32_t obvious_sample(const SamplingParams& p, std::mt19937_64& rng, std::vector<float> l,
                       const std::vector<int32_t>& history) {
    if (p.repeat_penalty != 1.0f) {
        const size_t first = p.repeat_last_n > 0 && size_t(p.repeat_last_n) < history.size()
                                 ? history.size() - size_t(p.repeat_last_n) : 0;
        std::vector<bool> seen(l.size(), false);
        for (size_t i = first; i < history.size(); ++i) {
            const auto t = size_t(history[i]);
            if (seen[t]) continue;
            seen[t] = true;
            l[t] = l[t] > 0 ? l[t] / p.repeat_penalty : l[t] * p.repeat_penalty;
        }
    }
    std::vector<int32_t> ids(l.size());
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(i);
    std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return l[size_t(a)] > l[size_t(b)]; });
    if (p.temperature <= 0.0f) return ids[0];
    if (p.top_k > 0 && size_t(p.top_k) < ids.size()) ids.resize(size_t(p.top_k));
    std::vector<double> prob;
    double sum = 0.0;
    for (int32_t id : ids) {
        prob.push_back(std::exp((double(l[size_t(id)]) - double(l[size_t(ids[0])])) / p.temperature));
        sum += prob.back();
    }
    for (double& x : prob) x /= sum;
    size_t n = prob.size();
    if (p.min_p > 0.0f)
        while (n > 1 && prob[n - 1] < double(p.min_p) * prob[0]) --n;
    double mass = 0.0;
    if (p.top_p < 1.0f)
        for (size_t i = 0; i < n; ++i)
            if ((mass += prob[i]) >= double(p.top_p)) n = i + 1;
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) total += prob[i];
    double r = double(rng() >> 11) * (1.0 / 9007199254740992.0) * total;
    for (size_t i = 0; i < n; ++i)
        if ((r -= prob[i]) < 0.0) return ids[i];
    return ids[n - 1];
}

}  // namespace

TEST_CASE("the Sampler draws what the obvious full sort draws, for every filter setting") {
    const uint64_t seed = std::random_device{}();
    CAPTURE(seed);
    std::mt19937_64 gen(seed);
    int compared = 0;
    for (int32_t n_vocab : {1, 2, 7, 300, 5000}) {
        for (float spread : {0.05f, 1.0f, 4.0f}) {
            std::normal_distribution<float> d(0.0f, spread);
            std::vector<float> logits(static_cast<size_t>(n_vocab));
            // coarse values: many exact ties between ids
            for (float& x : logits) x = std::round(d(gen) * 8.0f) / 8.0f;
            std::vector<int32_t> history(40);
            for (int32_t& t : history) t = int32_t(gen() % uint64_t(n_vocab));
            for (float temperature : {0.0f, 0.4f, 1.0f, 2.5f})
                for (int32_t top_k : {0, 1, 5, 40})
                    for (float top_p : {1.0f, 0.95f, 0.5f})
                        for (float min_p : {0.0f, 0.05f, 0.4f})
                            for (float penalty : {1.0f, 1.3f}) {
                                SamplingParams p;
                                p.temperature = temperature, p.top_k = top_k, p.top_p = top_p;
                                p.min_p = min_p, p.repeat_penalty = penalty, p.repeat_last_n = 16;
                                p.seed = gen();
                                Sampler s(p);
                                std::mt19937_64 rng(p.seed);
                                for (int draw = 0; draw < 3; ++draw, ++compared) {
                                    CAPTURE(n_vocab);
                                    CAPTURE(spread);
                                    CAPTURE(temperature);
                                    CAPTURE(top_k);
                                    CAPTURE(top_p);
                                    CAPTURE(min_p);
                                    CAPTURE(penalty);
                                    REQUIRE(s.sample(logits.data(), n_vocab, history) ==
                                            obvious_sample(p, rng, logits, history));
                                }
                            }
        }
    }
    MESSAGE(compared << " draws compared");
}

TEST_CASE("NaN or infinite logits (a broken checkpoint) give some id in range, never a crash") {
    const float nan = std::nanf(""), inf = INFINITY;
    for (std::vector<float> l : {std::vector<float>{nan, nan, nan}, {1.0f, nan, 2.0f}, {inf, 1.0f, inf}, {-inf, -inf}}) {
        for (int32_t top_k : {0, 1}) {
            for (float temperature : {0.0f, 1.0f}) {
                SamplingParams p = plain(temperature);
                p.top_k = top_k;
                p.min_p = 0.1f;
                p.top_p = 0.9f;
                Sampler s(p);
                const int32_t t = s.sample(l.data(), int32_t(l.size()), {});
                CHECK(t >= 0);
                CHECK(t < int32_t(l.size()));
            }
        }
    }
}

TEST_CASE("greedy ignores NaN: NaN counts as -inf, all NaN gives 0") {
    const float nan = std::nanf(""), inf = INFINITY;
    struct Case {
        std::vector<float> l;
        int32_t want;
    };
    const std::vector<Case> cases = {
        {{nan, 1.0f, 2.0f}, 2},       // a NaN first is not the answer
        {{1.0f, nan, 0.5f}, 0},
        {{nan, nan, nan}, 0},
        {{nan, -inf, nan}, 0},        // all "-inf": the lowest id
        {{-inf, nan, -inf, -1e38f}, 3},
        {{-inf, -inf}, 0},
    };
    for (const Case& c : cases) {
        // also past the 16 vectorised lanes: the same values at the end of a longer row
        for (int32_t pad : {0, 37}) {
            std::vector<float> l(size_t(pad), nan);
            l.insert(l.end(), c.l.begin(), c.l.end());
            int32_t want = c.want + pad;
            if (std::all_of(c.l.begin(), c.l.end(), [](float x) { return !(x > -INFINITY); }))
                want = 0;  // nothing above -inf anywhere
            Sampler s(plain(0.0f));
            CAPTURE(pad);
            CHECK(s.sample(l.data(), int32_t(l.size()), {}) == want);
        }
    }
}

TEST_CASE("peek, advance and sample_with give sample()'s tokens in every mode") {
    const uint64_t seed = std::random_device{}();
    CAPTURE(seed);
    std::mt19937_64 gen(seed);
    int compared = 0;
    for (int32_t n_vocab : {1, 3, 300, 3000}) {
        std::normal_distribution<float> d(0.0f, 2.0f);
        std::vector<float> logits(static_cast<size_t>(n_vocab));
        for (float& x : logits) x = std::round(d(gen) * 8.0f) / 8.0f;
        if (n_vocab > 3) logits[size_t(n_vocab / 2)] = std::nanf("");
        std::vector<int32_t> history(100);
        for (int32_t& t : history) t = int32_t(gen() % uint64_t(n_vocab + 5)) - 2;  // some out of range
        for (float temperature : {0.0f, 0.7f, 1.5f})
            for (int32_t top_k : {0, 1, 40})
                for (float top_p : {1.0f, 0.9f})
                    for (float min_p : {0.0f, 0.05f})
                        for (float penalty : {1.0f, 1.3f})
                            for (int32_t last_n : {0, 16}) {
                                SamplingParams p;
                                p.temperature = temperature, p.top_k = top_k, p.top_p = top_p;
                                p.min_p = min_p, p.repeat_penalty = penalty;
                                p.repeat_last_n = last_n, p.seed = gen();
                                Sampler a(p), b(p);
                                CHECK(a.params().seed == p.seed);
                                for (int step = 0; step < 4; ++step, ++compared) {
                                    CAPTURE(n_vocab);
                                    CAPTURE(temperature);
                                    CAPTURE(top_k);
                                    CAPTURE(penalty);
                                    CAPTURE(last_n);
                                    const pyr::SampleDraw draw = b.peek(history, n_vocab);
                                    // peek does not move the stream
                                    REQUIRE(b.peek(history, n_vocab).u == draw.u);
                                    if (temperature <= 0.0f) CHECK(draw.u == 0.0);
                                    // the penalty list: the window's distinct in-range ids
                                    std::vector<int32_t> want;
                                    if (penalty != 1.0f) {
                                        const size_t first =
                                            last_n > 0 && size_t(last_n) < history.size()
                                                ? history.size() - size_t(last_n) : 0;
                                        for (size_t i = first; i < history.size(); ++i) {
                                            const int32_t t = history[i];
                                            if (t >= 0 && t < n_vocab &&
                                                std::find(want.begin(), want.end(), t) == want.end())
                                                want.push_back(t);
                                        }
                                    }
                                    CHECK(draw.penalized == want);
                                    const int32_t with =
                                        b.sample_with(logits.data(), n_vocab, draw);
                                    b.advance();
                                    REQUIRE(with == a.sample(logits.data(), n_vocab, history));
                                    history.push_back(with);
                                    history.erase(history.begin());
                                }
                            }
    }
    MESSAGE(compared << " draws compared");
}
