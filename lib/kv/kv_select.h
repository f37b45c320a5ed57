// Building blocks of the keep/drop decisions: scoring keys from attention rows, pooling,
// stable top-k, and the rolling window of recent attention rows a layer keeps.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pyr {

// Scores of keys [key_begin, key_end) from `rows` (n_rows, n_keys), oldest row first:
// s_j = (1/n_rows) * sum_i w_i * rows[i][j]; with `weighted`, w_i = 1 + 0.2 * i / (n_rows - 1)
// (PyramidInfer's linspace 1.0 -> 1.2), else w_i = 1.
std::vector<double> window_scores(const float* rows, int32_t n_rows, int32_t n_keys,
                                  int32_t key_begin, int32_t key_end, bool weighted);

// Max-pool over neighbouring scores (kernel odd, stride 1, window clipped at the ends), as
// SnapKV smooths its votes so that whole phrases survive. kernel <= 1 leaves them.
std::vector<double> max_pool(std::vector<double> scores, int32_t kernel);

// Indices of the k best scores, in ascending index order. Ties go to the earlier index.
std::vector<int32_t> top_k_in_order(const std::vector<double>& scores, int32_t k);

// The attention rows of a layer's most recent queries, over the cache slots generation may
// still compress: a window of columns starting at a slot the caller tracks (the layer's
// first uncompressed slot; older slots are final and never scored again, so their columns
// are not kept). Column c of the window is that slot + c. A key newer than a row has 0 in it.
class RecentRows {
public:
    explicit RecentRows(int32_t capacity = 0)
        : capacity_(capacity), slots_(size_t(std::max(capacity, 0))) {}
    int32_t capacity() const { return capacity_; }
    int32_t size() const { return count_; }
    // Adds rows (n_rows, n_keys) over all n_keys slots, keeping their columns from slot
    // `first` on (the window's start); the oldest rows beyond capacity leave.
    void push(const float* rows, int32_t n_rows, int32_t n_keys, int32_t first);
    // window_scores() of window columns [begin, end) over the rows, oldest first.
    std::vector<double> scores(int32_t begin, int32_t end, bool weighted) const;
    // The window's first n columns leave it (their slots became final or were dropped).
    void drop_front(int32_t n) { dropped_ += n; }

private:
    // Row i (oldest first) is slots_[slot(i)]. The slots are reused, not
    // reallocated: a layer pushes a row at every decode step, for every sequence of a batch
    // (host time per sequence and layer adds to every step of a large batch). A row keeps
    // the columns it was pushed with; the window's column c is its element
    // c + dropped_ - base (columns that left the window are skipped, not erased: erasing
    // them moved every row's data at each compression).
    struct Row {
        std::vector<float> cols;  // window columns from `base` on (shorter: zeros follow)
        int64_t base = 0;         // dropped_ when pushed
    };
    size_t slot(int32_t i) const { return size_t((head_ + i) % capacity_); }

    int32_t capacity_;
    std::vector<Row> slots_;
    int32_t head_ = 0, count_ = 0;
    int64_t dropped_ = 0;  // window columns dropped so far
};

}  // namespace pyr
