// The KV policies on the GPU: what a step measures for them at each layer (attention rows
// of the last queries, column sums), when the measurements come back, and what their
// decisions do to the step in flight (a first prefill's kept tokens go on to the deeper
// layers). The decisions themselves are the policies' (lib/kv/), on the host.
#include <algorithm>

#include "backend/cuda/cuda_backend.h"

namespace pyr::cuda {

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
    size_t partial_floats = 0;  // the column sums' workspace, reused sequence after sequence
    for (const std::vector<Measured>* ms : {&now, &later})
        for (const Measured& m : *ms)
            if (m.sums_off != SIZE_MAX)
                partial_floats = std::max(partial_floats, kernels::attention_col_sums_partial_floats(
                                                              lb.attn[size_t(m.seq)].n_q, m.n_keys));
    grow_scratch(s_.col_partial, partial_floats * 4);
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
                                                       base + shift + m.sums_off,
                                                       s_.col_partial.as<float>(), st,
                                                       attention_on_tensor_cores_,
                                                       lb.launch_max_q[size_t(m.seq)]));
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

}  // namespace pyr::cuda
