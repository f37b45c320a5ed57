#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "backend/cuda/cuda_linear.h"
#include "common/log.h"
#include "model/rope.h"

namespace pyr::cuda {

namespace {

DType host_dtype(kernels::Dt dt) { return dt == kernels::Dt::F16 ? DType::F16 : DType::BF16; }

template <typename T>
void upload_vector(Context& ctx, DeviceBuffer& buf, const std::vector<T>& v) {
    // Pageable source: staged before the call returns, so `v` may change right after.
    PYR_CUDA_CHECK(cudaMemcpyAsync(buf.get(), v.data(), v.size() * sizeof(T),
                                   cudaMemcpyHostToDevice, ctx.stream()));
}

CudaKvStorage& cuda_storage(KvCache& cache) {
    auto* s = dynamic_cast<CudaKvStorage*>(&cache.storage());
    PYR_ASSERT(s != nullptr);
    return *s;
}

}  // namespace

// ---- KV storage -----------------------------------------------------------------------

CudaKvStorage::CudaKvStorage(std::shared_ptr<Context> ctx, kernels::Dt dt, int n_layer,
                             int32_t n_ctx, int32_t kv_dim)
    : ctx_(std::move(ctx)), dt_(dt), layers_(size_t(n_layer)), n_ctx_(n_ctx), kv_dim_(kv_dim) {}

// New buffers of `capacity` tokens holding rows index_dev[0..n_rows) of the old ones (or
// the first n_rows when index_dev is null).
void CudaKvStorage::reallocate(Layer& layer, int32_t capacity, const int32_t* index_dev,
                               int32_t n_rows) {
    const size_t row = size_t(kv_dim_) * 2;
    DeviceBuffer k = ctx_->alloc(size_t(capacity) * row, Use::Kv);
    DeviceBuffer v = ctx_->alloc(size_t(capacity) * row, Use::Kv);
    if (n_rows > 0) {
        if (index_dev) {
            PYR_CUDA_CHECK(kernels::gather_rows(layer.k.get(), row, index_dev, n_rows, k.get(), ctx_->stream()));
            PYR_CUDA_CHECK(kernels::gather_rows(layer.v.get(), row, index_dev, n_rows, v.get(), ctx_->stream()));
        } else {
            PYR_CUDA_CHECK(cudaMemcpyAsync(k.get(), layer.k.get(), size_t(n_rows) * row,
                                           cudaMemcpyDeviceToDevice, ctx_->stream()));
            PYR_CUDA_CHECK(cudaMemcpyAsync(v.get(), layer.v.get(), size_t(n_rows) * row,
                                           cudaMemcpyDeviceToDevice, ctx_->stream()));
        }
    }
    layer.k = std::move(k);
    layer.v = std::move(v);
    layer.capacity = capacity;
}

void CudaKvStorage::reserve(int il, int32_t n_total) {
    Layer& layer = layers_[size_t(il)];
    PYR_ASSERT(n_total <= n_ctx_);
    if (n_total <= layer.capacity) return;
    const int32_t want = std::min(n_ctx_, std::max({n_total, 2 * layer.capacity, 64}));
    reallocate(layer, want, nullptr, layer.size);
}

void CudaKvStorage::retain(int il, const std::vector<int32_t>& keep) {
    Layer& layer = layers_[size_t(il)];
    for (size_t i = 0; i < keep.size(); ++i)
        PYR_ASSERT(keep[i] >= 0 && keep[i] < layer.size && (i == 0 || keep[i] > keep[i - 1]));
    const int32_t n = int32_t(keep.size());
    if (n == layer.size) return;  // strictly ascending and all of them: nothing moves
    ctx_->make_current();
    DeviceBuffer index = ctx_->alloc(keep.size() * sizeof(int32_t), Use::Scratch);
    upload_vector(*ctx_, index, keep);
    // Shrink the allocation with the cache, keeping room to grow again.
    const int32_t cap = n < layer.capacity / 2 ? std::min(n_ctx_, std::max(64, 2 * n)) : layer.capacity;
    reallocate(layer, cap, index.as<int32_t>(), n);
    layer.size = n;
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
    return std::make_unique<CudaKvStorage>(ctx_, dt_, config_.n_layer, n_ctx, kv_dim_);
}

DeviceMemory CudaBackend::device_memory() const {
    const MemoryUse u = ctx_->memory();
    return {u.weights, u.kv, u.scratch, u.peak};
}

// ---- scratch --------------------------------------------------------------------------

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

// ---- the forward pass -----------------------------------------------------------------

void CudaBackend::forward(SequenceStep* batch, int n_seq) {
    std::lock_guard<std::mutex> lock(mutex_);
    ctx_->make_current();
    for (int i = 0; i < n_seq; ++i) {
        check_sequence_step(config_, batch[i], "cuda backend");
        PYR_ASSERT(cuda_storage(*batch[i].cache).kv_dim() == kv_dim_);
    }
    for (int i = 0; i < n_seq; i += kernels::kMaxBatch)
        forward_batch(batch + i, std::min(n_seq - i, kernels::kMaxBatch));
}

// The sequences' tokens go through the layers together: one projection per weight matrix
// for all rows of the batch, one RoPE/append launch and one attention launch per layer over
// the ragged caches. KV policies observe and prune per sequence as on the CPU backend
// (CpuBackend::forward_sequence is the reference narrative).
void CudaBackend::forward_batch(SequenceStep* steps, int n_seq) {
    const ModelConfig& c = config_;
    Context& ctx = *ctx_;
    const cudaStream_t st = ctx.stream();
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
    upload_vector(ctx, s_.tokens, tokens);
    upload_vector(ctx, s_.cos, cos);
    upload_vector(ctx, s_.sin, sin);
    PYR_CUDA_CHECK(kernels::embed(dt_, w_.tok_embd.get(), s_.tokens.as<int32_t>(), n_rows, c.n_embd,
                                  s_.x.as<float>(), st));

    std::vector<Deferred> deferred;
    size_t obs_used = 0;
    for (int il = 0; il < c.n_layer; ++il) {
        check_cancel(steps, n_seq);
        const LayerWeights& L = w_.layers[size_t(il)];

        // attention block: x += o_proj(attention(rope(q), cache + rope(k), v))
        PYR_CUDA_CHECK(kernels::rmsnorm(dt_, s_.x.as<float>(), n_rows, c.n_embd, L.attn_norm.get(),
                                        c.rms_norm_eps, s_.xn.get(), st));
        linear(ctx, dt_, L.wqkv.get(), qkv_dim_, c.n_embd, s_.xn.get(), n_rows, s_.qkv.as<float>(),
               qkv_dim_, false);
        if (L.bqkv.get())
            PYR_CUDA_CHECK(kernels::add_bias(dt_, s_.qkv.as<float>(), n_rows, qkv_dim_, qkv_dim_,
                                             L.bqkv.get(), st));
        kernels::RopeStoreBatch rb;
        kernels::AttnBatch ab;
        rb.n_seq = ab.n_seq = n_seq;
        for (int s = 0; s < n_seq; ++s) {
            const InFlight& f = seqs[size_t(s)];
            KvCache& cache = *steps[s].cache;
            CudaKvStorage& kv = cuda_storage(cache);
            PYR_ASSERT(kv.size(il) == cache.size(il));
            const int32_t first_new = cache.size(il);
            kv.reserve(il, first_new + f.n);
            kv.set_size(il, first_new + f.n);
            cache.appended(il, f.positions.data(), f.n);
            rb.row0[s] = f.row0;
            rb.k_cache[s] = kv.keys(il);
            rb.v_cache[s] = kv.values(il);
            rb.slot0[s] = first_new;
            kernels::AttnSeq& a = ab.seq[s];
            a.q = s_.qkv.as<float>() + int64_t(f.row0) * qkv_dim_;
            a.q_stride = qkv_dim_;
            a.n_q = f.n;
            a.k = kv.keys(il);
            a.v = kv.values(il);
            a.n_kv = first_new + f.n;
            a.out = s_.att.as<char>() + int64_t(f.row0) * q_dim_ * 2;
            a.lse = s_.lse.as<float>() + int64_t(f.row0) * c.n_head;
        }
        rb.row0[n_seq] = n_rows;
        // what the policies will observe after this layer: the attention kernel keeps the raw
        // scores of the observed queries (no second pass over the keys for rows)
        std::vector<ObservationRequest> reqs(static_cast<size_t>(n_seq));
        size_t score_floats = 0;
        std::vector<size_t> score_off(static_cast<size_t>(n_seq), 0);
        for (int s = 0; s < n_seq; ++s) {
            kernels::AttnSeq& a = ab.seq[s];
            a.scores_from = a.n_q;  // no rows observed unless the policy asks
            if (!steps[s].policy) continue;
            reqs[size_t(s)] = steps[s].policy->observe(il);
            a.scores_from = a.n_q - std::min(reqs[size_t(s)].last_rows, a.n_q);
            score_off[size_t(s)] = score_floats;
            score_floats += size_t(a.n_q - a.scores_from) * size_t(c.n_head) * size_t(a.n_kv);
        }
        if (score_floats > s_.score_floats) {
            s_.scores = DeviceBuffer();
            s_.scores = ctx.alloc(score_floats * 4, Use::Scratch);
            s_.score_floats = score_floats;
        }
        for (int s = 0; s < n_seq; ++s)
            if (ab.seq[s].scores_from < ab.seq[s].n_q)
                ab.seq[s].scores = s_.scores.as<float>() + score_off[size_t(s)];
        PYR_CUDA_CHECK(kernels::rope_store(dt_, s_.qkv.as<float>(), rb, c.n_head, c.n_head_kv,
                                           c.head_dim, s_.cos.as<float>(), s_.sin.as<float>(), st));
        PYR_CUDA_CHECK(kernels::attention(dt_, ab, c.n_head, c.n_head_kv, c.head_dim, st));
        linear(ctx, dt_, L.wo.get(), c.n_embd, q_dim_, s_.att.get(), n_rows, s_.x.as<float>(),
               c.n_embd, true);
        if (L.bo.get())
            PYR_CUDA_CHECK(kernels::add_bias(dt_, s_.x.as<float>(), n_rows, c.n_embd, c.n_embd,
                                             L.bo.get(), st));

        // the policies' keep/drop decisions for this layer (lib/kv/)
        observe_layer(il, steps, ab, reqs, seqs, deferred, obs_used);
        n_rows = 0;
        for (const InFlight& f : seqs) n_rows += f.n;

        // MLP block: x += down(silu(gate(xn)) * up(xn))
        PYR_CUDA_CHECK(kernels::rmsnorm(dt_, s_.x.as<float>(), n_rows, c.n_embd, L.ffn_norm.get(),
                                        c.rms_norm_eps, s_.xn.get(), st));
        linear_swiglu(ctx, dt_, L.w_gate_up.get(), L.b_gate_up.get(), c.n_ff, c.n_embd,
                      s_.xn.get(), n_rows, s_.gu.as<float>(), s_.h.get());
        linear(ctx, dt_, L.w_down.get(), c.n_embd, c.n_ff, s_.h.get(), n_rows, s_.x.as<float>(),
               c.n_embd, true);
        if (L.b_down.get())
            PYR_CUDA_CHECK(kernels::add_bias(dt_, s_.x.as<float>(), n_rows, c.n_embd, c.n_embd,
                                             L.b_down.get(), st));
    }

    // output head on each sequence's last token: logits (n_out, n_vocab)
    std::vector<int32_t> last_rows;
    std::vector<int> out_seq;
    for (int s = 0; s < n_seq; ++s)
        if (steps[s].logits) {
            last_rows.push_back(seqs[size_t(s)].row0 + seqs[size_t(s)].n - 1);
            out_seq.push_back(s);
        }
    const int32_t n_out = int32_t(last_rows.size());
    std::vector<float> logits;
    if (n_out > 0) {
        upload_vector(ctx, s_.rows_index, last_rows);
        PYR_CUDA_CHECK(kernels::gather_rows(s_.x.get(), size_t(c.n_embd) * 4, s_.rows_index.as<int32_t>(),
                                            n_out, s_.x_tmp.get(), st));
        PYR_CUDA_CHECK(kernels::rmsnorm(dt_, s_.x_tmp.as<float>(), n_out, c.n_embd, w_.output_norm.get(),
                                        c.rms_norm_eps, s_.xn.get(), st));
        const void* head = w_.output.get() ? w_.output.get() : w_.tok_embd.get();
        linear(ctx, dt_, head, c.n_vocab, c.n_embd, s_.xn.get(), n_out, s_.logits.as<float>(),
               c.n_vocab, false);
        logits.resize(size_t(n_out) * size_t(c.n_vocab));
        PYR_CUDA_CHECK(cudaMemcpyAsync(logits.data(), s_.logits.get(), logits.size() * 4,
                                       cudaMemcpyDeviceToHost, st));
    }
    ctx.sync();
    for (int i = 0; i < n_out; ++i)
        std::copy_n(logits.data() + size_t(i) * size_t(c.n_vocab), c.n_vocab, steps[out_seq[size_t(i)]].logits);
    finish_deferred(steps, deferred, obs_used);
}

// After layer il's attention: measures what each sequence's policy asks for. In a first
// prefill the policy decides now (its keep set changes what deeper layers compute); in
// later steps the measurements stay on the device until the step ends (no stall per layer).
void CudaBackend::observe_layer(int il, SequenceStep* steps, const kernels::AttnBatch& ab,
                                const std::vector<ObservationRequest>& reqs,
                                std::vector<InFlight>& seqs, std::vector<Deferred>& deferred,
                                size_t& obs_used) {
    const ModelConfig& c = config_;
    Context& ctx = *ctx_;
    std::vector<std::vector<int32_t>> kept_rows(seqs.size());
    bool shrink = false;
    for (size_t s = 0; s < seqs.size(); ++s) {
        KvPolicy* policy = steps[s].policy;
        if (!policy) continue;
        InFlight& f = seqs[s];
        KvCache& cache = *steps[s].cache;
        const ObservationRequest& req = reqs[s];
        const kernels::AttnSeq& a = ab.seq[s];
        const int32_t n_kv = cache.size(il);
        PYR_ASSERT(n_kv == a.n_kv);
        const int32_t n_obs = a.scores ? a.n_q - a.scores_from : 0;  // rows asked for (forward_batch)
        const size_t need = size_t(n_obs) * size_t(n_kv) + (req.column_sums ? size_t(n_kv) : 0);
        ensure_obs(obs_used + need, obs_used);  // after what earlier layers left for later
        Deferred d{int(s), il, n_obs, n_kv, SIZE_MAX, SIZE_MAX};
        float* base = s_.obs.as<float>();
        if (n_obs > 0) {
            d.rows_off = obs_used;
            PYR_CUDA_CHECK(kernels::attention_rows(a.scores, a.lse + int64_t(a.scores_from) * c.n_head,
                                                   n_obs, c.n_head, n_kv, n_kv - f.n + a.scores_from,
                                                   base + d.rows_off, ctx.stream()));
        }
        if (req.column_sums) {
            d.sums_off = obs_used + size_t(n_obs) * size_t(n_kv);
            PYR_CUDA_CHECK(cudaMemsetAsync(base + d.sums_off, 0, size_t(n_kv) * 4, ctx.stream()));
            PYR_CUDA_CHECK(kernels::attention_col_sums(dt_, a, c.n_head, c.n_head_kv, c.head_dim,
                                                       base + d.sums_off, ctx.stream()));
        }
        if (!f.first_prefill) {
            deferred.push_back(d);
            obs_used += need;
            continue;
        }
        std::vector<float> host(need);
        if (need > 0) {
            PYR_CUDA_CHECK(cudaMemcpyAsync(host.data(), s_.obs.as<float>() + obs_used, need * 4,
                                           cudaMemcpyDeviceToHost, ctx.stream()));
            ctx.sync();
        }
        Observation obs;
        obs.n_keys = n_kv;
        obs.n_rows = n_obs;
        obs.rows = n_obs > 0 ? host.data() : nullptr;
        obs.column_sums = req.column_sums ? host.data() + size_t(n_obs) * size_t(n_kv) : nullptr;
        auto keep = policy->on_layer(il, obs, cache);
        if (!keep) continue;
        const int32_t first_new = n_kv - f.n;
        cache.retain(il, *keep);
        if (!policy->shrink_prefill(il)) continue;
        // only the kept ones among this step's tokens go on to deeper layers
        for (int32_t slot : *keep)
            if (slot >= first_new) kept_rows[s].push_back(slot - first_new);
        PYR_ASSERT(!kept_rows[s].empty() && kept_rows[s].back() == f.n - 1);  // the last token stays
        shrink = true;
    }
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
    upload_vector(*ctx_, s_.rows_index, index);
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

// Hands the observations measured during a later step to the policies, layer by layer.
void CudaBackend::finish_deferred(SequenceStep* steps, const std::vector<Deferred>& deferred,
                                  size_t obs_used) {
    if (deferred.empty()) return;
    std::vector<float> host(obs_used);
    if (obs_used > 0) {
        PYR_CUDA_CHECK(cudaMemcpyAsync(host.data(), s_.obs.get(), obs_used * 4, cudaMemcpyDeviceToHost,
                                       ctx_->stream()));
        ctx_->sync();
    }
    for (const Deferred& d : deferred) {
        Observation obs;
        obs.n_keys = d.n_keys;
        obs.n_rows = d.n_rows;
        obs.rows = d.rows_off != SIZE_MAX ? host.data() + d.rows_off : nullptr;
        obs.column_sums = d.sums_off != SIZE_MAX ? host.data() + d.sums_off : nullptr;
        KvCache& cache = *steps[d.seq].cache;
        if (auto keep = steps[d.seq].policy->on_layer(d.il, obs, cache)) cache.retain(d.il, *keep);
    }
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
