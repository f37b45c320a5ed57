// RoPE on the fused q|k|v projection and the append of k, v to each sequence's cache, for a
// whole batch in one launch. CPU reference: cpu::rope_apply + CpuKvStorage::append.
#include "common.cuh"

namespace pyr::kernels {
namespace {

constexpr int kRopeThreads = 128;

// A row's work is (n_head + n_head_kv) * half rotation pairs (q heads, then k heads; pair i
// of a head is its elements i and i + half) followed by kv_dim v copies, one item per
// thread. Block (t, j) does items [j * kRopeThreads, (j + 1) * kRopeThreads) of row t, so
// that even a lone decode row spreads over many SMs; consecutive threads touch consecutive
// elements of a head.
template <typename T>
__global__ void rope_store_kernel(float* qkv, RopeStoreBatch batch, int32_t n_head,
                                  int32_t n_head_kv, int32_t head_dim, const float* cos,
                                  const float* sin) {
    const int32_t t = blockIdx.x;
    const int32_t half = head_dim / 2;
    const int32_t q_dim = n_head * head_dim, kv_dim = n_head_kv * head_dim;
    const int32_t n_pairs = (n_head + n_head_kv) * half;
    const int32_t p = blockIdx.y * kRopeThreads + threadIdx.x;
    if (p >= n_pairs + kv_dim) return;

    // the row's sequence: the last s with row0[s] <= t (a binary search, the same for the
    // whole block, instead of a scan over up to kMaxBatch sequences)
    int32_t s = 0;
    for (int32_t hi = batch.n_seq - 1; s < hi;) {
        const int32_t mid = (s + hi + 1) / 2;
        if (batch.row0[mid] <= t) s = mid;
        else hi = mid - 1;
    }
    const int32_t first = batch.row0[s];
    // the cache row of token t; read only by the items that write the cache
    auto cache_row = [&](bool value) {
        const int32_t slot0 =
            batch.kv_len ? batch.kv_len[s] - (batch.row0[s + 1] - first) : batch.slot0[s];
        return kv_row<T>(batch.pages[s], slot0 + (t - first), kv_dim, value);
    };
    float* q = qkv + int64_t(t) * (q_dim + 2 * kv_dim);
    if (p < n_pairs) {
        const int32_t h = p / half, i = p - h * half;
        const float c = cos[int64_t(t) * half + i], sn = sin[int64_t(t) * half + i];
        if (h < n_head) {
            float* xh = q + h * head_dim;
            const float a = xh[i], b = xh[i + half];
            xh[i] = a * c - b * sn;
            xh[i + half] = b * c + a * sn;
        } else {
            const int32_t off = (h - n_head) * head_dim;
            const float* k = q + q_dim + off;
            const float a = k[i], b = k[i + half];
            T* kc = cache_row(false) + off;
            kc[i] = from_f32<T>(a * c - b * sn);
            kc[i + half] = from_f32<T>(b * c + a * sn);
        }
    } else {
        const int32_t i = p - n_pairs;
        cache_row(true)[i] = from_f32<T>(q[q_dim + kv_dim + i]);
    }
}

}  // namespace

cudaError_t rope_store(Dt dt, float* qkv, const RopeStoreBatch& batch, int32_t n_head,
                       int32_t n_head_kv, int32_t head_dim, const float* cos, const float* sin,
                       cudaStream_t stream) {
    if (batch.n_seq <= 0 || batch.n_seq > kMaxBatch) return cudaErrorInvalidValue;
    if (n_head <= 0 || n_head_kv <= 0 || head_dim <= 0 || head_dim % 2 != 0)
        return cudaErrorInvalidValue;
    if (batch.row0[0] != 0) return cudaErrorInvalidValue;
    for (int32_t s = 0; s < batch.n_seq; ++s)
        if (batch.row0[s + 1] < batch.row0[s]) return cudaErrorInvalidValue;
    const int32_t n_rows = batch.row0[batch.n_seq];
    if (n_rows <= 0) return cudaSuccess;
    const int64_t items = int64_t(n_head + n_head_kv) * (head_dim / 2) +
                          int64_t(n_head_kv) * head_dim;
    const int64_t chunks = (items + kRopeThreads - 1) / kRopeThreads;
    if (chunks > 65535) return cudaErrorInvalidValue;  // gridDim.y
    const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(chunks));
    PYR_DISPATCH_DT(dt, (rope_store_kernel<T><<<grid, kRopeThreads, 0, stream>>>(
                            qkv, batch, n_head, n_head_kv, head_dim, cos, sin)));
    return cudaGetLastError();
}

}  // namespace pyr::kernels
