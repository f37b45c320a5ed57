// Shared device helpers of the kernels: the 16-bit element types, conversions, warp
// reductions and the dispatch from kernels::Dt to a C++ type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace pyr::kernels {

// (Host code uses them too: device.cu's tensor-core check.)
template <typename T> __host__ __device__ __forceinline__ float to_f32(T x);
template <> __host__ __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __host__ __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) {
    return __bfloat162float(x);
}
template <typename T> __host__ __device__ __forceinline__ T from_f32(float x);
template <> __host__ __device__ __forceinline__ __half from_f32<__half>(float x) {
    return __float2half_rn(x);
}
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// 8 consecutive 16-bit elements, loaded as one 16-byte access, widened to fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float out[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_f32(e[i]);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// SwiGLU of one gate and up value: silu(g) * u. One formula for silu_mul and gemv_swiglu,
// whose results must agree bit for bit.
__device__ __forceinline__ float swiglu(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

// Programmatic dependent launch (Hopper). A kernel launched early (gemv.cu: launch_early)
// may start while the kernel before it in the stream still runs: its blocks take the SMs that
// kernel leaves idle, start reading what does not depend on it (the weights), and
// wait_for_prior_grid() holds them until that kernel has finished and its writes are visible.
// A kernel that often precedes one calls let_next_grid_start() as it begins; without it the
// next grid starts only as this one ends. Both compile to nothing before sm_90 (and in
// tools/cuda_sim, whose launches run one after another anyway).
__device__ __forceinline__ void let_next_grid_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Asks L2 to fetch the 128-byte line holding p; nothing waits for it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// Tensor cores (sm_80+): c += A (16x16) B (16x8) for one warp, fp32 sums, elements of T
// (mma.sync.aligned.m16n8k16). Every lane of the warp calls it with its registers in the PTX
// ISA's fragment layout; with g = lane / 4 and t = lane % 4, two elements a register, the
// first in the low half:
//   a[0] A[g][2t, 2t+1]   a[1] A[g+8][2t, 2t+1]   a[2] A[g][2t+8, 2t+9]   a[3] A[g+8][2t+8, 2t+9]
//   b[0] B[2t, 2t+1][g]   b[1] B[2t+8, 2t+9][g]
//   c[0], c[1] C[g][2t, 2t+1]   c[2], c[3] C[g+8][2t, 2t+1]
// tools/cuda_sim computes the same product from the same layout.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same_v<T, __half>)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
                     "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                     "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif !defined(__CUDACC__)
    pyr_sim::mma_m16n8k16<T>(c, a, b);
#else
    __trap();  // no tensor-core path is launched on an older device (attention_mma.cu checks)
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory into a warp's registers, one
// instruction (ldmatrix.sync.aligned.m8n8.x4, sm_75+): lane 8m + r passes the address of
// row r of matrix m (8 consecutive elements, 16-byte aligned); register m of the lane with
// g = lane / 4, t = lane % 4 then holds matrix m's elements [g][2t], [g][2t + 1], or with
// TRANS [2t][g], [2t + 1][g] -- B fragment registers read from rows of keys (n-major) or,
// transposed, from rows of values (k-major). Every lane of the warp calls it.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr)
                     : "memory");  // it reads shared memory: not moved across its writes
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr)
                     : "memory");
#elif !defined(__CUDACC__)
    pyr_sim::ldmatrix_x4(r, row, TRANS);
#else
    __trap();  // as mma_m16n8k16: only the tensor-core kernels use it
#endif
}

// Copies from global to shared memory that the thread does not wait for (cp.async, sm_80+):
// cp_async16 queues 16 bytes from src to dst (both 16-byte aligned), or 16 zeros where
// !valid (src is not read then, but must be a valid address); cp_async_commit closes the
// thread's group of copies queued since the last; cp_async_wait<N> waits until at most the
// N newest of the thread's groups are still in flight. Other threads' copies are seen after
// their waits and a __syncthreads.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
#elif !defined(__CUDACC__)
    pyr_sim::cp_async(dst, src, 16, valid ? 16 : 0);
#else
    __trap();  // as mma_m16n8k16: only the tensor-core kernels use it
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#elif !defined(__CUDACC__)
    pyr_sim::cp_async_commit();
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#elif !defined(__CUDACC__)
    pyr_sim::cp_async_wait(N);
#endif
}

// The B fragments of two 8-column tiles, n and n + 1, of a 16-row step, from a staged tile
// (LD elements a row) in one ldmatrix_x4: b[0..1] for tile n, b[2..3] for tile n + 1. B is
// the tile's rows [row0, row0 + 16) and columns [col0, col0 + 16) as B[k][n] = tile[k][n]
// (TRANS: rows along k, values) or B[k][n] = tile[n][k] (rows along n, keys): the four 8x8
// matrices are (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
template <bool TRANS, typename T, int LD>
__device__ __forceinline__ void b_fragments(const T* tile, int32_t row0, int32_t col0, uint32_t (&b)[4]) {
    const int lane = threadIdx.x & 31, m = lane >> 3, r = lane & 7;
    const int k8 = 8 * (m & 1), n8 = 8 * (m >> 1);  // matrix m's first k and n
    ldmatrix_x4<TRANS>(b, TRANS ? tile + (row0 + k8 + r) * LD + col0 + n8
                                : tile + (row0 + n8 + r) * LD + col0 + k8);
}

// Where a lane's fragment elements lie (the layout above), for the kernels that fill and
// read fragments; tensor_cores() checks these on the device. Register `reg' of an A fragment
// holds A[a_row][a_col] and A[a_row][a_col + 1]; register `reg' of a B fragment B[b_k][b_n]
// and B[b_k + 1][b_n]; accumulator element i is C[c_row][c_col].
__device__ __forceinline__ int a_row(int lane, int reg) { return (lane >> 2) + 8 * (reg & 1); }
__device__ __forceinline__ int a_col(int lane, int reg) { return 2 * (lane & 3) + 8 * (reg >> 1); }
__device__ __forceinline__ int b_k(int lane, int reg) { return 2 * (lane & 3) + 8 * reg; }
__device__ __forceinline__ int b_n(int lane) { return lane >> 2; }
__device__ __forceinline__ int c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
__device__ __forceinline__ int c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// Two 16-bit elements in one register, `lo' in the low half (the fragment layout's order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
    T e[2] = {lo, hi};
    uint32_t r;
    memcpy(&r, e, sizeof r);
    return r;
}

// The A fragment of a 16-column step from two accumulator tiles (columns 0-7: `lo', 8-15:
// `hi'), rounded to T: the accumulator layout holds each element where the A layout wants
// it, so one product (attention's probabilities) feeds the next without leaving registers.
template <typename T>
__device__ __forceinline__ void a_from_accumulators(const float lo[4], const float hi[4], uint32_t a[4]) {
    a[0] = pack2(from_f32<T>(lo[0]), from_f32<T>(lo[1]));
    a[1] = pack2(from_f32<T>(lo[2]), from_f32<T>(lo[3]));
    a[2] = pack2(from_f32<T>(hi[0]), from_f32<T>(hi[1]));
    a[3] = pack2(from_f32<T>(hi[2]), from_f32<T>(hi[3]));
}

// A paged KV cache (kernels.h: kKvPageRows): its gap, the slots before its row 0.
__device__ __forceinline__ int32_t kv_gap(KvPages table) {
    return int32_t(reinterpret_cast<uintptr_t>(table[0]));
}

// Slot s of a paged KV cache: its key, or its value when `value`. row_elems = kv_dim.
template <typename T>
__device__ __forceinline__ T* kv_slot(KvPages table, int32_t s, int64_t row_elems, bool value) {
    T* page = static_cast<T*>(table[1 + s / kKvPageRows]);
    return page + (int64_t(value ? kKvPageRows : 0) + s % kKvPageRows) * row_elems;
}

// Row j of a paged KV cache: slot gap + j.
template <typename T>
__device__ __forceinline__ T* kv_row(KvPages table, int32_t j, int64_t row_elems, bool value) {
    return kv_slot<T>(table, kv_gap(table) + j, row_elems, value);
}

inline unsigned blocks_for(int64_t n, int threads) {
    return unsigned((n + threads - 1) / threads);
}

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace pyr::kernels

// Runs `body` with `T` bound to the C++ type of kernels::Dt `dt`.
#define PYR_DISPATCH_DT(dt, body)                                                   \
    do {                                                                            \
        if ((dt) == ::pyr::kernels::Dt::F16) {                                      \
            using T = __half;                                                       \
            body;                                                                   \
        } else {                                                                    \
            using T = __nv_bfloat16;                                                \
            body;                                                                   \
        }                                                                           \
    } while (0)
