// The CUDA backend's KV storage: per (session, layer) paged caches in the model's 16-bit
// type, ragged -- each layer grows and shrinks on its own, by whole pages
// (kernels::kKvPageRows tokens), at either end -- and the compactor that moves their rows
// in place when a policy drops tokens.
#pragma once

#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "backend/cuda/cuda_context.h"
#include "kernels/kernels.h"
#include "kv/kv_cache.h"

namespace pyr::cuda {

// The KV caches' moves of rows in place (CudaKvStorage::retain), queued and run together by
// flush(): one upload of the jobs and their source lists from pinned memory, one launch
// (kernels::compact_rows, which also writes each cache's new gap into its page table), then
// the pages the moves emptied are freed (stream order: after the launch). The page tables
// keep their addresses, so a decode step's CUDA graph (keyed by them) replays after a move.
// One per backend, shared with every storage it makes; storages are pruned and destroyed by
// session threads while the engine's forward may run on another thread, so a mutex guards
// it. The backend flushes at the start of forward (what the policies' after_step queued) and
// after each of its retain loops.
class KvCompactor {
public:
    explicit KvCompactor(std::shared_ptr<Context> ctx)
        : ctx_(std::move(ctx)), uploaded_(std::make_unique<Event>()) {}

    // Queues: of the cache `table`'s rows (from slot `gap` on, keys and values of row_bytes),
    // rows keep[i] (ascending, within them) move to slots new_gap + i, every one toward the
    // front (new_gap + i <= gap + keep[i]) or, with toward_back, toward the back; the table's
    // gap becomes new_gap.
    // `emptied` (pages that hold no kept row afterwards) are freed once the move is queued. A
    // job pending for the same table is composed with this one (both in one job: they must
    // move the same way, pending() says which). Device memory for the job is taken now (an
    // out-of-memory error leaves nothing queued and `emptied` as it was).
    void add(const void* owner, void** table, size_t row_bytes, int32_t gap,
             const std::vector<int32_t>& keep, int32_t new_gap, bool toward_back,
             std::vector<DeviceBuffer>&& emptied);
    // The way the job pending for `table` moves its rows (true: toward the back), if any.
    std::optional<bool> pending(kernels::KvPages table);
    // Forgets owner's jobs (its pages are being freed).
    void drop(const void* owner);
    // Queues the pending jobs on the context's stream (the calling thread's device must be
    // the context's). If queuing fails they stay pending: the next flush runs them.
    void flush();

private:
    struct Job {
        const void* owner;
        void** table;
        size_t row_bytes;
        int32_t gap_before;        // the table's gap before the job
        int32_t dst0;              // the new gap: row i goes to slot dst0 + i
        bool toward_back;
        std::vector<int32_t> src;  // row i's slot before the job
        std::vector<DeviceBuffer> emptied;  // freed after the launch
        int32_t n_moving = 0;      // of src's entries (count_moving), what flush uploads
    };
    // The entries of a job whose rows move ([lo, hi) of src), or none.
    static std::pair<int32_t, int32_t> moving(const Job& j);
    static int32_t count_moving(const Job& j);
    void reserve_device(size_t n_jobs, size_t n_moving);
    size_t bytes_for(size_t n_jobs, size_t n_src) const;
    void remove(size_t i);  // jobs_[i], the mutex held

    std::shared_ptr<Context> ctx_;
    std::mutex mutex_;
    std::vector<Job> jobs_;
    std::unordered_map<kernels::KvPages, size_t> index_;  // table -> its job in jobs_
    size_t n_moving_ = 0;  // the jobs' moving entries (count_moving), summed
    PinnedBuffer host_;       // the jobs and source lists of the flushes in flight
    size_t host_used_ = 0;    // bytes of host_ whose copies may still be queued
    DeviceBuffer device_;     // the last flush's device copy, read by its launch
    std::unique_ptr<Event> uploaded_;  // recorded after the last flush's copy
};

class CudaKvStorage final : public KvStorage {
public:
    // back_moves false: a retain always moves the kept rows toward the front (for comparing)
    CudaKvStorage(std::shared_ptr<Context> ctx, std::shared_ptr<KvCompactor> compactor,
                  kernels::Dt dt, int n_layer, int32_t n_ctx, int32_t kv_dim, bool back_moves = true);
    ~CudaKvStorage() override;

    uint64_t bytes_per_token() const override { return 2 * uint64_t(kv_dim_) * 2; }
    // Moves the kept rows in place, toward the front or the back of the layer's rows,
    // whichever moves fewer (a job for the compactor; the host view changes now), and gives
    // back the pages that no longer hold any.
    void retain(int il, const std::vector<int32_t>& keep) override;
    void truncate(int il, int32_t n) override;
    uint64_t rows_moved() const override { return rows_moved_; }

    // Makes room for n_total rows in layer il: the pages that cover them. Returns the first
    // entry of host_table(il) that changed (table_entries(il) when none): the caller uploads
    // entries [that, table_entries(il)) to table(il) before a launch reads them, then says so
    // (table_uploaded; until then they count as changed). Flushes the
    // compactor first if the layer has a job pending (appends must follow it); past the
    // table's end, drops the entries of the pages wholly in the gap (the table shifts) and,
    // if still short, moves the rows to the front of their first page (queued and flushed).
    int32_t reserve(int il, int32_t n_total);
    void table_uploaded(int il);
    void set_size(int il, int32_t n) { layers_[size_t(il)].size = n; }
    int32_t size(int il) const { return layers_[size_t(il)].size; }
    // Rows the layer can hold without a new page.
    int32_t capacity(int il) const {
        const Layer& l = layers_[size_t(il)];
        return int32_t(l.pages.size()) * kernels::kKvPageRows - l.gap();
    }
    // Layer il's page table (kernels.h: KvPages) on the device (its address never changes)
    // and on the host, and its entries in use.
    void** table(int il) const { return tables_.as<void*>() + int64_t(il) * (1 + max_pages_); }
    void* const* host_table(int il) const { return layers_[size_t(il)].table.data(); }
    int32_t table_entries(int il) const { return int32_t(layers_[size_t(il)].table.size()); }
    int32_t kv_dim() const { return kv_dim_; }
    // What a storage holds when all its layers are full (Backend::kv_storage_bytes), with
    // its last logits when the backend samples on the device (n_vocab floats; else 0).
    static uint64_t bytes_when_full(int n_layer, int32_t n_ctx, int32_t kv_dim, int32_t logits_floats);
    // The session's last logits when its step sampled on the device and left them there
    // (allocated on first use; Backend::read_logits copies them out). Null until then.
    float* last_logits(int32_t n_vocab);
    const float* last_logits() const { return last_logits_.as<float>(); }

private:
    struct Layer {
        // page i holds slots [i, i + 1) * kKvPageRows; pages wholly in the gap are empty
        std::vector<DeviceBuffer> pages;
        std::vector<void*> table{nullptr};  // as the device table holds it: the gap, the pages
        int32_t size = 0;
        int32_t stale_from = 1;  // entries of `table` from here on may differ on the device
        int32_t gap() const { return int32_t(reinterpret_cast<uintptr_t>(table[0])); }
        void set_gap(int32_t g) { table[0] = reinterpret_cast<void*>(uintptr_t(g)); }
    };
    static size_t page_bytes(int32_t kv_dim) { return 2 * size_t(kernels::kKvPageRows) * size_t(kv_dim) * 2; }
    static int32_t pages_for(int32_t n) {  // no overflow up to INT32_MAX rows
        return int32_t((int64_t(n) + kernels::kKvPageRows - 1) / kernels::kKvPageRows);
    }
    void drop_gap_pages(Layer& layer);  // the table shifts

    std::shared_ptr<Context> ctx_;
    std::shared_ptr<KvCompactor> compactor_;
    kernels::Dt dt_;
    std::vector<Layer> layers_;
    int32_t n_ctx_, kv_dim_, max_pages_;
    bool back_moves_;
    uint64_t rows_moved_ = 0;
    DeviceBuffer tables_;  // (n_layer, 1 + max_pages_): each layer's gap, then its pages
    DeviceBuffer last_logits_;
};

// The CUDA storage of a cache that a CudaBackend made.
CudaKvStorage& cuda_storage(KvCache& cache);

// Flushes the compactions that a loop of retains queued, at done() or, should an exception
// leave the loop, when destroyed: no compaction stays pending past the loop.
class CompactAfter {
public:
    explicit CompactAfter(KvCompactor& c) : c_(c) {}
    CompactAfter(const CompactAfter&) = delete;
    CompactAfter& operator=(const CompactAfter&) = delete;
    ~CompactAfter();
    void done();

private:
    KvCompactor& c_;
    bool done_ = false;
};

}  // namespace pyr::cuda
