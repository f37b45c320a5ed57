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

template <typename T, int QT, int DPL, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
attention_kernel(AttnBatch batch, int32_t n_head, int32_t n_head_kv, int32_t hd, float qscale) {
    const AttnSeq& sq = batch.seq[blockIdx.z];
    const int32_t q0 = int32_t(blockIdx.x) * QT;
    if (q0 >= sq.n_q) return;
    const int32_t nq = min(QT, sq.n_q - q0);
    const int h = blockIdx.y, kvh = h / (n_head / n_head_kv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t kv_dim = int64_t(n_head_kv) * hd;

    extern __shared__ float smem[];
    float* q_s = smem;  // (QT, hd) pre-scaled queries
    for (int32_t i = threadIdx.x; i < QT * hd; i += blockDim.x) {
        const int32_t qi = i / hd, d = i % hd;
        q_s[i] = qi < nq ? sq.q[int64_t(q0 + qi) * sq.q_stride + h * hd + d] * qscale : 0.0f;
    }
    __syncthreads();

    // the true key count: the device's (graph replays) or the host's; sq.n_kv is then only
    // the launch's bound and the scores' row stride (clamped: never read past the cache)
    const int32_t n_kv = batch.kv_len ? min(max(batch.kv_len[blockIdx.z], sq.n_q), sq.n_kv) : sq.n_kv;
    const int32_t first_limit = n_kv - sq.n_q + q0;     // last key query q0 sees
    const int32_t kend = first_limit + nq;              // keys [0, kend) matter to the block
    const T* K = static_cast<const T*>(sq.k) + kvh * hd;
    const T* V = static_cast<const T*>(sq.v) + kvh * hd;

    float m[QT], l[QT], acc[QT][DPL];
#pragma unroll
    for (int qi = 0; qi < QT; ++qi) {
        m[qi] = -INFINITY;
        l[qi] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[qi][i] = 0.0f;
    }

    for (int32_t base = warp * 32; base < kend; base += WARPS * 32) {
        const int32_t j = base + lane;
        float s[QT];
#pragma unroll
        for (int qi = 0; qi < QT; ++qi) s[qi] = 0.0f;
        if (j < kend) key_scores<T, QT, DPL>(K + j * kv_dim, q_s, hd, s);
        float p[QT];
#pragma unroll
        for (int qi = 0; qi < QT; ++qi) {
            if (qi >= nq || j >= kend || j > first_limit + qi) s[qi] = -INFINITY;
            // the raw scores of the observed queries, for attention_rows()
            if (sq.scores && j < kend && qi < nq && q0 + qi >= sq.scores_from)
                sq.scores[(int64_t(q0 + qi - sq.scores_from) * n_head + h) * sq.n_kv + j] = s[qi];
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
        const int32_t n_keys = min(32, kend - base);
        if (n_keys == 32) {  // a full tile: 8 value rows in flight at a time
#pragma unroll
            for (int j0 = 0; j0 < 32; j0 += 8) {
                float vf[8][DPL];
#pragma unroll
                for (int u = 0; u < 8; ++u)
                    load_lane_dims<T, DPL>(V + (base + j0 + u) * kv_dim, lane, hd, vf[u]);
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
            for (int32_t jj = 0; jj < n_keys; ++jj) {
                float vf[DPL];
                load_lane_dims<T, DPL>(V + (base + jj) * kv_dim, lane, hd, vf);
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
    T* out = static_cast<T*>(sq.out);
    for (int32_t i = threadIdx.x; i < nq * hd; i += blockDim.x) {
        const int32_t qi = i / hd, d = i % hd;
        float M = -INFINITY;
        for (int w = 0; w < WARPS; ++w) M = fmaxf(M, cm[w * QT + qi]);
        float L = 0.0f, O = 0.0f;
        for (int w = 0; w < WARPS; ++w) {
            const float f = exp2f(cm[w * QT + qi] - M);
            L += cl[w * QT + qi] * f;
            O += ca[(w * QT + qi) * hd + d] * f;
        }
        out[int64_t(q0 + qi) * n_head * hd + h * hd + d] = from_f32<T>(O / L);
        if (d == 0 && sq.lse) sq.lse[int64_t(q0 + qi) * n_head + h] = M + log2f(L);
    }
}

template <typename T, int QT, int DPL>
cudaError_t launch_attention(const AttnBatch& batch, int32_t max_q, int32_t n_head,
                             int32_t n_head_kv, int32_t hd, cudaStream_t stream) {
    // Decode: one query per block, 8 warps split its keys. Prefill: 8 queries per block
    // share each key load, 4 warps.
    constexpr int WARPS = QT == 1 ? 8 : 4;
    const size_t smem = sizeof(float) * (QT * hd + 2 * WARPS * QT + WARPS * QT * hd);
    const dim3 grid(unsigned((max_q + QT - 1) / QT), unsigned(n_head), unsigned(batch.n_seq));
    attention_kernel<T, QT, DPL, WARPS><<<grid, WARPS * 32, smem, stream>>>(
        batch, n_head, n_head_kv, hd, query_scale(hd));
    return cudaGetLastError();
}

template <typename T, int QT>
cudaError_t by_head_dim(const AttnBatch& batch, int32_t max_q, int32_t n_head,
                        int32_t n_head_kv, int32_t hd, cudaStream_t stream) {
    if (hd <= 32) return launch_attention<T, QT, 1>(batch, max_q, n_head, n_head_kv, hd, stream);
    if (hd <= 64) return launch_attention<T, QT, 2>(batch, max_q, n_head, n_head_kv, hd, stream);
    if (hd <= 128) return launch_attention<T, QT, 4>(batch, max_q, n_head, n_head_kv, hd, stream);
    return launch_attention<T, QT, 8>(batch, max_q, n_head, n_head_kv, hd, stream);
}

// rows[r, j] = mean over heads of exp2(score - lse): a thread per (row, key). n_kv is the
// row stride; kv_len (optional, on the device) the true key count, to which first_limit is
// relative then.
__global__ void rows_kernel(const float* scores, const float* lse, int32_t n_head, int32_t n_kv,
                            int32_t first_limit, const int32_t* kv_len, float* rows) {
    const int32_t r = blockIdx.y;
    const int32_t j = int32_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= n_kv) return;
    const int32_t n_true = kv_len ? min(max(*kv_len, 0), n_kv) : n_kv;
    float p = 0.0f;
    if (j < n_true && j <= first_limit + (n_true - n_kv) + r)
        for (int h = 0; h < n_head; ++h)
            p += exp2f(scores[(int64_t(r) * n_head + h) * n_kv + j] - lse[int64_t(r) * n_head + h]);
    rows[int64_t(r) * n_kv + j] = p / float(n_head);
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
    const T* K = static_cast<const T*>(sq.k);
    extern __shared__ float q_s[];  // (n_head, hd) pre-scaled query
    float col = 0.0f;
    for (int32_t qi = qa; qi < qb; ++qi) {
        __syncthreads();
        for (int32_t i = threadIdx.x; i < n_head * hd; i += blockDim.x)
            q_s[i] = sq.q[int64_t(qi) * sq.q_stride + i] * qscale;
        __syncthreads();
        if (j < sq.n_kv && j <= sq.n_kv - sq.n_q + qi)
            for (int h = 0; h < n_head; ++h)
                col += exp2f(dot_key(K + j * kv_dim + (h / group) * hd, q_s + h * hd, hd) -
                             sq.lse[int64_t(qi) * n_head + h]);
    }
    if (j < sq.n_kv) atomicAdd(&col_sums[j], col / float(n_head));
}

}  // namespace

cudaError_t attention(Dt dt, const AttnBatch& batch, int32_t n_head, int32_t n_head_kv,
                      int32_t head_dim, cudaStream_t stream) {
    if (batch.n_seq <= 0 || batch.n_seq > kMaxBatch || head_dim <= 0 || head_dim > 256 ||
        head_dim % 2 != 0 || n_head_kv <= 0 || n_head % n_head_kv != 0)
        return cudaErrorInvalidValue;
    int32_t max_q = 0;
    for (int s = 0; s < batch.n_seq; ++s) {
        if (batch.seq[s].n_q > batch.seq[s].n_kv) return cudaErrorInvalidValue;
        max_q = std::max(max_q, batch.seq[s].n_q);
    }
    if (max_q == 0) return cudaSuccess;
    if (max_q < 8)
        PYR_DISPATCH_DT(dt, return (by_head_dim<T, 1>(batch, max_q, n_head, n_head_kv, head_dim, stream)));
    PYR_DISPATCH_DT(dt, return (by_head_dim<T, 8>(batch, max_q, n_head, n_head_kv, head_dim, stream)));
}

cudaError_t attention_rows(const float* scores, const float* lse, int32_t n_rows,
                          int32_t n_head, int32_t n_kv, int32_t first_limit, float* rows,
                          cudaStream_t stream, const int32_t* kv_len) {
    if (n_rows <= 0 || n_kv <= 0) return cudaSuccess;
    const dim3 grid(blocks_for(n_kv, 128), unsigned(n_rows));
    rows_kernel<<<grid, 128, 0, stream>>>(scores, lse, n_head, n_kv, first_limit, kv_len, rows);
    return cudaGetLastError();
}

cudaError_t attention_col_sums(Dt dt, const AttnSeq& seq, int32_t n_head, int32_t n_head_kv,
                               int32_t head_dim, float* col_sums, cudaStream_t stream) {
    if (!seq.lse || head_dim <= 0 || head_dim > 256 || n_head_kv <= 0 || n_head % n_head_kv != 0)
        return cudaErrorInvalidValue;
    if (seq.n_q <= 0 || seq.n_kv <= 0) return cudaSuccess;
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
