#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "backend/cuda/cuda_linear.h"
#include "common/env.h"
#include "common/log.h"
#include "model/rope.h"

namespace pyr::cuda {

namespace {

// PYRAMID_ATTN_SPLITS=N forces N decode attention splits (1 = off); unset: attention_splits.
int32_t forced_attn_splits() {
    static const int32_t n = [] {
        const int v = env_int("PYRAMID_ATTN_SPLITS", 0);
        return v <= 0 ? 0 : std::min(v, int(kernels::kMaxAttnSplits));
    }();
    return n;
}

}  // namespace

// ---- construction (the weights: cuda_weights.cpp) -------------------------------------

CudaBackend::CudaBackend(std::shared_ptr<Context> ctx, std::shared_ptr<const Model> model)
    : ctx_(std::move(ctx)), model_(std::move(model)), config_(model_->config()) {
    const DType emb = model_->weights().tok_embd.dtype;
    dt_ = emb == DType::BF16 ? kernels::Dt::BF16 : kernels::Dt::F16;
    const DeviceGuard on_device(ctx_->device());
    init_common();
    upload(model_->weights());
}

CudaBackend::CudaBackend(std::shared_ptr<Context> ctx, const ModelConfig& config,
                         kernels::Dt dt, uint64_t seed)
    : ctx_(std::move(ctx)), config_(config), dt_(dt) {
    const DeviceGuard on_device(ctx_->device());
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
        const bool head_dim_ok = kernels::attention_rows_mma_supported(dt_, c.head_dim);
        if (tc == kernels::TensorCores::Usable || tc == kernels::TensorCores::Absent)
            PYR_LOG_INFO(what + (head_dim_ok || tc != kernels::TensorCores::Usable
                                     ? ""
                                     : "; head_dim " + std::to_string(c.head_dim) +
                                           ": prefill attention on the CUDA cores"));
        else
            PYR_LOG_WARN(what + "; prefill attention runs on the CUDA cores");
    }
    PYR_LOG_INFO(std::string("early launches of the projections (PDL) ") +
                 (kernels::early_launches(dt_) ? "on" : "off"));
    obs_ready_ = std::make_unique<Event>();
    compactor_ = std::make_shared<KvCompactor>(ctx_);
}

std::unique_ptr<KvStorage> CudaBackend::new_kv_storage(int32_t n_ctx) {
    return std::make_unique<CudaKvStorage>(ctx_, compactor_, dt_, config_.n_layer, n_ctx, kv_dim_,
                                           kv_back_moves_);
}

uint64_t CudaBackend::kv_storage_bytes(int32_t n_ctx) const {
    return CudaKvStorage::bytes_when_full(config_.n_layer, n_ctx, kv_dim_,
                                          sample_on_device_ ? config_.n_vocab : 0);
}

DeviceMemory CudaBackend::device_memory() const {
    const MemoryUse u = ctx_->memory();
    return {u.weights, u.kv, u.scratch, u.peak, ctx_->budget()};
}

// ---- scratch and staging ---------------------------------------------------------------

void CudaBackend::ensure_scratch(int32_t n_rows, int n_seq) {
    if (n_rows > s_.n_rows) {
        // twice the rows held so far, so that steps growing a little at a time reallocate
        // (and change their graphs' keys) rarely; exactly the rows asked for where the
        // budget has no room for that
        const int32_t grown = std::max(n_rows, 2 * s_.n_rows);
        try {
            allocate_rows(grown);
        } catch (const Error& e) {
            if (e.status() != PYR_ERR_OUT_OF_MEMORY || grown == n_rows) throw;
            allocate_rows(n_rows);
        }
    }
    grow_scratch(s_.logits, size_t(n_seq) * size_t(config_.n_vocab) * 4);
    grow_scratch(s_.kv_len, size_t(n_seq) * size_t(config_.n_layer) * 4);
}

void CudaBackend::allocate_rows(int32_t n_rows) {
    const size_t n = size_t(n_rows);
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
    s_.n_rows = n_rows;
}

// Makes `b` hold at least `bytes`. A buffer that grows is freed first (the budget counts what
// is held), so after a failed growth it is empty and the next call grows it again.
void CudaBackend::grow_scratch(DeviceBuffer& b, size_t bytes) {
    if (bytes <= b.bytes()) return;
    b = DeviceBuffer();
    b = ctx_->alloc(bytes, Use::Scratch);
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

void CudaBackend::ensure_scores(size_t floats) { grow_scratch(s_.scores, floats * 4); }

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
    grow_scratch(s_.attn_partial, need * 4);
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
    const DeviceGuard on_device(ctx_->device());
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
    // dynamic scaling sees each sequence's own length, rope_seq_len)
    std::vector<int32_t> tokens(static_cast<size_t>(n_rows));
    std::vector<float> cos(size_t(n_rows) * half), sin(size_t(n_rows) * half);
    for (int s = 0; s < n_seq; ++s) {
        const InFlight& f = seqs[size_t(s)];
        std::copy_n(steps[s].tokens, f.n, tokens.begin() + f.row0);
        rope_cos_sin(rope_inv_freq(c, rope_seq_len(steps[s])), f.positions.data(), f.n,
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
    for (int c0 = 0; c0 < n_seq; c0 += kernels::kMaxBatch) {
        const int c1 = std::min(n_seq, c0 + kernels::kMaxBatch);
        int32_t max_q = 0;
        for (int s = c0; s < c1; ++s) max_q = std::max(max_q, seqs[size_t(s)].n);
        std::fill(lb.launch_max_q.begin() + c0, lb.launch_max_q.begin() + c1, max_q);
    }
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
            // recomputed only where the attention ran on the tensor cores (which implies
            // attention_rows_mma can), so the rows meet an lse of the same arithmetic
            if (n_obs <= 1 || !kernels::attention_on_tensor_cores(dt_, lb.launch_max_q[size_t(s)], c.head_dim,
                                                                   attention_on_tensor_cores_)) {
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
    kv.table_uploaded(il);
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
        const int32_t max_q = lb.launch_max_q[size_t(c0)];
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
    grow_scratch(s_.sample_rows, desc.size() * sizeof(kernels::SampleRow));
    grow_scratch(s_.sampled, desc.size() * 4);
    grow_scratch(s_.penalized, penalized.size() * 4);
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
    // Everything this may allocate first: out of memory must leave every sequence's logits
    // kept on the device as they were (its session rolls the step back and keeps them).
    std::vector<size_t> to_host;  // indices into out_seqs
    std::vector<std::pair<size_t, float*>> on_device;  // (index, its last_logits)
    for (size_t i = 0; i < out_seqs.size(); ++i) {
        const SequenceStep& step = steps[out_seqs[i]];
        if (step.logits)
            to_host.push_back(i);
        else if (step.sample)
            on_device.emplace_back(i, cuda_storage(*step.cache).last_logits(config_.n_vocab));
    }
    const size_t logit_floats = to_host.size() * n_vocab;
    readback_.reserve((logit_floats + obs_floats + sampled.size()) * 4);
    for (const auto& [i, dst] : on_device)
        PYR_CUDA_CHECK(cudaMemcpyAsync(dst, s_.logits.as<float>() + i * n_vocab, n_vocab * 4,
                                       cudaMemcpyDeviceToDevice, st));
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
    const DeviceGuard on_device(ctx_->device());
    const float* logits = cuda_storage(cache).last_logits();
    if (!logits) fail(PYR_ERR_STATE, "no logits on the device for this session yet");
    const size_t bytes = size_t(config_.n_vocab) * 4;
    readback_.reserve(bytes);
    PYR_CUDA_CHECK(cudaMemcpyAsync(readback_.get(), logits, bytes, cudaMemcpyDeviceToHost, ctx_->stream()));
    ctx_->sync();
    std::memcpy(out, readback_.get(), bytes);
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
