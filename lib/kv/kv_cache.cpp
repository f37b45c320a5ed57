#include "kv/kv_cache.h"

#include "common/error.h"

namespace pyr {

KvCache::KvCache(int n_layer, std::unique_ptr<KvStorage> storage)
    : positions_(size_t(n_layer)), storage_(std::move(storage)) {}

void KvCache::appended(int il, const int32_t* positions, int32_t n) {
    positions_[il].insert(positions_[il].end(), positions, positions + n);
}

RetainMoves retain_moves(const std::vector<int32_t>& keep, int32_t size) {
    RetainMoves m;
    m.n_keep = int32_t(keep.size());
    const int32_t shift = size - m.n_keep;
    while (m.first_moved < m.n_keep && keep[size_t(m.first_moved)] == m.first_moved) ++m.first_moved;
    m.back_moved = m.n_keep;
    while (m.back_moved > 0 && keep[size_t(m.back_moved - 1)] == m.back_moved - 1 + shift) --m.back_moved;
    return m;
}

void KvCache::retain(int il, const std::vector<int32_t>& keep) {
    auto& pos = positions_[il];
    for (size_t i = 0; i < keep.size(); ++i) {
        PYR_ASSERT(keep[i] >= 0 && keep[i] < int32_t(pos.size()));
        PYR_ASSERT(i == 0 || keep[i] > keep[i - 1]);
    }
    storage_->retain(il, keep);  // may throw: the positions change only after it
    // in place (a policy prunes every step, for every sequence of a batch): keep[i] >= i, so
    // a slot is read before it is overwritten
    for (size_t i = 0; i < keep.size(); ++i) pos[i] = pos[size_t(keep[i])];
    pos.resize(keep.size());
}

void KvCache::truncate(const std::vector<int32_t>& sizes) {
    PYR_ASSERT(int(sizes.size()) == n_layer());
    for (int il = 0; il < n_layer(); ++il) {
        if (size(il) > sizes[size_t(il)]) {
            storage_->truncate(il, sizes[size_t(il)]);
            positions_[size_t(il)].resize(size_t(sizes[size_t(il)]));
        }
    }
}

std::vector<int32_t> KvCache::sizes() const {
    std::vector<int32_t> s(positions_.size());
    for (size_t il = 0; il < s.size(); ++il) s[il] = int32_t(positions_[il].size());
    return s;
}

uint64_t KvCache::bytes() const {
    uint64_t total = 0;
    for (int il = 0; il < n_layer(); ++il) total += bytes(il);
    return total;
}

}  // namespace pyr
