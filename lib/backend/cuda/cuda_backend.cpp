#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "backend/cuda/cuda_linear.h"
#include "common/env.h"
#include "common/log.h"
#include "model/rope.h"

namespace pyr::cuda {

namespace {

DType host_dtype(kernels::Dt dt) { return dt == kernels::Dt::F16 ? DType::F16 : DType::BF16; }

// PYRAMID_ATTN_SPLITS=N forces N decode attention splits (1 = off); unset: attention_splits.
int32_t forced_attn_splits() {
    static const int32_t n = [] {
        const int v = env_int("PYRAMID_ATTN_SPLITS", 0);
        return v <= 0 ? 0 : std::min(v, int(kernels::kMaxAttnSplits));
    }();
    return n;
}

// A decode step's bound on a cache's length (its launches read the true length on the
// device): the capacity rounded up to a power of two, so that the bound, and with it a
// captured graph's key, changes at doublings, not at every page the cache gains.
int32_t decode_bound(int32_t capacity) {
    int32_t b = kernels::kKvPageRows;
    while (b < capacity) b *= 2;
    return b;
}

CudaKvStorage& cuda_storage(KvCache& cache) {
    auto* s = dynamic_cast<CudaKvStorage*>(&cache.storage());
    PYR_ASSERT(s != nullptr);
    return *s;
}

// Flushes the compactions that a loop of retains queued, at done() or, should an exception
// leave the loop, when destroyed: no compaction stays pending past the loop.
class CompactAfter {
public:
    explicit CompactAfter(KvCompactor& c) : c_(c) {}
    CompactAfter(const CompactAfter&) = delete;
    CompactAfter& operator=(const CompactAfter&) = delete;
    ~CompactAfter() {
        if (done_) return;
        try {
            c_.flush();
        } catch (const std::exception& e) {
            PYR_LOG_WARN(std::string("cuda backend: compacting KV caches after an error failed too: ") + e.what());
        }
    }
    void done() {
        done_ = true;
        c_.flush();
    }

private:
    KvCompactor& c_;
    bool done_ = false;
};

}  // namespace

// ---- KV compaction ----------------------------------------------------------------------

// The device array of 2 * n_jobs CompactJobs (K and V share a source list), then the lists.
size_t KvCompactor::bytes_for(size_t n_jobs, size_t n_src) const {
    return 2 * n_jobs * sizeof(kernels::CompactJob) + n_src * sizeof(int32_t);
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
        std::vector<int32_t> composed(keep.size());
        for (size_t i = 0; i < keep.size(); ++i) {
            PYR_ASSERT(size_t(keep[i]) < j.src.size());
            composed[i] = j.src[size_t(keep[i])];
        }
        n_src_ = n_src_ - j.src.size() + composed.size();
        j.src = std::move(composed);
        j.dst0 = new_gap;
        for (DeviceBuffer& b : emptied) j.emptied.push_back(std::move(b));
        // nothing moves and the gap is as before: nothing reads the emptied pages any more
        const auto [lo, hi] = moving(j);
        if (lo == hi && j.dst0 == j.gap_before) remove(it->second);
        return;
    }
    Job j{owner, table, row_bytes, gap, new_gap, toward_back, std::vector<int32_t>(keep.size()), {}};
    for (size_t i = 0; i < keep.size(); ++i) j.src[i] = gap + keep[i];
    const auto [lo, hi] = moving(j);
    if (lo == hi && new_gap == gap) {  // nothing to do: nothing reads the emptied pages
        emptied.clear();
        return;
    }
    const size_t need = bytes_for(jobs_.size() + 1, n_src_ + j.src.size());
    if (need > device_.bytes())
        device_ = ctx_->alloc(std::max({need, 2 * device_.bytes(), size_t(64) << 10}), Use::Scratch);
    j.emptied = std::move(emptied);
    n_src_ += j.src.size();
    jobs_.push_back(std::move(j));
    index_[table] = jobs_.size() - 1;
}

void KvCompactor::remove(size_t i) {
    n_src_ -= jobs_[i].src.size();
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
    PYR_ASSERT(device_.bytes() >= bytes);  // taken by add(), for every entry
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
    // the emptied pages are freed (stream-ordered) after the launch that reads them, also
    // when queuing it fails
    const std::vector<Job> done = std::move(jobs_);
    jobs_.clear();
    index_.clear();
    n_src_ = 0;
    const cudaStream_t st = ctx_->stream();
    PYR_CUDA_CHECK(cudaMemcpyAsync(device_.get(), host, bytes, cudaMemcpyHostToDevice, st));
    uploaded_->record(st);
    PYR_CUDA_CHECK(kernels::compact_rows(device_.as<kernels::CompactJob>(), int32_t(n_jobs),
                                         max_row_bytes, st));
}

// ---- KV storage -----------------------------------------------------------------------

CudaKvStorage::CudaKvStorage(std::shared_ptr<Context> ctx, std::shared_ptr<KvCompactor> compactor,
                             kernels::Dt dt, int n_layer, int32_t n_ctx, int32_t kv_dim,
                             bool back_moves)
    : ctx_(std::move(ctx)), compactor_(std::move(compactor)), dt_(dt), layers_(size_t(n_layer)),
      n_ctx_(n_ctx), kv_dim_(kv_dim),
      max_pages_(pages_for(n_ctx)), back_moves_(back_moves) {
    const size_t bytes = size_t(n_layer) * size_t(1 + max_pages_) * sizeof(void*);
    tables_ = ctx_->alloc(bytes, Use::Kv);
    ctx_->make_current();
    PYR_CUDA_CHECK(cudaMemsetAsync(tables_.get(), 0, bytes, ctx_->stream()));  // every gap 0
}

CudaKvStorage::~CudaKvStorage() { compactor_->drop(this); }

uint64_t CudaKvStorage::bytes_when_full(int n_layer, int32_t n_ctx, int32_t kv_dim) {
    const uint64_t pages = uint64_t(pages_for(std::max(n_ctx, 0)));
    return uint64_t(n_layer) * (pages * page_bytes(kv_dim) + (1 + pages) * sizeof(void*));
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
        drop_gap_pages(layer);
    }
    const size_t have = layer.pages.size(), need = size_t(pages_for(layer.gap() + n_total));
    try {
        while (layer.pages.size() < need) {
            layer.pages.push_back(ctx_->alloc(page_bytes(kv_dim_), Use::Kv));
            layer.table.push_back(layer.pages.back().get());
        }
    } catch (...) {  // out of memory: the pages as they were (stale_from says what to upload)
        layer.pages.resize(have);
        layer.table.resize(1 + have);
        throw;
    }
    const int32_t first = std::min(layer.stale_from, int32_t(1 + have));
    layer.stale_from = int32_t(layer.table.size());  // the caller uploads them
    return first;
}

void CudaKvStorage::retain(int il, const std::vector<int32_t>& keep) {
    Layer& layer = layers_[size_t(il)];
    for (size_t i = 0; i < keep.size(); ++i)
        PYR_ASSERT(keep[i] >= 0 && keep[i] < layer.size && (i == 0 || keep[i] > keep[i - 1]));
    const int32_t n = int32_t(keep.size());
    if (n == layer.size) return;  // strictly ascending and all of them: nothing moves
    ctx_->make_current();
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

// ---- weights --------------------------------------------------------------------------

CudaBackend::CudaBackend(std::shared_ptr<Context> ctx, std::shared_ptr<const Model> model)
    : ctx_(std::move(ctx)), model_(std::move(model)), config_(model_->config()) {
    const DType emb = model_->weights().tok_embd.dtype;
    dt_ = emb == DType::BF16 ? kernels::Dt::BF16 : kernels::Dt::F16;
    init_common();
    upload(model_->weights());
}

CudaBackend::CudaBackend(std::shared_ptr<Context> ctx, const ModelConfig& config,
                         kernels::Dt dt, uint64_t seed)
    : ctx_(std::move(ctx)), config_(config), dt_(dt) {
    init_common();
    randomize(seed);
}

void CudaBackend::init_common() {
    const ModelConfig& c = config_;
    if (c.n_head <= 0 || c.n_head_kv <= 0 || c.n_head % c.n_head_kv != 0 || c.head_dim <= 0 ||
        c.head_dim % 2 != 0 || c.head_dim > 256 || c.n_layer <= 0)
        fail(PYR_ERR_UNSUPPORTED, "cuda backend: unsupported head layout (n_head " +
                                      std::to_string(c.n_head) + ", n_head_kv " +
                                      std::to_string(c.n_head_kv) + ", head_dim " +
                                      std::to_string(c.head_dim) + "; head_dim must be even and <= 256)");
    q_dim_ = c.n_head * c.head_dim;
    kv_dim_ = c.n_head_kv * c.head_dim;
    qkv_dim_ = q_dim_ + 2 * kv_dim_;
    ctx_->make_current();
    // PYRAMID_CUDA_GRAPHS=0: decode steps are launched kernel by kernel (for comparing)
    graphs_ = std::make_unique<StepGraphs>(ctx_, env_int("PYRAMID_CUDA_GRAPHS", 1) != 0);
    // PYRAMID_GPU_SAMPLING=0: the logits of every step come back and the host samples
    sample_on_device_ = env_int("PYRAMID_GPU_SAMPLING", 1) != 0;
    // PYRAMID_TENSOR_CORE_ATTENTION=0: prefill attention on the CUDA cores (for comparing)
    attention_on_tensor_cores_ = env_int("PYRAMID_TENSOR_CORE_ATTENTION", 1) != 0;
    // PYRAMID_GROUPED_DECODE=0: a decode attention block per query head, also under GQA
    group_heads_ = env_int("PYRAMID_GROUPED_DECODE", 1) != 0;
    // PYRAMID_KV_BACK_MOVES=0: a retain moves the kept rows to the front, however many
    kv_back_moves_ = env_int("PYRAMID_KV_BACK_MOVES", 1) != 0;
    if (attention_on_tensor_cores_) {  // the device's check runs now, not in a first prefill
        const kernels::TensorCores tc = kernels::tensor_cores(dt_);
        const std::string what = std::string("tensor cores ") + kernels::tensor_cores_name(tc);
        rows_on_tensor_cores_ = kernels::attention_rows_mma_supported(dt_, c.head_dim);
        if (tc == kernels::TensorCores::Usable || tc == kernels::TensorCores::Absent)
            PYR_LOG_INFO(what + (rows_on_tensor_cores_ || tc != kernels::TensorCores::Usable
                                     ? ""
                                     : "; head_dim " + std::to_string(c.head_dim) +
                                           ": prefill attention on the CUDA cores"));
        else
            PYR_LOG_WARN(what + "; prefill attention runs on the CUDA cores");
    }
    obs_ready_ = std::make_unique<Event>();
    compactor_ = std::make_shared<KvCompactor>(ctx_);
}

DeviceBuffer CudaBackend::upload_concat(std::initializer_list<const Tensor*> parts) {
    int64_t total = 0;
    for (const Tensor* t : parts) {
        if (!*t) return {};  // an absent optional bias (all parts are absent together)
        total += t->rows * t->cols;
    }
    DeviceBuffer buf = ctx_->alloc(size_t(total) * 2, Use::Weights);
    int64_t offset = 0;
    std::vector<float> staging;
    // Everything on the engine's stream (the buffers are stream-ordered allocations);
    // staging from pageable memory completes before each copy call returns.
    for (const Tensor* t : parts) {
        const int64_t n = t->rows * t->cols;
        char* dst = buf.as<char>() + offset * 2;
        if (t->dtype == host_dtype(dt_)) {
            PYR_CUDA_CHECK(cudaMemcpyAsync(dst, t->data, size_t(n) * 2, cudaMemcpyHostToDevice,
                                           ctx_->stream()));
        } else {  // F32 (or the other 16-bit type): widen on the host, narrow on the device
            staging.resize(size_t(n));
            convert_to_f32(t->dtype, t->data, staging.data(), size_t(n));
            DeviceBuffer tmp = ctx_->alloc(size_t(n) * 4, Use::Scratch);
            PYR_CUDA_CHECK(cudaMemcpyAsync(tmp.get(), staging.data(), size_t(n) * 4,
                                           cudaMemcpyHostToDevice, ctx_->stream()));
            PYR_CUDA_CHECK(kernels::convert_f32(dt_, tmp.as<float>(), n, dst, ctx_->stream()));
        }
        offset += n;
    }
    return buf;
}

DeviceBuffer CudaBackend::upload_tensor(const Tensor& t) { return upload_concat({&t}); }

void CudaBackend::upload(const ModelWeights& w) {
    const ModelConfig& c = config_;
    if (int(w.layers.size()) != c.n_layer)
        fail(PYR_ERR_INVALID_ARGUMENT, "cuda backend: " + std::to_string(w.layers.size()) +
                                           " layers of weights for n_layer " + std::to_string(c.n_layer));
    PYR_LOG_INFO("cuda backend: uploading weights");
    w_.tok_embd = upload_tensor(w.tok_embd);
    w_.output_norm = upload_tensor(w.output_norm);
    if (w.output.data != w.tok_embd.data) w_.output = upload_tensor(w.output);
    for (const pyr::LayerWeights& L : w.layers) {
        LayerWeights d;
        d.attn_norm = upload_tensor(L.attn_norm);
        d.wqkv = upload_concat({&L.wq, &L.wk, &L.wv});
        d.bqkv = upload_concat({&L.bq, &L.bk, &L.bv});
        d.wo = upload_tensor(L.wo);
        d.bo = upload_tensor(L.bo);
        d.ffn_norm = upload_tensor(L.ffn_norm);
        d.w_gate_up = upload_concat({&L.w_gate, &L.w_up});
        d.b_gate_up = upload_concat({&L.b_gate, &L.b_up});
        d.w_down = upload_tensor(L.w_down);
        d.b_down = upload_tensor(L.b_down);
        w_.layers.push_back(std::move(d));
    }
    ctx_->sync();
}

void CudaBackend::randomize(uint64_t seed) {
    const ModelConfig& c = config_;
    uint64_t stream_id = 0;
    // Uniform weights scaled by 1/sqrt(fan-in) keep activations O(1); norms near 1.
    auto make = [&](int64_t rows, int64_t cols, float scale, float offset) {
        DeviceBuffer b = ctx_->alloc(size_t(rows * cols) * 2, Use::Weights);
        PYR_CUDA_CHECK(kernels::fill_random(dt_, b.get(), rows * cols, seed + 1000003 * ++stream_id,
                                            scale, offset, ctx_->stream()));
        return b;
    };
    auto matrix = [&](int64_t rows, int64_t cols) {
        return make(rows, cols, 1.0f / std::sqrt(float(cols)), 0.0f);
    };
    auto norm = [&](int64_t n) { return make(n, 1, 0.1f, 1.0f); };
    w_.tok_embd = make(c.n_vocab, c.n_embd, 1.0f, 0.0f);
    w_.output_norm = norm(c.n_embd);
    if (!c.tie_word_embeddings) w_.output = matrix(c.n_vocab, c.n_embd);
    for (int il = 0; il < c.n_layer; ++il) {
        LayerWeights d;
        d.attn_norm = norm(c.n_embd);
        d.wqkv = matrix(qkv_dim_, c.n_embd);
        d.wo = matrix(c.n_embd, q_dim_);
        d.ffn_norm = norm(c.n_embd);
        d.w_gate_up = matrix(2 * int64_t(c.n_ff), c.n_embd);
        d.w_down = matrix(c.n_embd, c.n_ff);
        w_.layers.push_back(std::move(d));
    }
    ctx_->sync();
}

std::unique_ptr<KvStorage> CudaBackend::new_kv_storage(int32_t n_ctx) {
    return std::make_unique<CudaKvStorage>(ctx_, compactor_, dt_, config_.n_layer, n_ctx, kv_dim_,
                                           kv_back_moves_);
}

uint64_t CudaBackend::kv_storage_bytes(int32_t n_ctx) const {
    return CudaKvStorage::bytes_when_full(config_.n_layer, n_ctx, kv_dim_);
}

DeviceMemory CudaBackend::device_memory() const {
    const MemoryUse u = ctx_->memory();
    return {u.weights, u.kv, u.scratch, u.peak, ctx_->budget()};
}

// ---- scratch and staging ---------------------------------------------------------------

void CudaBackend::ensure_scratch(int32_t n_rows, int n_seq) {
    if (n_rows > s_.n_rows) {
        const size_t n = size_t(std::max(n_rows, 2 * s_.n_rows));
        const size_t half = size_t(config_.head_dim / 2);
        const size_t embd = size_t(config_.n_embd), ff = size_t(config_.n_ff);
        s_ = Scratch{};  // free first: the budget counts what is held
        s_.tokens = ctx_->alloc(n * 4, Use::Scratch);
        s_.cos = ctx_->alloc(n * half * 4, Use::Scratch);
        s_.sin = ctx_->alloc(n * half * 4, Use::Scratch);
        s_.cos_tmp = ctx_->alloc(n * half * 4, Use::Scratch);
        s_.sin_tmp = ctx_->alloc(n * half * 4, Use::Scratch);
        s_.x = ctx_->alloc(n * embd * 4, Use::Scratch);
        s_.x_tmp = ctx_->alloc(n * embd * 4, Use::Scratch);
        s_.xn = ctx_->alloc(n * std::max(embd, size_t(q_dim_)) * 2, Use::Scratch);
        s_.qkv = ctx_->alloc(n * size_t(qkv_dim_) * 4, Use::Scratch);
        s_.att = ctx_->alloc(n * size_t(q_dim_) * 2, Use::Scratch);
        s_.lse = ctx_->alloc(n * size_t(config_.n_head) * 4, Use::Scratch);
        s_.gu = ctx_->alloc(n * 2 * ff * 4, Use::Scratch);
        s_.h = ctx_->alloc(n * ff * 2, Use::Scratch);
        s_.rows_index = ctx_->alloc(n * 4, Use::Scratch);
        s_.n_rows = int32_t(n);
    }
    if (size_t(n_seq) > s_.n_logits) {
        s_.logits = ctx_->alloc(size_t(n_seq) * size_t(config_.n_vocab) * 4, Use::Scratch);
        s_.n_logits = size_t(n_seq);
    }
    const size_t n_len = size_t(n_seq) * size_t(config_.n_layer);
    if (n_len > s_.kv_len_n) {
        s_.kv_len = ctx_->alloc(n_len * 4, Use::Scratch);
        s_.kv_len_n = n_len;
    }
}

// Grows the observation buffer, keeping the first `keep` floats (measured earlier this step).
void CudaBackend::ensure_obs(size_t floats, size_t keep) {
    if (floats <= s_.obs_floats) return;
    const size_t n = std::max(floats, 2 * s_.obs_floats);
    DeviceBuffer bigger = ctx_->alloc(n * 4, Use::Scratch);
    if (keep > 0)
        PYR_CUDA_CHECK(cudaMemcpyAsync(bigger.get(), s_.obs.get(), keep * 4, cudaMemcpyDeviceToDevice,
                                       ctx_->stream()));
    s_.obs = std::move(bigger);
    s_.obs_floats = n;
}

void CudaBackend::ensure_scores(size_t floats) {
    if (floats <= s_.score_floats) return;
    s_.scores = DeviceBuffer();  // free first: the budget counts what is held
    s_.scores = ctx_->alloc(floats * 4, Use::Scratch);
    s_.score_floats = floats;
}

// Decode attention (one new token per sequence) splits each head's keys over several blocks
// when the heads alone leave SMs idle; how many follows the layer's largest decode bound
// (decode_bound), not the lengths, so that a captured graph's launch shape holds for the
// steps it replays.
int32_t CudaBackend::attn_splits(int n_seq, int32_t max_bound) const {
    if (forced_attn_splits()) return forced_attn_splits();
    const int32_t head_blocks = kernels::attention_decode_head_blocks(config_.n_head, config_.n_head_kv,
                                                                     config_.head_dim, group_heads_);
    return kernels::attention_splits(n_seq, head_blocks, max_bound, ctx_->sm_count());
}

// The split attention's workspace for n_split splits (grown, never shrunk).
float* CudaBackend::ensure_attn_partial(int n_seq, int32_t n_split) {
    const size_t need = kernels::attention_split_floats(n_seq, config_.n_head, config_.head_dim, n_split);
    if (need > s_.partial_floats) {
        s_.attn_partial = DeviceBuffer();  // free first: the budget counts what is held
        s_.attn_partial = ctx_->alloc(need * 4, Use::Scratch);
        s_.partial_floats = need;
    }
    return s_.attn_partial.as<float>();
}

// Queues a copy of n elements to the device through the pinned staging buffer: it runs in
// stream order behind the kernels before it, the host neither waits nor keeps `src`. The
// staging buffer is reused from the front after each step's wait (finish_step).
template <typename T>
void CudaBackend::stage_upload(void* dst, const T* src, size_t n) {
    const size_t bytes = n * sizeof(T);
    if (bytes == 0) return;
    size_t at = (stage_used_ + 15) & ~size_t(15);
    if (at + bytes > stage_.bytes()) {
        ctx_->sync();  // copies still queued read the staging buffer
        stage_.reserve(std::max(at + bytes, size_t(1) << 20));  // later steps like this one fit
        at = 0;
    }
    char* p = stage_.as<char>() + at;
    std::memcpy(p, src, bytes);
    PYR_CUDA_CHECK(cudaMemcpyAsync(dst, p, bytes, cudaMemcpyHostToDevice, ctx_->stream()));
    stage_used_ = at + bytes;
}

BackendStats CudaBackend::stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    const StepGraphs::Stats& g = graphs_->stats();
    return {g.replays, g.captures, g.direct, device_samples_, undecided_samples_,
            prefill_attention_tc_, prefill_attention_cc_};
}

// ---- the forward pass -----------------------------------------------------------------

void CudaBackend::forward(SequenceStep* batch, int n_seq) {
    std::lock_guard<std::mutex> lock(mutex_);
    ctx_->make_current();
    for (int i = 0; i < n_seq; ++i) {
        check_sequence_step(config_, batch[i], "cuda backend");
        PYR_ASSERT(cuda_storage(*batch[i].cache).kv_dim() == kv_dim_);
    }
    auto after_failure = [&] {
        // copies queued before the failure may still read the staging buffer
        cudaStreamSynchronize(ctx_->stream());
        cudaGetLastError();
        stage_used_ = 0;
    };
    try {
        compactor_->flush();  // what the policies pruned after their sessions' last steps
        forward_batch(batch, n_seq);
    } catch (const Error& e) {
        after_failure();
        // A step too large for the budget may have grown the scratch for itself first: kept,
        // it would leave the KV caches less room than before the step. The next step grows
        // it again to what that one needs.
        if (e.status() == PYR_ERR_OUT_OF_MEMORY) s_ = Scratch{};
        throw;
    } catch (...) {
        after_failure();
        throw;
    }
}

// The sequences' tokens go through the layers together: one projection per weight matrix
// for all rows of the batch (however many sequences: the weights are read once a step), one
// RoPE/append launch and one attention launch per layer over the ragged caches of each
// kernels::kMaxBatch sequences. KV policies observe and prune per sequence as on the CPU backend
// (CpuBackend::forward_sequence is the reference narrative). A step in which every sequence
// decodes one token goes through decode_step instead.
void CudaBackend::forward_batch(SequenceStep* steps, int n_seq) {
    if (decode_step(steps, n_seq)) return;
    const ModelConfig& c = config_;
    const cudaStream_t st = ctx_->stream();
    const int32_t half = c.head_dim / 2;

    std::vector<InFlight> seqs(static_cast<size_t>(n_seq));
    int32_t n_rows = 0;
    for (int s = 0; s < n_seq; ++s) {
        InFlight& f = seqs[size_t(s)];
        f.row0 = n_rows;
        f.n = steps[s].n_tokens;
        f.positions.assign(steps[s].positions, steps[s].positions + f.n);
        f.first_prefill = steps[s].cache->n_processed() == 0;
        n_rows += f.n;
    }
    ensure_scratch(n_rows, n_seq);

    // token ids and RoPE tables (host math shared with the CPU backend: every scaling type;
    // dynamic scaling sees each sequence's own largest position, as HF does per call)
    std::vector<int32_t> tokens(static_cast<size_t>(n_rows));
    std::vector<float> cos(size_t(n_rows) * half), sin(size_t(n_rows) * half);
    for (int s = 0; s < n_seq; ++s) {
        const InFlight& f = seqs[size_t(s)];
        std::copy_n(steps[s].tokens, f.n, tokens.begin() + f.row0);
        const int32_t max_pos = *std::max_element(f.positions.begin(), f.positions.end());
        rope_cos_sin(rope_inv_freq(c, max_pos + 1), f.positions.data(), f.n,
                     cos.data() + size_t(f.row0) * half, sin.data() + size_t(f.row0) * half);
    }
    stage_upload(s_.tokens.get(), tokens.data(), tokens.size());
    stage_upload(s_.cos.get(), cos.data(), cos.size());
    stage_upload(s_.sin.get(), sin.data(), sin.size());
    PYR_CUDA_CHECK(kernels::embed(dt_, w_.tok_embd.get(), s_.tokens.as<int32_t>(), n_rows, c.n_embd,
                                  s_.x.as<float>(), st));

    std::vector<Measured> deferred;
    size_t obs_used = 0;
    for (int il = 0; il < c.n_layer; ++il) {
        check_cancel(steps, n_seq);
        const LayerBatch lb = describe_layer(il, steps, seqs);
        attention_block(il, lb, n_rows, st);
        const std::vector<Measured> now = measure_layer(il, steps, lb, seqs, deferred, obs_used);
        // The MLP runs on every row while the measurements travel and the policies decide;
        // the rows they drop leave after it (row by row, so the kept rows are unaffected).
        mlp_block(il, n_rows, st);
        decide_layer(steps, now, seqs);
        n_rows = 0;
        for (const InFlight& f : seqs) n_rows += f.n;
    }

    // output head on each sequence's last token: logits (n_out, n_vocab)
    std::vector<int32_t> last_rows;
    std::vector<int32_t> out_seqs;
    for (int s = 0; s < n_seq; ++s)
        if (steps[s].logits || steps[s].sample) {
            last_rows.push_back(seqs[size_t(s)].row0 + seqs[size_t(s)].n - 1);
            out_seqs.push_back(s);
        }
    const int32_t n_out = int32_t(last_rows.size());
    if (n_out > 0) {
        stage_upload(s_.rows_index.get(), last_rows.data(), last_rows.size());
        PYR_CUDA_CHECK(kernels::gather_rows(s_.x.get(), size_t(c.n_embd) * 4, s_.rows_index.as<int32_t>(),
                                            n_out, s_.x_tmp.get(), st));
        output_head(s_.x_tmp.as<float>(), n_out, st);
    }
    finish_step(steps, out_seqs, deferred, obs_used);
}

// Layer il's launch descriptors for the batch, after the bookkeeping of the append (each
// cache grows by its sequence's rows), and what each policy observes at this layer.
CudaBackend::LayerBatch CudaBackend::describe_layer(int il, SequenceStep* steps,
                                                    const std::vector<InFlight>& seqs) {
    const ModelConfig& c = config_;
    const int n_seq = int(seqs.size());
    LayerBatch lb(n_seq);
    std::vector<size_t> score_off(seqs.size(), 0);
    size_t score_floats = 0;
    int32_t n_rows = 0;
    for (int s = 0; s < n_seq; ++s) {
        const InFlight& f = seqs[size_t(s)];
        KvCache& cache = *steps[s].cache;
        CudaKvStorage& kv = cuda_storage(cache);
        PYR_ASSERT(kv.size(il) == cache.size(il));
        const int32_t first_new = cache.size(il);
        reserve_kv(kv, il, first_new + f.n);
        kv.set_size(il, first_new + f.n);
        cache.appended(il, f.positions.data(), f.n);
        place_sequence(lb, s, f.row0, f.n, kv.table(il), first_new + f.n);
        lb.slot0[size_t(s)] = first_new;
        kernels::AttnSeq& a = lb.attn[size_t(s)];
        // The attention kernel keeps the raw scores of the observed queries (no second pass
        // over the keys for the rows), n_head floats per row and key; a prefill's many rows
        // (pyramid: a fifth of the prompt) are recomputed instead where the tensor cores can.
        a.scores_from = a.n_q;  // no rows observed unless the policy asks
        if (steps[s].policy) {
            lb.reqs[size_t(s)] = steps[s].policy->observe(il);
            const int32_t n_obs = std::min(lb.reqs[size_t(s)].last_rows, a.n_q);
            lb.obs_rows[size_t(s)] = n_obs;
            if (n_obs <= 1 || !rows_on_tensor_cores_) {
                a.scores_from = a.n_q - n_obs;
                score_off[size_t(s)] = score_floats;
                score_floats += size_t(n_obs) * size_t(c.n_head) * size_t(a.n_kv);
            }
        }
        n_rows += f.n;
    }
    lb.row0[size_t(n_seq)] = n_rows;
    if (n_rows == n_seq) {  // every sequence decodes one token
        int32_t max_bound = 0;
        for (int s = 0; s < n_seq; ++s)
            max_bound = std::max(max_bound, decode_bound(cuda_storage(*steps[s].cache).capacity(il)));
        lb.split.n_split = attn_splits(n_seq, max_bound);
        if (lb.split.n_split > 1) lb.split.partial = ensure_attn_partial(n_seq, lb.split.n_split);
    }
    ensure_scores(score_floats);
    for (int s = 0; s < n_seq; ++s)
        if (lb.attn[size_t(s)].scores_from < lb.attn[size_t(s)].n_q)
            lb.attn[size_t(s)].scores = s_.scores.as<float>() + score_off[size_t(s)];
    return lb;
}

// Room for n_total tokens in layer il of a cache; the page table entries of the pages
// added travel to the device in stream order, before the launches that read them.
void CudaBackend::reserve_kv(CudaKvStorage& kv, int il, int32_t n_total) {
    const int32_t first = kv.reserve(il, n_total), n = kv.table_entries(il);
    if (first < n) stage_upload(kv.table(il) + first, kv.host_table(il) + first, size_t(n - first));
}

// Sequence s of a layer's launches: its n rows from row0 of the batch buffers, its cache
// (page table), n_kv keys (or a bound on them, with device lengths). Slots and observed
// scores are the caller's.
void CudaBackend::place_sequence(LayerBatch& lb, int s, int32_t row0, int32_t n,
                                 kernels::KvPages pages, int32_t n_kv) const {
    lb.row0[size_t(s)] = row0;
    lb.pages[size_t(s)] = pages;
    kernels::AttnSeq& a = lb.attn[size_t(s)];
    a.q = s_.qkv.as<float>() + int64_t(row0) * qkv_dim_;
    a.q_stride = qkv_dim_;
    a.n_q = n;
    a.pages = pages;
    a.n_kv = n_kv;
    a.out = s_.att.as<char>() + int64_t(row0) * q_dim_ * 2;
    a.lse = s_.lse.as<float>() + int64_t(row0) * config_.n_head;
}

// x += o_proj(attention(rope(q), cache + rope(k), v)) over the batch's n_rows rows.
void CudaBackend::attention_block(int il, const LayerBatch& lb, int32_t n_rows, cudaStream_t st) {
    const ModelConfig& c = config_;
    const LayerWeights& L = w_.layers[size_t(il)];
    PYR_CUDA_CHECK(kernels::rmsnorm(dt_, s_.x.as<float>(), n_rows, c.n_embd, L.attn_norm.get(),
                                    c.rms_norm_eps, s_.xn.get(), st));
    linear(*ctx_, st, dt_, L.wqkv.get(), qkv_dim_, c.n_embd, s_.xn.get(), n_rows,
           s_.qkv.as<float>(), qkv_dim_, false);
    if (L.bqkv.get())
        PYR_CUDA_CHECK(kernels::add_bias(dt_, s_.qkv.as<float>(), n_rows, qkv_dim_, qkv_dim_,
                                         L.bqkv.get(), st));
    // kMaxBatch sequences a launch (the descriptors travel by value), all RoPE first. A
    // launch's rows are counted from its first sequence's. The split workspace is reused
    // launch after launch (stream order).
    const int n_seq = lb.n_seq();
    const int64_t half = c.head_dim / 2;
    for (int c0 = 0; c0 < n_seq; c0 += kernels::kMaxBatch) {
        const int n = std::min(n_seq - c0, kernels::kMaxBatch);
        const int32_t r0 = lb.row0[size_t(c0)];
        kernels::RopeStoreBatch rope;
        rope.n_seq = n;
        for (int i = 0; i <= n; ++i) rope.row0[i] = lb.row0[size_t(c0 + i)] - r0;
        std::copy_n(lb.pages.begin() + c0, n, rope.pages);
        std::copy_n(lb.slot0.begin() + c0, n, rope.slot0);
        rope.kv_len = lb.kv_len ? lb.kv_len + c0 : nullptr;
        PYR_CUDA_CHECK(kernels::rope_store(dt_, s_.qkv.as<float>() + int64_t(r0) * qkv_dim_, rope,
                                           c.n_head, c.n_head_kv, c.head_dim,
                                           s_.cos.as<float>() + r0 * half,
                                           s_.sin.as<float>() + r0 * half, st));
    }
    for (int c0 = 0; c0 < n_seq; c0 += kernels::kMaxBatch) {
        kernels::AttnBatch attn;
        attn.n_seq = std::min(n_seq - c0, kernels::kMaxBatch);
        std::copy_n(lb.attn.begin() + c0, attn.n_seq, attn.seq);
        attn.kv_len = lb.kv_len ? lb.kv_len + c0 : nullptr;
        int32_t max_q = 0;
        for (int i = 0; i < attn.n_seq; ++i) max_q = std::max(max_q, attn.seq[i].n_q);
        if (max_q > 1)
            ++(kernels::attention_on_tensor_cores(dt_, max_q, c.head_dim, attention_on_tensor_cores_)
                   ? prefill_attention_tc_
                   : prefill_attention_cc_);
        PYR_CUDA_CHECK(kernels::attention(dt_, attn, c.n_head, c.n_head_kv, c.head_dim, st, lb.split,
                                          attention_on_tensor_cores_, group_heads_));
    }
    linear(*ctx_, st, dt_, L.wo.get(), c.n_embd, q_dim_, s_.att.get(), n_rows, s_.x.as<float>(),
           c.n_embd, true);
    if (L.bo.get())
        PYR_CUDA_CHECK(kernels::add_bias(dt_, s_.x.as<float>(), n_rows, c.n_embd, c.n_embd,
                                         L.bo.get(), st));
}

namespace {
// Calls launch(batch) for each kernels::kMaxBatch of `seqs`, copied into a Batch descriptor
// (n_seq, seq[kMaxBatch]: they travel by value).
template <typename Batch, typename Seq, typename Launch>
void in_launches(const std::vector<Seq>& seqs, Launch launch) {
    for (size_t c0 = 0; c0 < seqs.size(); c0 += kernels::kMaxBatch) {
        Batch batch;
        batch.n_seq = int32_t(std::min(seqs.size() - c0, size_t(kernels::kMaxBatch)));
        std::copy_n(seqs.begin() + ptrdiff_t(c0), batch.n_seq, batch.seq);
        PYR_CUDA_CHECK(launch(batch));
    }
}
}  // namespace

// The policies' attention rows: from kept raw scores (attention_rows), or recomputed on the
// tensor cores (attention_rows_mma, a prefill's).
void CudaBackend::launch_rows(const std::vector<kernels::RowsSeq>& rows, cudaStream_t st) const {
    in_launches<kernels::RowsBatch>(
        rows, [&](const kernels::RowsBatch& b) { return kernels::attention_rows(b, config_.n_head, st); });
}

void CudaBackend::launch_rows_mma(const std::vector<kernels::RowsMmaSeq>& rows, cudaStream_t st) const {
    const ModelConfig& c = config_;
    in_launches<kernels::RowsMmaBatch>(rows, [&](const kernels::RowsMmaBatch& b) {
        return kernels::attention_rows_mma(dt_, b, c.n_head, c.n_head_kv, c.head_dim, st);
    });
}

// x += down(silu(gate(xn)) * up(xn)) over n_rows rows.
void CudaBackend::mlp_block(int il, int32_t n_rows, cudaStream_t st) {
    const ModelConfig& c = config_;
    const LayerWeights& L = w_.layers[size_t(il)];
    PYR_CUDA_CHECK(kernels::rmsnorm(dt_, s_.x.as<float>(), n_rows, c.n_embd, L.ffn_norm.get(),
                                    c.rms_norm_eps, s_.xn.get(), st));
    linear_swiglu(*ctx_, st, dt_, L.w_gate_up.get(), L.b_gate_up.get(), c.n_ff, c.n_embd,
                  s_.xn.get(), n_rows, s_.gu.as<float>(), s_.h.get());
    linear(*ctx_, st, dt_, L.w_down.get(), c.n_embd, c.n_ff, s_.h.get(), n_rows, s_.x.as<float>(),
           c.n_embd, true);
    if (L.b_down.get())
        PYR_CUDA_CHECK(kernels::add_bias(dt_, s_.x.as<float>(), n_rows, c.n_embd, c.n_embd,
                                         L.b_down.get(), st));
}

// logits (n_out, n_vocab) of the n_out rows of x.
void CudaBackend::output_head(const float* x, int32_t n_out, cudaStream_t st) {
    const ModelConfig& c = config_;
    PYR_CUDA_CHECK(kernels::rmsnorm(dt_, x, n_out, c.n_embd, w_.output_norm.get(), c.rms_norm_eps,
                                    s_.xn.get(), st));
    const void* head = w_.output.get() ? w_.output.get() : w_.tok_embd.get();
    linear(*ctx_, st, dt_, head, c.n_vocab, c.n_embd, s_.xn.get(), n_out, s_.logits.as<float>(),
           c.n_vocab, false);
}

// After layer il's attention: measures what each sequence's policy asks for. A first
// prefill's measurements are copied back now (returned; decide_layer waits for them): the
// policy's keep set changes what deeper layers compute. A later step's stay on the device
// until the step ends (`deferred`; no wait per layer).
std::vector<CudaBackend::Measured> CudaBackend::measure_layer(
    int il, SequenceStep* steps, const LayerBatch& lb, const std::vector<InFlight>& seqs,
    std::vector<Measured>& deferred, size_t& obs_used) {
    const ModelConfig& c = config_;
    const cudaStream_t st = ctx_->stream();
    // places: deferred ones after what earlier layers left, this layer's first prefills after
    // them (read back now, then free again)
    std::vector<Measured> now, later;
    size_t end_later = obs_used, end_now = 0;
    for (size_t s = 0; s < seqs.size(); ++s) {
        if (!steps[s].policy) continue;
        const kernels::AttnSeq& a = lb.attn[s];
        const int32_t n_obs = lb.obs_rows[s];  // rows asked for
        const bool sums = lb.reqs[s].column_sums;
        const size_t need = size_t(n_obs) * size_t(a.n_kv) + (sums ? size_t(a.n_kv) : 0);
        size_t& end = seqs[s].first_prefill ? end_now : end_later;
        Measured m{int(s), il, n_obs, a.n_kv, SIZE_MAX, SIZE_MAX};
        if (n_obs > 0) m.rows_off = end;
        if (sums) m.sums_off = end + size_t(n_obs) * size_t(a.n_kv);
        end += need;
        (seqs[s].first_prefill ? now : later).push_back(m);
    }
    ensure_obs(end_later + end_now, obs_used);
    float* base = s_.obs.as<float>();
    // the rows of every sequence in one launch; column sums (H2O) one sequence at a time
    std::vector<kernels::RowsSeq> rows;
    std::vector<kernels::RowsMmaSeq> rows_mma;
    auto launch = [&](const Measured& m, size_t shift) {
        const kernels::AttnSeq& a = lb.attn[size_t(m.seq)];
        const int32_t from = a.n_q - m.n_rows;  // the first observed query
        if (m.rows_off != SIZE_MAX && a.scores)
            rows.push_back({a.scores, a.lse + int64_t(from) * c.n_head, base + shift + m.rows_off,
                            m.n_rows, m.n_keys, m.n_keys - a.n_q + from, nullptr});
        if (m.rows_off != SIZE_MAX && !a.scores) {
            kernels::RowsMmaSeq r;
            r.q = a.q + int64_t(from) * a.q_stride;
            r.q_stride = a.q_stride;
            r.pages = a.pages;
            r.lse = a.lse + int64_t(from) * c.n_head;
            r.rows = base + shift + m.rows_off;
            r.n_rows = m.n_rows;
            r.n_kv = m.n_keys;
            r.first_limit = m.n_keys - a.n_q + from;
            rows_mma.push_back(r);
        }
        if (m.sums_off != SIZE_MAX) {
            PYR_CUDA_CHECK(cudaMemsetAsync(base + shift + m.sums_off, 0, size_t(m.n_keys) * 4, st));
            PYR_CUDA_CHECK(kernels::attention_col_sums(dt_, a, c.n_head, c.n_head_kv, c.head_dim,
                                                       base + shift + m.sums_off, st,
                                                       attention_on_tensor_cores_));
        }
    };
    for (const Measured& m : later) launch(m, 0);
    for (const Measured& m : now) launch(m, end_later);
    launch_rows(rows, st);
    launch_rows_mma(rows_mma, st);
    deferred.insert(deferred.end(), later.begin(), later.end());
    obs_used = end_later;
    if (end_now > 0) {
        readback_.reserve(end_now * 4);
        PYR_CUDA_CHECK(cudaMemcpyAsync(readback_.get(), base + end_later, end_now * 4,
                                       cudaMemcpyDeviceToHost, st));
        obs_ready_->record(st);
    }
    return now;
}

// A first prefill's keep/drop decisions for one layer (lib/kv/), once the measurements are
// on the host: the caches keep the chosen tokens and, where the policy shrinks the prefill,
// only the kept tokens' rows go on to deeper layers.
void CudaBackend::decide_layer(SequenceStep* steps, const std::vector<Measured>& now,
                               std::vector<InFlight>& seqs) {
    if (now.empty()) return;
    obs_ready_->wait();  // not the stream: the MLP queued behind the copy goes on
    CompactAfter compact(*compactor_);
    std::vector<std::vector<int32_t>> kept_rows(seqs.size());
    bool shrink = false;
    for (const Measured& m : now) {
        const size_t s = size_t(m.seq);
        KvPolicy* policy = steps[s].policy;
        KvCache& cache = *steps[s].cache;
        Observation obs;
        obs.n_keys = m.n_keys;
        obs.n_rows = m.n_rows;
        obs.rows = m.rows_off != SIZE_MAX ? readback_.as<float>() + m.rows_off : nullptr;
        obs.column_sums = m.sums_off != SIZE_MAX ? readback_.as<float>() + m.sums_off : nullptr;
        auto keep = policy->on_layer(m.il, obs, cache);
        if (!keep) continue;
        const int32_t first_new = m.n_keys - seqs[s].n;
        cache.retain(m.il, *keep);
        if (!policy->shrink_prefill(m.il)) continue;
        // only the kept ones among this step's tokens go on to deeper layers
        for (int32_t slot : *keep)
            if (slot >= first_new) kept_rows[s].push_back(slot - first_new);
        PYR_ASSERT(!kept_rows[s].empty() && kept_rows[s].back() == seqs[s].n - 1);  // the last token stays
        shrink = true;
    }
    compact.done();
    if (shrink) shrink_rows(seqs, kept_rows);
}

// Compacts the batch's residual rows, RoPE tables and positions to the kept rows
// (kept_rows[s] empty: sequence s keeps all of its rows).
void CudaBackend::shrink_rows(std::vector<InFlight>& seqs,
                              const std::vector<std::vector<int32_t>>& kept_rows) {
    std::vector<int32_t> index;
    int32_t row0 = 0;
    for (size_t s = 0; s < seqs.size(); ++s) {
        InFlight& f = seqs[s];
        std::vector<int32_t> rows = kept_rows[s];
        if (rows.empty())
            for (int32_t r = 0; r < f.n; ++r) rows.push_back(r);
        std::vector<int32_t> positions;
        for (int32_t r : rows) {
            index.push_back(f.row0 + r);
            positions.push_back(f.positions[size_t(r)]);
        }
        f.positions = std::move(positions);
        f.row0 = row0;
        f.n = int32_t(rows.size());
        row0 += f.n;
    }
    const cudaStream_t st = ctx_->stream();
    const size_t half = size_t(config_.head_dim / 2);
    stage_upload(s_.rows_index.get(), index.data(), index.size());
    const int32_t n = int32_t(index.size());
    PYR_CUDA_CHECK(kernels::gather_rows(s_.x.get(), size_t(config_.n_embd) * 4, s_.rows_index.as<int32_t>(),
                                        n, s_.x_tmp.get(), st));
    PYR_CUDA_CHECK(kernels::gather_rows(s_.cos.get(), half * 4, s_.rows_index.as<int32_t>(), n,
                                        s_.cos_tmp.get(), st));
    PYR_CUDA_CHECK(kernels::gather_rows(s_.sin.get(), half * 4, s_.rows_index.as<int32_t>(), n,
                                        s_.sin_tmp.get(), st));
    std::swap(s_.x, s_.x_tmp);
    std::swap(s_.cos, s_.cos_tmp);
    std::swap(s_.sin, s_.sin_tmp);
}

// Picks the next token of each sequence of out_seqs (row i of s_.logits is out_seqs[i]'s)
// that asked for a DeviceSample, in one launch into s_.sampled; returns those rows' i.
std::vector<int32_t> CudaBackend::sample_tokens(SequenceStep* steps,
                                                const std::vector<int32_t>& out_seqs,
                                                cudaStream_t st) {
    std::vector<int32_t> rows;
    std::vector<int32_t> penalized;
    std::vector<kernels::SampleRow> desc;
    for (size_t i = 0; i < out_seqs.size(); ++i) {
        const DeviceSample* d = steps[out_seqs[i]].sample;
        if (!d) continue;
        kernels::SampleRow r;
        r.logits = s_.logits.as<float>() + i * size_t(config_.n_vocab);
        r.temperature = d->temperature;
        r.top_k = d->top_k;
        r.top_p = d->top_p;
        r.min_p = d->min_p;
        r.repeat_penalty = d->repeat_penalty;
        r.n_penalized = d->n_penalized;
        r.u = d->u;
        desc.push_back(r);
        rows.push_back(int32_t(i));
        penalized.insert(penalized.end(), d->penalized, d->penalized + d->n_penalized);
    }
    if (rows.empty()) return rows;
    if (desc.size() > s_.n_sample_rows) {
        s_.sample_rows = ctx_->alloc(desc.size() * sizeof(kernels::SampleRow), Use::Scratch);
        s_.sampled = ctx_->alloc(desc.size() * 4, Use::Scratch);
        s_.n_sample_rows = desc.size();
    }
    if (penalized.size() > s_.n_penalized) {
        s_.penalized = ctx_->alloc(penalized.size() * 4, Use::Scratch);
        s_.n_penalized = penalized.size();
    }
    size_t at = 0;
    for (kernels::SampleRow& r : desc) {
        r.penalized = r.n_penalized > 0 ? s_.penalized.as<int32_t>() + at : nullptr;
        at += size_t(r.n_penalized);
    }
    stage_upload(s_.penalized.get(), penalized.data(), penalized.size());
    stage_upload(s_.sample_rows.get(), desc.data(), desc.size());
    PYR_CUDA_CHECK(kernels::sample_rows(s_.sample_rows.as<kernels::SampleRow>(), int32_t(desc.size()),
                                        config_.n_vocab, s_.sampled.as<int32_t>(), st));
    return rows;
}

// The step's one wait. The tokens picked on the device, the logits the host asked for (row i
// of s_.logits is sequence out_seqs[i]'s; a sequence that sampled on the device and asked
// for none keeps them on the device, in its storage) and the first obs_floats of the
// observation buffer come back together; then the policies get what later steps measured,
// layer by layer.
void CudaBackend::finish_step(SequenceStep* steps, const std::vector<int32_t>& out_seqs,
                              const std::vector<Measured>& deferred, size_t obs_floats) {
    const cudaStream_t st = ctx_->stream();
    const size_t n_vocab = size_t(config_.n_vocab);
    const std::vector<int32_t> sampled = sample_tokens(steps, out_seqs, st);
    std::vector<size_t> to_host;  // indices into out_seqs
    for (size_t i = 0; i < out_seqs.size(); ++i) {
        const SequenceStep& step = steps[out_seqs[i]];
        if (step.logits)
            to_host.push_back(i);
        else if (step.sample)
            PYR_CUDA_CHECK(cudaMemcpyAsync(cuda_storage(*step.cache).last_logits(config_.n_vocab),
                                           s_.logits.as<float>() + i * n_vocab, n_vocab * 4,
                                           cudaMemcpyDeviceToDevice, st));
    }
    const size_t logit_floats = to_host.size() * n_vocab;
    readback_.reserve((logit_floats + obs_floats + sampled.size()) * 4);
    float* host = readback_.as<float>();
    if (to_host.size() == out_seqs.size() && logit_floats > 0)  // all of them: one copy
        PYR_CUDA_CHECK(cudaMemcpyAsync(host, s_.logits.get(), logit_floats * 4,
                                       cudaMemcpyDeviceToHost, st));
    else
        for (size_t k = 0; k < to_host.size(); ++k)
            PYR_CUDA_CHECK(cudaMemcpyAsync(host + k * n_vocab, s_.logits.as<float>() + to_host[k] * n_vocab,
                                           n_vocab * 4, cudaMemcpyDeviceToHost, st));
    if (obs_floats > 0)
        PYR_CUDA_CHECK(cudaMemcpyAsync(host + logit_floats, s_.obs.get(), obs_floats * 4,
                                       cudaMemcpyDeviceToHost, st));
    auto* tokens = reinterpret_cast<int32_t*>(host + logit_floats + obs_floats);
    if (!sampled.empty())
        PYR_CUDA_CHECK(cudaMemcpyAsync(tokens, s_.sampled.get(), sampled.size() * 4,
                                       cudaMemcpyDeviceToHost, st));
    ctx_->sync();
    stage_used_ = 0;
    for (size_t k = 0; k < to_host.size(); ++k)
        std::copy_n(host + k * n_vocab, n_vocab, steps[out_seqs[to_host[k]]].logits);
    for (size_t k = 0; k < sampled.size(); ++k) {
        steps[out_seqs[size_t(sampled[k])]].sample->token = tokens[k];
        ++device_samples_;
        undecided_samples_ += tokens[k] < 0;
    }
    const float* obs_host = host + logit_floats;
    CompactAfter compact(*compactor_);
    for (const Measured& d : deferred) {
        Observation obs;
        obs.n_keys = d.n_keys;
        obs.n_rows = d.n_rows;
        obs.rows = d.rows_off != SIZE_MAX ? obs_host + d.rows_off : nullptr;
        obs.column_sums = d.sums_off != SIZE_MAX ? obs_host + d.sums_off : nullptr;
        KvCache& cache = *steps[d.seq].cache;
        if (auto keep = steps[d.seq].policy->on_layer(d.il, obs, cache)) cache.retain(d.il, *keep);
    }
    compact.done();
}

// Copies a sequence's logits left on the device by its last step (see finish_step).
void CudaBackend::read_logits(KvCache& cache, float* out) {
    std::lock_guard<std::mutex> lock(mutex_);  // readback_ and the stream's order
    ctx_->make_current();
    const float* logits = cuda_storage(cache).last_logits();
    if (!logits) fail(PYR_ERR_STATE, "no logits on the device for this session yet");
    const size_t bytes = size_t(config_.n_vocab) * 4;
    readback_.reserve(bytes);
    PYR_CUDA_CHECK(cudaMemcpyAsync(readback_.get(), logits, bytes, cudaMemcpyDeviceToHost, ctx_->stream()));
    ctx_->sync();
    std::memcpy(out, readback_.get(), bytes);
}

// ---- decode steps ---------------------------------------------------------------------

// Everything a decode step's launches depend on besides its inputs (token ids, RoPE tables
// and cache lengths, uploaded before them): two steps with equal keys queue the same work,
// so one's graph replays the other.
struct CudaBackend::DecodePlan {
    struct Seq {               // one sequence in one layer
        kernels::KvPages pages = nullptr;
        int32_t bound = 0;     // bounds the cache length in the launches; scores' row stride
        bool observed = false; // the policy measures the token's attention row
        size_t scores_off = 0, rows_off = 0;  // floats into s_.scores and s_.obs
    };
    int32_t n_seq = 0;
    std::vector<Seq> seqs;         // (n_layer, n_seq)
    std::vector<int32_t> n_split;  // per layer: the attention's splits
    const Seq& at(int il, int s) const { return seqs[size_t(il) * size_t(n_seq) + size_t(s)]; }

    StepGraphs::Key key(const Scratch& sc) const {
        StepGraphs::Key k{uint64_t(n_seq)};
        k.insert(k.end(), n_split.begin(), n_split.end());
        auto ptr = [&](const void* p) { k.push_back(uint64_t(reinterpret_cast<uintptr_t>(p))); };
        for (const Seq& q : seqs) {
            ptr(q.pages);
            k.insert(k.end(), {uint64_t(q.bound), uint64_t(q.observed), q.scores_off, q.rows_off});
        }
        // every buffer the launches touch (the weights never move)
        for (const DeviceBuffer* b : {&sc.tokens, &sc.cos, &sc.sin, &sc.x, &sc.xn, &sc.qkv, &sc.att,
                                      &sc.lse, &sc.gu, &sc.h, &sc.kv_len, &sc.obs, &sc.scores,
                                      &sc.logits, &sc.attn_partial})
            ptr(b->get());
        return k;
    }
};

// A step in which every sequence decodes one token (after its first prefill): the
// bookkeeping of all layers first, then the work of the whole step queued at once --
// replayed from a CUDA graph where the same plan ran before (cuda_graph.h). The cache
// lengths travel in device memory (kv_len), so a replay sees this step's. The cancel flags
// are checked once, before. Column sums over a step's queries (H2O) are, with its one
// query, that query's attention row: the rows kernel measures both. Returns false (nothing
// done) for other steps.
bool CudaBackend::decode_step(SequenceStep* steps, int n_seq) {
    const ModelConfig& c = config_;
    for (int s = 0; s < n_seq; ++s)
        if (steps[s].n_tokens != 1 || steps[s].cache->n_processed() == 0) return false;
    std::vector<ObservationRequest> reqs(size_t(c.n_layer) * size_t(n_seq));
    for (int il = 0; il < c.n_layer; ++il)
        for (int s = 0; s < n_seq; ++s)
            if (steps[s].policy) {
                reqs[size_t(il) * size_t(n_seq) + size_t(s)] = steps[s].policy->observe(il);
            }
    check_cancel(steps, n_seq);
    ensure_scratch(n_seq, n_seq);

    const int32_t half = c.head_dim / 2;
    std::vector<int32_t> tokens(static_cast<size_t>(n_seq));
    std::vector<float> cos(size_t(n_seq) * half), sin(size_t(n_seq) * half);
    for (int s = 0; s < n_seq; ++s) {
        tokens[size_t(s)] = steps[s].tokens[0];
        rope_cos_sin(rope_inv_freq(c, steps[s].positions[0] + 1), steps[s].positions, 1,
                     cos.data() + size_t(s) * half, sin.data() + size_t(s) * half);
    }
    DecodePlan plan;
    plan.n_seq = n_seq;
    plan.seqs.resize(reqs.size());
    std::vector<int32_t> kv_len(reqs.size());
    std::vector<Measured> deferred;
    size_t score_floats = 0, obs_floats = 0;
    for (int il = 0; il < c.n_layer; ++il)
        for (int s = 0; s < n_seq; ++s) {
            const size_t i = size_t(il) * size_t(n_seq) + size_t(s);
            KvCache& cache = *steps[s].cache;
            CudaKvStorage& kv = cuda_storage(cache);
            PYR_ASSERT(kv.size(il) == cache.size(il));
            const int32_t n_kv = cache.size(il) + 1;
            reserve_kv(kv, il, n_kv);
            kv.set_size(il, n_kv);
            cache.appended(il, steps[s].positions, 1);
            kv_len[i] = n_kv;
            DecodePlan::Seq& q = plan.seqs[i];
            q.pages = kv.table(il);
            q.bound = decode_bound(kv.capacity(il));
            const bool row = reqs[i].last_rows > 0, sums = reqs[i].column_sums;
            q.observed = row || sums;
            if (!q.observed) continue;
            q.scores_off = score_floats;
            q.rows_off = obs_floats;
            score_floats += size_t(c.n_head) * size_t(q.bound);
            obs_floats += size_t(q.bound);
            deferred.push_back({s, il, row ? 1 : 0, n_kv, row ? q.rows_off : SIZE_MAX,
                                sums ? q.rows_off : SIZE_MAX});
        }
    int32_t max_split = 1;
    plan.n_split.resize(size_t(c.n_layer));
    for (int il = 0; il < c.n_layer; ++il) {
        int32_t max_bound = 0;
        for (int s = 0; s < n_seq; ++s) max_bound = std::max(max_bound, plan.at(il, s).bound);
        plan.n_split[size_t(il)] = attn_splits(n_seq, max_bound);
        max_split = std::max(max_split, plan.n_split[size_t(il)]);
    }
    if (max_split > 1) ensure_attn_partial(n_seq, max_split);
    ensure_scores(score_floats);
    ensure_obs(obs_floats, 0);
    stage_upload(s_.tokens.get(), tokens.data(), tokens.size());
    stage_upload(s_.cos.get(), cos.data(), cos.size());
    stage_upload(s_.sin.get(), sin.data(), sin.size());
    stage_upload(s_.kv_len.get(), kv_len.data(), kv_len.size());

    graphs_->run(plan.key(s_), [&](cudaStream_t st) { encode_decode(plan, st); },
                 !linear_uses_gemv(n_seq));
    std::vector<int32_t> out_seqs(static_cast<size_t>(n_seq));
    for (int s = 0; s < n_seq; ++s) out_seqs[size_t(s)] = s;
    finish_step(steps, out_seqs, deferred, obs_floats);
    return true;
}

// Queues a decode step's work on `st`, from the plan and the uploaded inputs only (it may
// be captured into a graph: no allocation, no wait). Row s of the batch is sequence s.
void CudaBackend::encode_decode(const DecodePlan& plan, cudaStream_t st) {
    const ModelConfig& c = config_;
    const int n_seq = plan.n_seq;
    PYR_CUDA_CHECK(kernels::embed(dt_, w_.tok_embd.get(), s_.tokens.as<int32_t>(), n_seq, c.n_embd,
                                  s_.x.as<float>(), st));
    for (int il = 0; il < c.n_layer; ++il) {
        const int32_t* kv_len = s_.kv_len.as<int32_t>() + int64_t(il) * n_seq;
        LayerBatch lb(n_seq);
        lb.kv_len = kv_len;
        for (int s = 0; s < n_seq; ++s) {
            const DecodePlan::Seq& q = plan.at(il, s);
            place_sequence(lb, s, s, 1, q.pages, q.bound);
            kernels::AttnSeq& a = lb.attn[size_t(s)];
            a.scores_from = q.observed ? 0 : 1;
            a.scores = q.observed ? s_.scores.as<float>() + q.scores_off : nullptr;
        }
        lb.row0[size_t(n_seq)] = n_seq;
        lb.split.n_split = plan.n_split[size_t(il)];
        if (lb.split.n_split > 1) lb.split.partial = s_.attn_partial.as<float>();
        attention_block(il, lb, n_seq, st);
        std::vector<kernels::RowsSeq> rows;  // the observed tokens' attention rows
        for (int s = 0; s < n_seq; ++s) {
            const DecodePlan::Seq& q = plan.at(il, s);
            if (q.observed)
                rows.push_back({s_.scores.as<float>() + q.scores_off,
                                s_.lse.as<float>() + int64_t(s) * c.n_head,
                                s_.obs.as<float>() + q.rows_off, 1, q.bound, q.bound - 1,
                                kv_len + s});
        }
        launch_rows(rows, st);
        mlp_block(il, n_seq, st);
    }
    output_head(s_.x.as<float>(), n_seq, st);
}

// ---- factories ------------------------------------------------------------------------

}  // namespace pyr::cuda

namespace pyr {

int cuda_device_count() { return cuda::device_count(); }

std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<const Model> model, int device,
                                           uint64_t max_device_bytes) {
    PYR_ASSERT(model != nullptr);
    auto ctx = cuda::Context::open(device, max_device_bytes);
    return std::make_unique<cuda::CudaBackend>(std::move(ctx), std::move(model));
}

std::unique_ptr<Backend> make_cuda_backend_random(const ModelConfig& config, bool bf16,
                                                  uint64_t seed, int device,
                                                  uint64_t max_device_bytes) {
    auto ctx = cuda::Context::open(device, max_device_bytes);
    return std::make_unique<cuda::CudaBackend>(std::move(ctx), config,
                                               bf16 ? kernels::Dt::BF16 : kernels::Dt::F16, seed);
}

}  // namespace pyr
