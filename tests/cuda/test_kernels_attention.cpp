// Tests of kernels/attention.cu and attention_mma.cu: attention over paged ragged caches,
// decode splits and grouped blocks, the tensor cores, and the KV policies' observations
// (kernel_test_util.h says how they test).
#include "cuda/kernel_test_util.h"

using namespace kernel_test;

namespace {

// One sequence of an attention batch: host inputs as the kernel sees them.
struct HostAttnSeq {
    int32_t n_q = 0, n_kv = 0, q_stride = 0;
    int32_t scores_from = -1;         // raw scores wanted for queries scores_from..; -1: none
    std::vector<float> q;             // (n_q, q_stride) fp32
    std::vector<uint16_t> k, v;       // (n_kv, kv_dim) 16-bit bits
};

HostAttnSeq random_attn_seq(Rng& rng, Dt dt, int32_t n_q, int32_t n_kv, int32_t n_head,
                            int32_t n_head_kv, int32_t hd, int32_t scores_from) {
    HostAttnSeq s;
    s.n_q = n_q;
    s.n_kv = n_kv;
    s.scores_from = scores_from;
    // queries are rows of the fused q|k|v projection: their stride is wider than q
    s.q_stride = (n_head + 2 * n_head_kv) * hd;
    s.q = rng.floats(size_t(n_q) * s.q_stride, -2.0f, 2.0f);
    s.k = rng.bits16(dt, size_t(n_kv) * n_head_kv * hd, -2.0f, 2.0f);
    s.v = rng.bits16(dt, size_t(n_kv) * n_head_kv * hd, -1.0f, 1.0f);
    return s;
}

// Its device buffers. The cache is paged (DevicePagedCache: shuffled pages, all poison but
// the sequence's rows), with rows beyond n_kv filled with NaN: reading (and weighting by
// zero) a key or value the sequence does not have would show in the output. `capacity`
// (>= n_kv; 0: n_kv) is the bound the launch is given when the true count comes from the
// device (AttnBatch::kv_len): the cache's rows and the scores' row stride.
struct DeviceAttnSeq {
    static constexpr int32_t kSpareRows = 3;
    int32_t cap;
    DeviceArray<float> q;
    DevicePagedCache cache;
    DeviceArray<uint16_t> out;
    DeviceArray<float> lse, scores;

    // gap: the cache's (DevicePagedCache; random when negative). The decode kernel's tiles
    // follow the cache's slots, so two runs give the same bits only with the same gap.
    DeviceAttnSeq(Rng& rng, const HostAttnSeq& h, int32_t n_head, int32_t n_head_kv, int32_t hd,
                  int32_t capacity = 0, int32_t gap = -1)
        : cap(std::max(capacity, h.n_kv)),
          q(h.q),
          cache(rng, cap + kSpareRows, size_t(n_head_kv) * hd * 2, 0, gap),
          out(size_t(h.n_q) * n_head * hd),
          lse(size_t(h.n_q) * n_head),
          scores(h.scores_from < 0 ? 0 : size_t(h.n_q - h.scores_from) * n_head * cap) {
        PageImage im = cache.poisoned();
        cache.set_rows(im, false, 0, h.k);
        cache.set_rows(im, true, 0, h.v);
        cache.upload(im);
        out.poison();
        lse.poison();
        scores.poison();
    }
    K::AttnSeq view(const HostAttnSeq& h) const {
        K::AttnSeq s;
        s.q = q.get();
        s.q_stride = h.q_stride;
        s.n_q = h.n_q;
        s.pages = cache.pages();
        s.n_kv = cap;
        s.out = out.get();
        s.lse = lse.get();
        if (h.scores_from >= 0) {
            s.scores = scores.get();
            s.scores_from = h.scores_from;
        }
        return s;
    }
};

// The reference in double: scores (n_q, n_head, n_kv) = q.k log2(e) / sqrt(hd) and the
// probabilities of their causal softmax (both 0 for keys a query cannot see), out
// (n_q, n_head * hd) and lse (n_q, n_head) = log2 sum_j 2^score_j.
struct AttnRef {
    std::vector<double> scores, probs, out, lse;
};

AttnRef attention_ref(Dt dt, const HostAttnSeq& s, int32_t n_head, int32_t n_head_kv, int32_t hd) {
    const int32_t group = n_head / n_head_kv, kv_dim = n_head_kv * hd;
    const double log2e = 1.0 / std::log(2.0);
    AttnRef ref;
    ref.scores.assign(size_t(s.n_q) * n_head * s.n_kv, 0.0);
    ref.probs.assign(size_t(s.n_q) * n_head * s.n_kv, 0.0);
    ref.out.assign(size_t(s.n_q) * n_head * hd, 0.0);
    ref.lse.assign(size_t(s.n_q) * n_head, 0.0);
    const std::vector<double> k = widen(dt, s.k), v = widen(dt, s.v);
    for (int32_t i = 0; i < s.n_q; ++i)
        for (int32_t h = 0; h < n_head; ++h) {
            const int32_t last = s.n_kv - s.n_q + i;  // the last key query i sees
            const float* q = &s.q[size_t(i) * s.q_stride + size_t(h) * hd];
            const size_t kv_off = size_t(h / group) * hd;
            double* score = &ref.scores[(size_t(i) * n_head + h) * s.n_kv];
            double mx = -INFINITY;
            for (int32_t j = 0; j <= last; ++j) {
                double dot = 0.0;
                for (int32_t d = 0; d < hd; ++d) dot += q[d] * k[size_t(j) * kv_dim + kv_off + d];
                score[j] = dot * log2e / std::sqrt(double(hd));
                mx = std::max(mx, score[j]);
            }
            double sum = 0.0;
            for (int32_t j = 0; j <= last; ++j) sum += std::exp2(score[j] - mx);
            ref.lse[size_t(i) * n_head + h] = mx + std::log2(sum);
            double* p = &ref.probs[(size_t(i) * n_head + h) * s.n_kv];
            double* o = &ref.out[size_t(i) * n_head * hd + size_t(h) * hd];
            for (int32_t j = 0; j <= last; ++j) {
                p[j] = std::exp2(score[j] - mx) / sum;
                for (int32_t d = 0; d < hd; ++d) o[d] += p[j] * v[size_t(j) * kv_dim + kv_off + d];
            }
        }
    return ref;
}

// The rows the recent-window policies observe: each key's probability for queries
// rows_from..n_q-1, averaged over the heads, in (query - rows_from, key) order.
std::vector<double> head_mean_rows_ref(const AttnRef& ref, int32_t rows_from, int32_t n_q, int32_t n_kv,
                                       int32_t n_head) {
    std::vector<double> rows(size_t(n_q - rows_from) * n_kv, 0.0);
    for (int32_t i = rows_from; i < n_q; ++i)
        for (int32_t h = 0; h < n_head; ++h)
            for (int32_t j = 0; j < n_kv; ++j)
                rows[size_t(i - rows_from) * n_kv + j] += ref.probs[(size_t(i) * n_head + h) * n_kv + j] / n_head;
    return rows;
}

// The column sums H2O observes: the head-averaged rows of all n_q queries, summed.
std::vector<double> col_sums_ref(const AttnRef& ref, int32_t n_q, int32_t n_kv, int32_t n_head) {
    const std::vector<double> rows = head_mean_rows_ref(ref, 0, n_q, n_kv, n_head);
    std::vector<double> cols(size_t(n_kv), 0.0);
    for (int32_t i = 0; i < n_q; ++i)
        for (int32_t j = 0; j < n_kv; ++j) cols[j] += rows[size_t(i) * n_kv + j];
    return cols;
}

// The raw scores attention() wrote for the keys each observed query sees (the others are
// unspecified), in (query, head, key) order.
std::vector<float> visible_scores(const HostAttnSeq& h, const DeviceAttnSeq& d, int32_t n_head) {
    std::vector<float> got;
    if (h.scores_from < 0) return got;
    const std::vector<float> scores = d.scores.download();
    for (int32_t i = h.scores_from; i < h.n_q; ++i)
        for (int32_t hh = 0; hh < n_head; ++hh)
            for (int32_t j = 0; j <= h.n_kv - h.n_q + i; ++j)
                got.push_back(scores[(size_t(i - h.scores_from) * n_head + hh) * d.cap + j]);
    return got;
}

// Checks what attention() wrote for one sequence against the reference: out, lse and the
// raw scores of the keys each observed query sees.
void check_attention(Dt dt, const HostAttnSeq& h, const DeviceAttnSeq& d, const AttnRef& ref,
                     int32_t n_head) {
    check_close(widen(dt, d.out.download()), ref.out, tol16(dt));
    const std::vector<float> lse = d.lse.download();
    double worst = 0.0;
    for (size_t i = 0; i < lse.size(); ++i)
        worst = std::isfinite(lse[i]) ? std::max(worst, std::abs(lse[i] - ref.lse[i])) : INFINITY;
    CHECK_MESSAGE(worst < 1e-3, "lse off by " << worst);
    if (h.scores_from < 0) return;
    std::vector<double> want;
    for (int32_t i = h.scores_from; i < h.n_q; ++i)
        for (int32_t hh = 0; hh < n_head; ++hh)
            for (int32_t j = 0; j <= h.n_kv - h.n_q + i; ++j)
                want.push_back(ref.scores[(size_t(i) * n_head + hh) * h.n_kv + j]);
    // On the tensor cores the fp32 query enters as two terms of T, within 2^-16 of q for bf16
    // (2^-22 for fp16; attention_mma.cu): bf16's scores were seen up to 1.3e-5 off (in 5000
    // checks, mostly of a few scores each); dropping the second term would put them ~2e-3 off.
    INFO("raw scores of queries " << h.scores_from << "..");
    check_close(widen(visible_scores(h, d, n_head)), want, dt == Dt::BF16 ? 1e-4 : 1e-5);
}

struct SeqShape {
    int32_t n_q, n_kv;
};

}  // namespace

TEST_CASE("tensor_cores: the device computes with the register layout the kernels assume") {
    GPU_OR_SKIP();
    CHECK(K::kernels_runnable() == cudaSuccess);
    // every device the GPU tests run on has them (sm_80+; the sim computes them itself); a
    // wrong transcription of the layout in common.cuh shows here as LayoutMismatch
    for (Dt dt : kDts) {
        INFO("dt " << dt_name(dt));
        const K::TensorCores t = K::tensor_cores(dt);
        CHECK_MESSAGE(t == K::TensorCores::Usable, K::tensor_cores_name(t));
        CHECK(K::tensor_cores(dt) == t);  // asked once, then remembered
    }
}

TEST_CASE("attention: causal softmax(q k / sqrt(d)) v of a ragged batch, lse and scores") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    struct Heads {
        int32_t n_head, n_head_kv;
    };
    const Heads heads[] = {{8, 2}, {4, 4}};  // GQA, MHA
    struct Batch {
        const char* name;
        std::vector<SeqShape> seqs;
    };
    // attention() takes its decode kernel when every sequence has fewer than 8 queries, and
    // its tensor-core kernel (64 queries, 64 keys a block step) from 16 queries on where it can
    const Batch batches[] = {
        {"decode", {{1, 1}, {1, 300}, {3, 40}, {7, 7}, {2, 129}}},
        {"prefill", {{37, 37}, {20, 133}, {8, 8}, {9, 300}}},
        {"mixed", {{1, 1}, {1, 300}, {3, 40}, {37, 37}, {20, 133}}},
        {"long prefill", {{130, 130}, {70, 201}, {16, 16}, {1, 65}, {64, 64}}},
    };
    // 36 is not a multiple of 8 (element-wise dot products), 80 not of 32 (partial lanes)
    for (int32_t hd : {32, 36, 64, 80, 128, 256})
        for (const Heads& hs : heads)
            for (const Batch& b : batches)
                for (Dt dt : kDts)
                    for (bool tensor_cores : {false, true}) {
                    int32_t max_q = 0;
                    for (const SeqShape& sh : b.seqs) max_q = std::max(max_q, sh.n_q);
                    const bool on_tc = K::attention_on_tensor_cores(dt, max_q, hd, tensor_cores);
                    // every device the tests run on has tensor cores (sm_80+, or the sim's)
                    CHECK(on_tc == (tensor_cores && max_q >= 16 && (hd == 64 || hd == 128)));
                    if (tensor_cores && !on_tc) continue;  // the same launch as without
                    INFO("dt " << dt_name(dt) << ", head_dim " << hd << ", heads " << hs.n_head
                               << "/" << hs.n_head_kv << ", batch " << b.name
                               << std::string(on_tc ? ", tensor cores" : ""));
                    std::vector<HostAttnSeq> host;
                    std::vector<DeviceAttnSeq> dev;
                    dev.reserve(b.seqs.size());
                    K::AttnBatch batch;
                    batch.n_seq = int32_t(b.seqs.size());
                    for (size_t s = 0; s < b.seqs.size(); ++s) {
                        // raw scores from every other sequence, of its second half of queries
                        const int32_t scores_from = s % 2 ? b.seqs[s].n_q / 2 : -1;
                        host.push_back(random_attn_seq(rng, dt, b.seqs[s].n_q, b.seqs[s].n_kv,
                                                       hs.n_head, hs.n_head_kv, hd, scores_from));
                        dev.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd);
                        batch.seq[s] = dev.back().view(host.back());
                    }
                    LAUNCH_OK(K::attention(dt, batch, hs.n_head, hs.n_head_kv, hd, nullptr, {},
                                           tensor_cores));
                    for (size_t s = 0; s < host.size(); ++s) {
                        INFO("sequence " << s << " (n_q " << host[s].n_q << ", n_kv " << host[s].n_kv << ")");
                        check_attention(dt, host[s], dev[s],
                                        attention_ref(dt, host[s], hs.n_head, hs.n_head_kv, hd),
                                        hs.n_head);
                    }
                }
}

TEST_CASE("attention: true key counts read on the device (kv_len) under a larger launch bound") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    // Each cache is given room for more keys than it has (the rows beyond hold NaN), the
    // launch that bound and the true counts on the device: the plain run's bits must come out.
    const std::vector<SeqShape> batches[] = {
        {{1, 1}, {1, 300}, {3, 40}, {7, 7}, {2, 129}},  // decode kernel
        {{37, 37}, {20, 133}, {1, 1}, {9, 300}},         // prefill kernel (tensor cores at 128)
    };
    const int32_t extra[] = {1, 31, 32, 100, 5};  // capacity - n_kv: within and past tiles
    struct Heads {
        int32_t n_head, n_head_kv;
    };
    for (int32_t hd : {36, 128})
        for (const Heads& hs : {Heads{8, 2}, Heads{4, 4}})
            for (const std::vector<SeqShape>& shapes : batches)
                for (Dt dt : kDts)
                    for (bool tensor_cores : {false, true}) {
                    if (tensor_cores && hd != 128) continue;  // the same launch as without
                    INFO("dt " << dt_name(dt) << ", head_dim " << hd << ", heads " << hs.n_head
                               << "/" << hs.n_head_kv << ", " << shapes.size() << " sequences"
                               << std::string(tensor_cores ? ", tensor cores where it can" : ""));
                    std::vector<HostAttnSeq> host;
                    std::vector<DeviceAttnSeq> plain, bounded;
                    plain.reserve(shapes.size());
                    bounded.reserve(shapes.size());
                    K::AttnBatch b_plain, b_bounded;
                    b_plain.n_seq = b_bounded.n_seq = int32_t(shapes.size());
                    std::vector<int32_t> lens;
                    for (size_t s = 0; s < shapes.size(); ++s) {
                        const int32_t scores_from = s % 2 ? 0 : shapes[s].n_q - 1;
                        host.push_back(random_attn_seq(rng, dt, shapes[s].n_q, shapes[s].n_kv,
                                                       hs.n_head, hs.n_head_kv, hd, scores_from));
                        const int32_t gap = rng.index(K::kKvPageRows);
                        plain.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd, 0, gap);
                        bounded.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd,
                                             shapes[s].n_kv + extra[s % 5], gap);
                        b_plain.seq[s] = plain.back().view(host.back());
                        b_bounded.seq[s] = bounded.back().view(host.back());
                        lens.push_back(shapes[s].n_kv);
                    }
                    DeviceArray<int32_t> d_lens(lens);
                    b_bounded.kv_len = d_lens.get();
                    LAUNCH_OK(K::attention(dt, b_plain, hs.n_head, hs.n_head_kv, hd, nullptr, {},
                                           tensor_cores));
                    LAUNCH_OK(K::attention(dt, b_bounded, hs.n_head, hs.n_head_kv, hd, nullptr, {},
                                           tensor_cores));
                    for (size_t s = 0; s < host.size(); ++s) {
                        INFO("sequence " << s << " (n_q " << host[s].n_q << ", n_kv " << host[s].n_kv
                                         << ", bound " << bounded[s].cap << ")");
                        check_attention(dt, host[s], bounded[s],
                                        attention_ref(dt, host[s], hs.n_head, hs.n_head_kv, hd),
                                        hs.n_head);
                        CHECK(count_bit_mismatches(bounded[s].out.download(), plain[s].out.download()) == 0);
                        CHECK(count_bit_mismatches(bounded[s].lse.download(), plain[s].lse.download()) == 0);
                        CHECK(count_bit_mismatches(visible_scores(host[s], bounded[s], hs.n_head),
                                                   visible_scores(host[s], plain[s], hs.n_head)) == 0);
                    }
                }
}

TEST_CASE("attention: decode split over blocks (AttnSplit) merges its partial softmaxes") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    // A one-key cache (every split but the first empty), tile tails, a sequence without a
    // query, and caches of 22 tiles (16 and 7 splits leave the last ones empty).
    const std::vector<SeqShape> shapes = {{1, 1}, {1, 300}, {1, 33}, {0, 5}, {1, 700}, {1, 64}};
    const int32_t extra[] = {1, 31, 32, 100, 5, 300};  // capacity - n_kv with kv_len
    struct Heads {
        int32_t n_head, n_head_kv;
    };
    for (int32_t hd : {36, 64, 128})
        for (const Heads& hs : {Heads{8, 2}, Heads{4, 4}})
            for (Dt dt : kDts)
                for (int32_t n_split : {2, 3, 7, 16})
                    for (bool bounded : {false, true}) {
                        INFO("dt " << dt_name(dt) << ", head_dim " << hd << ", heads " << hs.n_head
                                   << "/" << hs.n_head_kv << ", " << n_split << " splits"
                                   << std::string(bounded ? ", kv_len under a larger bound" : ""));
                        std::vector<HostAttnSeq> host;
                        std::vector<DeviceAttnSeq> dev;
                        dev.reserve(shapes.size());
                        K::AttnBatch batch;
                        batch.n_seq = int32_t(shapes.size());
                        std::vector<int32_t> lens;
                        for (size_t s = 0; s < shapes.size(); ++s) {
                            host.push_back(random_attn_seq(rng, dt, shapes[s].n_q, shapes[s].n_kv, hs.n_head,
                                                           hs.n_head_kv, hd, s % 2 ? 0 : -1));
                            dev.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd,
                                             bounded ? shapes[s].n_kv + extra[s] : 0);
                            batch.seq[s] = dev.back().view(host.back());
                            lens.push_back(shapes[s].n_kv);
                        }
                        DeviceArray<int32_t> d_lens(lens);
                        if (bounded) batch.kv_len = d_lens.get();
                        DeviceArray<float> partial(
                            K::attention_split_floats(batch.n_seq, hs.n_head, hd, n_split));
                        partial.poison();
                        LAUNCH_OK(K::attention(dt, batch, hs.n_head, hs.n_head_kv, hd, nullptr,
                                               K::AttnSplit{n_split, partial.get()}));
                        for (size_t s = 0; s < host.size(); ++s) {
                            INFO("sequence " << s << " (n_q " << host[s].n_q << ", n_kv " << host[s].n_kv
                                             << ", bound " << dev[s].cap << ")");
                            check_attention(dt, host[s], dev[s],
                                            attention_ref(dt, host[s], hs.n_head, hs.n_head_kv, hd),
                                            hs.n_head);
                        }
                    }
}

TEST_CASE("attention: a decode block computes a KV head's group of query heads, the per-head blocks' bits") {
    // attention_decode_head_blocks: grouped where 2..8 query heads share a KV head and
    // head_dim is 33..128
    CHECK(K::attention_decode_head_blocks(32, 8, 128) == 8);   // LLaMA-3-8B
    CHECK(K::attention_decode_head_blocks(32, 8, 128, false) == 32);
    CHECK(K::attention_decode_head_blocks(6, 2, 64) == 2);     // the bundled model
    CHECK(K::attention_decode_head_blocks(64, 8, 128) == 8);
    CHECK(K::attention_decode_head_blocks(28, 4, 128) == 4);   // groups of 7
    CHECK(K::attention_decode_head_blocks(32, 32, 128) == 32); // no groups (MHA)
    CHECK(K::attention_decode_head_blocks(36, 4, 128) == 36);  // groups of 9
    CHECK(K::attention_decode_head_blocks(8, 2, 32) == 8);     // head_dim 32
    CHECK(K::attention_decode_head_blocks(8, 2, 256) == 8);    // head_dim 256
    CHECK(K::attention_decode_head_blocks(8, 3, 128) == 8);    // not a grouping at all

    GPU_OR_SKIP();
    SEEDED_RNG();
    struct Heads {
        int32_t n_head, n_head_kv;
    };
    // groups of 2, 3 and 4 (blocks of 4 rows, some unused), 7 and 8 (blocks of 8)
    const Heads heads[] = {{4, 2}, {6, 2}, {8, 2}, {7, 1}, {16, 2}};
    // a plain decode launch may hold up to 7 queries a sequence; a split one at most 1
    const std::vector<SeqShape> plain_shapes = {{1, 1}, {1, 300}, {3, 40}, {0, 9}, {7, 7}, {2, 129}};
    const std::vector<SeqShape> split_shapes = {{1, 1}, {1, 300}, {1, 33}, {0, 5}, {1, 700}};
    const int32_t extra[] = {1, 31, 32, 100, 5, 64};  // capacity - n_kv, under kv_len
    for (int32_t hd : {36, 64, 128})
        for (const Heads& hs : heads)
            for (Dt dt : kDts)
                for (int32_t n_split : {1, 3}) {
                    const bool bounded = n_split > 1;
                    const std::vector<SeqShape>& shapes = n_split > 1 ? split_shapes : plain_shapes;
                    INFO("dt " << dt_name(dt) << ", head_dim " << hd << ", heads " << hs.n_head
                               << "/" << hs.n_head_kv << ", " << n_split << " splits"
                               << std::string(bounded ? ", kv_len under a larger bound" : ""));
                    CHECK(K::attention_decode_head_blocks(hs.n_head, hs.n_head_kv, hd) == hs.n_head_kv);
                    std::vector<HostAttnSeq> host;
                    std::vector<DeviceAttnSeq> grouped, per_head;
                    grouped.reserve(shapes.size());
                    per_head.reserve(shapes.size());
                    K::AttnBatch b_grouped, b_per_head;
                    b_grouped.n_seq = b_per_head.n_seq = int32_t(shapes.size());
                    std::vector<int32_t> lens;
                    for (size_t s = 0; s < shapes.size(); ++s) {
                        // raw scores of every other sequence (the observed decode rows)
                        const int32_t scores_from = s % 2 ? 0 : -1;
                        host.push_back(random_attn_seq(rng, dt, shapes[s].n_q, shapes[s].n_kv,
                                                       hs.n_head, hs.n_head_kv, hd, scores_from));
                        const int32_t cap = bounded ? shapes[s].n_kv + extra[s] : 0;
                        const int32_t gap = rng.index(K::kKvPageRows);
                        grouped.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd, cap, gap);
                        per_head.emplace_back(rng, host.back(), hs.n_head, hs.n_head_kv, hd, cap, gap);
                        b_grouped.seq[s] = grouped.back().view(host.back());
                        b_per_head.seq[s] = per_head.back().view(host.back());
                        lens.push_back(shapes[s].n_kv);
                    }
                    DeviceArray<int32_t> d_lens(lens);
                    if (bounded) b_grouped.kv_len = b_per_head.kv_len = d_lens.get();
                    DeviceArray<float> partial(
                        K::attention_split_floats(int32_t(shapes.size()), hs.n_head, hd, n_split));
                    partial.poison();
                    const K::AttnSplit split{n_split, n_split > 1 ? partial.get() : nullptr};
                    LAUNCH_OK(K::attention(dt, b_grouped, hs.n_head, hs.n_head_kv, hd, nullptr, split,
                                           true, true));
                    partial.poison();
                    LAUNCH_OK(K::attention(dt, b_per_head, hs.n_head, hs.n_head_kv, hd, nullptr, split,
                                           true, false));
                    for (size_t s = 0; s < host.size(); ++s) {
                        INFO("sequence " << s << " (n_q " << host[s].n_q << ", n_kv " << host[s].n_kv << ")");
                        check_attention(dt, host[s], grouped[s],
                                        attention_ref(dt, host[s], hs.n_head, hs.n_head_kv, hd),
                                        hs.n_head);
                        CHECK(count_bit_mismatches(grouped[s].out.download(), per_head[s].out.download()) == 0);
                        CHECK(count_bit_mismatches(grouped[s].lse.download(), per_head[s].lse.download()) == 0);
                        CHECK(count_bit_mismatches(visible_scores(host[s], grouped[s], hs.n_head),
                                                   visible_scores(host[s], per_head[s], hs.n_head)) == 0);
                    }
                }
}

TEST_CASE("attention: the decode split's choice and refusals") {
    // attention_splits: the 7B decode shapes on an H100 (132 SMs)
    CHECK(K::attention_splits(1, 32, 768, 132) == 3);    // >= 256 keys a split
    CHECK(K::attention_splits(1, 32, 512, 132) == 2);
    CHECK(K::attention_splits(1, 32, 4096, 132) == 8);   // about 2 blocks per SM
    CHECK(K::attention_splits(1, 32, 255, 132) == 1);
    CHECK(K::attention_splits(1, 8, 1 << 20, 132) == K::kMaxAttnSplits);
    CHECK(K::attention_splits(4, 32, 4096, 132) == 2);   // 128 blocks: not quite full
    CHECK(K::attention_splits(5, 32, 4096, 132) == 1);   // 160 blocks fill the device
    for (int32_t n_sm : {1, 8, 108, 132})
        for (int32_t n_seq : {1, 2, 3, 7, 64})
            for (int32_t n_head : {1, 8, 32, 40, 64})
                for (int32_t max_kv : {0, 1, 255, 256, 511, 768, 4096, 1 << 20}) {
                    INFO(n_seq << " sequences, " << n_head << " heads, " << max_kv << " keys, "
                                << n_sm << " SMs");
                    const int32_t n = K::attention_splits(n_seq, n_head, max_kv, n_sm);
                    CHECK(n >= 1);
                    CHECK(n <= K::kMaxAttnSplits);
                    if (n > 1) {
                        CHECK(n * 256 <= max_kv);
                        CHECK(n * n_seq * n_head <= 2 * n_sm);
                    }
                    if (n_seq * n_head >= n_sm) CHECK(n == 1);
                }
    CHECK(K::attention_split_floats(2, 32, 128, 3) == size_t(2) * 32 * 3 * 130);
    CHECK(K::attention_split_floats(2, 32, 128, 1) == 0);

    GPU_OR_SKIP();
    SEEDED_RNG();
    const Dt dt = Dt::F16;
    const int32_t n_head = 4, hd = 64;
    const HostAttnSeq one = random_attn_seq(rng, dt, 1, 40, n_head, n_head, hd, -1);
    const HostAttnSeq two = random_attn_seq(rng, dt, 2, 40, n_head, n_head, hd, -1);
    const DeviceAttnSeq d_one(rng, one, n_head, n_head, hd), d_two(rng, two, n_head, n_head, hd);
    DeviceArray<float> partial(K::attention_split_floats(2, n_head, hd, K::kMaxAttnSplits + 1));
    K::AttnBatch decode, mixed;
    decode.n_seq = 1;
    decode.seq[0] = d_one.view(one);
    mixed.n_seq = 2;
    mixed.seq[0] = d_one.view(one);
    mixed.seq[1] = d_two.view(two);
    auto run = [&](const K::AttnBatch& b, int32_t n_split, float* p) {
        return K::attention(dt, b, n_head, n_head, hd, nullptr, K::AttnSplit{n_split, p});
    };
    CHECK(run(mixed, 2, partial.get()) == cudaErrorInvalidValue);  // a sequence with 2 queries
    CHECK(run(decode, 2, nullptr) == cudaErrorInvalidValue);       // no workspace
    CHECK(run(decode, 0, partial.get()) == cudaErrorInvalidValue);
    CHECK(run(decode, K::kMaxAttnSplits + 1, partial.get()) == cudaErrorInvalidValue);
    CHECK(cudaGetLastError() == cudaSuccess);  // refused before any launch
    LAUNCH_OK(run(mixed, 1, nullptr));  // no split: no workspace needed
    LAUNCH_OK(run(decode, K::kMaxAttnSplits, partial.get()));
    check_attention(dt, one, d_one, attention_ref(dt, one, n_head, n_head, hd), n_head);
}

TEST_CASE("attention_rows_mma: observed rows recomputed on the tensor cores, attention_rows' bits") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    struct Config {
        int32_t n_head, n_head_kv, hd;
    };
    // 2 row blocks and 5 key tiles (the first sequence), a short one; GQA 4 and 3, MHA
    const std::vector<SeqShape> shapes = {{150, 300}, {40, 40}};
    const int32_t observed[] = {70, 10};
    for (const Config& cf : {Config{8, 2, 64}, Config{6, 2, 64}, Config{4, 4, 128}})
        for (Dt dt : kDts) {
            INFO("dt " << dt_name(dt) << ", heads " << cf.n_head << "/" << cf.n_head_kv
                       << ", head_dim " << cf.hd);
            REQUIRE(K::attention_rows_mma_supported(dt, cf.hd));
            std::vector<HostAttnSeq> host;
            std::vector<DeviceAttnSeq> dev;
            dev.reserve(shapes.size());
            K::AttnBatch batch;
            batch.n_seq = int32_t(shapes.size());
            K::RowsBatch from_scores;
            K::RowsMmaBatch from_q;
            from_scores.n_seq = from_q.n_seq = batch.n_seq;
            std::vector<DeviceArray<float>> rows_scores, rows_q;
            for (size_t s = 0; s < shapes.size(); ++s) {
                const int32_t n_q = shapes[s].n_q, n_kv = shapes[s].n_kv, n_rows = observed[s];
                host.push_back(random_attn_seq(rng, dt, n_q, n_kv, cf.n_head, cf.n_head_kv, cf.hd,
                                               n_q - n_rows));
                dev.emplace_back(rng, host.back(), cf.n_head, cf.n_head_kv, cf.hd);
                batch.seq[s] = dev.back().view(host.back());
                rows_scores.emplace_back(size_t(n_rows) * n_kv);
                rows_q.emplace_back(size_t(n_rows) * n_kv);
                rows_scores.back().poison();
                rows_q.back().poison();
                const int32_t first_limit = n_kv - n_q + (n_q - n_rows);
                const float* lse = dev.back().lse.get() + size_t(n_q - n_rows) * cf.n_head;
                from_scores.seq[s] = {dev.back().scores.get(), lse, rows_scores.back().get(), n_rows,
                                      n_kv, first_limit, nullptr};
                K::RowsMmaSeq& r = from_q.seq[s];
                r.q = dev.back().q.get() + size_t(n_q - n_rows) * host.back().q_stride;
                r.q_stride = host.back().q_stride;
                r.pages = dev.back().cache.pages();
                r.lse = lse;
                r.rows = rows_q.back().get();
                r.n_rows = n_rows;
                r.n_kv = n_kv;
                r.first_limit = first_limit;
            }
            REQUIRE(K::attention_on_tensor_cores(dt, 150, cf.hd));
            LAUNCH_OK(K::attention(dt, batch, cf.n_head, cf.n_head_kv, cf.hd, nullptr));
            LAUNCH_OK(K::attention_rows(from_scores, cf.n_head, nullptr));
            LAUNCH_OK(K::attention_rows_mma(dt, from_q, cf.n_head, cf.n_head_kv, cf.hd, nullptr));
            for (size_t s = 0; s < shapes.size(); ++s) {
                INFO("sequence " << s);
                const HostAttnSeq& h = host[s];
                const std::vector<float> got = rows_q[s].download();
                CHECK(count_bit_mismatches(got, rows_scores[s].download()) == 0);
                const AttnRef ref = attention_ref(dt, h, cf.n_head, cf.n_head_kv, cf.hd);
                check_close(widen(got), head_mean_rows_ref(ref, h.scores_from, h.n_q, h.n_kv, cf.n_head), 1e-3);
                size_t nonzero_masked = 0;  // exact zeros where the query cannot see the key
                for (int32_t r = 0; r < observed[s]; ++r)
                    for (int32_t j = h.n_kv - h.n_q + h.scores_from + r + 1; j < h.n_kv; ++j)
                        nonzero_masked += got[size_t(r) * h.n_kv + j] != 0.0f;
                CHECK(nonzero_masked == 0);
            }
        }
    K::RowsMmaBatch none;
    CHECK(K::attention_rows_mma(Dt::F16, none, 4, 4, 80, nullptr) == cudaErrorInvalidValue);
    CHECK(!K::attention_rows_mma_supported(Dt::F16, 80));
}

TEST_CASE("attention_rows, attention_col_sums: head-averaged probabilities for KV policies") {
    GPU_OR_SKIP();
    SEEDED_RNG();
    const int32_t n_q = 50, n_kv = 150, rows_from = 40, n_rows = n_q - rows_from;
    struct Config {
        int32_t n_head, n_head_kv, hd;
    };
    const Config configs[] = {{8, 2, 64}, {4, 4, 80}, {8, 2, 36}};
    const double tol = 1e-3;
    for (const Config& cf : configs)
        for (Dt dt : kDts) {
            INFO("dt " << dt_name(dt) << ", heads " << cf.n_head << "/" << cf.n_head_kv
                       << ", head_dim " << cf.hd);
            // attention() first: the observations are computed from its lse and scores
            const HostAttnSeq host =
                random_attn_seq(rng, dt, n_q, n_kv, cf.n_head, cf.n_head_kv, cf.hd, rows_from);
            const DeviceAttnSeq dev(rng, host, cf.n_head, cf.n_head_kv, cf.hd);
            K::AttnBatch batch;
            batch.n_seq = 1;
            batch.seq[0] = dev.view(host);
            LAUNCH_OK(K::attention(dt, batch, cf.n_head, cf.n_head_kv, cf.hd, nullptr));
            const AttnRef ref = attention_ref(dt, host, cf.n_head, cf.n_head_kv, cf.hd);
            check_attention(dt, host, dev, ref, cf.n_head);

            const std::vector<double> rows_ref = head_mean_rows_ref(ref, rows_from, n_q, n_kv, cf.n_head);
            const std::vector<double> cols_ref = col_sums_ref(ref, n_q, n_kv, cf.n_head);

            {  // rows of the last queries, from the scores and their lse
                DeviceArray<float> d_rows(size_t(n_rows) * n_kv);
                d_rows.poison();
                const int32_t first_limit = n_kv - n_q + rows_from;
                K::RowsBatch rb;
                rb.n_seq = 1;
                rb.seq[0] = {dev.scores.get(), dev.lse.get() + size_t(rows_from) * cf.n_head,
                             d_rows.get(), n_rows, n_kv, first_limit, nullptr};
                LAUNCH_OK(K::attention_rows(rb, cf.n_head, nullptr));
                const std::vector<float> rows = d_rows.download();
                check_close(widen(rows), rows_ref, tol);
                // exact zeros where a query cannot see the key (the softmax is causal)
                size_t nonzero_masked = 0;
                for (int32_t r = 0; r < n_rows; ++r)
                    for (int32_t j = first_limit + r + 1; j < n_kv; ++j)
                        nonzero_masked += rows[size_t(r) * n_kv + j] != 0.0f;
                CHECK(nonzero_masked == 0);

                // the same with the true key count on the device, n_kv a larger bound (the
                // stride of scores and rows): the plain rows' bits, zeros past the true count;
                // in one launch with the plain sequence again (a batch of unequal shapes)
                const int32_t cap = n_kv + 45;
                const DeviceAttnSeq bounded(rng, host, cf.n_head, cf.n_head_kv, cf.hd, cap, dev.cache.gap());
                DeviceArray<int32_t> d_len(std::vector<int32_t>{n_kv});
                K::AttnBatch bb;
                bb.n_seq = 1;
                bb.seq[0] = bounded.view(host);
                bb.kv_len = d_len.get();
                LAUNCH_OK(K::attention(dt, bb, cf.n_head, cf.n_head_kv, cf.hd, nullptr));
                DeviceArray<float> d_rows_b(size_t(n_rows) * cap), d_rows_again(d_rows.size());
                d_rows_b.poison();
                d_rows_again.poison();
                K::RowsBatch both;
                both.n_seq = 2;
                both.seq[0] = {bounded.scores.get(), bounded.lse.get() + size_t(rows_from) * cf.n_head,
                               d_rows_b.get(), n_rows, cap, cap - n_q + rows_from, d_len.get()};
                both.seq[1] = rb.seq[0];
                both.seq[1].rows = d_rows_again.get();
                LAUNCH_OK(K::attention_rows(both, cf.n_head, nullptr));
                CHECK(count_bit_mismatches(d_rows_again.download(), rows) == 0);
                const std::vector<float> rows_b = d_rows_b.download();
                std::vector<float> head, tail;
                for (int32_t r = 0; r < n_rows; ++r)
                    for (int32_t j = 0; j < cap; ++j)
                        (j < n_kv ? head : tail).push_back(rows_b[size_t(r) * cap + j]);
                CHECK(count_bit_mismatches(head, rows) == 0);
                CHECK(tail == std::vector<float>(tail.size(), 0.0f));
            }
            // column sums over all queries, zeroed beforehand: on the CUDA cores, and on the
            // tensor cores where they can (head_dim 64 here)
            DeviceArray<float> d_part(std::max<size_t>(K::attention_col_sums_partial_floats(n_q, n_kv), 1));
            for (bool tensor_cores : {false, true}) {
                INFO(std::string(tensor_cores ? "tensor cores where they can" : "CUDA cores"));
                DeviceArray<float> d_cols(static_cast<size_t>(n_kv));
                d_cols.zero();
                d_part.poison();
                LAUNCH_OK(K::attention_col_sums(dt, batch.seq[0], cf.n_head, cf.n_head_kv, cf.hd,
                                                d_cols.get(), d_part.get(), nullptr, tensor_cores));
                check_close(widen(d_cols.download()), cols_ref, tol);

                // they add to what is there (the sums of earlier steps)
                const std::vector<float> before = rng.floats(size_t(n_kv), 0.0f, 3.0f);
                d_cols.upload(before);
                LAUNCH_OK(K::attention_col_sums(dt, batch.seq[0], cf.n_head, cf.n_head_kv, cf.hd,
                                                d_cols.get(), d_part.get(), nullptr, tensor_cores));
                std::vector<double> expect(cols_ref);
                for (int32_t j = 0; j < n_kv; ++j) expect[j] += before[j];
                check_close(widen(d_cols.download()), expect, tol);
            }
            {  // a sequence of few queries in one attention launch with a longer one: its
               // sums are made on the launch's cores (launch_max_q), from its own lse
                const int32_t few = 5;
                const HostAttnSeq h_few = random_attn_seq(rng, dt, few, n_kv, cf.n_head, cf.n_head_kv, cf.hd, few);
                const DeviceAttnSeq d_few(rng, h_few, cf.n_head, cf.n_head_kv, cf.hd);
                K::AttnBatch two;
                two.n_seq = 2;
                two.seq[0] = d_few.view(h_few);
                two.seq[1] = dev.view(host);
                LAUNCH_OK(K::attention(dt, two, cf.n_head, cf.n_head_kv, cf.hd, nullptr));
                const std::vector<double> cols_few =
                    col_sums_ref(attention_ref(dt, h_few, cf.n_head, cf.n_head_kv, cf.hd), few, n_kv, cf.n_head);
                INFO("5 queries, launch of " << n_q << " (tensor cores where they can)");
                DeviceArray<float> d_cols(static_cast<size_t>(n_kv));
                d_cols.zero();
                d_part.poison();
                LAUNCH_OK(K::attention_col_sums(dt, two.seq[0], cf.n_head, cf.n_head_kv, cf.hd,
                                                d_cols.get(), d_part.get(), nullptr, true, n_q));
                check_close(widen(d_cols.download()), cols_few, tol);
            }
            {  // more queries than a block of kColSumQueries (blocks of 64, 64 and 22): the
               // blocks' sums are added in order, so a second run gives the same bits
                const int32_t long_q = 2 * K::kColSumQueries + 22, long_kv = long_q + 20;
                const HostAttnSeq h_long =
                    random_attn_seq(rng, dt, long_q, long_kv, cf.n_head, cf.n_head_kv, cf.hd, long_q);
                const DeviceAttnSeq d_long(rng, h_long, cf.n_head, cf.n_head_kv, cf.hd);
                K::AttnBatch one;
                one.n_seq = 1;
                one.seq[0] = d_long.view(h_long);
                LAUNCH_OK(K::attention(dt, one, cf.n_head, cf.n_head_kv, cf.hd, nullptr));
                const std::vector<double> cols_long = col_sums_ref(
                    attention_ref(dt, h_long, cf.n_head, cf.n_head_kv, cf.hd), long_q, long_kv, cf.n_head);
                DeviceArray<float> part(K::attention_col_sums_partial_floats(long_q, long_kv));
                REQUIRE(part.size() == 3 * size_t(long_kv));
                for (bool tensor_cores : {false, true}) {
                    INFO(long_q << " queries, " << std::string(tensor_cores ? "tensor cores where they can" : "CUDA cores"));
                    DeviceArray<float> d_cols(static_cast<size_t>(long_kv));
                    std::vector<float> first;
                    for (int run = 0; run < 2; ++run) {
                        d_cols.zero();
                        part.poison();
                        LAUNCH_OK(K::attention_col_sums(dt, one.seq[0], cf.n_head, cf.n_head_kv, cf.hd,
                                                        d_cols.get(), part.get(), nullptr, tensor_cores));
                        if (run == 0) first = d_cols.download();
                    }
                    check_close(widen(first), cols_long, tol);
                    CHECK(count_bit_mismatches(d_cols.download(), first) == 0);
                }
            }
        }
}
