#include "kv/kv_select.h"

#include <algorithm>
#include <numeric>

namespace pyr {

std::vector<double> window_scores(const float* rows, int32_t n_rows, int32_t n_keys,
                                  int32_t key_begin, int32_t key_end, bool weighted) {
    std::vector<double> s(size_t(key_end - key_begin), 0.0);
    for (int32_t i = 0; i < n_rows; ++i) {
        const double w = weighted && n_rows > 1 ? 1.0 + 0.2 * i / (n_rows - 1) : 1.0;
        const float* row = rows + int64_t(i) * n_keys;
        for (int32_t j = key_begin; j < key_end; ++j) s[size_t(j - key_begin)] += w * row[j];
    }
    for (double& v : s) v /= n_rows > 0 ? n_rows : 1;
    return s;
}

std::vector<double> max_pool(const std::vector<double>& scores, int32_t kernel) {
    if (kernel <= 1) return scores;
    const int64_t half = kernel / 2, n = int64_t(scores.size());
    std::vector<double> out(scores.size());
    for (int64_t j = 0; j < n; ++j) {
        const int64_t lo = std::max<int64_t>(0, j - half), hi = std::min<int64_t>(n - 1, j + half);
        out[size_t(j)] = *std::max_element(scores.begin() + lo, scores.begin() + hi + 1);
    }
    return out;
}

std::vector<int32_t> top_k_in_order(const std::vector<double>& scores, int32_t k) {
    std::vector<int32_t> idx(scores.size());
    std::iota(idx.begin(), idx.end(), 0);
    k = std::max(0, std::min(k, int32_t(idx.size())));
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
        return scores[size_t(a)] > scores[size_t(b)] || (scores[size_t(a)] == scores[size_t(b)] && a < b);
    });
    idx.resize(size_t(k));
    std::sort(idx.begin(), idx.end());
    return idx;
}

void RecentRows::push(const float* rows, int32_t n_rows, int32_t n_keys) {
    for (int32_t i = 0; i < n_rows; ++i) {
        const float* r = rows + int64_t(i) * n_keys;
        rows_.emplace_back(r, r + n_keys);
        if (int32_t(rows_.size()) > capacity_) rows_.pop_front();
    }
}

void RecentRows::retain(const std::vector<int32_t>& keep) {
    for (auto& row : rows_) {
        std::vector<float> kept;
        kept.reserve(keep.size());
        for (int32_t j : keep) kept.push_back(size_t(j) < row.size() ? row[size_t(j)] : 0.0f);
        row = std::move(kept);
    }
}

std::vector<float> RecentRows::matrix(int32_t n_keys) const {
    std::vector<float> m(rows_.size() * size_t(n_keys), 0.0f);
    for (size_t i = 0; i < rows_.size(); ++i)
        std::copy_n(rows_[i].begin(), std::min(rows_[i].size(), size_t(n_keys)),
                    m.begin() + std::ptrdiff_t(i * size_t(n_keys)));
    return m;
}

}  // namespace pyr
