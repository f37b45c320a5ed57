// What the two attention files share: attention.cu (the CUDA-core kernels, decode and
// short prefills, and the entry points) and attention_mma.cu (prefills and their
// observations on the tensor cores, to which attention.cu hands them).
#pragma once

#include <algorithm>
#include <cmath>

#include "common.cuh"

namespace pyr::kernels::attention_detail {

constexpr float kLog2e = 1.4426950408889634f;

// Scores are in log2 units: q pre-scaled by log2(e) / sqrt(head_dim).
inline float query_scale(int32_t head_dim) { return kLog2e / std::sqrt(float(head_dim)); }

// The true key count of the block's sequence: the device's (graph replays) or the host's;
// its n_kv is then only the launch's bound and the scores' row stride (clamped: never read
// past the cache).
__device__ __forceinline__ int32_t true_kv_len(const AttnBatch& batch) {
    const AttnSeq& sq = batch.seq[blockIdx.z];
    return batch.kv_len ? min(max(batch.kv_len[blockIdx.z], sq.n_q), sq.n_kv) : sq.n_kv;
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

// attention_mma.cu: attention() of a prefill and attention_col_sums()' partial rows on the
// tensor cores, where attention_on_tensor_cores() allows them.
cudaError_t attention_mma(Dt dt, const AttnBatch& batch, int32_t max_q, int32_t n_head,
                          int32_t n_head_kv, int32_t head_dim, cudaStream_t stream);
cudaError_t col_sums_mma(Dt dt, const AttnSeq& seq, int32_t n_head, int32_t n_head_kv,
                         int32_t head_dim, float* partial, cudaStream_t stream);

}  // namespace pyr::kernels::attention_detail
