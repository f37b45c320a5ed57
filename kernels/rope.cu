// RoPE on the fused q|k|v projection and the append of k, v to each sequence's cache, for a
// whole batch in one launch. CPU reference: cpu::rope_apply + CpuKvStorage::append.
#include "common.cuh"

namespace pyr::kernels {
namespace {

// One block per token row of the batch.
template <typename T>
__global__ void rope_store_kernel(float* qkv, RopeStoreBatch batch, int32_t n_head,
                                  int32_t n_head_kv, int32_t head_dim, const float* cos,
                                  const float* sin) {
    const int32_t t = blockIdx.x;
    int32_t s = 0;
    while (s + 1 < batch.n_seq && t >= batch.row0[s + 1]) ++s;
    const int32_t half = head_dim / 2;
    const int32_t q_dim = n_head * head_dim, kv_dim = n_head_kv * head_dim;
    float* q = qkv + int64_t(t) * (q_dim + 2 * kv_dim);
    const float* k = q + q_dim;
    const float* v = k + kv_dim;
    const int64_t slot = batch.slot0[s] + (t - batch.row0[s]);
    T* kc = static_cast<T*>(batch.k_cache[s]) + slot * kv_dim;
    T* vc = static_cast<T*>(batch.v_cache[s]) + slot * kv_dim;
    const float* c = cos + int64_t(t) * half;
    const float* sn = sin + int64_t(t) * half;
    for (int32_t p = threadIdx.x; p < (n_head + n_head_kv) * half; p += blockDim.x) {
        const int32_t h = p / half, i = p % half;
        if (h < n_head) {
            float* xh = q + h * head_dim;
            const float a = xh[i], b = xh[i + half];
            xh[i] = a * c[i] - b * sn[i];
            xh[i + half] = b * c[i] + a * sn[i];
        } else {
            const int32_t off = (h - n_head) * head_dim;
            const float a = k[off + i], b = k[off + i + half];
            kc[off + i] = from_f32<T>(a * c[i] - b * sn[i]);
            kc[off + i + half] = from_f32<T>(b * c[i] + a * sn[i]);
        }
    }
    for (int32_t i = threadIdx.x; i < kv_dim; i += blockDim.x) vc[i] = from_f32<T>(v[i]);
}

}  // namespace

cudaError_t rope_store(Dt dt, float* qkv, const RopeStoreBatch& batch, int32_t n_head,
                       int32_t n_head_kv, int32_t head_dim, const float* cos, const float* sin,
                       cudaStream_t stream) {
    if (batch.n_seq <= 0 || batch.n_seq > kMaxBatch) return cudaErrorInvalidValue;
    const int32_t n_rows = batch.row0[batch.n_seq];
    if (n_rows <= 0) return cudaSuccess;
    PYR_DISPATCH_DT(dt, (rope_store_kernel<T><<<n_rows, 256, 0, stream>>>(
                            qkv, batch, n_head, n_head_kv, head_dim, cos, sin)));
    return cudaGetLastError();
}

}  // namespace pyr::kernels
