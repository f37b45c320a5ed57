// Attention over the KV cache, prefill and decode, for a batch of ragged sequences in one
// launch, and the observation scores of the KV policies. CPU reference: cpu::attention.
//
// attention(): a block owns up to QT queries of one head; its warps split the visible
// keys in tiles of 32 (lane = key for the scores, lane = head dims for P.V) and keep an
// online softmax each (running max m, sum l, output acc), merged in shared memory at the
// end. Scores are in log2 units (q pre-scaled by log2(e)/sqrt(head_dim)). The merged
// log2-sum-exp2 per (query, head) is stored, and the raw scores of the few observed queries
// when asked, so that attention_rows() gives exact probabilities for the KV policies without
// the n_q x n_kv matrix of the whole prefill ever existing.
//
// Decode split (AttnSplit, one query per sequence): a (sequence, head) has too few blocks to
// fill the device at small batches, and each walks the whole cache. Its keys are then split
// over n_split blocks, whole 32-key tiles each; a block writes its merged partial softmax
// state (m, l, unnormalised acc) to a workspace, and split_merge_kernel merges the splits
// with the same function (merge_states) the block used for its warps.
#include <algorithm>
#include <cmath>

#include "common.cuh"

namespace pyr::kernels {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

float query_scale(int32_t head_dim) { return kLog2e / std::sqrt(float(head_dim)); }

// Dot product of a cached key row (head_dim elements of T) with a pre-scaled query row; the
// loads of a row are issued together (unrolled) so that one latency covers them.
template <typename T>
__device__ __forceinline__ float dot_key(const T* k, const float* q, int32_t hd) {
    float s = 0.0f;
    if ((hd & 7) == 0) {
#pragma unroll 4
        for (int32_t d = 0; d < hd; d += 8) {
            float kf[8];
            load8(k + d, kf);
#pragma unroll
            for (int e = 0; e < 8; ++e) s += kf[e] * q[d + e];
        }
    } else {
        for (int32_t d = 0; d < hd; ++d) s += to_f32(k[d]) * q[d];
    }
    return s;
}

// The DPL head dims [lane*DPL, lane*DPL + DPL) of a value row; one vector load when the
// head is exactly 32*DPL wide.
template <typename T, int DPL>
__device__ __forceinline__ void load_lane_dims(const T* row, int lane, int32_t hd, float out[DPL]) {
    const int32_t d0 = lane * DPL;
    if (hd == 32 * DPL) {
        T e[DPL];
        if constexpr (DPL == 8) *reinterpret_cast<uint4*>(e) = *reinterpret_cast<const uint4*>(row + d0);
        else if constexpr (DPL == 4) *reinterpret_cast<uint2*>(e) = *reinterpret_cast<const uint2*>(row + d0);
        else if constexpr (DPL == 2) *reinterpret_cast<uint32_t*>(e) = *reinterpret_cast<const uint32_t*>(row + d0);
        else e[0] = row[d0];
#pragma unroll
        for (int i = 0; i < DPL; ++i) out[i] = to_f32(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < DPL; ++i) out[i] = d0 + i < hd ? to_f32(row[d0 + i]) : 0.0f;
    }
}

// Scores of one key (this lane's) against the block's QT queries.
template <typename T, int QT, int DPL>
__device__ __forceinline__ void key_scores(const T* kr, const float* q_s, int32_t hd, float s[QT]) {
    if (hd == 32 * DPL && (hd & 7) == 0) {  // the common case: fully unrolled, 8 loads at once
        constexpr int HD = 32 * DPL, kChunks = HD / 8, kGroup = kChunks < 8 ? kChunks : 8;
#pragma unroll
        for (int c0 = 0; c0 < kChunks; c0 += kGroup) {
            float kf[kGroup][8];
#pragma unroll
            for (int u = 0; u < kGroup; ++u) load8(kr + (c0 + u) * 8, kf[u]);
#pragma unroll
            for (int u = 0; u < kGroup; ++u)
#pragma unroll
                for (int qi = 0; qi < QT; ++qi)
#pragma unroll
                    for (int e = 0; e < 8; ++e) s[qi] += kf[u][e] * q_s[qi * HD + (c0 + u) * 8 + e];
        }
    } else {
#pragma unroll
        for (int qi = 0; qi < QT; ++qi) s[qi] = dot_key(kr, q_s + qi * hd, hd);
    }
}

// Online-softmax states of n passes over disjoint keys (max m_i, sum l_i = sum 2^(s - m_i),
// unnormalised output acc_i at one head dim), merged: M = max m_i, L = sum l_i 2^(m_i - M),
// O = sum acc_i 2^(m_i - M). A pass that saw no key (m_i = -inf, l_i = acc_i = 0) drops
// out; if none saw any, the merge is such an empty state too (no -inf - -inf).
struct SoftmaxState {
    float m, l, o;
};
__device__ __forceinline__ SoftmaxState merge_states(const float* m, const float* l,
                                                     int32_t ml_stride, const float* acc,
                                                     int32_t acc_stride, int n) {
    SoftmaxState r{-INFINITY, 0.0f, 0.0f};
    for (int i = 0; i < n; ++i) r.m = fmaxf(r.m, m[i * ml_stride]);
    if (r.m == -INFINITY) return r;
    for (int i = 0; i < n; ++i) {
        const float f = exp2f(m[i * ml_stride] - r.m);
        r.l += l[i * ml_stride] * f;
        r.o += acc[int64_t(i) * acc_stride] * f;
    }
    return r;
}

// A finished (query, head, dim): out = O / L and, once per (query, head), lse = M + log2 L.
template <typename T>
__device__ __forceinline__ void store_output(const AttnSeq& sq, int32_t q, int h, int32_t n_head,
                                             int32_t hd, int32_t d, const SoftmaxState& st) {
    static_cast<T*>(sq.out)[int64_t(q) * n_head * hd + h * hd + d] = from_f32<T>(st.o / st.l);
    if (d == 0 && sq.lse) sq.lse[int64_t(q) * n_head + h] = st.m + log2f(st.l);
}

// The split workspace of (sequence s, head h): m (n_split), l (n_split), acc (n_split, hd).
template <typename F>
__device__ __forceinline__ F* split_state(F* partial, int32_t s, int h, int32_t n_head, int32_t hd,
                                          int32_t n_split) {
    return partial + (int64_t(s) * n_head + h) * n_split * (hd + 2);
}

// The true key count of the block's sequence: the device's (graph replays) or the host's;
// its n_kv is then only the launch's bound and the scores' row stride (clamped: never read
// past the cache).
__device__ __forceinline__ int32_t true_kv_len(const AttnBatch& batch) {
    const AttnSeq& sq = batch.seq[blockIdx.z];
    return batch.kv_len ? min(max(batch.kv_len[blockIdx.z], sq.n_q), sq.n_kv) : sq.n_kv;
}

// A block's rows: QT queries of head blockIdx.y, or, with GROUP (decode, grouped-query
// attention), the group's query heads of KV head blockIdx.y for one query, which then share
// each key and value the block loads (the cache is read once, not once per query head).
// Every row's math is the same either way, in the same order: the same bits come out.
// SPLIT (decode only, QT == 1 or GROUP): blockIdx.x is the split of the keys, the query the
// sequence's only one. Template parameters: the other kernels stay as they were.
template <typename T, int QT, int DPL, int WARPS, bool SPLIT, bool GROUP>
__global__ void __launch_bounds__(WARPS * 32)
attention_kernel(AttnBatch batch, int32_t n_head, int32_t n_head_kv, int32_t hd, float qscale,
                 int32_t n_split, float* partial) {
    static_assert(!SPLIT || QT == 1 || GROUP, "the decode split has one query per sequence");
    let_next_grid_start();  // o_proj (or the split's merge) follows
    const AttnSeq& sq = batch.seq[blockIdx.z];
    const int32_t group = n_head / n_head_kv;
    const int32_t q0 = SPLIT ? 0 : int32_t(blockIdx.x) * (GROUP ? 1 : QT);
    if (q0 >= sq.n_q) return;
    const int32_t nq = GROUP ? 1 : min(QT, sq.n_q - q0);  // the block's queries
    const int32_t n_rows = GROUP ? group : nq;             // GROUP: group <= QT
    const int kvh = GROUP ? int(blockIdx.y) : int(blockIdx.y) / group;
    // row r is query row_query(r) at head row_head(r)
    auto row_query = [&](int r) { return GROUP ? q0 : q0 + r; };
    auto row_head = [&](int r) { return GROUP ? kvh * group + r : int(blockIdx.y); };
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t kv_dim = int64_t(n_head_kv) * hd;
    const int32_t n_kv = true_kv_len(batch);

    extern __shared__ float smem[];
    float* q_s = smem;  // (QT, hd) pre-scaled queries
    for (int32_t i = threadIdx.x; i < QT * hd; i += blockDim.x) {
        const int32_t r = i / hd, d = i % hd;
        q_s[i] = r < n_rows ? sq.q[int64_t(row_query(r)) * sq.q_stride + row_head(r) * hd + d] * qscale
                            : 0.0f;
    }
    __syncthreads();

    const int32_t first_limit = n_kv - sq.n_q + q0;     // last key query q0 sees
    const int32_t kend = first_limit + nq;              // keys [0, kend) matter to the block
    // Tiles of 32 keys start at cache slots that are multiples of 32 (kernels.h: gap), so
    // that each lies in one page: the first one from key -phase on. The block walks the
    // tiles from tile0 up to key kstop: all of them, or its split's (none for a split past
    // the end); their keys before 0 and from kstop on are skipped.
    const int32_t gap = kv_gap(sq.pages), phase = gap % 32;
    int32_t tile0 = -phase, kstop = kend;
    if constexpr (SPLIT) {
        const int32_t per = ((kend + phase + 31) / 32 + n_split - 1) / n_split * 32;
        tile0 = int32_t(blockIdx.x) * per - phase;
        kstop = min(tile0 + per, kend);
    }

    float m[QT], l[QT], acc[QT][DPL];
#pragma unroll
    for (int qi = 0; qi < QT; ++qi) {
        m[qi] = -INFINITY;
        l[qi] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[qi][i] = 0.0f;
    }

    for (int32_t base = tile0 + warp * 32; base < kstop; base += WARPS * 32) {
        const int32_t j = base + lane;
        const bool walked = j >= 0 && j < kstop;
        // the tile's 32 rows are consecutive slots of one page
        const T* K = kv_slot<const T>(sq.pages, gap + base, kv_dim, false) + kvh * hd;
        const T* V = kv_slot<const T>(sq.pages, gap + base, kv_dim, true) + kvh * hd;
        float s[QT];
#pragma unroll
        for (int qi = 0; qi < QT; ++qi) s[qi] = 0.0f;
        if (walked) key_scores<T, QT, DPL>(K + lane * kv_dim, q_s, hd, s);
        float p[QT];
#pragma unroll
        for (int qi = 0; qi < QT; ++qi) {
            if (qi >= n_rows || !walked || j > first_limit + row_query(qi) - q0) s[qi] = -INFINITY;
            // the raw scores of the observed queries, for attention_rows()
            if (sq.scores && walked && qi < n_rows && row_query(qi) >= sq.scores_from)
                sq.scores[(int64_t(row_query(qi) - sq.scores_from) * n_head + row_head(qi)) * sq.n_kv + j] =
                    s[qi];
            const float m_new = fmaxf(m[qi], warp_max(s[qi]));
            p[qi] = 0.0f;
            if (m_new == -INFINITY) continue;  // uniform: nothing visible yet
            const float corr = exp2f(m[qi] - m_new);
            p[qi] = exp2f(s[qi] - m_new);
            l[qi] = l[qi] * corr + warp_sum(p[qi]);
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[qi][i] *= corr;
            m[qi] = m_new;
        }
        const int32_t first_key = max(-base, 0), n_keys = min(32, kstop - base);
        if (first_key == 0 && n_keys == 32) {  // a full tile: 8 value rows in flight at a time
#pragma unroll
            for (int j0 = 0; j0 < 32; j0 += 8) {
                float vf[8][DPL];
#pragma unroll
                for (int u = 0; u < 8; ++u)
                    load_lane_dims<T, DPL>(V + (j0 + u) * kv_dim, lane, hd, vf[u]);
#pragma unroll
                for (int u = 0; u < 8; ++u)
#pragma unroll
                    for (int qi = 0; qi < QT; ++qi) {
                        const float pj = __shfl_sync(0xffffffffu, p[qi], j0 + u);
#pragma unroll
                        for (int i = 0; i < DPL; ++i) acc[qi][i] += pj * vf[u][i];
                    }
            }
        } else {
            for (int32_t jj = first_key; jj < n_keys; ++jj) {  // a value row outside is garbage
                float vf[DPL];
                load_lane_dims<T, DPL>(V + jj * kv_dim, lane, hd, vf);
#pragma unroll
                for (int qi = 0; qi < QT; ++qi) {
                    const float pj = __shfl_sync(0xffffffffu, p[qi], jj);
#pragma unroll
                    for (int i = 0; i < DPL; ++i) acc[qi][i] += pj * vf[i];
                }
            }
        }
    }

    // merge the warps' partial softmaxes
    float* cm = q_s + QT * hd;     // (WARPS, QT) running max
    float* cl = cm + WARPS * QT;   // (WARPS, QT) running sum
    float* ca = cl + WARPS * QT;   // (WARPS, QT, hd) unnormalised outputs
    if (lane == 0)
#pragma unroll
        for (int qi = 0; qi < QT; ++qi) {
            cm[warp * QT + qi] = m[qi];
            cl[warp * QT + qi] = l[qi];
        }
#pragma unroll
    for (int qi = 0; qi < QT; ++qi)
#pragma unroll
        for (int i = 0; i < DPL; ++i)
            if (lane * DPL + i < hd) ca[(warp * QT + qi) * hd + lane * DPL + i] = acc[qi][i];
    __syncthreads();
    for (int32_t i = threadIdx.x; i < n_rows * hd; i += blockDim.x) {
        const int32_t qi = i / hd, d = i % hd;
        const SoftmaxState st = merge_states(cm + qi, cl + qi, QT, ca + qi * hd + d, QT * hd, WARPS);
        if constexpr (SPLIT) {  // the split's state, for split_merge_kernel
            float* ps = split_state(partial, blockIdx.z, row_head(qi), n_head, hd, n_split);
            if (d == 0) {
                ps[blockIdx.x] = st.m;
                ps[n_split + blockIdx.x] = st.l;
            }
            ps[2 * n_split + int64_t(blockIdx.x) * hd + d] = st.o;
        } else {
            store_output<T>(sq, row_query(qi), row_head(qi), n_head, hd, d, st);
        }
    }
}

// The splits of each (sequence, head) of a split decode merged: a block per (head,
// sequence), a thread per head dim.
template <typename T>
__global__ void split_merge_kernel(AttnBatch batch, int32_t n_head, int32_t hd, int32_t n_split,
                                   const float* partial) {
    let_next_grid_start();  // o_proj follows
    const AttnSeq& sq = batch.seq[blockIdx.y];
    if (sq.n_q == 0) return;  // 0 or 1 query here
    const int h = blockIdx.x;
    const float* ps = split_state(partial, blockIdx.y, h, n_head, hd, n_split);
    for (int32_t d = threadIdx.x; d < hd; d += blockDim.x)
        store_output<T>(sq, 0, h, n_head, hd, d,
                        merge_states(ps, ps + n_split, 1, ps + 2 * n_split + d, hd, n_split));
}

// ---- prefill on tensor cores (sm_80+) -------------------------------------------------
// attention_mma_kernel: a block owns 64 queries of one head, a warp 16 of them; the block
// stages 64 keys and values at a time in shared memory, and each warp computes its 16 x 64
// scores with mma_m16n8k16 (common.cuh), keeps the online softmax of its rows in registers
// and adds P V with mma_m16n8k16 again: the scores' accumulator layout (two 8-key tiles) is
// the layout of P as the A operand of a 16-key step, so P never leaves the registers.
// The query is fp32 and the tensor cores take 16-bit operands: it goes in as two terms of T,
// hi = T(q) and lo = T(q - hi), whose sum is within 2^-17 of q (bf16; 2^-22 for fp16), so
// that scores, lse and the observed raw scores stay as exact as the CUDA-core kernel's, on
// which the KV policies' choices depend. P is rounded to T for P V (as the output will be).
constexpr int kMmaQueries = 64;  // a block's queries: 4 warps of 16 rows
constexpr int kMmaKeys = 64;     // keys a tile (kKvPageRows at most: two pages, kernels.h)
constexpr int kMmaMinQueries = 16;  // attention() takes this kernel from here on

template <int HD>
constexpr int kMmaRowStride = HD + 8;  // elements; +16 bytes: conflict-free fragment loads

// A tile of keys, and of values too where the kernel stages them.
template <typename T, int HD>
constexpr size_t mma_smem_bytes(bool with_values) {
    return (with_values ? 2 : 1) * size_t(kMmaKeys) * kMmaRowStride<HD> * sizeof(T);
}

// Runs `body` with the constant HD bound to head_dim: 64, or else 128, the sizes the
// tensor-core kernels are built for (attention_rows_mma_supported).
#define PYR_DISPATCH_MMA_HD(head_dim, body) \
    do {                                    \
        if ((head_dim) == 64) {             \
            constexpr int HD = 64;          \
            body;                           \
        } else {                            \
            constexpr int HD = 128;         \
            body;                           \
        }                                   \
    } while (0)

// Rows base, base + 1, ... (at most kKvPageRows of them) of a paged KV cache, keys or values:
// row base + r is row(r). The tensor-core kernels' tiles start at key multiples of kMmaKeys,
// so behind a gap (kernels.h) one spans two pages, consecutive rows within each.
template <typename T>
struct KvTile {
    T* lo;
    T* hi;          // the second page's first row (lo when the tile has one page)
    int32_t split;  // rows before it are in lo's page
    int64_t row_elems;
    __device__ __forceinline__ T* row(int32_t r) const {
        return r < split ? lo + r * row_elems : hi + (r - split) * row_elems;
    }
};
// The tile of rows from base; rows from `end` on are not read (their page may be absent).
template <typename T>
__device__ __forceinline__ KvTile<T> kv_tile(KvPages table, int32_t base, int32_t end,
                                             int64_t row_elems, bool value) {
    const int32_t s = kv_gap(table) + base, split = kKvPageRows - s % kKvPageRows;
    T* lo = kv_slot<T>(table, s, row_elems, value);
    T* hi = base + split < end ? kv_slot<T>(table, s + split, row_elems, value) : lo;
    return {lo, hi, split, row_elems};
}

// Keys (or values) [base, base + kMmaKeys) of KV head kvh into dst (kMmaKeys, LD); rows
// from `end' on are zeros (a value row of NaN weighted by 0 would still poison P V).
template <typename T, int HD>
__device__ __forceinline__ void stage_tile(KvPages pages, int32_t base, int32_t end, int kvh,
                                           int64_t kv_dim, bool value, T* dst) {
    static_assert(kMmaKeys <= kKvPageRows, "a tile must span at most two pages");
    constexpr int LD = kMmaRowStride<HD>, kVecs = HD / 8;  // 16-byte vectors a row
    const KvTile<const T> tile = kv_tile<const T>(pages, base, end, kv_dim, value);
    for (int i = threadIdx.x; i < kMmaKeys * kVecs; i += blockDim.x) {
        const int r = i / kVecs, c = (i % kVecs) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (base + r < end) v = *reinterpret_cast<const uint4*>(tile.row(r) + kvh * HD + c);
        *reinterpret_cast<uint4*>(dst + r * LD + c) = v;
    }
}

// A warp's 16 query rows (row i at q + i * q_stride, head_dim HD, fp32; rows from n_rows
// on are zeros) as A fragments of T: qa[0] = T(q), qa[1] = T(q - qa[0]) (see above).
template <typename T, int HD>
__device__ __forceinline__ void query_fragments(const float* q, int64_t q_stride, int32_t n_rows,
                                                uint32_t (&qa)[2][HD / 16][4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int32_t row = a_row(lane, j);
            float x[2] = {0.0f, 0.0f};
            if (row < n_rows) {
                const float* e = q + row * q_stride + kk * 16 + a_col(lane, j);
                x[0] = e[0];
                x[1] = e[1];
            }
            const T hi0 = from_f32<T>(x[0]), hi1 = from_f32<T>(x[1]);
            qa[0][kk][j] = pack2(hi0, hi1);
            qa[1][kk][j] = pack2(from_f32<T>(x[0] - to_f32(hi0)), from_f32<T>(x[1] - to_f32(hi1)));
        }
}

// s = q k (unscaled) of a warp's 16 rows and the kMmaKeys staged keys Ks (kMmaKeys, LD):
// s[n][i] is key 8 n + c_col(lane, i) of row c_row(lane, i). The lo term goes first.
template <typename T, int HD>
__device__ __forceinline__ void tile_scores(const uint32_t (&qa)[2][HD / 16][4], const T* Ks,
                                            float (&s)[kMmaKeys / 8][4]) {
    constexpr int LD = kMmaRowStride<HD>;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int n = 0; n < kMmaKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
        for (int n = 0; n < kMmaKeys / 8; ++n) {
            const T* k = Ks + (n * 8 + b_n(lane)) * LD + kk * 16;  // B[d][j] = K[j][d]
            const uint32_t b[2] = {*reinterpret_cast<const uint32_t*>(k + b_k(lane, 0)),
                                   *reinterpret_cast<const uint32_t*>(k + b_k(lane, 1))};
            mma_m16n8k16<T>(s[n], qa[1][kk], b);
            mma_m16n8k16<T>(s[n], qa[0][kk], b);
        }
}

template <typename T, int HD>
__global__ void __launch_bounds__(128)
attention_mma_kernel(AttnBatch batch, int32_t n_head, int32_t n_head_kv, float qscale) {
    static_assert(HD % 16 == 0, "16-dim steps");
    constexpr int LD = kMmaRowStride<HD>, kSteps = HD / 16, kDimTiles = HD / 8,
                  kKeyTiles = kMmaKeys / 8;
    let_next_grid_start();  // o_proj follows
    const AttnSeq& sq = batch.seq[blockIdx.z];
    const int32_t q0 = int32_t(blockIdx.x) * kMmaQueries;
    if (q0 >= sq.n_q) return;
    const int32_t nq = min(kMmaQueries, sq.n_q - q0);
    const int h = blockIdx.y, kvh = h / (n_head / n_head_kv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t kv_dim = int64_t(n_head_kv) * HD;
    const int32_t n_kv = true_kv_len(batch);
    const int32_t first_limit = n_kv - sq.n_q + q0;  // last key query q0 sees
    const int32_t kend = first_limit + nq;           // keys [0, kend) matter to the block
    // this warp's rows: block rows w0 .. w0 + 15, the keys [0, w_end) matter to them; this
    // lane's accumulators hold two of them, r = 0, 1 (elements 2r, 2r + 1: c_row(lane, 2r))
    const int32_t w0 = warp * 16, w_nq = max(0, min(16, nq - w0));
    const int32_t w_end = w_nq > 0 ? first_limit + w0 + w_nq : 0;
    bool valid[2];
    int32_t last[2];   // the last key each row sees
    float* observed[2];  // the row's raw scores, when asked for
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int32_t row = w0 + c_row(lane, 2 * r);
        valid[r] = row < nq;
        last[r] = first_limit + row;
        observed[r] = sq.scores && valid[r] && q0 + row >= sq.scores_from
                          ? sq.scores + (int64_t(q0 + row - sq.scores_from) * n_head + h) * sq.n_kv
                          : nullptr;
    }

    // the query rows as A fragments, hi and lo terms (zero rows past the block's queries)
    uint32_t qa[2][kSteps][4];
    query_fragments<T, HD>(sq.q + int64_t(q0 + w0) * sq.q_stride + h * HD, sq.q_stride, w_nq, qa);

    extern __shared__ float smem[];
    T* Ks = reinterpret_cast<T*>(smem);  // (kMmaKeys, LD)
    T* Vs = Ks + kMmaKeys * LD;          // (kMmaKeys, LD)

    float o[kDimTiles][4];  // output accumulators: dims 8 n + c_col(lane, i)
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // the rows' running max, sum

    for (int32_t base = 0; base < kend; base += kMmaKeys) {
        __syncthreads();  // every warp is done with the tile before
        stage_tile<T, HD>(sq.pages, base, kend, kvh, kv_dim, false, Ks);
        stage_tile<T, HD>(sq.pages, base, kend, kvh, kv_dim, true, Vs);
        __syncthreads();
        if (base >= w_end) continue;  // past this warp's causal horizon (warp-uniform)

        // s = q k over the tile: keys base + 8 n + c_col(lane, i)
        float s[kKeyTiles][4];
        tile_scores<T, HD>(qa, Ks, s);

        // online softmax of each row; a row's 64 keys lie with 4 lanes (lane ^ 1, lane ^ 2)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int32_t j = base + n * 8 + c_col(lane, 2 * r + c);
                    float v = s[n][2 * r + c] * qscale;
                    if (!valid[r] || j > last[r]) v = -INFINITY;
                    else if (observed[r]) observed[r][j] = v;
                    s[n][2 * r + c] = v;
                    mx = fmaxf(mx, v);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[r], mx);
            const float ref = m_new == -INFINITY ? 0.0f : m_new;  // no -inf - -inf
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float p = exp2f(s[n][2 * r + c] - ref);
                    s[n][2 * r + c] = p;
                    sum += p;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float corr = exp2f(m[r] - ref);
            l[r] = l[r] * corr + sum;
            m[r] = m_new;
#pragma unroll
            for (int n = 0; n < kDimTiles; ++n) {
                o[n][2 * r] *= corr;
                o[n][2 * r + 1] *= corr;
            }
        }

        // o += P V, 16 keys a step: key tiles 2 ks and 2 ks + 1 are P's A fragment
#pragma unroll
        for (int ks = 0; ks < kKeyTiles / 2; ++ks) {
            uint32_t pa[4];
            a_from_accumulators<T>(s[2 * ks], s[2 * ks + 1], pa);
#pragma unroll
            for (int n = 0; n < kDimTiles; ++n) {
                const T* v = Vs + ks * 16 * LD + n * 8 + b_n(lane);  // B[j][d] = V[j][d]
                const T* v0 = v + b_k(lane, 0) * LD;
                const T* v1 = v + b_k(lane, 1) * LD;
                const uint32_t b[2] = {pack2(v0[0], v0[LD]), pack2(v1[0], v1[LD])};
                mma_m16n8k16<T>(o[n], pa, b);
            }
        }
    }

    // out = o / l, lse = m + log2 l
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (!valid[r]) continue;
        const int32_t q = q0 + w0 + c_row(lane, 2 * r);
        T* out = static_cast<T*>(sq.out) + int64_t(q) * n_head * HD + h * HD + c_col(lane, 2 * r);
#pragma unroll
        for (int n = 0; n < kDimTiles; ++n)
            *reinterpret_cast<uint32_t*>(out + n * 8) =
                pack2(from_f32<T>(o[n][2 * r] / l[r]), from_f32<T>(o[n][2 * r + 1] / l[r]));
        if (c_col(lane, 0) == 0 && sq.lse) sq.lse[int64_t(q) * n_head + h] = m[r] + log2f(l[r]);
    }
}

// The probabilities exp2(q k * qscale - lse) of a block's rows (up to kMmaQueries: row i's
// query at q + i * q_stride, its lse at lse + i * n_head, it sees keys <= first_last + i)
// and the keys [base, base + kMmaKeys), summed over every head in order into this warp's
// acc (the accumulator layout: row c_row(lane, i) of the warp's 16, key base + 8 n +
// c_col(lane, i)). q k is tile_scores', as attention_mma_kernel makes it. The block stages
// each KV head's keys (those before `end') in Ks; every thread of the block must call it.
template <typename T, int HD>
__device__ __forceinline__ void probs_over_heads(const float* q, int32_t q_stride, const float* lse,
                                                 KvPages pages, int32_t base, int32_t end,
                                                 int32_t n_rows, int32_t first_last, int32_t n_head,
                                                 int32_t n_head_kv, float qscale, T* Ks,
                                                 float (&acc)[kMmaKeys / 8][4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int32_t w0 = warp * 16, w_rows = max(0, min(16, n_rows - w0));
    const int64_t kv_dim = int64_t(n_head_kv) * HD;
    const int group = n_head / n_head_kv;
#pragma unroll
    for (int n = 0; n < kMmaKeys / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    for (int kvh = 0; kvh < n_head_kv && base < end; ++kvh) {  // no key seen: zeros
        __syncthreads();  // every warp is done with the tile before
        stage_tile<T, HD>(pages, base, end, kvh, kv_dim, false, Ks);
        __syncthreads();
        if (w_rows == 0) continue;
        for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
            uint32_t qa[2][HD / 16][4];
            query_fragments<T, HD>(q + int64_t(w0) * q_stride + h * HD, q_stride, w_rows, qa);
            float s[kMmaKeys / 8][4];
            tile_scores<T, HD>(qa, Ks, s);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int32_t row = w0 + c_row(lane, i);
                if (row >= n_rows) continue;
                const float row_lse = lse[int64_t(row) * n_head + h];
#pragma unroll
                for (int n = 0; n < kMmaKeys / 8; ++n)
                    if (base + n * 8 + c_col(lane, i) <= first_last + row)
                        acc[n][i] += exp2f(s[n][i] * qscale - row_lse);
            }
        }
    }
}

// rows_mma_kernel: the observed rows of attention_rows, recomputed instead of read from
// stored raw scores: a block owns 64 rows and one tile of 64 keys; the heads are summed in
// order, as rows_kernel sums them, so the bits are those of attention_mma_kernel's scores
// through rows_kernel.
template <typename T, int HD>
__global__ void __launch_bounds__(128)
rows_mma_kernel(RowsMmaBatch batch, int32_t n_head, int32_t n_head_kv, float qscale) {
    const RowsMmaSeq& sq = batch.seq[blockIdx.z];
    const int32_t base = int32_t(blockIdx.x) * kMmaKeys, r0 = int32_t(blockIdx.y) * kMmaQueries;
    if (base >= sq.n_kv || r0 >= sq.n_rows) return;
    const int32_t nr = min(kMmaQueries, sq.n_rows - r0);
    const int lane = threadIdx.x & 31, w0 = (threadIdx.x >> 5) * 16;
    extern __shared__ float smem[];
    float acc[kMmaKeys / 8][4];
    probs_over_heads<T, HD>(sq.q + int64_t(r0) * sq.q_stride, sq.q_stride, sq.lse + int64_t(r0) * n_head,
                            sq.pages, base, min(sq.n_kv, sq.first_limit + r0 + nr), nr,
                            sq.first_limit + r0, n_head, n_head_kv, qscale,
                            reinterpret_cast<T*>(smem), acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int32_t row = w0 + c_row(lane, i);
        if (row >= nr) continue;
#pragma unroll
        for (int n = 0; n < kMmaKeys / 8; ++n) {
            const int32_t j = base + n * 8 + c_col(lane, i);
            if (j < sq.n_kv) sq.rows[int64_t(r0 + row) * sq.n_kv + j] = acc[n][i] / float(n_head);
        }
    }
}

// col_sums_mma_kernel: attention_col_sums on the tensor cores: a block owns 64 queries and
// one tile of 64 keys, sums the probabilities over its queries and every head, and adds its
// 64 sums to col_sums (atomics: blocks of other queries add to the same keys).
template <typename T, int HD>
__global__ void __launch_bounds__(128)
col_sums_mma_kernel(AttnSeq sq, int32_t n_head, int32_t n_head_kv, float qscale, float* col_sums) {
    constexpr int kKeyTiles = kMmaKeys / 8;
    const int32_t base = int32_t(blockIdx.x) * kMmaKeys, q0 = int32_t(blockIdx.y) * kMmaQueries;
    if (base >= sq.n_kv || q0 >= sq.n_q) return;
    const int32_t nq = min(kMmaQueries, sq.n_q - q0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int32_t first_last = sq.n_kv - sq.n_q + q0;  // last key query q0 sees
    extern __shared__ float smem[];
    float acc[kKeyTiles][4];
    probs_over_heads<T, HD>(sq.q + int64_t(q0) * sq.q_stride, sq.q_stride, sq.lse + int64_t(q0) * n_head,
                            sq.pages, base, min(sq.n_kv, first_last + nq), nq, first_last, n_head,
                            n_head_kv, qscale, reinterpret_cast<T*>(smem), acc);
    // the block's sum per key: this lane's two rows, the 8 lanes holding the same keys
    // (lane bits 2-4), then the 4 warps
    float col[kKeyTiles][2];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            float v = acc[n][c] + acc[n][2 + c];
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            col[n][c] = v;
        }
    __syncthreads();  // the key tile is done with: its space holds the warps' sums
    float* part = smem;  // (4 warps, kMmaKeys)
    if (lane < 4)
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) part[warp * kMmaKeys + n * 8 + c_col(lane, c)] = col[n][c];
    __syncthreads();
    for (int i = threadIdx.x; i < kMmaKeys; i += blockDim.x) {
        const float v = part[i] + part[kMmaKeys + i] + part[2 * kMmaKeys + i] + part[3 * kMmaKeys + i];
        if (base + i < sq.n_kv) atomicAdd(&col_sums[base + i], v / float(n_head));
    }
}

template <typename T, int HD>
cudaError_t launch_attention_mma(const AttnBatch& batch, int32_t max_q, int32_t n_head,
                                 int32_t n_head_kv, cudaStream_t stream) {
    const dim3 grid(unsigned((max_q + kMmaQueries - 1) / kMmaQueries), unsigned(n_head),
                    unsigned(batch.n_seq));
    attention_mma_kernel<T, HD><<<grid, 128, mma_smem_bytes<T, HD>(true), stream>>>(
        batch, n_head, n_head_kv, query_scale(HD));
    return cudaGetLastError();
}

// Decode (fewer than 8 queries a sequence): a block per query, 8 warps split its keys; its
// rows are the query's head, or its KV head's group of query heads (GROUP: up to QT of
// them). Prefill: a block per QT queries of a head, which share each key load, 4 warps.
template <typename T, int QT, int DPL, bool GROUP>
cudaError_t launch_attention(const AttnBatch& batch, int32_t max_q, int32_t n_head,
                             int32_t n_head_kv, int32_t hd, const AttnSplit& split,
                             cudaStream_t stream) {
    constexpr bool kDecode = QT == 1 || GROUP;
    constexpr int WARPS = kDecode ? 8 : 4;
    const size_t smem = sizeof(float) * (QT * hd + 2 * WARPS * QT + WARPS * QT * hd);
    const unsigned head_blocks = unsigned(GROUP ? n_head_kv : n_head);
    if (split.n_split <= 1) {
        const dim3 grid(unsigned(kDecode ? max_q : (max_q + QT - 1) / QT), head_blocks, unsigned(batch.n_seq));
        attention_kernel<T, QT, DPL, WARPS, false, GROUP><<<grid, WARPS * 32, smem, stream>>>(
            batch, n_head, n_head_kv, hd, query_scale(hd), 1, nullptr);
        return cudaGetLastError();
    }
    if constexpr (!kDecode) {
        return cudaErrorInvalidValue;  // attention() refuses it before
    } else {
        const dim3 grid(unsigned(split.n_split), head_blocks, unsigned(batch.n_seq));
        attention_kernel<T, QT, DPL, WARPS, true, GROUP><<<grid, WARPS * 32, smem, stream>>>(
            batch, n_head, n_head_kv, hd, query_scale(hd), split.n_split, split.partial);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        const int threads = std::min(256, (hd + 31) / 32 * 32);
        split_merge_kernel<T><<<dim3(unsigned(n_head), unsigned(batch.n_seq)), threads, 0, stream>>>(
            batch, n_head, hd, split.n_split, split.partial);
        return cudaGetLastError();
    }
}

template <typename T, int QT>
cudaError_t by_head_dim(const AttnBatch& batch, int32_t max_q, int32_t n_head,
                        int32_t n_head_kv, int32_t hd, const AttnSplit& split,
                        cudaStream_t stream) {
    if (hd <= 32) return launch_attention<T, QT, 1, false>(batch, max_q, n_head, n_head_kv, hd, split, stream);
    if (hd <= 64) return launch_attention<T, QT, 2, false>(batch, max_q, n_head, n_head_kv, hd, split, stream);
    if (hd <= 128) return launch_attention<T, QT, 4, false>(batch, max_q, n_head, n_head_kv, hd, split, stream);
    return launch_attention<T, QT, 8, false>(batch, max_q, n_head, n_head_kv, hd, split, stream);
}

// The rows of a grouped decode block (query heads a KV head, rounded up to 4 or 8: fewer
// instantiations, and a decode block's spare rows cost arithmetic, not memory), or 0 where
// decode keeps a block per query head: no groups, groups past 8 (registers), head sizes
// outside 33..128 (the two instantiated; LLaMA-family heads are 64 or 128 wide).
int32_t grouped_decode_rows(int32_t n_head, int32_t n_head_kv, int32_t hd) {
    const int32_t group = n_head / n_head_kv;
    if (group < 2 || group > 8 || hd <= 32 || hd > 128) return 0;
    return group <= 4 ? 4 : 8;
}

template <typename T, int QT>
cudaError_t grouped_by_head_dim(const AttnBatch& batch, int32_t max_q, int32_t n_head,
                                int32_t n_head_kv, int32_t hd, const AttnSplit& split,
                                cudaStream_t stream) {
    if (hd <= 64) return launch_attention<T, QT, 2, true>(batch, max_q, n_head, n_head_kv, hd, split, stream);
    return launch_attention<T, QT, 4, true>(batch, max_q, n_head, n_head_kv, hd, split, stream);
}

template <typename T>
cudaError_t grouped_decode(const AttnBatch& batch, int32_t max_q, int32_t n_head,
                           int32_t n_head_kv, int32_t hd, const AttnSplit& split,
                           cudaStream_t stream) {
    if (grouped_decode_rows(n_head, n_head_kv, hd) == 4)
        return grouped_by_head_dim<T, 4>(batch, max_q, n_head, n_head_kv, hd, split, stream);
    return grouped_by_head_dim<T, 8>(batch, max_q, n_head, n_head_kv, hd, split, stream);
}

// rows[r, j] = mean over heads of exp2(score - lse): a thread per (row, key). n_kv is the
// row stride; kv_len (optional, on the device) the true key count, to which first_limit is
// relative then.
__global__ void rows_kernel(RowsBatch batch, int32_t n_head) {
    const RowsSeq& sq = batch.seq[blockIdx.z];
    const int32_t r = blockIdx.y;
    const int32_t j = int32_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= sq.n_rows || j >= sq.n_kv) return;
    const int32_t n_true = sq.kv_len ? min(max(*sq.kv_len, 0), sq.n_kv) : sq.n_kv;
    float p = 0.0f;
    if (j < n_true && j <= sq.first_limit + (n_true - sq.n_kv) + r)
        for (int h = 0; h < n_head; ++h)
            p += exp2f(sq.scores[(int64_t(r) * n_head + h) * sq.n_kv + j] -
                       sq.lse[int64_t(r) * n_head + h]);
    sq.rows[int64_t(r) * sq.n_kv + j] = p / float(n_head);
}

// Column sums over every query (H2O): recomputes the scores, a thread per key and a block
// per chunk of queries, summed over heads in registers, over chunks with atomics.
template <typename T>
__global__ void col_sums_kernel(AttnSeq sq, int32_t n_head, int32_t n_head_kv, int32_t hd,
                                float qscale, int32_t q_chunk, float* col_sums) {
    const int32_t j = int32_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int32_t qa = int32_t(blockIdx.y) * q_chunk;
    const int32_t qb = min(qa + q_chunk, sq.n_q);
    const int group = n_head / n_head_kv;
    const int64_t kv_dim = int64_t(n_head_kv) * hd;
    extern __shared__ float q_s[];  // (n_head, hd) pre-scaled query
    float col = 0.0f;
    for (int32_t qi = qa; qi < qb; ++qi) {
        __syncthreads();
        for (int32_t i = threadIdx.x; i < n_head * hd; i += blockDim.x)
            q_s[i] = sq.q[int64_t(qi) * sq.q_stride + i] * qscale;
        __syncthreads();
        if (j < sq.n_kv && j <= sq.n_kv - sq.n_q + qi) {
            const T* key = kv_row<const T>(sq.pages, j, kv_dim, false);
            for (int h = 0; h < n_head; ++h)
                col += exp2f(dot_key(key + (h / group) * hd, q_s + h * hd, hd) -
                             sq.lse[int64_t(qi) * n_head + h]);
        }
    }
    if (j < sq.n_kv) atomicAdd(&col_sums[j], col / float(n_head));
}

}  // namespace

int32_t attention_decode_head_blocks(int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                                     bool group_heads) {
    if (n_head_kv <= 0 || n_head % n_head_kv != 0) return n_head;
    return group_heads && grouped_decode_rows(n_head, n_head_kv, head_dim) ? n_head_kv : n_head;
}

int32_t attention_splits(int32_t n_seq, int32_t head_blocks, int32_t max_kv, int32_t n_sm) {
    constexpr int32_t kMinKeys = 256;  // a tile for each of a block's 8 warps
    const int64_t blocks = int64_t(n_seq) * head_blocks;
    if (blocks <= 0 || n_sm <= 0 || blocks >= n_sm) return 1;
    const int64_t n = std::min<int64_t>({2 * int64_t(n_sm) / blocks, max_kv / kMinKeys, kMaxAttnSplits});
    return int32_t(std::max<int64_t>(n, 1));
}

size_t attention_split_floats(int32_t n_seq, int32_t n_head, int32_t head_dim, int32_t n_split) {
    if (n_seq <= 0 || n_head <= 0 || head_dim <= 0 || n_split <= 1) return 0;
    return size_t(n_seq) * size_t(n_head) * size_t(n_split) * size_t(head_dim + 2);
}

// The head sizes the tensor-core kernels are built for (PYR_DISPATCH_MMA_HD), on a device
// whose tensor cores passed their check: every tensor-core path asks this.
bool attention_rows_mma_supported(Dt dt, int32_t head_dim) {
    return (head_dim == 64 || head_dim == 128) && tensor_cores(dt) == TensorCores::Usable;
}

bool attention_on_tensor_cores(Dt dt, int32_t max_q, int32_t head_dim, bool allow_tensor_cores) {
    return allow_tensor_cores && max_q >= kMmaMinQueries && attention_rows_mma_supported(dt, head_dim);
}

cudaError_t attention(Dt dt, const AttnBatch& batch, int32_t n_head, int32_t n_head_kv,
                      int32_t head_dim, cudaStream_t stream, const AttnSplit& split,
                      bool allow_tensor_cores, bool group_heads) {
    if (batch.n_seq <= 0 || batch.n_seq > kMaxBatch || head_dim <= 0 || head_dim > 256 ||
        head_dim % 2 != 0 || n_head_kv <= 0 || n_head % n_head_kv != 0 || split.n_split < 1 ||
        split.n_split > kMaxAttnSplits || (split.n_split > 1 && !split.partial))
        return cudaErrorInvalidValue;
    int32_t max_q = 0;
    for (int s = 0; s < batch.n_seq; ++s) {
        if (batch.seq[s].n_q > batch.seq[s].n_kv) return cudaErrorInvalidValue;
        max_q = std::max(max_q, batch.seq[s].n_q);
    }
    if (split.n_split > 1 && max_q > 1) return cudaErrorInvalidValue;  // decode only
    if (max_q == 0) return cudaSuccess;
    if (attention_on_tensor_cores(dt, max_q, head_dim, allow_tensor_cores))
        PYR_DISPATCH_DT(dt, PYR_DISPATCH_MMA_HD(head_dim, return (launch_attention_mma<T, HD>(
                                                              batch, max_q, n_head, n_head_kv, stream))));
    if (max_q < 8 && attention_decode_head_blocks(n_head, n_head_kv, head_dim, group_heads) != n_head)
        PYR_DISPATCH_DT(dt, return (grouped_decode<T>(batch, max_q, n_head, n_head_kv, head_dim, split, stream)));
    if (max_q < 8)
        PYR_DISPATCH_DT(dt, return (by_head_dim<T, 1>(batch, max_q, n_head, n_head_kv, head_dim, split, stream)));
    PYR_DISPATCH_DT(dt, return (by_head_dim<T, 8>(batch, max_q, n_head, n_head_kv, head_dim, split, stream)));
}

// The most rows and keys of a batch's sequences (RowsBatch, RowsMmaBatch): its launch's shape.
template <typename Batch>
void rows_shape(const Batch& batch, int32_t& max_rows, int32_t& max_kv) {
    max_rows = max_kv = 0;
    for (int s = 0; s < batch.n_seq; ++s) {
        max_rows = std::max(max_rows, batch.seq[s].n_rows);
        max_kv = std::max(max_kv, batch.seq[s].n_kv);
    }
}

cudaError_t attention_rows(const RowsBatch& batch, int32_t n_head, cudaStream_t stream) {
    if (batch.n_seq < 0 || batch.n_seq > kMaxBatch || n_head <= 0) return cudaErrorInvalidValue;
    int32_t max_rows, max_kv;
    rows_shape(batch, max_rows, max_kv);
    if (max_rows <= 0 || max_kv <= 0) return cudaSuccess;
    const dim3 grid(blocks_for(max_kv, 128), unsigned(max_rows), unsigned(batch.n_seq));
    rows_kernel<<<grid, 128, 0, stream>>>(batch, n_head);
    return cudaGetLastError();
}

cudaError_t attention_rows_mma(Dt dt, const RowsMmaBatch& batch, int32_t n_head, int32_t n_head_kv,
                               int32_t head_dim, cudaStream_t stream) {
    if (batch.n_seq < 0 || batch.n_seq > kMaxBatch || n_head <= 0 || n_head_kv <= 0 ||
        n_head % n_head_kv != 0 || !attention_rows_mma_supported(dt, head_dim))
        return cudaErrorInvalidValue;
    int32_t max_rows, max_kv;
    rows_shape(batch, max_rows, max_kv);
    if (max_rows <= 0 || max_kv <= 0) return cudaSuccess;
    const dim3 grid(blocks_for(max_kv, kMmaKeys), blocks_for(max_rows, kMmaQueries), unsigned(batch.n_seq));
    PYR_DISPATCH_DT(dt, PYR_DISPATCH_MMA_HD(head_dim, (rows_mma_kernel<T, HD><<<grid, 128, mma_smem_bytes<T, HD>(false), stream>>>(
                                                          batch, n_head, n_head_kv, query_scale(HD)))));
    return cudaGetLastError();
}

cudaError_t attention_col_sums(Dt dt, const AttnSeq& seq, int32_t n_head, int32_t n_head_kv,
                               int32_t head_dim, float* col_sums, cudaStream_t stream,
                               bool allow_tensor_cores) {
    if (!seq.lse || head_dim <= 0 || head_dim > 256 || n_head_kv <= 0 || n_head % n_head_kv != 0)
        return cudaErrorInvalidValue;
    if (seq.n_q <= 0 || seq.n_kv <= 0) return cudaSuccess;
    if (attention_on_tensor_cores(dt, seq.n_q, head_dim, allow_tensor_cores)) {
        const dim3 grid(blocks_for(seq.n_kv, kMmaKeys), blocks_for(seq.n_q, kMmaQueries));
        PYR_DISPATCH_DT(dt, PYR_DISPATCH_MMA_HD(head_dim, (col_sums_mma_kernel<T, HD><<<grid, 128, mma_smem_bytes<T, HD>(false), stream>>>(
                                                              seq, n_head, n_head_kv, query_scale(HD), col_sums))));
        return cudaGetLastError();
    }
    constexpr int32_t kChunk = 4, kThreads = 128;
    const dim3 grid(blocks_for(seq.n_kv, kThreads), blocks_for(seq.n_q, kChunk));
    const size_t smem = sizeof(float) * size_t(n_head) * size_t(head_dim);
    if (smem > 48 * 1024) return cudaErrorInvalidValue;
    PYR_DISPATCH_DT(dt, (col_sums_kernel<T><<<grid, kThreads, smem, stream>>>(
                            seq, n_head, n_head_kv, head_dim, query_scale(head_dim), kChunk,
                            col_sums)));
    return cudaGetLastError();
}

}  // namespace pyr::kernels
