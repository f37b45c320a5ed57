// The CUDA backend's decode steps: every sequence of the batch decodes one token, the
// whole step queued at once and replayed from a CUDA graph where the same plan ran before.
#include <algorithm>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_linear.h"
#include "model/rope.h"

namespace pyr::cuda {


// A decode step's bound on a cache's length (its launches read the true length on the
// device): the capacity rounded up to a power of two, so that the bound, and with it a
// captured graph's key, changes at doublings, not at every page the cache gains.
int32_t CudaBackend::decode_bound(int32_t capacity) {
    int32_t b = kernels::kKvPageRows;
    while (b < capacity) b *= 2;
    return b;
}

// Everything a decode step's launches depend on besides its inputs (token ids, RoPE tables
// and cache lengths, uploaded before them): two steps with equal keys queue the same work,
// so one's graph replays the other.
struct CudaBackend::DecodePlan {
    struct Seq {               // one sequence in one layer
        kernels::KvPages pages = nullptr;
        int32_t bound = 0;     // bounds the cache length in the launches; scores' row stride
        bool observed = false; // the policy measures the token's attention row
        size_t scores_off = 0, rows_off = 0;  // floats into s_.scores (each layer from 0) and s_.obs
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
        rope_cos_sin(rope_inv_freq(c, rope_seq_len(steps[s])), steps[s].positions, 1,
                     cos.data() + size_t(s) * half, sin.data() + size_t(s) * half);
    }
    DecodePlan plan;
    plan.n_seq = n_seq;
    plan.seqs.resize(reqs.size());
    std::vector<int32_t> kv_len(reqs.size());
    std::vector<Measured> deferred;
    // a layer's raw scores are read within the layer (its rows), so every layer's start at 0
    size_t score_floats = 0, obs_floats = 0;
    for (int il = 0; il < c.n_layer; ++il) {
        size_t layer_scores = 0;
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
            q.scores_off = layer_scores;
            q.rows_off = obs_floats;
            layer_scores += size_t(c.n_head) * size_t(q.bound);
            obs_floats += size_t(q.bound);
            deferred.push_back({s, il, row ? 1 : 0, n_kv, row ? q.rows_off : SIZE_MAX,
                                sums ? q.rows_off : SIZE_MAX});
        }
        score_floats = std::max(score_floats, layer_scores);
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

}  // namespace pyr::cuda
