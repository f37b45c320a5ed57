// One session's KV cache: per layer, the original positions of the cached tokens (the
// bookkeeping, here) and their keys/values (the bytes, in a backend-owned KvStorage).
// Layers may hold different token sets: compression policies (lib/kv/) decide what is
// kept; the backend moves the bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace pyr {

// Backend-owned key/value storage of one session, all layers.
class KvStorage {
public:
    virtual ~KvStorage() = default;
    // Bytes one cached token takes in one layer (keys + values, all KV heads).
    virtual uint64_t bytes_per_token() const = 0;
    // Keep only the slots `keep` (strictly ascending indices into layer il's cache), in order.
    virtual void retain(int il, const std::vector<int32_t>& keep) = 0;
    // Drop slots from the end so that n remain (rolls back an interrupted step).
    virtual void truncate(int il, int32_t n) = 0;
    // Rows (one token's keys and values in one layer) that retain() has moved so far: the
    // cost of a policy's decisions in memory traffic.
    virtual uint64_t rows_moved() const = 0;
};

// Where a retain's kept rows (keep, strictly ascending, of a layer's `size` rows) move, in
// order, with the fewest moves: toward the front (row keep[i] -> row i; entries from
// first_moved on move) or toward the back (keep[i] -> size - n_keep + i; entries before
// back_moved move). A storage that can leave a gap before a layer's rows picks the cheaper.
struct RetainMoves {
    int32_t n_keep = 0, first_moved = 0, back_moved = 0;
    bool toward_back() const { return back_moved < n_keep - first_moved; }
    int32_t rows_moved(bool back) const { return back ? back_moved : n_keep - first_moved; }
};
RetainMoves retain_moves(const std::vector<int32_t>& keep, int32_t size);

class KvCache {
public:
    KvCache(int n_layer, std::unique_ptr<KvStorage> storage);

    int n_layer() const { return int(positions_.size()); }
    int32_t size(int il) const { return int32_t(positions_[il].size()); }
    // Original positions of the cached tokens of layer il, in cache order.
    const std::vector<int32_t>& positions(int il) const { return positions_[il]; }
    KvStorage& storage() { return *storage_; }

    // Records that the backend appended tokens at `positions` to layer il's storage.
    void appended(int il, const int32_t* positions, int32_t n);
    // Keeps the slots `keep` (ascending) of layer il, in storage and bookkeeping.
    void retain(int il, const std::vector<int32_t>& keep);
    // Rolls every layer back to the sizes in `sizes` (from sizes()).
    void truncate(const std::vector<int32_t>& sizes);
    std::vector<int32_t> sizes() const;

    // Tokens processed through the model so far (what an uncompressed cache would hold).
    int32_t n_processed() const { return n_processed_; }
    void set_n_processed(int32_t n) { n_processed_ = n; }

    uint64_t bytes(int il) const { return uint64_t(size(il)) * storage_->bytes_per_token(); }
    uint64_t bytes() const;
    uint64_t bytes_full() const {
        return uint64_t(n_processed_) * uint64_t(n_layer()) * storage_->bytes_per_token();
    }

private:
    std::vector<std::vector<int32_t>> positions_;
    std::unique_ptr<KvStorage> storage_;
    int32_t n_processed_ = 0;
};

}  // namespace pyr
