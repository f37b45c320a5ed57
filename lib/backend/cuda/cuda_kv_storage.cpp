#include "backend/cuda/cuda_kv_storage.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "common/error.h"
#include "common/log.h"

namespace pyr::cuda {

CudaKvStorage& cuda_storage(KvCache& cache) {
    auto* s = dynamic_cast<CudaKvStorage*>(&cache.storage());
    PYR_ASSERT(s != nullptr);
    return *s;
}

CompactAfter::~CompactAfter() {
    if (done_) return;
    try {
        c_.flush();
    } catch (const std::exception& e) {
        PYR_LOG_WARN(std::string("cuda backend: compacting KV caches after an error failed too: ") + e.what());
    }
}

void CompactAfter::done() {
    done_ = true;
    c_.flush();
}

// ---- KV compaction ----------------------------------------------------------------------

// The device array of 2 * n_jobs CompactJobs (K and V share a source list), then the lists.
size_t KvCompactor::bytes_for(size_t n_jobs, size_t n_src) const {
    return 2 * n_jobs * sizeof(kernels::CompactJob) + n_src * sizeof(int32_t);
}

int32_t KvCompactor::count_moving(const Job& j) {
    const auto [lo, hi] = moving(j);
    return hi - lo;
}

std::pair<int32_t, int32_t> KvCompactor::moving(const Job& j) {
    // all rows move one way, so the rows that stay are a prefix (toward the front) or a suffix
    int32_t lo = 0, hi = int32_t(j.src.size());
    if (!j.toward_back)
        while (lo < hi && j.src[size_t(lo)] == j.dst0 + lo) ++lo;
    else
        while (hi > lo && j.src[size_t(hi - 1)] == j.dst0 + hi - 1) --hi;
    return {lo, hi};
}

void KvCompactor::add(const void* owner, void** table, size_t row_bytes, int32_t gap,
                      const std::vector<int32_t>& keep, int32_t new_gap, bool toward_back,
                      std::vector<DeviceBuffer>&& emptied) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = index_.find(table);
    if (it != index_.end()) {  // rows of rows: keep indexes what the pending job keeps
        Job& j = jobs_[it->second];
        PYR_ASSERT(j.toward_back == toward_back && j.dst0 == gap);
        Job composed{owner, table, row_bytes, j.gap_before, new_gap, toward_back,
                     std::vector<int32_t>(keep.size()), {}};
        for (size_t i = 0; i < keep.size(); ++i) {
            PYR_ASSERT(size_t(keep[i]) < j.src.size());
            composed.src[i] = j.src[size_t(keep[i])];
        }
        const int32_t n_moving = count_moving(composed);
        const size_t total = n_moving_ - size_t(j.n_moving) + size_t(n_moving);
        reserve_device(jobs_.size(), total);
        n_moving_ = total;
        j.src = std::move(composed.src);
        j.dst0 = new_gap;
        j.n_moving = n_moving;
        for (DeviceBuffer& b : emptied) j.emptied.push_back(std::move(b));
        // nothing moves and the gap is as before: nothing reads the emptied pages any more
        if (n_moving == 0 && j.dst0 == j.gap_before) remove(it->second);
        return;
    }
    Job j{owner, table, row_bytes, gap, new_gap, toward_back, std::vector<int32_t>(keep.size()), {}};
    for (size_t i = 0; i < keep.size(); ++i) j.src[i] = gap + keep[i];
    j.n_moving = count_moving(j);
    if (j.n_moving == 0 && new_gap == gap) {  // nothing to do: nothing reads the emptied pages
        emptied.clear();
        return;
    }
    reserve_device(jobs_.size() + 1, n_moving_ + size_t(j.n_moving));
    j.emptied = std::move(emptied);
    n_moving_ += size_t(j.n_moving);
    jobs_.push_back(std::move(j));
    index_[table] = jobs_.size() - 1;
}

// Device room for n_jobs jobs moving n_moving rows in all (what flush uploads), taken before
// a job changes: an out-of-memory error leaves the queue as it was.
void KvCompactor::reserve_device(size_t n_jobs, size_t n_moving) {
    const size_t need = bytes_for(n_jobs, n_moving);
    if (need > device_.bytes())
        device_ = ctx_->alloc(std::max({need, 2 * device_.bytes(), size_t(64) << 10}), Use::Scratch);
}

void KvCompactor::remove(size_t i) {
    n_moving_ -= size_t(jobs_[i].n_moving);
    index_.erase(jobs_[i].table);
    if (i + 1 < jobs_.size()) {
        jobs_[i] = std::move(jobs_.back());
        index_[jobs_[i].table] = i;
    }
    jobs_.pop_back();
}

std::optional<bool> KvCompactor::pending(kernels::KvPages table) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = index_.find(table);
    if (it == index_.end()) return std::nullopt;
    return jobs_[it->second].toward_back;
}

void KvCompactor::drop(const void* owner) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = jobs_.size(); i-- > 0;)
        if (jobs_[i].owner == owner) remove(i);
}

void KvCompactor::flush() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (jobs_.empty()) return;
    // only the entries that move go up (streaming's step: the sinks, not the window)
    std::vector<std::pair<int32_t, int32_t>> moves(jobs_.size());
    size_t n_moving = 0;
    for (size_t i = 0; i < jobs_.size(); ++i) {
        moves[i] = moving(jobs_[i]);
        n_moving += size_t(moves[i].second - moves[i].first);
    }
    const size_t n_jobs = 2 * jobs_.size(), jobs_bytes = n_jobs * sizeof(kernels::CompactJob);
    const size_t bytes = bytes_for(jobs_.size(), n_moving);
    PYR_ASSERT(n_moving == n_moving_ && device_.bytes() >= bytes);  // taken by add()
    // host_ is used from the front once the last flush's copy has passed (then every earlier
    // one has), else after what the copies still in flight read: the host never waits for
    // the device here unless host_ is full (several flushes behind one long kernel, e.g. the
    // caches of a batch shrinking after a first prefill's layer, queued behind its MLP).
    size_t from = uploaded_->done() ? 0 : (host_used_ + 15) & ~size_t(15);
    if (from + bytes > host_.bytes()) {
        if (from > 0) uploaded_->wait();
        from = 0;
        host_.reserve(std::max(bytes, size_t(64) << 10));
    }
    host_used_ = from + bytes;
    char* host = host_.as<char>() + from;
    auto* jobs = reinterpret_cast<kernels::CompactJob*>(host);
    auto* srcs = reinterpret_cast<int32_t*>(host + jobs_bytes);
    const auto* srcs_dev = reinterpret_cast<const int32_t*>(device_.as<char>() + jobs_bytes);
    size_t at = 0, max_row_bytes = 0;
    for (size_t i = 0; i < jobs_.size(); ++i) {
        const Job& j = jobs_[i];
        const auto [lo, hi] = moves[i];
        std::copy(j.src.begin() + lo, j.src.begin() + hi, srcs + at);
        kernels::CompactJob c;  // the keys, then the values (kernels.h: a page's halves)
        c.table = j.table;
        c.src = srcs_dev + at;
        c.row_bytes = j.row_bytes;
        c.n = hi - lo;
        c.dst0 = j.dst0 + lo;
        c.toward_back = j.toward_back ? 1 : 0;
        c.gap = j.dst0;  // the keys' job writes the table's gap
        jobs[2 * i] = c;
        c.offset = uint64_t(kernels::kKvPageRows) * j.row_bytes;
        c.gap = -1;
        jobs[2 * i + 1] = c;
        at += size_t(hi - lo);
        max_row_bytes = std::max(max_row_bytes, j.row_bytes);
    }
    // Failing to queue the launch keeps the jobs for the next flush: the host's tables
    // already show the moves, so they must still happen.
    const cudaStream_t st = ctx_->stream();
    PYR_CUDA_CHECK(cudaMemcpyAsync(device_.get(), host, bytes, cudaMemcpyHostToDevice, st));
    try {
        uploaded_->record(st);
        PYR_CUDA_CHECK(kernels::compact_rows(device_.as<kernels::CompactJob>(), int32_t(n_jobs),
                                             max_row_bytes, st));
    } catch (...) {
        // uploaded_ may not mark the copy queued above, which reads host_: let it finish
        // before a later flush writes there
        cudaStreamSynchronize(st);
        cudaGetLastError();
        throw;
    }
    jobs_.clear();  // the emptied pages are freed (stream-ordered) after the launch
    index_.clear();
    n_moving_ = 0;
}

// ---- KV storage -----------------------------------------------------------------------

CudaKvStorage::CudaKvStorage(std::shared_ptr<Context> ctx, std::shared_ptr<KvCompactor> compactor,
                             kernels::Dt dt, int n_layer, int32_t n_ctx, int32_t kv_dim,
                             bool back_moves)
    : ctx_(std::move(ctx)), compactor_(std::move(compactor)), dt_(dt), layers_(size_t(n_layer)),
      n_ctx_(n_ctx), kv_dim_(kv_dim),
      max_pages_(pages_for(n_ctx)), back_moves_(back_moves) {
    const DeviceGuard on_device(ctx_->device());
    const size_t bytes = size_t(n_layer) * size_t(1 + max_pages_) * sizeof(void*);
    tables_ = ctx_->alloc(bytes, Use::Kv);
    PYR_CUDA_CHECK(cudaMemsetAsync(tables_.get(), 0, bytes, ctx_->stream()));  // every gap 0
}

CudaKvStorage::~CudaKvStorage() { compactor_->drop(this); }

uint64_t CudaKvStorage::bytes_when_full(int n_layer, int32_t n_ctx, int32_t kv_dim,
                                        int32_t logits_floats) {
    const uint64_t pages = uint64_t(pages_for(std::max(n_ctx, 0)));
    return uint64_t(n_layer) * (pages * page_bytes(kv_dim) + (1 + pages) * sizeof(void*)) +
           uint64_t(logits_floats) * 4;
}

void CudaKvStorage::drop_gap_pages(Layer& layer) {
    const int32_t n = layer.gap() / kernels::kKvPageRows;
    for (int32_t p = 0; p < n; ++p) PYR_ASSERT(layer.pages[size_t(p)].get() == nullptr);
    layer.pages.erase(layer.pages.begin(), layer.pages.begin() + n);
    layer.table.erase(layer.table.begin() + 1, layer.table.begin() + 1 + n);
    layer.set_gap(layer.gap() - n * kernels::kKvPageRows);
    layer.stale_from = 0;
}

int32_t CudaKvStorage::reserve(int il, int32_t n_total) {
    Layer& layer = layers_[size_t(il)];
    PYR_ASSERT(n_total <= n_ctx_);
    if (compactor_->pending(table(il))) compactor_->flush();
    const int32_t table_slots = max_pages_ * kernels::kKvPageRows;
    bool shift = false;
    if (layer.gap() + n_total > table_slots) {  // past the table's end
        const int32_t page_start = layer.gap() / kernels::kKvPageRows * kernels::kKvPageRows;
        if (layer.gap() - page_start + n_total > table_slots) {
            // the rows move to the front of their first page (rare: a layer growing to
            // nearly n_ctx rows after dropping some at its front)
            std::vector<int32_t> all(size_t(layer.size));
            std::iota(all.begin(), all.end(), 0);
            compactor_->add(this, table(il), size_t(kv_dim_) * 2, layer.gap(), all, page_start,
                            false, {});
            compactor_->flush();
            layer.set_gap(page_start);
        }
        shift = true;
    }
    // the new pages first: out of memory leaves the table as it was (also unshifted: host
    // and device keep the same entries)
    const int32_t dropped = shift ? layer.gap() / kernels::kKvPageRows : 0;
    const size_t have = layer.pages.size() - size_t(dropped),
                 need = size_t(pages_for(layer.gap() - dropped * kernels::kKvPageRows + n_total));
    std::vector<DeviceBuffer> added;
    while (have + added.size() < need) added.push_back(ctx_->alloc(page_bytes(kv_dim_), Use::Kv));
    if (shift) drop_gap_pages(layer);
    for (DeviceBuffer& page : added) {
        layer.table.push_back(page.get());
        layer.pages.push_back(std::move(page));
    }
    return std::min(layer.stale_from, int32_t(1 + have));
}

void CudaKvStorage::table_uploaded(int il) {
    Layer& layer = layers_[size_t(il)];
    layer.stale_from = int32_t(layer.table.size());
}

void CudaKvStorage::retain(int il, const std::vector<int32_t>& keep) {
    Layer& layer = layers_[size_t(il)];
    for (size_t i = 0; i < keep.size(); ++i)
        PYR_ASSERT(keep[i] >= 0 && keep[i] < layer.size && (i == 0 || keep[i] > keep[i - 1]));
    const int32_t n = int32_t(keep.size());
    if (n == layer.size) return;  // strictly ascending and all of them: nothing moves
    const DeviceGuard on_device(ctx_->device());
    // Moved in place, later, with every other cache's moves (KvCompactor), which then frees
    // the pages outside the kept rows (the move reads them first). A job pending for the
    // layer decides the way (both become one job).
    const std::optional<bool> pending = compactor_->pending(table(il));
    const RetainMoves moves = retain_moves(keep, layer.size);
    const bool toward_back = pending ? *pending : back_moves_ && moves.toward_back();
    const int32_t new_gap = toward_back ? layer.gap() + (layer.size - n) : layer.gap();
    const size_t first_used = size_t(new_gap / kernels::kKvPageRows),
                 end_used = n > 0 ? size_t(pages_for(new_gap + n)) : first_used;
    std::vector<DeviceBuffer> emptied;
    std::vector<size_t> emptied_at;
    for (size_t p = 0; p < layer.pages.size(); ++p)
        if ((p < first_used || p >= end_used) && layer.pages[p].get() != nullptr) {
            emptied.push_back(std::move(layer.pages[p]));
            emptied_at.push_back(p);
        }
    try {
        compactor_->add(this, table(il), size_t(kv_dim_) * 2, layer.gap(), keep, new_gap, toward_back,
                        std::move(emptied));
    } catch (...) {  // nothing queued: the layer as it was
        for (size_t i = 0; i < emptied.size(); ++i) layer.pages[emptied_at[i]] = std::move(emptied[i]);
        throw;
    }
    layer.pages.resize(end_used);
    layer.table.resize(1 + end_used);
    layer.stale_from = std::min(layer.stale_from, int32_t(layer.table.size()));
    layer.set_gap(new_gap);
    layer.size = n;
    rows_moved_ += uint64_t(moves.rows_moved(toward_back));
}

float* CudaKvStorage::last_logits(int32_t n_vocab) {
    if (last_logits_.bytes() != size_t(n_vocab) * 4)
        last_logits_ = ctx_->alloc(size_t(n_vocab) * 4, Use::Scratch);
    return last_logits_.as<float>();
}

void CudaKvStorage::truncate(int il, int32_t n) {
    PYR_ASSERT(n >= 0 && n <= size(il));
    layers_[size_t(il)].size = n;
}

}  // namespace pyr::cuda
