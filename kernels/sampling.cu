// Token sampling on the device, one block per row: the token pyr::Sampler::sample_with
// picks (CPU reference: lib/engine/sampler.cpp; the draw itself is draw_from_prefix of
// lib/engine/sampling_rules.h, compiled here for the device). Picking on the device spares
// the step its copy of n_vocab logits to the host and the host's pass over them, and lets a
// whole decode step, sampling included, stay on the device.
#include <climits>
#include <cmath>

#include "common.cuh"
#include "engine/sampling_rules.h"

namespace pyr::kernels {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr size_t kMaxBitmapBytes = size_t(kSampleMaxVocab) / 8;  // 48 KiB
// The static shared arrays of sample_rows_kernel (an upper bound), for the opt-in above
// 48 KiB in all.
constexpr size_t kStaticSmem = kSampleCandidates * (8 + 8 + 4) + 256 * 4 + kWarps * 16 + 64;

// Logit i as the CPU sampler sees it: the repetition penalty applied in float (penalized()),
// then NaN made -inf (without_nan(); greedy counts NaN as -inf too).
__device__ __forceinline__ float logit_at(const SampleRow& row, const uint32_t* bits, bool pen,
                                          int32_t i) {
    float l = row.logits[i];
    if (pen && (bits[i >> 5] >> (i & 31) & 1u))
        l = l > 0.0f ? l / row.repeat_penalty : l * row.repeat_penalty;
    return l != l ? -INFINITY : l;
}

// A total order of the tokens as the CPU's `better`: a larger key is a larger logit, ties to
// the lower id. High half: the float's bits made unsigned-orderable (-0 as +0: they compare
// equal on the CPU), low half: ~id. Keys of distinct ids differ.
__device__ __forceinline__ uint64_t order_key(float l, int32_t i) {
    uint32_t b = __float_as_uint(l == 0.0f ? 0.0f : l);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return uint64_t(b) << 32 | uint64_t(~uint32_t(i));
}
__device__ __forceinline__ float key_logit(uint64_t key) {
    uint32_t b = uint32_t(key >> 32);
    b = (b & 0x80000000u) ? (b & 0x7fffffffu) : ~b;
    return __uint_as_float(b);
}
__device__ __forceinline__ int32_t key_id(uint64_t key) { return int32_t(~uint32_t(key)); }

// The key of the need-th best token (1 <= need <= n_vocab) by radix select: 8-bit digits
// from the top, one shared histogram per pass (integer atomics: deterministic). Stops early
// once the bucket holding it is wanted whole: its prefix with zeros below is then a key
// with exactly `need` keys >= it. Every thread of the block calls it and gets the result.
__device__ uint64_t select_key(const SampleRow& row, const uint32_t* bits, bool pen,
                               int32_t n_vocab, int32_t need, int32_t* hist, int32_t* sel) {
    uint64_t prefix = 0, mask = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
        __syncthreads();
        for (int32_t i = threadIdx.x; i < n_vocab; i += blockDim.x) {
            const uint64_t k = order_key(logit_at(row, bits, pen, i), i);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1);
        }
        __syncthreads();
        if (threadIdx.x < 32) {  // warp 0 finds the bucket: lane L holds digits 255-8L..248-8L
            const int lane = threadIdx.x;
            int c[8], s = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) s += c[j] = hist[255 - lane * 8 - j];
            int incl = s;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += v;
            }
            if (incl - s < need && need <= incl) {  // exactly one lane
                int above = incl - s, digit = -1, count = 0;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (digit >= 0) continue;
                    if (above + c[j] >= need) digit = 255 - lane * 8 - j, count = c[j];
                    else above += c[j];
                }
                sel[0] = digit, sel[1] = above, sel[2] = count;
            }
        }
        __syncthreads();
        need -= sel[1];
        prefix |= uint64_t(sel[0]) << shift;
        mask |= uint64_t(0xffu) << shift;
        if (sel[2] == need) break;  // the same for every thread
    }
    return prefix;
}

// Sorts keys[0, n) largest first, n a power of two (bitonic network, n <= blockDim.x).
__device__ void sort_descending(uint64_t* keys, int n) {
    for (int k = 2; k <= n; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            const int i = threadIdx.x, p = i ^ j;
            if (i < n && p > i) {
                const uint64_t a = keys[i], b = keys[p];
                if (((i & k) == 0) == (a < b)) keys[i] = b, keys[p] = a;
            }
            __syncthreads();
        }
}

// The sum of x over the block: a fixed tree (the same bits every run; no float atomics).
__device__ double block_sum(double x, double* part) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (lane == 0) part[warp] = x;
    __syncthreads();
    if (warp == 0) {
        x = lane < int(blockDim.x >> 5) ? part[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
        if (lane == 0) part[0] = x;
    }
    __syncthreads();
    return part[0];
}

__global__ void __launch_bounds__(kThreads)
    sample_rows_kernel(const SampleRow* rows, int32_t n_vocab, int32_t n_words, int32_t* out) {
    extern __shared__ uint32_t penalized_bits[];  // (n_words) bit i: id i is penalized
    __shared__ uint64_t s_keys[kSampleCandidates];
    __shared__ double s_probs[kSampleCandidates];
    __shared__ int32_t s_ids[kSampleCandidates];
    __shared__ int32_t s_hist[256];
    __shared__ int32_t s_sel[3];
    __shared__ double s_part[kWarps];
    __shared__ float s_best[kWarps];
    __shared__ int32_t s_best_id[kWarps];
    __shared__ int32_t s_count;

    const SampleRow row = rows[blockIdx.x];
    const int32_t tid = threadIdx.x;
    const bool pen = row.n_penalized > 0;
    if (pen) {
        for (int32_t w = tid; w < n_words; w += blockDim.x) penalized_bits[w] = 0;
        __syncthreads();
        for (int32_t j = tid; j < row.n_penalized; j += blockDim.x) {
            const int32_t t = row.penalized[j];
            if (t >= 0 && t < n_vocab) atomicOr(&penalized_bits[t >> 5], 1u << (t & 31));
        }
        __syncthreads();
    }

    if (row.temperature <= 0.0f) {  // greedy: the lowest id of the largest logit
        float best = -INFINITY;
        int32_t best_id = INT32_MAX;
        for (int32_t i = tid; i < n_vocab; i += blockDim.x) {
            const float l = logit_at(row, penalized_bits, pen, i);
            if (l > best || (l == best && i < best_id)) best = l, best_id = i;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float b = __shfl_xor_sync(0xffffffffu, best, o);
            const int32_t bi = __shfl_xor_sync(0xffffffffu, best_id, o);
            if (b > best || (b == best && bi < best_id)) best = b, best_id = bi;
        }
        if ((tid & 31) == 0) s_best[tid >> 5] = best, s_best_id[tid >> 5] = best_id;
        __syncthreads();
        if (tid == 0) {
            for (int w = 1; w < int(blockDim.x >> 5); ++w)
                if (s_best[w] > best || (s_best[w] == best && s_best_id[w] < best_id))
                    best = s_best[w], best_id = s_best_id[w];
            out[blockIdx.x] = best_id;
        }
        return;
    }

    // The candidates: the m best of the set (the k best with top-k, else the vocabulary).
    const bool top_k = row.top_k > 0 && row.top_k < n_vocab;
    const int32_t set_size = top_k ? row.top_k : n_vocab;
    const int32_t m = set_size < kSampleCandidates ? set_size : kSampleCandidates;
    const bool complete = m == set_size;
    const uint64_t threshold = select_key(row, penalized_bits, pen, n_vocab, m, s_hist, s_sel);
    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int32_t i = tid; i < n_vocab; i += blockDim.x) {
        const uint64_t k = order_key(logit_at(row, penalized_bits, pen, i), i);
        if (k >= threshold) {  // exactly m of them (keys are unique); the guard is cheap
            const int32_t at = atomicAdd(&s_count, 1);
            if (at < m) s_keys[at] = k;
        }
    }
    int n_sort = 1;
    while (n_sort < m) n_sort <<= 1;
    for (int32_t i = m + tid; i < n_sort; i += blockDim.x) s_keys[i] = 0;  // below every key
    __syncthreads();
    sort_descending(s_keys, n_sort);

    // Weights as the CPU computes them: exp((l - max) / t) in double.
    const double max_logit = key_logit(s_keys[0]);
    const double t = row.temperature;
    for (int32_t i = tid; i < m; i += blockDim.x) {
        const uint64_t k = s_keys[i];
        s_ids[i] = key_id(k);
        s_probs[i] = exp((double(key_logit(k)) - max_logit) / t);
    }
    __syncthreads();
    double sum;
    if (complete && top_k) {  // the CPU's sum: the k best, best first
        if (tid == 0) {
            double s = 0.0;
            for (int32_t i = 0; i < m; ++i) s += s_probs[i];
            s_part[0] = s;
        }
        __syncthreads();
        sum = s_part[0];
    } else {  // the whole set, past the candidates too (its last bits may differ from the CPU's)
        const uint64_t floor_key =
            top_k ? select_key(row, penalized_bits, pen, n_vocab, row.top_k, s_hist, s_sel) : 0;
        double local = 0.0;
        for (int32_t i = tid; i < n_vocab; i += blockDim.x) {
            const float l = logit_at(row, penalized_bits, pen, i);
            if (order_key(l, i) >= floor_key) local += exp((double(l) - max_logit) / t);
        }
        sum = block_sum(local, s_part);
    }
    for (int32_t i = tid; i < m; i += blockDim.x) s_probs[i] /= sum;
    __syncthreads();
    if (tid == 0)
        out[blockIdx.x] = draw_from_prefix(s_probs, s_ids, m, complete, row.u, row.top_p, row.min_p);
}

}  // namespace

cudaError_t sample_rows(const SampleRow* rows, int32_t n_rows, int32_t n_vocab, int32_t* out,
                        cudaStream_t stream) {
    if (n_rows < 0 || n_vocab < 1 || n_vocab > kSampleMaxVocab) return cudaErrorInvalidValue;
    if (n_rows == 0) return cudaSuccess;
    if (rows == nullptr || out == nullptr) return cudaErrorInvalidValue;
    const int32_t n_words = (n_vocab + 31) / 32;
    const size_t smem = size_t(n_words) * 4;
    if (smem > kMaxBitmapBytes) return cudaErrorInvalidValue;
#if defined(__CUDACC__)
    // Static and dynamic shared memory above 48 KiB in all (vocabularies past ~220k ids)
    // need the opt-in (the sim does not model it).
    if (smem + kStaticSmem > 48 * 1024) {
        const cudaError_t err = cudaFuncSetAttribute(
            sample_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        if (err != cudaSuccess) return err;
    }
#endif
    sample_rows_kernel<<<unsigned(n_rows), kThreads, smem, stream>>>(rows, n_vocab, n_words, out);
    return cudaGetLastError();
}

}  // namespace pyr::kernels
