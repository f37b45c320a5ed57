// Matrix times a few token vectors (decode): y = W a (+ y), one warp per output row, W read
// once with 16-byte loads, fp32 accumulation. Larger token counts go to cuBLAS
// (lib/backend/cuda/cuda_linear.cpp). CPU reference: cpu::matmul.
#include <atomic>
#include <type_traits>

#include "common.cuh"
#include "common/env.h"

namespace pyr::kernels {
namespace {

constexpr int kWarps = 8;

// Before its wait for the kernel before it (launched_early), a warp asks L2 for the first
// 4 KiB of each of its rows -- a line per lane -- so that DRAM works while that kernel ends.
// Bounded: the warps resident at once then ask for about L2's size, not more.
template <typename T, int R>
__device__ __forceinline__ void prefetch_rows(const T* const w[R], int32_t cols) {
    const int64_t off = int64_t(threadIdx.x & 31) * (128 / int64_t(sizeof(T)));
    if (off >= cols) return;
#pragma unroll
    for (int r = 0; r < R; ++r) prefetch_l2(w[r] + off);
}

template <typename T, int NT>
__device__ __forceinline__ void accumulate8(const float wf[8], const T* a, int32_t cols,
                                            int32_t c, float acc[NT]) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        float af[8];
        load8(a + int64_t(t) * cols + c, af);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[t] = fmaf(wf[e], af[e], acc[t]);
    }
}

// The dot products of R rows w[r] of W with NT token vectors a (NT, cols), by one warp:
// lane l takes the 16-byte words l, l + 32, ... (or the elements l, l + 32, ... when the rows
// are not 16-byte aligned), then the lanes' partials are summed; every lane returns the sums.
// R independent 16-byte loads per step and four steps unrolled keep 4R loads in flight per
// lane. A row's fmaf's and their order do not depend on R or on the other rows, so every
// caller gets the bits of gemv with one row per warp (gemv_swiglu relies on it).
template <typename T, int NT, int R>
__device__ __forceinline__ void dot_rows(const T* const w[R], int32_t cols, const T* a,
                                         float acc[R][NT]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[r][t] = 0.0f;
    if ((cols & 7) == 0) {
        int32_t c = lane * 8;
        for (; c + 3 * 256 < cols; c += 4 * 256) {
            float wf[4][R][8];
#pragma unroll
            for (int u = 0; u < 4; ++u)
#pragma unroll
                for (int r = 0; r < R; ++r) load8(w[r] + c + u * 256, wf[u][r]);
#pragma unroll
            for (int u = 0; u < 4; ++u)
#pragma unroll
                for (int r = 0; r < R; ++r) accumulate8<T, NT>(wf[u][r], a, cols, c + u * 256, acc[r]);
        }
        for (; c < cols; c += 256) {
            float wf[R][8];
#pragma unroll
            for (int r = 0; r < R; ++r) load8(w[r] + c, wf[r]);
#pragma unroll
            for (int r = 0; r < R; ++r) accumulate8<T, NT>(wf[r], a, cols, c, acc[r]);
        }
    } else {  // rows not 16-byte aligned: element by element
        for (int32_t c = lane; c < cols; c += 32)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float wf = to_f32(w[r][c]);
#pragma unroll
                for (int t = 0; t < NT; ++t)
                    acc[r][t] = fmaf(wf, to_f32(a[int64_t(t) * cols + c]), acc[r][t]);
            }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[r][t] = warp_sum(acc[r][t]);
}

// Each warp computes one row (2 or 4 rows a warp were slower on an H100: 7B decode at 152
// tok/s with 1, 143 with 2, 144 with 4).
template <typename T, int NT>
__global__ void __launch_bounds__(kWarps * 32)
gemv_kernel(const T* W, int32_t rows, int32_t cols, const T* a, float* y, int32_t ld,
            float beta) {
    const int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
    if (r >= rows) return;
    const T* const w[1] = {W + r * cols};
    let_next_grid_start();
    prefetch_rows<T, 1>(w, cols);
    wait_for_prior_grid();  // a and y may be the kernel before's output
    float acc[1][NT];
    dot_rows<T, NT, 1>(w, cols, a, acc);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            float* out = y + int64_t(t) * ld + r;
            *out = beta != 0.0f ? acc[0][t] + beta * *out : acc[0][t];
        }
    }
}

// Warp i computes gate row i and up row n_ff + i together (both rows' loads in flight), then
// h[t, i] = silu(gate) * up: gemv into fp32 and silu_mul without the fp32 round trip.
template <typename T, int NT>
__global__ void __launch_bounds__(kWarps * 32)
gemv_swiglu_kernel(const T* W, int32_t n_ff, int32_t cols, const T* a, T* h) {
    const int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
    if (i >= n_ff) return;
    const T* const w[2] = {W + i * cols, W + (n_ff + i) * cols};
    let_next_grid_start();
    prefetch_rows<T, 2>(w, cols);
    wait_for_prior_grid();  // a is the kernel before's output
    float acc[2][NT];
    dot_rows<T, NT, 2>(w, cols, a, acc);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int t = 0; t < NT; ++t)
            h[int64_t(t) * n_ff + i] = from_f32<T>(swiglu(acc[0][t], acc[1][t]));
    }
}

// Whether launched_early may let kernels overlap on the current device: compute capability 9.0
// or newer, the library's kernels built for it (a build for older GPUs whose PTX the driver
// compiles for a Hopper has no wait in its code: its binary version reads 90, its PTX
// version less), no earlier refusal, and not turned off with PYRAMID_PDL=0 (for comparing).
std::atomic<bool> early_launch_refused{false};

bool early_launch_ok(const void* kernel) {
    static const bool wanted = env_int("PYRAMID_PDL", 1) != 0;
    if (!wanted || early_launch_refused.load(std::memory_order_relaxed)) return false;
    constexpr int kDevices = 16;
    static std::atomic<int> verdict[kDevices];  // 0 unknown, 1 yes, -1 no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices) {
        cudaGetLastError();
        return false;
    }
    int v = verdict[dev].load(std::memory_order_relaxed);
    if (v == 0) {
        int major = 0;
        cudaFuncAttributes attr{};
        const bool ok =
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
            major >= 9 && cudaFuncGetAttributes(&attr, kernel) == cudaSuccess &&
            attr.binaryVersion >= 90 && attr.ptxVersion >= 90;
        cudaGetLastError();
        v = ok ? 1 : -1;
        verdict[dev].store(v, std::memory_order_relaxed);
    }
    return v > 0;
}

// Launches kernel<<<grid, block, 0, stream>>>(args) so that it may start before the kernel
// ahead of it in the stream has ended (programmatic dependent launch; common.cuh): the kernel
// must call wait_for_prior_grid() before it reads or writes anything another kernel touches.
// False where the device or the runtime does not allow it (after a refusal, no more tries):
// then the caller launches it plainly.
template <typename... P, typename... A>
bool launched_early(void (*kernel)(P...), unsigned grid, unsigned block, cudaStream_t stream,
                    A... args) {
#ifdef __CUDACC__  // nvcc; tools/cuda_sim compiles this file with g++ and has no such launch
    if (!early_launch_ok(reinterpret_cast<const void*>(kernel))) return false;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(block);
    config.dynamicSmemBytes = 0;
    config.stream = stream;
    config.attrs = &attr;
    config.numAttrs = 1;
    if (cudaLaunchKernelEx(&config, kernel, args...) == cudaSuccess) return true;
    cudaGetLastError();
    early_launch_refused.store(true, std::memory_order_relaxed);
#endif
    return false;
}

// f(std::integral_constant<int, N>{}) for a token count n in 1..kGemvMaxTokens: the kernels
// are instantiated per count (their accumulators are registers).
template <typename F>
cudaError_t by_token_count(int32_t n, F&& f) {
    static_assert(kGemvMaxTokens == 8, "gemv instantiates 1..8 tokens");
    switch (n) {
        case 1: return f(std::integral_constant<int, 1>{});
        case 2: return f(std::integral_constant<int, 2>{});
        case 3: return f(std::integral_constant<int, 3>{});
        case 4: return f(std::integral_constant<int, 4>{});
        case 5: return f(std::integral_constant<int, 5>{});
        case 6: return f(std::integral_constant<int, 6>{});
        case 7: return f(std::integral_constant<int, 7>{});
        case 8: return f(std::integral_constant<int, 8>{});
        default: return cudaErrorInvalidValue;
    }
}

// dot_rows reads W's rows and a 8 elements (16 bytes) at a time when cols is a multiple of 8.
bool rows_aligned(const void* W, int32_t cols, const void* a) {
    return cols % 8 != 0 || (aligned(W, 16) && aligned(a, 16));
}

template <typename T>
cudaError_t launch(const T* W, int32_t rows, int32_t cols, const T* a, int32_t n, float* y,
                   int32_t ld, float beta, cudaStream_t stream) {
    const unsigned grid = blocks_for(rows, kWarps);
    return by_token_count(n, [&](auto tokens) {
        constexpr int N = decltype(tokens)::value;
        if (!launched_early(gemv_kernel<T, N>, grid, kWarps * 32, stream, W, rows, cols, a, y, ld, beta))
            gemv_kernel<T, N><<<grid, kWarps * 32, 0, stream>>>(W, rows, cols, a, y, ld, beta);
        return cudaGetLastError();
    });
}

template <typename T>
cudaError_t launch_swiglu(const T* W, int32_t n_ff, int32_t cols, const T* a, int32_t n, T* h,
                          cudaStream_t stream) {
    const unsigned grid = blocks_for(n_ff, kWarps);
    return by_token_count(n, [&](auto tokens) {
        constexpr int N = decltype(tokens)::value;
        if (!launched_early(gemv_swiglu_kernel<T, N>, grid, kWarps * 32, stream, W, n_ff, cols, a, h))
            gemv_swiglu_kernel<T, N><<<grid, kWarps * 32, 0, stream>>>(W, n_ff, cols, a, h);
        return cudaGetLastError();
    });
}

}  // namespace

bool early_launches(Dt dt) {
#ifdef __CUDACC__
    PYR_DISPATCH_DT(dt, return early_launch_ok(reinterpret_cast<const void*>(gemv_kernel<T, 1>)));
#else
    (void)dt;
    return false;
#endif
}

cudaError_t gemv(Dt dt, const void* W, int32_t rows, int32_t cols, const void* a, int32_t n,
                 float* y, int32_t ld, float beta, cudaStream_t stream) {
    if (n <= 0 || rows <= 0) return cudaSuccess;
    if (!rows_aligned(W, cols, a)) return cudaErrorMisalignedAddress;
    PYR_DISPATCH_DT(dt, return launch<T>(static_cast<const T*>(W), rows, cols,
                                         static_cast<const T*>(a), n, y, ld, beta, stream));
}

cudaError_t gemv_swiglu(Dt dt, const void* W_gate_up, int32_t n_ff, int32_t cols, const void* a,
                        int32_t n, void* h, cudaStream_t stream) {
    if (n <= 0 || n_ff <= 0) return cudaSuccess;
    if (cols < 0) return cudaErrorInvalidValue;
    if (!rows_aligned(W_gate_up, cols, a)) return cudaErrorMisalignedAddress;
    PYR_DISPATCH_DT(dt, return launch_swiglu<T>(static_cast<const T*>(W_gate_up), n_ff, cols,
                                                static_cast<const T*>(a), n, static_cast<T*>(h),
                                                stream));
}

}  // namespace pyr::kernels
