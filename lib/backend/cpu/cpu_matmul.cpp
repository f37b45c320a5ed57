// cpu::matmul (cpu_ops.h): y (n_tok, n_out) = x (n_tok, n_in) W^T (+ b), fp32 accumulation
// of fp32 activations times F32/F16/BF16 weights converted to fp32. Two paths:
//
// Dot path, fewer than kMinTileTokens tokens (decode): bound by streaming W from memory,
// so each block of four weight rows is dotted with every token, F16 rows read as they are
// for a single token (no converted copy).
//
// Tile path, more tokens (prefill): compute bound once a weight is loaded per several
// tokens rather than per token, so the pass is cache-blocked:
//   - a block of up to kBlockRows rows of W is converted to fp32 once, into a thread-local
//     buffer, as panels of kPanel = 16 rows stored k-major (panel[k * 16 + r] = W[r, k]);
//   - token block by token block (a slice of x sized to stay in L2), every panel is
//     multiplied with the token block one register tile at a time: up to 6 tokens x 16
//     rows in 12 AVX accumulators. Each step of k loads 16 weights (2 vectors) and
//     broadcasts one input per token: 12 FMAs for 8 loads, and no horizontal sums;
//   - a panel (16 x n_in floats: 24 KiB at n_in 384) stays in L1 over the tiles of a token
//     block, and the token block in L2 over the panels of the row block, where the old
//     per-row loop streamed all of x from L2/L3 for every four rows.
// The threads share the row blocks (of all projections of the pass); blocks shrink when
// there would be fewer than four per thread. Each output of the tile path is one fp32 sum
// over k in order, plus the bias.
#include <algorithm>
#include <vector>

#include "backend/cpu/cpu_ops.h"
#include "common/error.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYR_CPU_X86_SIMD 1
#include <immintrin.h>
#endif

namespace pyr::cpu {

namespace {

using detail::Kernels;

constexpr int64_t kMinTileTokens = 5;  // fewer tokens take the dot path (measured)
constexpr int64_t kDotRows = 4;        // rows per dot4 call of the dot path
constexpr int64_t kPanel = detail::kTileCols;  // weight rows per panel (two AVX vectors)
constexpr int64_t kBlockRows = 64;     // largest row block: four panels
constexpr int64_t kTokBlockBytes = 256 * 1024;  // the slice of x kept in L2
constexpr int kTileRows = detail::kTileRows;

// ---- kernels (cpu_ops.h detail::MatmulKernels) ---------------------------------------

void dot4_generic(const float* x, const float* w, int64_t n, float* out) {
    const Kernels& kr = detail::kernels();  // generic whenever this kernel is
    for (int r = 0; r < 4; ++r) out[r] = kr.dot(x, w + r * n, n);
}

// GCC would vectorise the k loop (in-order reductions, with shuffles: 3x slower); the
// loop over the 16 columns is the one to vectorise, which its SLP pass then does.
#if defined(__GNUC__) && !defined(__clang__)
#define PYR_NO_LOOP_VECTORIZE __attribute__((optimize("no-tree-loop-vectorize")))
#else
#define PYR_NO_LOOP_VECTORIZE
#endif

template <int NT>
PYR_NO_LOOP_VECTORIZE void tile_generic_n(const float* x, int64_t ldx, const float* w,
                                          int64_t ldw, int64_t n_k, float* out, int64_t ldo) {
    float acc[NT][kPanel] = {};
    for (int64_t k = 0; k < n_k; ++k) {
        const float* wk = w + k * ldw;
        for (int t = 0; t < NT; ++t) {
            const float xv = x[t * ldx + k];
            for (int c = 0; c < kPanel; ++c) acc[t][c] += xv * wk[c];
        }
    }
    for (int t = 0; t < NT; ++t) std::copy_n(acc[t], kPanel, out + t * ldo);
}

void tile_generic(const float* x, int64_t ldx, int n_t, const float* w, int64_t ldw,
                  int64_t n_k, float* out, int64_t ldo) {
    for (; n_t >= 2; n_t -= 2, x += 2 * ldx, out += 2 * ldo)
        tile_generic_n<2>(x, ldx, w, ldw, n_k, out, ldo);
    if (n_t == 1) tile_generic_n<1>(x, ldx, w, ldw, n_k, out, ldo);
}

void pack8_generic(const float* rows, int64_t ld, int64_t n, float* dst) {
    for (int64_t k = 0; k < n; ++k)
        for (int i = 0; i < 8; ++i) dst[k * kPanel + i] = rows[i * ld + k];
}

#ifdef PYR_CPU_X86_SIMD
// The sum of v's lanes, in the order of cpu_ops.cpp's hsum.
__attribute__((target("avx2,fma"))) float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) void dot4_avx2(const float* x, const float* w, int64_t n,
                                                   float* out) {
    const float* w0 = w;
    const float* w1 = w + n;
    const float* w2 = w + 2 * n;
    const float* w3 = w + 3 * n;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        s0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + i), s0);
        s1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w1 + i), s1);
        s2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w2 + i), s2);
        s3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w3 + i), s3);
    }
    out[0] = hsum(s0);
    out[1] = hsum(s1);
    out[2] = hsum(s2);
    out[3] = hsum(s3);
    for (; i < n; ++i) {
        out[0] += x[i] * w0[i];
        out[1] += x[i] * w1[i];
        out[2] += x[i] * w2[i];
        out[3] += x[i] * w3[i];
    }
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 load_f16x8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,fma,f16c"))) void dot4_f16_avx2(const float* x, const uint16_t* w,
                                                             int64_t n, float* out) {
    const uint16_t* w0 = w;
    const uint16_t* w1 = w + n;
    const uint16_t* w2 = w + 2 * n;
    const uint16_t* w3 = w + 3 * n;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        s0 = _mm256_fmadd_ps(xv, load_f16x8(w0 + i), s0);
        s1 = _mm256_fmadd_ps(xv, load_f16x8(w1 + i), s1);
        s2 = _mm256_fmadd_ps(xv, load_f16x8(w2 + i), s2);
        s3 = _mm256_fmadd_ps(xv, load_f16x8(w3 + i), s3);
    }
    out[0] = hsum(s0);
    out[1] = hsum(s1);
    out[2] = hsum(s2);
    out[3] = hsum(s3);
    for (; i < n; ++i) {
        out[0] += x[i] * f16_to_f32(w0[i]);
        out[1] += x[i] * f16_to_f32(w1[i]);
        out[2] += x[i] * f16_to_f32(w2[i]);
        out[3] += x[i] * f16_to_f32(w3[i]);
    }
}

// a += x[0] * w0, b += x[0] * w1: one row's step of k in a tile.
__attribute__((target("avx2,fma"), always_inline)) inline void fma_row(
    const float* x, __m256 w0, __m256 w1, __m256& a, __m256& b) {
    const __m256 xv = _mm256_broadcast_ss(x);
    a = _mm256_fmadd_ps(xv, w0, a);
    b = _mm256_fmadd_ps(xv, w1, b);
}

__attribute__((target("avx2,fma"), always_inline)) inline void store_row(float* out, __m256 a,
                                                                        __m256 b) {
    _mm256_storeu_ps(out, a);
    _mm256_storeu_ps(out + 8, b);
}

// The accumulators are named, not an array: GCC keeps an array of them in memory.
template <int NT>
__attribute__((target("avx2,fma"))) void tile_avx2_n(const float* x, int64_t ldx,
                                                     const float* w, int64_t ldw, int64_t n_k,
                                                     float* out, int64_t ldo) {
    static_assert(NT >= 1 && NT <= 6);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
    for (int64_t k = 0; k < n_k; ++k) {
        const __m256 w0 = _mm256_loadu_ps(w + k * ldw);
        const __m256 w1 = _mm256_loadu_ps(w + k * ldw + 8);
        fma_row(x + k, w0, w1, a0, b0);
        if constexpr (NT > 1) fma_row(x + ldx + k, w0, w1, a1, b1);
        if constexpr (NT > 2) fma_row(x + 2 * ldx + k, w0, w1, a2, b2);
        if constexpr (NT > 3) fma_row(x + 3 * ldx + k, w0, w1, a3, b3);
        if constexpr (NT > 4) fma_row(x + 4 * ldx + k, w0, w1, a4, b4);
        if constexpr (NT > 5) fma_row(x + 5 * ldx + k, w0, w1, a5, b5);
    }
    store_row(out, a0, b0);
    if constexpr (NT > 1) store_row(out + ldo, a1, b1);
    if constexpr (NT > 2) store_row(out + 2 * ldo, a2, b2);
    if constexpr (NT > 3) store_row(out + 3 * ldo, a3, b3);
    if constexpr (NT > 4) store_row(out + 4 * ldo, a4, b4);
    if constexpr (NT > 5) store_row(out + 5 * ldo, a5, b5);
}

__attribute__((target("avx2,fma"))) void tile_avx2(const float* x, int64_t ldx, int n_t,
                                                   const float* w, int64_t ldw, int64_t n_k,
                                                   float* out, int64_t ldo) {
    switch (n_t) {
        case 6: return tile_avx2_n<6>(x, ldx, w, ldw, n_k, out, ldo);
        case 5: return tile_avx2_n<5>(x, ldx, w, ldw, n_k, out, ldo);
        case 4: return tile_avx2_n<4>(x, ldx, w, ldw, n_k, out, ldo);
        case 3: return tile_avx2_n<3>(x, ldx, w, ldw, n_k, out, ldo);
        case 2: return tile_avx2_n<2>(x, ldx, w, ldw, n_k, out, ldo);
        default: return tile_avx2_n<1>(x, ldx, w, ldw, n_k, out, ldo);
    }
}

// pack8_generic by 8 x 8 transposes in registers.
__attribute__((target("avx2,fma"))) void pack8_avx2(const float* rows, int64_t ld, int64_t n,
                                                    float* dst) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 r[8], s[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows + i * ld + k);
        for (int i = 0; i < 8; i += 2) {  // s[i] = r[i][0] r[i+1][0] r[i][1] r[i+1][1] | ...
            s[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
            s[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {  // r[i + c] = column c of rows i..i+3 | column c+4
            r[i] = _mm256_shuffle_ps(s[i], s[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
            r[i + 1] = _mm256_shuffle_ps(s[i], s[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
            r[i + 2] = _mm256_shuffle_ps(s[i + 1], s[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
            r[i + 3] = _mm256_shuffle_ps(s[i + 1], s[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int c = 0; c < 4; ++c) {
            _mm256_storeu_ps(dst + (k + c) * kPanel, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
            _mm256_storeu_ps(dst + (k + c + 4) * kPanel,
                             _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
        }
    }
    pack8_generic(rows + k, ld, n - k, dst + k * kPanel);
}
#endif

const detail::MatmulKernels kMatmulGeneric{dot4_generic, nullptr, tile_generic, pack8_generic};
#ifdef PYR_CPU_X86_SIMD
const detail::MatmulKernels kMatmulSimd{dot4_avx2, dot4_f16_avx2, tile_avx2, pack8_avx2};
#endif

// ---- the pass -------------------------------------------------------------------------

struct MatmulJob {
    const Tensor* w;
    std::vector<float> bias;  // (w.rows) in fp32, empty when none
    float* y;
    int64_t first_block;      // index of its first row block in the combined pass
    int64_t n_blocks;
};

// y[t, row0 + r] = out[t * ld + r] (+ bias) for t < n_t, r < n_rows.
void store_rows(const float* out, int64_t ld, int64_t n_t, const MatmulJob& job, int64_t row0,
                int64_t n_rows, float* y) {
    const int64_t n_out = job.w->rows;
    for (int64_t t = 0; t < n_t; ++t) {
        float* yt = y + t * n_out + row0;
        const float* ot = out + t * ld;
        if (job.bias.empty()) {
            std::copy_n(ot, n_rows, yt);
        } else {
            for (int64_t r = 0; r < n_rows; ++r) yt[r] = ot[r] + job.bias[size_t(row0 + r)];
        }
    }
}

// Few tokens: y[:, row0 .. row0 + n_rows) with n_rows <= kDotRows, the rows dotted with
// each token (converted to fp32 once; F16 rows are read directly for a single token).
void dot_rows(const Kernels& kr, const detail::MatmulKernels& mk, const float* x,
              int64_t n_tok, const MatmulJob& job, int64_t row0, int64_t n_rows,
              std::vector<float>& buf) {
    const Tensor& w = *job.w;
    const int64_t n_in = w.cols;
    float out[kDotRows];
    if (n_tok == 1 && n_rows == kDotRows && w.dtype == DType::F16 && mk.dot4_f16) {
        mk.dot4_f16(x, static_cast<const uint16_t*>(w.data) + row0 * n_in, n_in, out);
        store_rows(out, kDotRows, 1, job, row0, n_rows, job.y);
        return;
    }
    const float* wr = nullptr;  // (n_rows, n_in)
    if (w.dtype == DType::F32) {
        wr = static_cast<const float*>(w.data) + row0 * n_in;
    } else {
        if (buf.size() < size_t(n_rows * n_in)) buf.resize(size_t(n_rows * n_in));
        to_f32(w, row0 * n_in, n_rows * n_in, buf.data());
        wr = buf.data();
    }
    for (int64_t t = 0; t < n_tok; ++t) {
        const float* xt = x + t * n_in;
        if (n_rows == kDotRows) {
            mk.dot4(xt, wr, n_in, out);
        } else {
            for (int64_t r = 0; r < n_rows; ++r) out[r] = kr.dot(xt, wr + r * n_in, n_in);
        }
        store_rows(out, kDotRows, 1, job, row0, n_rows, job.y + t * w.rows);
    }
}

// Rows [row0, row0 + n_rows) of w as fp32 panels (see the top of the file), the last one
// zero-padded to kPanel rows: eight rows at a time converted into `rows` (8 * n_in floats
// of scratch) and transposed into their panel.
void pack_panels(const detail::MatmulKernels& mk, const Tensor& w, int64_t row0,
                 int64_t n_rows, float* rows, float* panels) {
    const int64_t n_in = w.cols;
    const int64_t padded = (n_rows + kPanel - 1) / kPanel * kPanel;
    for (int64_t r = 0; r < padded; r += 8) {
        const int64_t n = std::clamp<int64_t>(n_rows - r, 0, 8);
        if (n > 0) to_f32(w, (row0 + r) * n_in, n * n_in, rows);
        std::fill(rows + n * n_in, rows + 8 * n_in, 0.0f);
        mk.pack8(rows, n_in, n_in, panels + (r / kPanel) * kPanel * n_in + r % kPanel);
    }
}

// Many tokens: y[:, row0 .. row0 + n_rows) with n_rows <= kBlockRows.
void tile_rows(const detail::MatmulKernels& mk, const float* x, int64_t n_tok,
               const MatmulJob& job, int64_t row0, int64_t n_rows, std::vector<float>& buf) {
    const int64_t n_in = job.w->cols, n_out = job.w->rows;
    const int64_t n_panels = (n_rows + kPanel - 1) / kPanel;
    const size_t panel_floats = size_t(kPanel * n_in);
    // buf: the panels, then eight converted rows
    if (buf.size() < (size_t(n_panels) + 1) * panel_floats) {
        buf.resize((size_t(n_panels) + 1) * panel_floats);
    }
    float* panels = buf.data();
    pack_panels(mk, *job.w, row0, n_rows, panels + size_t(n_panels) * panel_floats, panels);

    const int64_t tok_block =
        std::max<int64_t>(1, kTokBlockBytes / (n_in * int64_t(sizeof(float))) / kTileRows) *
        kTileRows;
    float out[kTileRows * kPanel];
    for (int64_t tb = 0; tb < n_tok; tb += tok_block) {
        const int64_t tb_end = std::min(n_tok, tb + tok_block);
        for (int64_t p = 0; p < n_panels; ++p) {
            const int64_t r0 = p * kPanel;
            const int64_t nr = std::min(kPanel, n_rows - r0);
            for (int64_t t = tb; t < tb_end; t += kTileRows) {
                const int n_t = int(std::min<int64_t>(kTileRows, tb_end - t));
                const float* panel = panels + size_t(p) * panel_floats;
                float* yt = job.y + t * n_out + row0 + r0;
                if (nr < kPanel) {  // the last rows of w: through a full tile
                    mk.tile(x + t * n_in, n_in, n_t, panel, kPanel, n_in, out, kPanel);
                    store_rows(out, kPanel, n_t, job, row0 + r0, nr, job.y + t * n_out);
                    continue;
                }
                mk.tile(x + t * n_in, n_in, n_t, panel, kPanel, n_in, yt, n_out);
                if (!job.bias.empty())
                    for (int i = 0; i < n_t; ++i)
                        for (int64_t r = 0; r < kPanel; ++r)
                            yt[i * n_out + r] += job.bias[size_t(row0 + r0 + r)];
            }
        }
    }
}

}  // namespace

const detail::MatmulKernels& detail::matmul_kernels() {
#ifdef PYR_CPU_X86_SIMD
    if (kernels().simd) return kMatmulSimd;
#endif
    return kMatmulGeneric;
}

void matmul(ThreadPool& pool, const float* x, int64_t n_tok,
            std::initializer_list<Projection> projections) {
    // Rows per block: kDotRows for few tokens, else the largest of 64/32/16 that gives
    // every thread four blocks (or 16).
    int64_t total_rows = 0;
    for (const Projection& p : projections) total_rows += p.w ? p.w->rows : 0;
    const bool tiled = n_tok >= kMinTileTokens;
    int64_t block_rows = kDotRows;
    if (tiled) {
        block_rows = kBlockRows;
        while (block_rows > kPanel && total_rows / block_rows < 4 * int64_t(pool.size()))
            block_rows /= 2;
    }

    std::vector<MatmulJob> jobs;
    int64_t n_blocks = 0;
    for (const Projection& p : projections) {
        PYR_ASSERT(p.w && p.w->data && p.y);
        PYR_ASSERT(p.w->cols == projections.begin()->w->cols);
        MatmulJob job{p.w, {}, p.y, n_blocks, (p.w->rows + block_rows - 1) / block_rows};
        if (p.b && p.b->data) {
            PYR_ASSERT(p.b->rows * p.b->cols == p.w->rows);
            job.bias.resize(size_t(p.w->rows));
            to_f32(*p.b, 0, p.w->rows, job.bias.data());
        }
        n_blocks += job.n_blocks;
        jobs.push_back(std::move(job));
    }
    if (n_tok <= 0) return;
    const Kernels& kr = detail::kernels();
    const detail::MatmulKernels& mk = detail::matmul_kernels();
    pool.parallel_for(n_blocks, [&](int64_t b0, int64_t b1) {
        static thread_local std::vector<float> buf;  // converted weight rows
        size_t j = 0;
        for (int64_t b = b0; b < b1; ++b) {
            while (b >= jobs[j].first_block + jobs[j].n_blocks) ++j;
            const MatmulJob& job = jobs[j];
            const int64_t row0 = (b - job.first_block) * block_rows;
            const int64_t n_rows = std::min(block_rows, job.w->rows - row0);
            if (tiled) {
                tile_rows(mk, x, n_tok, job, row0, n_rows, buf);
            } else {
                dot_rows(kr, mk, x, n_tok, job, row0, n_rows, buf);
            }
        }
    });
}

}  // namespace pyr::cpu
