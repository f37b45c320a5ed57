#include "backend/cuda/cuda_linear.h"

#include <algorithm>

#include "common/env.h"

namespace pyr::cuda {

// PYRAMID_CUDA_GEMV_MAX=0 sends every product to cuBLAS (for comparing the two paths).
static int gemv_max_tokens() {
    static const int n =
        std::clamp(env_int("PYRAMID_CUDA_GEMV_MAX", kernels::kGemvMaxTokens), 0, kernels::kGemvMaxTokens);
    return n;
}

// PYRAMID_FUSE_SWIGLU=0 keeps gemv + silu_mul for a few tokens too (for timing the fusion).
static bool fuse_swiglu() {
    static const bool on = env_int("PYRAMID_FUSE_SWIGLU", 1) != 0;
    return on;
}

bool linear_uses_gemv(int32_t n) { return n <= gemv_max_tokens(); }

void linear(Context& ctx, cudaStream_t stream, kernels::Dt dt, const void* W, int32_t rows,
            int32_t cols, const void* a, int32_t n, float* y, int32_t ld, bool accumulate) {
    if (n <= 0) return;
    if (linear_uses_gemv(n)) {
        PYR_CUDA_CHECK(kernels::gemv(dt, W, rows, cols, a, n, y, ld, accumulate ? 1.0f : 0.0f,
                                     stream));
        return;
    }
    // Row-major y (n, rows) = a (n, cols) W^T is column-major y^T = W^T(col-major (cols, rows))^T a^T.
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    const cudaDataType_t t = dt == kernels::Dt::F16 ? CUDA_R_16F : CUDA_R_16BF;
    PYR_CUBLAS_CHECK(cublasSetStream(ctx.cublas(), stream));
    // after each cublasSetStream, which resets the workspace to cuBLAS's own
    PYR_CUBLAS_CHECK(cublasSetWorkspace(ctx.cublas(), ctx.gemm_workspace(), ctx.gemm_workspace_bytes()));
    PYR_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &alpha,
                                  W, t, cols, a, t, cols, &beta, y, CUDA_R_32F, ld,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void linear_swiglu(Context& ctx, cudaStream_t stream, kernels::Dt dt, const void* W_gate_up,
                   const void* b_gate_up, int32_t n_ff, int32_t cols, const void* a, int32_t n,
                   float* gu, void* h) {
    if (n <= 0) return;
    if (!b_gate_up && linear_uses_gemv(n) && fuse_swiglu()) {
        PYR_CUDA_CHECK(kernels::gemv_swiglu(dt, W_gate_up, n_ff, cols, a, n, h, stream));
        return;
    }
    linear(ctx, stream, dt, W_gate_up, 2 * n_ff, cols, a, n, gu, 2 * n_ff, false);
    if (b_gate_up)
        PYR_CUDA_CHECK(kernels::add_bias(dt, gu, n, 2 * n_ff, 2 * n_ff, b_gate_up, stream));
    PYR_CUDA_CHECK(kernels::silu_mul(dt, gu, n, n_ff, h, stream));
}

}  // namespace pyr::cuda
