#include "kv/kv_select.h"

#include <algorithm>
#include <numeric>

namespace pyr {

namespace {

// PyramidInfer's row weights (linspace 1.0 -> 1.2, oldest row first), or 1.
double row_weight(int32_t i, int32_t n_rows, bool weighted) {
    return weighted && n_rows > 1 ? 1.0 + 0.2 * i / (n_rows - 1) : 1.0;
}

}  // namespace

std::vector<double> window_scores(const float* rows, int32_t n_rows, int32_t n_keys,
                                  int32_t key_begin, int32_t key_end, bool weighted) {
    std::vector<double> s(size_t(key_end - key_begin), 0.0);
    for (int32_t i = 0; i < n_rows; ++i) {
        const double w = row_weight(i, n_rows, weighted);
        const float* row = rows + int64_t(i) * n_keys;
        for (int32_t j = key_begin; j < key_end; ++j) s[size_t(j - key_begin)] += w * row[j];
    }
    for (double& v : s) v /= n_rows > 0 ? n_rows : 1;
    return s;
}

std::vector<double> max_pool(std::vector<double> scores, int32_t kernel) {
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
    const int32_t n = int32_t(scores.size());
    k = std::max(0, std::min(k, n));
    auto better = [&](int32_t a, int32_t b) {
        return scores[size_t(a)] > scores[size_t(b)] || (scores[size_t(a)] == scores[size_t(b)] && a < b);
    };
    std::vector<int32_t> idx(static_cast<size_t>(n));
    std::iota(idx.begin(), idx.end(), 0);
    if (n - k < k) {
        // Fewer to drop than to keep (H2O drops one a step): find the n - k worst in the
        // same total order, and keep the rest, already in index order.
        std::partial_sort(idx.begin(), idx.begin() + (n - k), idx.end(),
                          [&](int32_t a, int32_t b) { return better(b, a); });
        std::vector<bool> dropped(size_t(n), false);
        for (int32_t i = 0; i < n - k; ++i) dropped[size_t(idx[size_t(i)])] = true;
        std::vector<int32_t> keep;
        keep.reserve(size_t(k));
        for (int32_t j = 0; j < n; ++j)
            if (!dropped[size_t(j)]) keep.push_back(j);
        return keep;
    }
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), better);
    idx.resize(size_t(k));
    std::sort(idx.begin(), idx.end());
    return idx;
}

void RecentRows::push(const float* rows, int32_t n_rows, int32_t n_keys, int32_t first) {
    first = std::min(first, n_keys);
    // Rows that would leave again at once are not copied.
    for (int32_t i = std::max(0, n_rows - capacity_); i < n_rows; ++i) {
        const float* r = rows + int64_t(i) * n_keys;
        if (count_ < capacity_) {
            ++count_;
        } else {  // the oldest row leaves: its slot takes the new one
            head_ = (head_ + 1) % capacity_;
        }
        Row& row = slots_[slot(count_ - 1)];
        // the window is a little wider at each step until a compression: room to spare, so
        // that a reused row is not reallocated every time
        const size_t width = size_t(n_keys - first);
        if (row.cols.capacity() < width) row.cols.reserve(width + width / 4 + 16);
        row.cols.assign(r + first, r + n_keys);
        row.base = dropped_;
    }
}

// The same sums, in the same order, as window_scores() over the 0-padded matrix (a padded
// zero adds nothing), so selections match it bit for bit.
std::vector<double> RecentRows::scores(int32_t begin, int32_t end, bool weighted) const {
    std::vector<double> s(size_t(end - begin), 0.0);
    const int32_t n_rows = size();
    for (int32_t i = 0; i < n_rows; ++i) {
        const double w = row_weight(i, n_rows, weighted);
        const Row& row = slots_[slot(i)];
        const int64_t skip = dropped_ - row.base;  // its columns that left the window
        const float* r = row.cols.data() + std::min<int64_t>(skip, int64_t(row.cols.size()));
        const int32_t width = int32_t(std::max<int64_t>(int64_t(row.cols.size()) - skip, 0));
        const int32_t stop = std::min(end, width);
        for (int32_t j = begin; j < stop; ++j) s[size_t(j - begin)] += w * r[j];
    }
    for (double& v : s) v /= n_rows > 0 ? n_rows : 1;
    return s;
}

}  // namespace pyr
