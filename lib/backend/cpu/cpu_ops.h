// The CPU ops of the LLaMA forward pass, one concept each: fp32 math on weights of any
// dtype (F32/F16/BF16 converted to fp32 on the fly). Activations are fp32, token-major.
// Each op has a plain-loop reference in tests/backend/test_cpu_ops.cpp; to add an op, add
// it here with its shapes, implement it in cpu_ops.cpp and test it against such a loop.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "common/thread_pool.h"
#include "model/model.h"

namespace pyr::cpu {

// One projection of a matmul: y (n_tok, w.rows) = x (n_tok, w.cols) W^T (+ b).
// `b` may be null or an absent Tensor (no bias).
struct Projection {
    const Tensor* w = nullptr;
    const Tensor* b = nullptr;
    float* y = nullptr;
};

// Runs the projections of one input x (n_tok, n_in) in a single parallel pass over their
// output rows (q/k/v or gate/up share a pass). Every w must have n_in columns.
void matmul(ThreadPool& pool, const float* x, int64_t n_tok,
            std::initializer_list<Projection> projections);

// y (n_tok, n) = x * rsqrt(mean(x^2) + eps) * w, with w a [n] tensor of any dtype.
// y may alias x.
void rmsnorm(const float* x, int64_t n_tok, const Tensor& w, float eps, float* y);

// HF rotate-half RoPE in place on x (n_tok, n_head, head_dim), with cos, sin
// (n_tok, head_dim/2) from rope_cos_sin (model/rope.h).
void rope_apply(float* x, int64_t n_tok, int n_head, int head_dim, const float* cos,
                const float* sin);

// Attention of one sequence's queries against its cached keys/values. A cached key is
// visible to a query iff key position <= query position (causal by position, so caches
// with dropped tokens work); query head h reads kv head h / (n_head / n_head_kv).
struct AttentionArgs {
    const float* q = nullptr;         // (n_q, n_head, head_dim), after RoPE
    const int32_t* q_pos = nullptr;   // (n_q)
    int32_t n_q = 0;
    const float* k = nullptr;         // (n_kv, n_head_kv, head_dim), after RoPE
    const float* v = nullptr;         // (n_kv, n_head_kv, head_dim)
    const int32_t* kv_pos = nullptr;  // (n_kv)
    int32_t n_kv = 0;
    int n_head = 0;
    int n_head_kv = 0;
    int head_dim = 0;
    float* out = nullptr;             // (n_q, n_head, head_dim); zeros where nothing is visible
    // Optional observations for KV policies (null = not wanted):
    float* probs = nullptr;           // (n_q - probs_from, n_head, n_kv): the softmax
    int32_t probs_from = 0;           //   probabilities of queries t >= probs_from; 0 if masked
    float* col_sums = nullptr;        // (n_head, n_kv) += probabilities summed over all queries
};
// out = softmax(q k^T / sqrt(head_dim), masked) v, softmax in fp32 with max subtraction.
void attention(ThreadPool& pool, const AttentionArgs& args);

// gate (n) = silu(gate) * up  (SwiGLU).
void silu_mul(float* gate, const float* up, int64_t n);

// y (n) += x (n)  (residual).
void add(float* y, const float* x, int64_t n);

// out (n_tok, table.cols) = rows `tokens` of table, converted to fp32. Ids must be valid.
void embed(const Tensor& table, const int32_t* tokens, int32_t n_tok, float* out);

// Converts elements [first, first + n) of a tensor (flat, row-major) to fp32.
void to_f32(const Tensor& t, int64_t first, int64_t n, float* dst);

// The vector kernels in use: "avx2+fma+f16c" when the CPU has them, else "generic".
// set_simd_enabled(false) forces the generic kernels (tests, benchmarks); not thread-safe
// against a running forward.
const char* kernel_name();
void set_simd_enabled(bool enabled);

// ---- private: the kernel set shared by cpu_ops.cpp and cpu_matmul.cpp -----------------
namespace detail {

// Vector kernels on fp32 data, one implementation per kernel set (cpu_ops.cpp).
struct Kernels {
    const char* name;
    bool simd;  // the AVX2/FMA/F16C set (matmul_kernels() follows it)
    void (*f16_to_f32)(const uint16_t* src, float* dst, int64_t n);
    float (*dot)(const float* a, const float* b, int64_t n);
    // out[j] = dot(q, k + j*stride, n) for j < n_keys (attention scores of one query).
    void (*dots)(const float* q, const float* k, int64_t stride, int64_t n, int64_t n_keys,
                 float* out);
    // out[d] += sum_j p[j] * v[j*stride + d] for d < n (attention output of one query).
    void (*weighted_sum)(const float* p, const float* v, int64_t stride, int64_t n,
                         int64_t n_keys, float* out);
    // p[j] = softmax(p * scale)[j] for j < n, in place; -inf entries (masked) become 0.
    // At least one entry must be finite.
    void (*softmax)(float* p, int64_t n, float scale);
};

// The set in use: SIMD when the CPU has it and set_simd_enabled has not turned it off.
const Kernels& kernels();

// Matrix kernels (cpu_matmul.cpp), of the same set; the attention uses the tiles too.
inline constexpr int kTileRows = 6;
inline constexpr int kTileCols = 16;
struct MatmulKernels {
    // out[r] = dot(x, w + r*n), r < 4: four consecutive weight rows against one input.
    void (*dot4)(const float* x, const float* w, int64_t n, float* out);
    // dot4 reading F16 rows directly (decode: no converted copy); null when absent.
    void (*dot4_f16)(const float* x, const uint16_t* w, int64_t n, float* out);
    // out (n_t, kTileCols) = x (n_t, n_k) w (n_k, kTileCols) for n_t <= kTileRows, rows of
    // x ldx apart, of w ldw apart, of out ldo apart; each output an fp32 sum over k in order.
    void (*tile)(const float* x, int64_t ldx, int n_t, const float* w, int64_t ldw,
                 int64_t n_k, float* out, int64_t ldo);
    // dst[k * kTileCols + i] = rows[i * ld + k] for i < 8, k < n: eight rows of a matrix
    // transposed into eight columns of a tile's w.
    void (*pack8)(const float* rows, int64_t ld, int64_t n, float* dst);
};
const MatmulKernels& matmul_kernels();

}  // namespace detail
}  // namespace pyr::cpu
