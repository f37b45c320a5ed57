#include "backend/cpu/cpu_ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "common/error.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYR_CPU_X86_SIMD 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace pyr::cpu {

// ---- vector kernels -------------------------------------------------------------------
// Two sets chosen once at runtime: portable loops that -O3 vectorises, and AVX2/FMA/F16C
// intrinsics (compiled with target attributes, so the build needs no -march flag).

namespace {

using detail::Kernels;

// f16 -> f32 for every half value, built once (thread-safe static initialisation). Faster
// than branch-free bit manipulation with SSE2 only (measured: 2.5 vs 1.8 Gelem/s).
const float* f16_table() {
    static const std::vector<float> table = [] {
        std::vector<float> t(65536);
        for (uint32_t i = 0; i < 65536; ++i) t[i] = f16_to_f32(uint16_t(i));
        return t;
    }();
    return table.data();
}

void f16_to_f32_lut(const uint16_t* src, float* dst, int64_t n) {
    const float* lut = f16_table();
    for (int64_t i = 0; i < n; ++i) dst[i] = lut[src[i]];
}

void bf16_to_f32_loop(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits = uint32_t(src[i]) << 16;
        std::memcpy(dst + i, &bits, 4);
    }
}

// Eight independent accumulators: the reduction order is fixed, so the compiler can
// vectorise it without -ffast-math.
float dot_generic(const float* a, const float* b, int64_t n) {
    float acc[8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

void dots_generic(const float* q, const float* k, int64_t stride, int64_t n, int64_t n_keys,
                  float* out) {
    for (int64_t j = 0; j < n_keys; ++j) out[j] = dot_generic(q, k + j * stride, n);
}

void weighted_sum_generic(const float* p, const float* v, int64_t stride, int64_t n,
                          int64_t n_keys, float* out) {
    for (int64_t j = 0; j < n_keys; ++j)
        for (int64_t d = 0; d < n; ++d) out[d] += p[j] * v[j * stride + d];
}

void softmax_generic(float* p, int64_t n, float scale) {
    float max_s = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
        p[j] *= scale;
        max_s = std::max(max_s, p[j]);
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        p[j] = std::exp(p[j] - max_s);
        sum += p[j];
    }
    for (int64_t j = 0; j < n; ++j) p[j] /= sum;
}

const Kernels kGeneric{"generic",           false,          f16_to_f32_lut, dot_generic,
                       dots_generic,        weighted_sum_generic, softmax_generic};

#ifdef PYR_CPU_X86_SIMD
__attribute__((target("avx2,fma,f16c"))) void f16_to_f32_f16c(const uint16_t* src, float* dst,
                                                               int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

__attribute__((target("avx2,fma"))) float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    if (i + 8 <= n) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        i += 8;
    }
    float s = hsum(_mm256_add_ps(s0, s1));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// Sums of eight vectors: lane i of the result is the sum of a[i]'s eight lanes.
__attribute__((target("avx2,fma"))) inline __m256 hsum8(const __m256* a) {
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                         _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// Eight keys at a time: q is loaded once per eight FMAs and the eight independent
// accumulators keep both FMA ports busy; one reduction gives the eight scores.
__attribute__((target("avx2,fma"))) void dots_avx2(const float* q, const float* k,
                                                   int64_t stride, int64_t n, int64_t n_keys,
                                                   float* out) {
    const int64_t n8 = n & ~int64_t(7);
    int64_t j = 0;
    for (; j + 8 <= n_keys; j += 8) {
        const float* kj = k + j * stride;
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < n8; d += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d);
            for (int i = 0; i < 8; ++i)
                acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kj + i * stride + d), acc[i]);
        }
        _mm256_storeu_ps(out + j, hsum8(acc));
        for (int64_t d = n8; d < n; ++d)
            for (int i = 0; i < 8; ++i) out[j + i] += q[d] * kj[i * stride + d];
    }
    for (; j < n_keys; ++j) out[j] = dot_avx2(q, k + j * stride, n);
}

// out[0 .. 8*NV) += sum_j p[j] * v[j*stride + ...]: the output block stays in NV registers
// over all keys (NV = 8 gives the eight independent chains that fill both FMA ports).
template <int NV>
__attribute__((target("avx2,fma"))) void weighted_sum_block(const float* p, const float* v,
                                                            int64_t stride, int64_t n_keys,
                                                            float* out) {
    __m256 acc[NV];
    for (int i = 0; i < NV; ++i) acc[i] = _mm256_loadu_ps(out + 8 * i);
    for (int64_t j = 0; j < n_keys; ++j) {
        const __m256 pj = _mm256_broadcast_ss(p + j);
        const float* vj = v + j * stride;
        for (int i = 0; i < NV; ++i)
            acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * i), acc[i]);
    }
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

__attribute__((target("avx2,fma"))) void weighted_sum_avx2(const float* p, const float* v,
                                                           int64_t stride, int64_t n,
                                                           int64_t n_keys, float* out) {
    int64_t d = 0;
    for (; d + 64 <= n; d += 64) weighted_sum_block<8>(p, v + d, stride, n_keys, out + d);
    for (; d + 32 <= n; d += 32) weighted_sum_block<4>(p, v + d, stride, n_keys, out + d);
    for (; d + 8 <= n; d += 8) weighted_sum_block<1>(p, v + d, stride, n_keys, out + d);
    for (; d < n; ++d)
        for (int64_t j = 0; j < n_keys; ++j) out[d] += p[j] * v[j * stride + d];
}

// exp(x) for x <= 0 (Cephes expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n;
// within 1 ulp of std::exp on every 8th float tried), 0 below -87.3 where 2^n leaves the
// normal range.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpos(__m256 x) {
    const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

__attribute__((target("avx2,fma"))) void softmax_avx2(float* p, int64_t n, float scale) {
    const int64_t n8 = n & ~int64_t(7);
    const __m256 vscale = _mm256_set1_ps(scale);
    __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n8; j += 8) {
        const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(p + j), vscale);
        _mm256_storeu_ps(p + j, s);
        vmax = _mm256_max_ps(vmax, s);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float max_s = std::max(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_shuffle_ps(m4, m4, 1)));
    for (int64_t j = n8; j < n; ++j) {
        p[j] *= scale;
        max_s = std::max(max_s, p[j]);
    }
    const __m256 vmax_s = _mm256_set1_ps(max_s);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
        const __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(p + j), vmax_s));
        _mm256_storeu_ps(p + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (int64_t j = n8; j < n; ++j) {
        p[j] = std::exp(p[j] - max_s);
        sum += p[j];
    }
    const __m256 vsum_s = _mm256_set1_ps(sum);
    for (int64_t j = 0; j < n8; j += 8)
        _mm256_storeu_ps(p + j, _mm256_div_ps(_mm256_loadu_ps(p + j), vsum_s));
    for (int64_t j = n8; j < n; ++j) p[j] /= sum;
}

const Kernels kSimd{"avx2+fma+f16c",    true,           f16_to_f32_f16c, dot_avx2,
                    dots_avx2,          weighted_sum_avx2, softmax_avx2};

bool cpu_has_simd() {
    __builtin_cpu_init();  // avx2/fma checks include the OS saving YMM registers
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return false;
    unsigned a, b, c, d;  // clang's builtin does not know "f16c": ask cpuid
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
}
#endif

std::atomic<bool> g_simd_enabled{true};

}  // namespace

const Kernels& detail::kernels() {
#ifdef PYR_CPU_X86_SIMD
    static const bool has_simd = cpu_has_simd();
    if (has_simd && g_simd_enabled.load(std::memory_order_relaxed)) return kSimd;
#endif
    return kGeneric;
}

using detail::kernels;

const char* kernel_name() { return kernels().name; }
void set_simd_enabled(bool enabled) { g_simd_enabled.store(enabled); }

void to_f32(const Tensor& t, int64_t first, int64_t n, float* dst) {
    switch (t.dtype) {
        case DType::F32:
            std::memcpy(dst, static_cast<const float*>(t.data) + first, size_t(n) * 4);
            break;
        case DType::F16:
            kernels().f16_to_f32(static_cast<const uint16_t*>(t.data) + first, dst, n);
            break;
        case DType::BF16:
            bf16_to_f32_loop(static_cast<const uint16_t*>(t.data) + first, dst, n);
            break;
    }
}

// ---- element-wise ops -----------------------------------------------------------------

void rmsnorm(const float* x, int64_t n_tok, const Tensor& w, float eps, float* y) {
    const int64_t n = w.rows * w.cols;
    std::vector<float> wf(static_cast<size_t>(n));
    to_f32(w, 0, n, wf.data());
    for (int64_t t = 0; t < n_tok; ++t) {
        const float* xt = x + t * n;
        float* yt = y + t * n;
        double sum_sq = 0.0;
        for (int64_t i = 0; i < n; ++i) sum_sq += double(xt[i]) * double(xt[i]);
        const float inv_rms = 1.0f / std::sqrt(float(sum_sq / double(n)) + eps);
        for (int64_t i = 0; i < n; ++i) yt[i] = wf[size_t(i)] * (xt[i] * inv_rms);
    }
}

void rope_apply(float* x, int64_t n_tok, int n_head, int head_dim, const float* cos,
                const float* sin) {
    const int half = head_dim / 2;
    for (int64_t t = 0; t < n_tok; ++t) {
        const float* c = cos + t * half;
        const float* s = sin + t * half;
        for (int h = 0; h < n_head; ++h) {
            float* xh = x + (t * n_head + h) * head_dim;
            for (int i = 0; i < half; ++i) {
                const float a = xh[i];
                const float b = xh[i + half];
                xh[i] = a * c[i] - b * s[i];
                xh[i + half] = b * c[i] + a * s[i];
            }
        }
    }
}

void silu_mul(float* gate, const float* up, int64_t n) {
    for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void add(float* y, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void embed(const Tensor& table, const int32_t* tokens, int32_t n_tok, float* out) {
    const int64_t n = table.cols;
    for (int32_t t = 0; t < n_tok; ++t) to_f32(table, int64_t(tokens[t]) * n, n, out + t * n);
}

// ---- attention ------------------------------------------------------------------------
// A work item is a block of queries that read the same kv head: a few tokens times the
// query heads of one kv group (or single heads in decode, so every thread has an item).
// Softmax has two passes over a full row of scores per query (scratch): it gives the
// probabilities the KV policies observe. Two ways to compute the scores and outputs:
//   - per query (few tokens: decode): dot products over key chunks, then the weighted sum
//     of the value rows; a chunk's keys (values) stay in L1 for every query of the block,
//     so they come from L2/L3 once per block, not once per query;
//   - tiled (prefill): the keys are transposed once per call into 16-key panels, so that
//     scores (queries x 16 keys) and outputs (queries x 16 dims, from the probabilities
//     and the value rows in place) are the register tiles of the matmul (cpu_matmul.cpp).

namespace {

constexpr int32_t kTiledMinTokens = 4;  // fewer tokens go per query
constexpr int kBlockQueries = 12;       // tiled: about this many queries per block

// Keys per chunk: 32 KiB of one head's keys (or values).
int32_t key_chunk(int hd) { return std::max(8, int32_t(32 * 1024 / (4 * hd)) / 8 * 8); }

struct AttentionPlan {
    bool sorted;      // kv_pos non-decreasing: each query sees a prefix of the keys
    bool tiled;
    int group;        // query heads per block (consecutive, one kv head)
    int32_t tokens;   // tokens per block
    int64_t ld;       // scores row stride: n_kv rounded up to kTileCols
    const float* kt;  // tiled: the keys as panels (n_head_kv, ld / 16, head_dim, 16)
};

// The keys of kv head g, keys [16 b, 16 b + 16) as panel kt[g][b] (zeros past n_kv).
void transpose_keys(const detail::MatmulKernels& mk, const AttentionArgs& a, int64_t ld,
                    int64_t g, int64_t b, float* kt, std::vector<float>& rows) {
    const int hd = a.head_dim;
    const int64_t kv_stride = int64_t(a.n_head_kv) * hd;
    float* panel = kt + (g * (ld / detail::kTileCols) + b) * hd * detail::kTileCols;
    for (int64_t j0 = b * detail::kTileCols; j0 < (b + 1) * detail::kTileCols; j0 += 8) {
        const float* src = a.k + j0 * kv_stride + g * hd;
        int64_t ld_src = kv_stride;
        if (j0 + 8 > a.n_kv) {  // the last keys, padded with zero rows
            rows.assign(size_t(8 * hd), 0.0f);
            for (int64_t j = j0; j < a.n_kv; ++j)
                std::copy_n(a.k + j * kv_stride + g * hd, hd, rows.data() + (j - j0) * hd);
            src = rows.data();
            ld_src = hd;
        }
        mk.pack8(src, ld_src, hd, panel + (j0 - b * detail::kTileCols));
    }
}

// Queries of tokens [t0, t1) x heads [h0, h0 + p.group). scratch: this thread's buffer;
// sums: this thread's col_sums (n_head, n_kv) or null.
void attend_block(const Kernels& kr, const detail::MatmulKernels& mk, const AttentionArgs& a,
                  const AttentionPlan& p, int32_t t0, int32_t t1, int h0,
                  std::vector<float>& scratch, float* sums) {
    constexpr int R = detail::kTileRows, C = detail::kTileCols;
    const int hd = a.head_dim, n_h = p.group;
    const int nq = (t1 - t0) * n_h;  // query i: token t0 + i / n_h, head h0 + i % n_h
    const int64_t kv_stride = int64_t(a.n_head_kv) * hd;
    const int64_t g = h0 / (a.n_head / a.n_head_kv);
    const float* v = a.v + g * hd;
    const int32_t chunk = key_chunk(hd);
    const size_t need = size_t(nq) * size_t(p.ld + 2 * hd) + size_t(R * C);
    if (scratch.size() < need) scratch.resize(need);
    float* scores = scratch.data();                  // (nq, ld)
    float* qb = scores + size_t(nq) * size_t(p.ld);  // (nq, hd) tiled: the queries
    float* ob = qb + size_t(nq) * size_t(hd);        // (nq, hd) tiled: the outputs
    float* tmp = ob + size_t(nq) * size_t(hd);       // (R, C)
    auto offset = [&](int i) { return (int64_t(t0 + i / n_h) * a.n_head + h0 + i % n_h) * hd; };

    // Token t sees keys [0, n_vis) at most: up to its last visible one.
    int32_t n_vis[kBlockQueries], n_max = 0;
    for (int32_t t = t0; t < t1; ++t) {
        int32_t n = a.n_kv;
        if (p.sorted) {
            n = int32_t(std::upper_bound(a.kv_pos, a.kv_pos + a.n_kv, a.q_pos[t]) - a.kv_pos);
        } else {
            while (n > 0 && a.kv_pos[n - 1] > a.q_pos[t]) --n;
        }
        n_vis[t - t0] = n;
        n_max = std::max(n_max, n);
    }
    auto vis = [&](int i) { return n_vis[i / n_h]; };

    // scores
    if (p.tiled) {
        for (int i = 0; i < nq; ++i) std::copy_n(a.q + offset(i), hd, qb + i * hd);
        for (int32_t b = 0; b * C < n_max; ++b) {
            const float* kt = p.kt + (g * (p.ld / C) + b) * hd * C;
            for (int i = 0; i < nq; i += R)
                mk.tile(qb + i * hd, hd, std::min(R, nq - i), kt, C, hd,
                        scores + i * p.ld + b * C, p.ld);
        }
    } else {
        for (int32_t c = 0; c < n_max; c += chunk)
            for (int i = 0; i < nq; ++i)
                if (c < vis(i))
                    kr.dots(a.q + offset(i), a.k + c * kv_stride + g * hd, kv_stride, hd,
                            std::min(c + chunk, vis(i)) - c, scores + i * p.ld + c);
    }

    // probabilities, observations
    const float scale = 1.0f / std::sqrt(float(hd));
    for (int i = 0; i < nq; ++i) {
        const int32_t t = t0 + i / n_h, h = h0 + i % n_h;
        float* s = scores + i * p.ld;
        bool any = vis(i) > 0;
        if (!p.sorted) {
            any = false;
            for (int32_t j = 0; j < vis(i); ++j) {
                const bool masked = a.kv_pos[j] > a.q_pos[t];
                if (masked) s[j] = -std::numeric_limits<float>::infinity();
                any = any || !masked;
            }
        }
        if (any) kr.softmax(s, vis(i), scale);
        std::fill(s + (any ? vis(i) : 0), s + a.n_kv, 0.0f);
        if (a.probs && t >= a.probs_from)
            std::copy_n(s, a.n_kv,
                        a.probs + ((int64_t(t) - a.probs_from) * a.n_head + h) * a.n_kv);
        if (sums)
            for (int32_t j = 0; j < a.n_kv; ++j) sums[int64_t(h) * a.n_kv + j] += s[j];
    }

    // outputs
    if (!p.tiled) {
        for (int i = 0; i < nq; ++i) std::fill_n(a.out + offset(i), hd, 0.0f);
        for (int32_t c = 0; c < n_max; c += chunk)
            for (int i = 0; i < nq; ++i)
                if (c < vis(i))
                    kr.weighted_sum(scores + i * p.ld + c, v + c * kv_stride, kv_stride, hd,
                                    std::min(c + chunk, vis(i)) - c, a.out + offset(i));
        return;
    }
    // Beyond its own n_vis a query's probabilities are 0, so the block runs to n_max.
    const int hd_tiles = hd / C * C;
    std::fill_n(ob, size_t(nq) * size_t(hd), 0.0f);
    for (int32_t c = 0; c < n_max; c += chunk) {
        const int32_t n = std::min(chunk, n_max - c);
        for (int d = 0; d < hd_tiles; d += C) {
            for (int i = 0; i < nq; i += R) {
                const int n_t = std::min(R, nq - i);
                mk.tile(scores + i * p.ld + c, p.ld, n_t, v + c * kv_stride + d, kv_stride, n,
                        tmp, C);
                for (int r = 0; r < n_t; ++r)
                    for (int e = 0; e < C; ++e) ob[(i + r) * hd + d + e] += tmp[r * C + e];
            }
        }
        if (hd_tiles < hd)
            for (int i = 0; i < nq; ++i)
                kr.weighted_sum(scores + i * p.ld + c, v + c * kv_stride + hd_tiles, kv_stride,
                                hd - hd_tiles, n, ob + i * hd + hd_tiles);
    }
    for (int i = 0; i < nq; ++i) std::copy_n(ob + i * hd, hd, a.out + offset(i));
}

}  // namespace

void attention(ThreadPool& pool, const AttentionArgs& a) {
    PYR_ASSERT(a.n_head > 0 && a.n_head_kv > 0 && a.n_head % a.n_head_kv == 0);
    PYR_ASSERT(a.head_dim > 0 && a.n_q >= 0 && a.n_kv >= 0);
    PYR_ASSERT(a.probs_from >= 0);
    const Kernels& kr = kernels();
    const detail::MatmulKernels& mk = detail::matmul_kernels();
    const int n_rep = a.n_head / a.n_head_kv;
    AttentionPlan p;
    p.sorted = std::is_sorted(a.kv_pos, a.kv_pos + a.n_kv);
    p.tiled = a.n_q >= kTiledMinTokens;
    p.ld = (int64_t(a.n_kv) + detail::kTileCols - 1) / detail::kTileCols * detail::kTileCols;
    p.group = n_rep;
    p.tokens = p.tiled ? std::max(1, kBlockQueries / n_rep) : 1;
    if (!p.tiled && int64_t(a.n_q) * a.n_head_kv < pool.size()) p.group = 1;
    const int64_t n_tblocks = (a.n_q + p.tokens - 1) / p.tokens;
    const int n_groups = a.n_head / p.group;

    std::vector<float> kt;  // tiled: the keys transposed (as many floats as the keys)
    if (p.tiled) {
        const int64_t n_panels = p.ld / detail::kTileCols;
        kt.resize(size_t(a.n_head_kv * n_panels * a.head_dim * detail::kTileCols));
        p.kt = kt.data();
        pool.parallel_for(a.n_head_kv * n_panels, [&](int64_t i0, int64_t i1) {
            static thread_local std::vector<float> rows;
            for (int64_t i = i0; i < i1; ++i)
                transpose_keys(mk, a, p.ld, i / n_panels, i % n_panels, kt.data(), rows);
        });
    }

    std::mutex sums_mutex;
    pool.parallel_for(n_tblocks * n_groups, [&](int64_t i0, int64_t i1) {
        static thread_local std::vector<float> scratch;
        static thread_local std::vector<float> sums;  // (n_head, n_kv) this chunk's col_sums
        if (a.col_sums) sums.assign(size_t(a.n_head) * size_t(a.n_kv), 0.0f);
        for (int64_t i = i0; i < i1; ++i) {
            // Token blocks in the order first, last, second, second to last...: in a causal
            // prefill the work of a block grows with its position, so chunks get even shares.
            const int64_t u = i / n_groups;
            const int64_t tb = u % 2 == 0 ? u / 2 : n_tblocks - 1 - u / 2;
            const int32_t t0 = int32_t(tb * p.tokens);
            const int32_t t1 = std::min(a.n_q, t0 + p.tokens);
            attend_block(kr, mk, a, p, t0, t1, int(i % n_groups) * p.group, scratch,
                         a.col_sums ? sums.data() : nullptr);
        }
        if (a.col_sums) {
            std::lock_guard<std::mutex> lock(sums_mutex);
            for (size_t j = 0; j < sums.size(); ++j) a.col_sums[j] += sums[j];
        }
    });
}

}  // namespace pyr::cpu
