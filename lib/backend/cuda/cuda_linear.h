// The projections: y (n, ld) fp32 = a (n, cols) . W (rows, cols)^T [+ y], W and a in the
// model's 16-bit type, fp32 accumulation. A few tokens (decode) take the memory-speed gemv
// kernel; more take cuBLAS on the tensor cores.
#pragma once

#include "backend/cuda/cuda_context.h"
#include "kernels/kernels.h"

namespace pyr::cuda {

// Queued on `stream` (the context's, or a stream capturing a graph).
void linear(Context& ctx, cudaStream_t stream, kernels::Dt dt, const void* W, int32_t rows,
            int32_t cols, const void* a, int32_t n, float* y, int32_t ld, bool accumulate);

// Whether products of n tokens take the gemv kernel (else cuBLAS).
bool linear_uses_gemv(int32_t n);

}  // namespace pyr::cuda
