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
//
// Prefills of 16+ queries at head_dim 64 or 128 run on the tensor cores instead where the
// device has them (attention_mma.cu), and so do the observations of such a prefill.
#include <algorithm>
#include <cmath>

#include "attention.cuh"

namespace pyr::kernels {
namespace {

using namespace attention_detail;

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
        alignas(16) T e[DPL];  // written as one vector (a -G build keeps it in local memory)
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
// per kColSumQueries queries, summed over heads and queries in registers into the block's
// row of partial (n_kv wide).
template <typename T>
__global__ void col_sums_kernel(AttnSeq sq, int32_t n_head, int32_t n_head_kv, int32_t hd,
                                float qscale, int32_t q_chunk, float* partial) {
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
    if (j < sq.n_kv) partial[int64_t(blockIdx.y) * sq.n_kv + j] = col;
}

// col_sums[j] += the n_rows partial rows' sums at key j, in row order, over n_head.
__global__ void col_sums_add_kernel(const float* partial, int32_t n_rows, int32_t n_kv,
                                    int32_t n_head, float* col_sums) {
    const int32_t j = int32_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= n_kv) return;
    float sum = 0.0f;
    for (int32_t r = 0; r < n_rows; ++r) sum += partial[int64_t(r) * n_kv + j];
    col_sums[j] += sum / float(n_head);
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
        return attention_mma(dt, batch, max_q, n_head, n_head_kv, head_dim, stream);
    if (max_q < 8 && attention_decode_head_blocks(n_head, n_head_kv, head_dim, group_heads) != n_head)
        PYR_DISPATCH_DT(dt, return (grouped_decode<T>(batch, max_q, n_head, n_head_kv, head_dim, split, stream)));
    if (max_q < 8)
        PYR_DISPATCH_DT(dt, return (by_head_dim<T, 1>(batch, max_q, n_head, n_head_kv, head_dim, split, stream)));
    PYR_DISPATCH_DT(dt, return (by_head_dim<T, 8>(batch, max_q, n_head, n_head_kv, head_dim, split, stream)));
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

cudaError_t attention_col_sums(Dt dt, const AttnSeq& seq, int32_t n_head, int32_t n_head_kv,
                               int32_t head_dim, float* col_sums, float* partial,
                               cudaStream_t stream, bool allow_tensor_cores, int32_t launch_max_q) {
    if (!seq.lse || head_dim <= 0 || head_dim > 256 || n_head_kv <= 0 || n_head % n_head_kv != 0)
        return cudaErrorInvalidValue;
    if (seq.n_q <= 0 || seq.n_kv <= 0) return cudaSuccess;
    constexpr int32_t kThreads = 128;
    if (attention_on_tensor_cores(dt, std::max(seq.n_q, launch_max_q), head_dim, allow_tensor_cores)) {
        const cudaError_t err = col_sums_mma(dt, seq, n_head, n_head_kv, head_dim, partial, stream);
        if (err != cudaSuccess) return err;
    } else {
        const dim3 grid(blocks_for(seq.n_kv, kThreads), blocks_for(seq.n_q, kColSumQueries));
        const size_t smem = sizeof(float) * size_t(n_head) * size_t(head_dim);
        if (smem > 48 * 1024) return cudaErrorInvalidValue;
        PYR_DISPATCH_DT(dt, (col_sums_kernel<T><<<grid, kThreads, smem, stream>>>(
                                seq, n_head, n_head_kv, head_dim, query_scale(head_dim),
                                kColSumQueries, partial)));
        if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    col_sums_add_kernel<<<blocks_for(seq.n_kv, kThreads), kThreads, 0, stream>>>(
        partial, int32_t(blocks_for(seq.n_q, kColSumQueries)), seq.n_kv, n_head, col_sums);
    return cudaGetLastError();
}

size_t attention_col_sums_partial_floats(int32_t n_q, int32_t n_kv) {
    if (n_q <= 0 || n_kv <= 0) return 0;
    return size_t(blocks_for(n_q, kColSumQueries)) * size_t(n_kv);
}

}  // namespace pyr::kernels
