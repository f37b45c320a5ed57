// cuda-sim: what a .cu file sees of the device, on the host. run.sh force-includes this
// header (-include) in every kernel file, whose launches `k<<<g, b, smem, s>>>(args)' it has
// rewritten into `::pyr_sim::launch(k, "k", g, b, smem, s)(args)'.
//
// Model: the blocks of a launch run one after another on each of a few worker threads
// (in parallel across workers); the threads of a block are fibers on their worker, switched
// only at __syncthreads and the warp operations, which are therefore real barriers. Hence
// __shared__ variables are per worker thread (block_shared below; `static thread_local'
// where the rewrite does not recognise the declaration): every fiber of the running block
// sees the same object, and the block running on another worker has its own.
#pragma once

// Defined before the toolkit headers: their crt/host_defines.h keeps definitions it finds.
#define __global__
#define __device__
#define __host__
#define __shared__ static thread_local
#define __constant__
#define __launch_bounds__(...)

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// The toolkit's own runtime header: its declarations compile as host code (cuda_fp16.h
// pulls them in anyway); sim_runtime.cpp defines the calls the kernels and tests make.
#include <cuda_runtime.h>

// Per worker thread; the scheduler sets threadIdx before it resumes a fiber.
extern thread_local uint3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

namespace pyr_sim {

// ---- launches --------------------------------------------------------------------------

struct LaunchSpec {
    const char* name;
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
};
// Runs every thread of every block of the launch (each calls body(closure)) and returns when
// all are done: cudaSuccess, or cudaErrorLaunchFailure after a fault in the kernel (reported
// on stderr).
cudaError_t run_launch(const LaunchSpec& spec, void (*body)(const void*), const void* closure);
// A launch as the runtime receives it: the configuration is checked now (an invalid one is the
// launch's error), then the launch runs at once, or, while spec.stream is capturing, becomes a
// node of the capture's graph that runs at each replay, with these arguments. The outcome is
// the calling thread's last error (cudaGetLastError), as for a real launch.
void submit_launch(const LaunchSpec& spec, void (*body)(const void*),
                   std::shared_ptr<const void> closure);

// Queues `op' on `stream' (the runtime's calls and cuBLAS use it too): runs it now, or while
// the stream captures records it, to run at each replay of the graph. Returns the call's
// status, also the thread's last error when it is one.
cudaError_t enqueue(cudaStream_t stream, std::string what, std::function<cudaError_t()> op);
// Whether [p, p + bytes) lies inside one cudaMalloc'd block.
bool is_device_range(const void* p, size_t bytes);

template <typename... P>
struct Launcher {
    void (*kernel)(P...);
    LaunchSpec spec;

    template <typename... A>
    void operator()(A&&... args) const {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong argument count");
        // Kernel arguments are copied once, converted to the parameter types, as CUDA does
        // (a captured launch keeps this copy for its replays); each thread then gets its own
        // copy of them through the call.
        using Args = std::tuple<std::decay_t<P>...>;
        struct Closure {
            void (*kernel)(P...);
            Args args;
        };
        auto closure = std::make_shared<const Closure>(Closure{kernel, Args(std::forward<A>(args)...)});
        submit_launch(spec, [](const void* c) {
            const Closure* cl = static_cast<const Closure*>(c);
            std::apply(cl->kernel, cl->args);
        }, std::move(closure));
    }
};

template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block,
                      size_t smem = 0, cudaStream_t stream = nullptr) {
    return {kernel, {name, grid, block, smem, stream}};
}

// The running block's dynamic shared memory (extern __shared__), 16-byte aligned.
void* dynamic_smem();

// A __shared__ variable (the rewrite names each declaration by its __COUNTER__): one object
// per worker thread, registered so that every block starts with it full of 0xFF bytes, as
// shared memory starts as garbage on the device. (Equal ids in different files share the
// object: harmless, one kernel runs on a worker at a time.)
void register_shared(void* p, size_t bytes);
template <typename T, int Id>
T& block_shared() {
    alignas(16) static thread_local T object;
    static thread_local const bool registered = (register_shared(&object, sizeof(T)), true);
    (void)registered;
    return object;
}

// ---- warps -----------------------------------------------------------------------------

struct Exchange {
    const uint64_t* slots;  // the value each lane of the warp put in, by lane
    int lane;               // the caller's lane
};
// Puts v in the caller's slot and waits until every lane of the warp has done the same:
// the barrier behind every warp operation. `mask' must name all lanes of the warp, all
// still running (the kernels' only use; anything else is reported as a fault).
Exchange warp_exchange(unsigned mask, uint64_t v);

template <typename T>
uint64_t to_slot(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a wide type");
    uint64_t s = 0;
    std::memcpy(&s, &v, sizeof(T));
    return s;
}
template <typename T>
T from_slot(uint64_t s) {
    T v;
    std::memcpy(&v, &s, sizeof(T));
    return v;
}

}  // namespace pyr_sim

void __syncthreads();

inline void __syncwarp(unsigned mask = 0xffffffffu) { pyr_sim::warp_exchange(mask, 0); }

// Shuffles within segments of `width' lanes (a power of two), as the PTX shfl modes: a
// source past the caller's segment returns the caller's own value.
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
    const pyr_sim::Exchange e = pyr_sim::warp_exchange(mask, pyr_sim::to_slot(v));
    const int base = e.lane & ~(width - 1);
    return pyr_sim::from_slot<T>(e.slots[base + (src & (width - 1))]);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
    const pyr_sim::Exchange e = pyr_sim::warp_exchange(mask, pyr_sim::to_slot(v));
    const int src = e.lane ^ lane_mask, end = (e.lane & ~(width - 1)) + width;
    return src < end ? pyr_sim::from_slot<T>(e.slots[src]) : v;
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    const pyr_sim::Exchange e = pyr_sim::warp_exchange(mask, pyr_sim::to_slot(v));
    const int src = e.lane + int(delta), end = (e.lane & ~(width - 1)) + width;
    return src < end ? pyr_sim::from_slot<T>(e.slots[src]) : v;
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    const pyr_sim::Exchange e = pyr_sim::warp_exchange(mask, pyr_sim::to_slot(v));
    const int src = e.lane - int(delta), base = e.lane & ~(width - 1);
    return src >= base ? pyr_sim::from_slot<T>(e.slots[src]) : v;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    const pyr_sim::Exchange e = pyr_sim::warp_exchange(mask, pred != 0);
    unsigned bits = 0;
    for (int l = 0; l < warpSize; ++l)
        if (mask >> l & 1u) bits |= unsigned(e.slots[l] != 0) << l;
    return bits;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// ---- tensor cores: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} ----------------------
// common.cuh's mma_m16n8k16 calls this here. D = A (16x16) B (16x8) + C, fp32 sums, from the
// registers every lane of the warp holds, in the PTX ISA's fragment layout ("Matrix Fragments
// for mma.m16n8k16 with floating point type"; g = lane / 4, t = lane % 4, two 16-bit elements
// a register, the lower-numbered one in the low half):
//   a[0] A[g][2t..2t+1]  a[1] A[g+8][2t..2t+1]  a[2] A[g][2t+8..2t+9]  a[3] A[g+8][2t+8..2t+9]
//   b[0] B[2t..2t+1][g]  b[1] B[2t+8..2t+9][g]
//   c[0..1] C[g][2t..2t+1]  c[2..3] C[g+8][2t..2t+1]
// Each lane widens its own registers to floats once and shares a pointer to them in a warp
// exchange (so the whole warp must call it, as on the device); a second exchange holds every
// lane until all have read.
namespace pyr_sim {
template <typename T>
void mma_m16n8k16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    static_assert(sizeof(T) == 2, "16-bit elements");
    struct Elements {
        float a[8], b[4];  // register i's elements at 2i (low half) and 2i + 1
    };
    Elements mine;
    auto widen = [](const uint32_t* regs, int n, float* out) {
        for (int i = 0; i < n; ++i) {
            T v[2];
            std::memcpy(v, &regs[i], 4);
            out[2 * i] = float(v[0]);
            out[2 * i + 1] = float(v[1]);
        }
    };
    widen(a, 4, mine.a);
    widen(b, 2, mine.b);
    const Exchange e = warp_exchange(0xffffffffu, to_slot(&mine));
    const Elements* lane[32];
    for (int l = 0; l < 32; ++l) lane[l] = from_slot<const Elements*>(e.slots[l]);
    auto A = [&](int r, int k) { return lane[(r % 8) * 4 + (k % 8) / 2]->a[2 * ((r >= 8) + 2 * (k >= 8)) + k % 2]; };
    auto B = [&](int k, int n) { return lane[n * 4 + (k % 8) / 2]->b[2 * (k >= 8) + k % 2]; };
    const int g = e.lane / 4, t = e.lane % 4;
    // d[i] = C[r][n] + sum over k in order of A[r][k] B[k][n], with r = g + 8 (i / 2) and
    // n = 2t + i % 2: the lane's rows and columns gathered first, then the four sums side by
    // side (each in its own order, so the same bits as one after the other). They were a third
    // of a prefill-heavy engine test's time, which fell from 172 s to 153 s. A product of two
    // 16-bit values is exact in fp32 (short of underflow): fused into an FMA (Makefile:
    // PYR_SIM_FMA) or not, the sums are the same.
    float rows[2][16], cols[2][16];
    for (int k = 0; k < 16; ++k) {
        rows[0][k] = A(g, k);
        rows[1][k] = A(g + 8, k);
        cols[0][k] = B(k, 2 * t);
        cols[1][k] = B(k, 2 * t + 1);
    }
    float d0 = c[0], d1 = c[1], d2 = c[2], d3 = c[3];  // registers, not an array gcc keeps in memory
    for (int k = 0; k < 16; ++k) {
        d0 += rows[0][k] * cols[0][k];
        d1 += rows[0][k] * cols[1][k];
        d2 += rows[1][k] * cols[0][k];
        d3 += rows[1][k] * cols[1][k];
    }
    warp_exchange(0xffffffffu, 0);
    c[0] = d0;
    c[1] = d1;
    c[2] = d2;
    c[3] = d3;
}
}  // namespace pyr_sim

// common.cuh's ldmatrix_x4 calls this here (ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16):
// four 8x8 matrices of 16-bit elements; lane 8m + r names row r of matrix m (8 consecutive
// elements); register m of lane (g = lane / 4, t = lane % 4) receives matrix m's elements
// [g][2t], [g][2t + 1] or, transposed, [2t][g], [2t + 1][g], the first in the low half. The
// lanes' row addresses travel in a warp exchange (the whole warp must call it, as on the
// device); the rows are read before a second exchange lets any lane go on.
namespace pyr_sim {
// Faults the block unless [row, row + bytes) lies in the block's shared memory, 16-byte aligned.
void check_shared_rows(const void* row, size_t bytes, const char* op);

// common.cuh's cp_async16 / cp_async_commit / cp_async_wait call these here: a copy of
// `bytes' from global to shared memory, its first src_bytes from src and zeros after them.
// Some blocks land each copy at once, the others only when the thread's cp_async_wait
// leaves fewer groups pending than its groups (sim_runtime.cpp: run_block), so that both a
// missing barrier and a missing or lax wait give wrong data.
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);

inline void ldmatrix_x4(uint32_t r[4], const void* row, bool trans) {
    check_shared_rows(row, 16, "ldmatrix");
    const Exchange e = warp_exchange(0xffffffffu, to_slot(row));
    const int g = e.lane / 4, t = e.lane % 4;
    auto at = [&](int m, int rr, int c) {  // element c of row rr of matrix m, as its bits
        uint16_t v;
        std::memcpy(&v, from_slot<const uint8_t*>(e.slots[8 * m + rr]) + 2 * c, 2);
        return uint32_t(v);
    };
    uint32_t out[4];
    for (int m = 0; m < 4; ++m)
        out[m] = trans ? at(m, 2 * t, g) | at(m, 2 * t + 1, g) << 16
                       : at(m, g, 2 * t) | at(m, g, 2 * t + 1) << 16;
    warp_exchange(0xffffffffu, 0);
    std::memcpy(r, out, sizeof out);
}
}  // namespace pyr_sim

// ---- atomics: real ones, since blocks on different workers run at the same time ----------
// The value operand does not take part in deduction, as with CUDA's overloads
// (atomicAdd(unsigned*, 1) is fine).

namespace pyr_sim {
template <typename T>
struct same {
    using type = T;
};
template <typename T>
using same_t = typename same<T>::type;
}  // namespace pyr_sim

template <typename T>
T atomicAdd(T* p, pyr_sim::same_t<T> v) {
    if constexpr (std::is_integral_v<T>) {
        return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    } else {  // float, double: compare-and-swap on the bits
        T old, want;
        __atomic_load(p, &old, __ATOMIC_RELAXED);
        do want = old + v;
        while (!__atomic_compare_exchange(p, &old, &want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        return old;
    }
}
template <typename T>
T atomicSub(T* p, pyr_sim::same_t<T> v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
template <typename T>
T atomicExch(T* p, pyr_sim::same_t<T> v) {
    T old;
    __atomic_exchange(p, &v, &old, __ATOMIC_RELAXED);
    return old;
}
template <typename T>
T atomicCAS(T* p, pyr_sim::same_t<T> expected, pyr_sim::same_t<T> desired) {
    __atomic_compare_exchange(p, &expected, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return expected;  // the old value either way
}
template <typename T>
T atomicOr(T* p, pyr_sim::same_t<T> v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
// Only what the kernels use; atomicMax/Min and friends are left out until one needs them.

// ---- device math and loads ------------------------------------------------------------
// The fast intrinsics are the accurate host functions: the sim is at least as exact.

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
// nvcc never fuses __fmul_rn, __fadd_rn and __fsub_rn into a multiply-add, though it fuses
// plain a * b + c (its default --fmad=true). Here the product, and the sum's operands, pass
// through an empty asm the optimiser cannot see through, so that no multiply-add spans them in
// a build that fuses the rest (-mfma -ffp-contract=fast: a check of code that relies on these
// roundings).
namespace pyr_sim {
inline float unfused(float v) {
#if defined(__x86_64__) || defined(__i386__)
    asm("" : "+x"(v));
#elif defined(__aarch64__)
    asm("" : "+w"(v));
#else
    asm("" : "+m"(v));
#endif
    return v;
}
}  // namespace pyr_sim
inline float __fmul_rn(float x, float y) { return pyr_sim::unfused(x * y); }
inline float __fadd_rn(float x, float y) { return pyr_sim::unfused(x) + pyr_sim::unfused(y); }
inline float __fsub_rn(float x, float y) { return pyr_sim::unfused(x) - pyr_sim::unfused(y); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
template <typename T>
T __ldg(const T* p) { return *p; }
inline unsigned __float_as_uint(float x) {
    unsigned u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

// CUDA's min and max of mixed arithmetic types, in the global namespace as on the device.
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    return C(a) < C(b) ? C(b) : C(a);
}
