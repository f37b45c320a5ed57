// Tests of kernels/sampling.cu: sample_rows against the CPU sampler (kernel_test_util.h
// says how they test).
#include "cuda/kernel_test_util.h"
#include "engine/sampler.h"
#include "engine/sampling_rules.h"

using namespace kernel_test;

TEST_CASE("sample_rows, greedy: index of the row maximum, the lowest one on ties") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n_rows = 9;
    for (int32_t n_vocab : {1, 10, 1000, 32003}) {
        INFO("n_vocab " << n_vocab);
        std::vector<float> logits(size_t(n_rows) * n_vocab);
        for (int32_t r = 0; r < n_rows; ++r) {
            float* row = &logits[size_t(r) * n_vocab];
            for (int32_t i = 0; i < n_vocab; ++i) row[i] = rng.uniform(-10.0f, 10.0f);
            const int32_t p = rng.index(n_vocab);
            auto set = [&](int64_t i, float v) {
                if (i >= 0 && i < n_vocab) row[i] = v;
            };
            switch (r) {
                case 0: set(p, 20.0f); break;  // one clear maximum
                case 1:                        // ties at random positions
                    for (int k = 0; k < 4; ++k) set(rng.index(n_vocab), 20.0f);
                    break;
                case 2: std::fill(row, row + n_vocab, 3.5f); break;  // all equal
                case 3: set(n_vocab - 1, 20.0f); break;              // the last index
                case 4: set(p, 20.0f), set(p + 1024, 20.0f); break;  // one thread's two keys
                case 5: set(p, 20.0f), set(p + 1, 20.0f); break;     // neighbouring lanes
                case 6: set(p, 20.0f), set(p + 32 * 5, 20.0f); break;  // different warps
                case 7:  // far negative with -inf entries
                    for (int32_t i = 0; i < n_vocab; ++i)
                        row[i] = i % 3 == 0 ? -INFINITY : rng.uniform(-3e38f, -1e38f);
                    set(p, -5e37f);
                    break;
                default: set(0, 20.0f), set(n_vocab - 1, 20.0f); break;  // first and last
            }
        }
        DeviceArray<float> d_logits(logits);
        std::vector<K::SampleRow> rows(static_cast<size_t>(n_rows));  // temperature 0: greedy
        for (int32_t r = 0; r < n_rows; ++r) rows[size_t(r)].logits = d_logits.get() + size_t(r) * n_vocab;
        DeviceArray<K::SampleRow> d_rows(rows);
        DeviceArray<int32_t> d_out(n_rows);
        d_out.poison();
        LAUNCH_OK(K::sample_rows(d_rows.get(), n_rows, n_vocab, d_out.get(), nullptr));
        const std::vector<int32_t> out = d_out.download();
        for (int32_t r = 0; r < n_rows; ++r) {
            const float* row = &logits[size_t(r) * n_vocab];
            int32_t best = 0;
            for (int32_t i = 1; i < n_vocab; ++i)
                if (row[i] > row[best]) best = i;
            INFO("row " << r);
            CHECK(out[r] == best);
        }
    }
}

namespace {

// The CPU sampler's view of one row, sorted in full: what its token is (draw_from_prefix over
// the whole candidate set), and what the best kSampleCandidates alone decide (the kernel's
// answer: that token or -1).
struct SampleRef {
    int32_t full = -1, prefix = -1;
    std::vector<int32_t> ids;  // the set, best first
    std::vector<double> w;     // their weights
    double sum = 0.0;          // the CPU's sum (best first with top-k, else in id order)
    int32_t prefix_with_sum(double s, const pyr::SamplingParams& p, double u) const {
        const auto m = int32_t(std::min<size_t>(ids.size(), K::kSampleCandidates));
        std::vector<double> probs(static_cast<size_t>(m));
        for (int32_t i = 0; i < m; ++i) probs[size_t(i)] = w[size_t(i)] / s;
        return pyr::draw_from_prefix(probs.data(), ids.data(), m, size_t(m) == ids.size(), u,
                                     p.top_p, p.min_p);
    }
};

SampleRef sample_reference(const pyr::SamplingParams& p, std::vector<float> l,
                           const std::vector<int32_t>& penalized, double u) {
    const auto n = int32_t(l.size());
    for (int32_t t : penalized) {
        float& x = l[size_t(t)];
        x = x > 0 ? x / p.repeat_penalty : x * p.repeat_penalty;
    }
    for (float& x : l)
        if (x != x) x = -INFINITY;
    SampleRef r;
    r.ids.resize(size_t(n));
    for (int32_t i = 0; i < n; ++i) r.ids[size_t(i)] = i;
    std::sort(r.ids.begin(), r.ids.end(), [&](int32_t a, int32_t b) {
        return l[size_t(a)] > l[size_t(b)] || (l[size_t(a)] == l[size_t(b)] && a < b);
    });
    const bool top_k = p.top_k > 0 && p.top_k < n;
    if (top_k) r.ids.resize(size_t(p.top_k));
    const double mx = l[size_t(r.ids[0])], t = p.temperature;
    auto weight = [&](int32_t id) { return std::exp((double(l[size_t(id)]) - mx) / t); };
    for (int32_t id : r.ids) r.w.push_back(weight(id));
    if (top_k)
        for (double x : r.w) r.sum += x;
    else
        for (int32_t i = 0; i < n; ++i) r.sum += weight(i);
    std::vector<double> probs;
    for (double x : r.w) probs.push_back(x / r.sum);
    r.full = pyr::draw_from_prefix(probs.data(), r.ids.data(), int32_t(r.ids.size()), true, u,
                                   p.top_p, p.min_p);
    r.prefix = r.prefix_with_sum(r.sum, p, u);
    return r;
}

pyr::SamplingParams sampling(float temperature, int32_t top_k, float top_p, float min_p,
                             float penalty = 1.0f, int32_t last_n = 64) {
    pyr::SamplingParams p;
    p.temperature = temperature, p.top_k = top_k, p.top_p = top_p, p.min_p = min_p;
    p.repeat_penalty = penalty, p.repeat_last_n = last_n;
    return p;
}

}  // namespace

TEST_CASE("sample_rows: the CPU sampler's token in every mode; -1 only where the best 1024 cannot decide") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    // settings; the history's length picks the penalty list's (short: 64 of 200, long: 3000)
    struct Setting {
        pyr::SamplingParams p;
        int32_t history;
    };
    const std::vector<Setting> settings = {
        {sampling(0.0f, 0, 1.0f, 0.0f), 0},               // greedy
        {sampling(0.0f, 40, 0.9f, 0.1f, 1.3f, 0), 3000},  // greedy, long penalty list
        {sampling(0.8f, 0, 1.0f, 0.0f), 0},               // temperature only
        {sampling(1.0f, 1, 1.0f, 0.0f), 0},               // top-k 1
        {sampling(0.8f, 40, 0.95f, 0.05f), 200},          // the defaults
        {sampling(1.0f, 1000, 1.0f, 0.0f), 0},
        {sampling(1.3f, 1000, 0.9f, 0.0f, 1.3f), 200},
        {sampling(1.0f, 1500, 1.0f, 0.0f), 0},            // k past the candidates
        {sampling(0.7f, 1500, 0.95f, 0.02f), 0},
        {sampling(1.0f, 0, 0.5f, 0.0f), 0},               // top-p
        {sampling(0.7f, 0, 0.95f, 0.0f), 0},
        {sampling(1.0f, 0, 1.0f, 0.05f), 0},              // min-p
        {sampling(1.0f, 0, 0.95f, 0.05f, 1.3f), 200},     // penalty, short list
        {sampling(2.0f, 0, 0.9f, 0.0f, 1.3f, 0), 3000},   // penalty, long list
        {sampling(0.6f, 40, 1.0f, 0.0f, 1.3f, 0), 3000},
        {sampling(1.0f, 1 << 20, 1.0f, 0.0f), 0},         // k >= n_vocab: off
    };
    enum Logits { kPeaked, kFlat, kTies, kKinds };
    int32_t minus_ones = 0, near_ties = 0, rows_total = 0;
    for (int32_t n_vocab : {32000, 1000, 1537, 33, 1}) {
        INFO("n_vocab " << n_vocab);
        const auto nv = size_t(n_vocab);
        std::vector<float> logits;
        std::vector<int32_t> lists;
        struct Row {
            pyr::SamplingParams p;
            std::vector<int32_t> history;
            pyr::SampleDraw draw;
            size_t list_at = 0;
            int kind = 0;
        };
        std::vector<Row> rows;
        for (int kind = 0; kind < kKinds; ++kind)
            for (size_t s = 0; s < settings.size(); ++s) {
                Row row;
                row.p = settings[s].p;
                row.p.seed = rng.gen();
                row.kind = kind;
                std::vector<float> l(nv);
                switch (kind) {
                    case kPeaked:  // a few clear favourites over a wide spread
                        for (float& x : l) x = rng.uniform(-12.0f, 4.0f);
                        for (int j = 0; j < 4; ++j) l[size_t(rng.index(n_vocab))] = rng.uniform(8.0f, 12.0f);
                        break;
                    case kFlat:  // the mass spread over the whole vocabulary
                        for (float& x : l) x = rng.uniform(-0.5f, 0.5f);
                        break;
                    default:  // coarse values (ties), and -inf, NaN, -0, +0, sometimes +inf
                        for (float& x : l) x = std::round(rng.uniform(-16.0f, 16.0f)) / 4.0f;
                        for (int j = 0; j < 6; ++j) {
                            l[size_t(rng.index(n_vocab))] = -INFINITY;
                            l[size_t(rng.index(n_vocab))] = std::nanf("");
                            l[size_t(rng.index(n_vocab))] = -0.0f;
                            l[size_t(rng.index(n_vocab))] = 0.0f;
                        }
                        if (s % 3 == 1) l[size_t(rng.index(n_vocab))] = INFINITY;
                        break;
                }
                // histories lean to the best tokens, so that the penalty changes the order
                for (int32_t j = 0; j < settings[s].history; ++j) {
                    int32_t t = rng.index(n_vocab);
                    if (j % 4 == 0) t = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
                    if (j % 97 == 0) t = n_vocab + rng.index(5);  // out of range: skipped
                    row.history.push_back(t);
                }
                pyr::Sampler sampler(row.p);
                row.draw = sampler.peek(row.history, n_vocab);
                row.list_at = lists.size();
                lists.insert(lists.end(), row.draw.penalized.begin(), row.draw.penalized.end());
                logits.insert(logits.end(), l.begin(), l.end());
                rows.push_back(std::move(row));
            }
        const auto n_rows = int32_t(rows.size());
        DeviceArray<float> d_logits(logits);
        DeviceArray<int32_t> d_lists(std::max<size_t>(lists.size(), 1));
        if (!lists.empty()) d_lists.upload(lists);
        std::vector<K::SampleRow> desc(static_cast<size_t>(n_rows));
        for (int32_t r = 0; r < n_rows; ++r) {
            const Row& row = rows[size_t(r)];
            K::SampleRow& d = desc[size_t(r)];
            d.logits = d_logits.get() + size_t(r) * nv;
            d.temperature = row.p.temperature, d.top_k = row.p.top_k;
            d.top_p = row.p.top_p, d.min_p = row.p.min_p, d.repeat_penalty = row.p.repeat_penalty;
            d.penalized = d_lists.get() + row.list_at;
            d.n_penalized = int32_t(row.draw.penalized.size());
            d.u = row.draw.u;
        }
        DeviceArray<K::SampleRow> d_rows(desc);
        DeviceArray<int32_t> d_out(static_cast<size_t>(n_rows));
        d_out.poison();
        LAUNCH_OK(K::sample_rows(d_rows.get(), n_rows, n_vocab, d_out.get(), nullptr));
        const std::vector<int32_t> out = d_out.download();
        for (int32_t r = 0; r < n_rows; ++r) {
            const Row& row = rows[size_t(r)];
            const std::vector<float> l(logits.begin() + ptrdiff_t(size_t(r) * nv),
                                       logits.begin() + ptrdiff_t(size_t(r + 1) * nv));
            pyr::Sampler sampler(row.p);
            const int32_t want = sampler.sample_with(l.data(), n_vocab, row.draw);
            INFO("row " << r << " (logits kind " << row.kind << "): temperature "
                        << row.p.temperature << ", top_k " << row.p.top_k << ", top_p "
                        << row.p.top_p << ", min_p " << row.p.min_p << ", penalty "
                        << row.p.repeat_penalty << " on " << row.draw.penalized.size()
                        << " ids, u " << row.draw.u << "; kernel " << out[size_t(r)]
                        << ", CPU " << want);
            ++rows_total;
            if (row.p.temperature <= 0.0f) {  // greedy: exact
                CHECK(out[size_t(r)] == want);
                continue;
            }
            const SampleRef ref = sample_reference(row.p, l, row.draw.penalized, row.draw.u);
            REQUIRE(ref.full == want);  // the rule: the whole sorted set gives the CPU's token
            const bool top_k = row.p.top_k > 0 && row.p.top_k < n_vocab;
            const bool exact = top_k && row.p.top_k <= K::kSampleCandidates;
            if (out[size_t(r)] == -1) {
                ++minus_ones;
                CHECK_MESSAGE(!exact, "-1 where the candidates are the whole set");
                CHECK_MESSAGE(n_vocab > K::kSampleCandidates, "-1 with every token a candidate");
            }
            if (out[size_t(r)] == ref.prefix) continue;
            // The only allowed difference: the kernel's sum over the whole set (a tree, not the
            // CPU's id order) differs in its last bits and u lies on a boundary between two
            // tokens, where a sum a few ulps off picks the neighbour.
            const bool near_tie = !exact && (ref.prefix_with_sum(ref.sum * (1 + 1e-12), row.p, row.draw.u) == out[size_t(r)] ||
                                             ref.prefix_with_sum(ref.sum * (1 - 1e-12), row.p, row.draw.u) == out[size_t(r)]);
            near_ties += near_tie;
            CHECK_MESSAGE(near_tie, "kernel " << out[size_t(r)] << ", the best 1024 decide "
                                              << ref.prefix);
        }
    }
    MESSAGE(rows_total << " rows: " << minus_ones << " left to the host (-1), " << near_ties
                       << " near-tie differences (expected 0 on random data)");
    CHECK(minus_ones > 0);  // the flat rows without top-k: the host's case was exercised
    CHECK(near_ties == 0);
}

TEST_CASE("sample_rows: bad arguments are refused, no rows is a no-op") {
    GPU_OR_SKIP();
    DeviceArray<K::SampleRow> d_rows(std::vector<K::SampleRow>(1));
    DeviceArray<int32_t> d_out(1);
    CHECK(K::sample_rows(d_rows.get(), -1, 100, d_out.get(), nullptr) == cudaErrorInvalidValue);
    CHECK(K::sample_rows(d_rows.get(), 1, 0, d_out.get(), nullptr) == cudaErrorInvalidValue);
    CHECK(K::sample_rows(d_rows.get(), 1, K::kSampleMaxVocab + 1, d_out.get(), nullptr) ==
          cudaErrorInvalidValue);
    CHECK(K::sample_rows(nullptr, 1, 100, d_out.get(), nullptr) == cudaErrorInvalidValue);
    CHECK(K::sample_rows(d_rows.get(), 0, 100, d_out.get(), nullptr) == cudaSuccess);
}

// The largest vocabulary the penalty bitmap allows, with a penalty on its last id.
TEST_CASE("sample_rows: the largest vocabulary, penalized ids at its end") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n_vocab = K::kSampleMaxVocab;
    std::vector<float> l = rng.floats(size_t(n_vocab), -4.0f, 4.0f);
    l[size_t(n_vocab - 1)] = 30.0f, l[size_t(n_vocab - 2)] = 29.0f;
    const std::vector<int32_t> pen = {n_vocab - 1};  // 30 / 1.3 < 29: the runner-up wins
    DeviceArray<float> d_l(l);
    DeviceArray<int32_t> d_pen(pen);
    std::vector<K::SampleRow> desc(2);
    for (K::SampleRow& d : desc) d.logits = d_l.get(), d.penalized = d_pen.get(), d.n_penalized = 1, d.repeat_penalty = 1.3f;
    desc[1].temperature = 0.5f, desc[1].top_k = 2, desc[1].u = 0.0;
    DeviceArray<K::SampleRow> d_rows(desc);
    DeviceArray<int32_t> d_out(2);
    d_out.poison();
    LAUNCH_OK(K::sample_rows(d_rows.get(), 2, n_vocab, d_out.get(), nullptr));
    const std::vector<int32_t> out = d_out.download();
    CHECK(out[0] == n_vocab - 2);
    CHECK(out[1] == n_vocab - 2);
}
