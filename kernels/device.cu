// What the current device can run: the library's kernels at all (built for its
// architecture), and the tensor-core kernels: compute capability 8.0 or newer, the kernels
// built for it, and the register layout that common.cuh transcribes from the PTX ISA
// (mma_m16n8k16, a_row & co.) confirmed by the device itself.
//
// The tensor cores' check: products of small integers, exact in every 16-bit type and in fp32 sums, made
// the ways attention_mma_kernel makes them. S = A B + C with B's fragments loaded from shared
// memory as keys are (b_fragments from an n-major copy) and again as values are (transposed,
// from a k-major copy); then P V with P the A fragment built from two accumulator tiles of S
// (a_from_accumulators). The host compares each with its own product. A device or toolkit
// that placed an element elsewhere (mma or ldmatrix) would give other numbers here, and
// attention then stays on the CUDA cores instead of computing wrong values.
#include <atomic>
#include <cstdint>
#include <vector>

#include "common.cuh"

namespace pyr::kernels {
namespace {

// One warp. a (16, 16), bt (16, 16) = B's transpose (n-major: keys), b (16, 16) = B
// (k-major: values), c (16, 16), v (16, 16), all row-major; out: S as keys (16, 16), S as
// values (16, 16), P V (16, 16) with P = S rounded to T. Dynamic shared memory: 3 x 256 T.
template <typename T>
__global__ void tensor_core_check_kernel(const T* a, const T* bt, const T* b, const float* c,
                                         const T* v, float* out) {
    const int lane = threadIdx.x;
    extern __shared__ float smem[];
    T* const s_bt = reinterpret_cast<T*>(smem);
    T* const s_b = s_bt + 256;
    T* const s_v = s_b + 256;
    for (int i = lane; i < 256; i += 32) s_bt[i] = bt[i], s_b[i] = b[i], s_v[i] = v[i];
    __syncthreads();
    uint32_t af[4];
    for (int reg = 0; reg < 4; ++reg) {
        const T* e = a + a_row(lane, reg) * 16 + a_col(lane, reg);
        af[reg] = pack2(e[0], e[1]);
    }
    uint32_t from_keys[4], from_values[4], from_v[4];  // two 8-column tiles each
    b_fragments<false, T, 16>(s_bt, 0, 0, from_keys);
    b_fragments<true, T, 16>(s_b, 0, 0, from_values);
    b_fragments<true, T, 16>(s_v, 0, 0, from_v);
    float s_keys[2][4], s_values[2][4];  // the two 8-column tiles of S
    for (int tile = 0; tile < 2; ++tile) {
        for (int i = 0; i < 4; ++i)
            s_keys[tile][i] = s_values[tile][i] = c[c_row(lane, i) * 16 + tile * 8 + c_col(lane, i)];
        mma_m16n8k16<T>(s_keys[tile], af, from_keys + 2 * tile);
        mma_m16n8k16<T>(s_values[tile], af, from_values + 2 * tile);
        for (int i = 0; i < 4; ++i) {
            const int at = c_row(lane, i) * 16 + tile * 8 + c_col(lane, i);
            out[at] = s_keys[tile][i];
            out[256 + at] = s_values[tile][i];
        }
    }
    uint32_t pa[4];
    a_from_accumulators<T>(s_keys[0], s_keys[1], pa);
    for (int tile = 0; tile < 2; ++tile) {
        float pv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma_m16n8k16<T>(pv, pa, from_v + 2 * tile);
        for (int i = 0; i < 4; ++i) out[512 + c_row(lane, i) * 16 + tile * 8 + c_col(lane, i)] = pv[i];
    }
}

template <typename T>
TensorCores check_on_device() {
#ifdef __CUDACC__  // tools/cuda_sim has no devices to refuse, and runs the check as it is
    int dev = 0, major = 0;
    cudaFuncAttributes attr{};  // PTX for older GPUs that the driver compiles reads 80+ as
                                // its binary version, below 80 as its PTX version
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        major < 8 ||
        cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(tensor_core_check_kernel<T>)) != cudaSuccess ||
        attr.binaryVersion < 80 || attr.ptxVersion < 80) {
        cudaGetLastError();
        return TensorCores::Absent;
    }
#endif
    // integers in [-2, 2]: |S| <= 16 * 4 + 2 = 66 and |P V| <= 16 * 66 * 2, all exact
    auto small = [](int i, int salt) { return float((i * 7 + salt * 3 + i / 5) % 5 - 2); };
    std::vector<T> a(256), bt(256), b(256), v(256);
    std::vector<float> c(256);
    for (int i = 0; i < 256; ++i) {
        a[size_t(i)] = from_f32<T>(small(i, 1));
        b[size_t(i)] = from_f32<T>(small(i, 2));
        c[size_t(i)] = small(i, 3);
    }
    for (int k = 0; k < 16; ++k)
        for (int n = 0; n < 16; ++n) bt[size_t(n * 16 + k)] = b[size_t(k * 16 + n)];
    for (int i = 0; i < 256; ++i) v[size_t(i)] = from_f32<T>(small(i, 4));
    std::vector<float> want(768, 0.0f);
    for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 16; ++n) {
            float s = c[size_t(r * 16 + n)];
            for (int k = 0; k < 16; ++k) s += to_f32(a[size_t(r * 16 + k)]) * to_f32(b[size_t(k * 16 + n)]);
            want[size_t(r * 16 + n)] = want[size_t(256 + r * 16 + n)] = s;
        }
    for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 16; ++n) {
            float s = 0.0f;
            for (int k = 0; k < 16; ++k) s += want[size_t(r * 16 + k)] * to_f32(v[size_t(k * 16 + n)]);
            want[size_t(512 + r * 16 + n)] = s;
        }

    // device copies: a | bt | b | v (16-bit), then c | out (fp32)
    void* mem = nullptr;
    const size_t halves = 256 * 4, bytes = halves * 2 + (256 + 768) * 4;
    if (cudaMalloc(&mem, bytes) != cudaSuccess) {
        cudaGetLastError();
        return TensorCores::Unchecked;
    }
    T* d_a = static_cast<T*>(mem);
    T *d_bt = d_a + 256, *d_b = d_bt + 256, *d_v = d_b + 256;
    float* d_c = reinterpret_cast<float*>(d_v + 256);
    float* d_out = d_c + 256;
    std::vector<float> got(768);
    bool ran = cudaMemcpy(d_a, a.data(), 512, cudaMemcpyHostToDevice) == cudaSuccess &&
               cudaMemcpy(d_bt, bt.data(), 512, cudaMemcpyHostToDevice) == cudaSuccess &&
               cudaMemcpy(d_b, b.data(), 512, cudaMemcpyHostToDevice) == cudaSuccess &&
               cudaMemcpy(d_v, v.data(), 512, cudaMemcpyHostToDevice) == cudaSuccess &&
               cudaMemcpy(d_c, c.data(), 1024, cudaMemcpyHostToDevice) == cudaSuccess;
    if (ran) {
        tensor_core_check_kernel<T><<<1, 32, 3 * 256 * sizeof(T)>>>(d_a, d_bt, d_b, d_c, d_v, d_out);
        ran = cudaGetLastError() == cudaSuccess &&
              cudaMemcpy(got.data(), d_out, 768 * 4, cudaMemcpyDeviceToHost) == cudaSuccess;
    }
    cudaFree(mem);
    cudaGetLastError();
    if (!ran) return TensorCores::Unchecked;
    return got == want ? TensorCores::Usable : TensorCores::LayoutMismatch;
}

}  // namespace

cudaError_t kernels_runnable() {
#ifdef __CUDACC__
    // any kernel: they are all built for the same architectures
    cudaFuncAttributes attr{};
    const cudaError_t e =
        cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(tensor_core_check_kernel<__half>));
    if (e != cudaSuccess) cudaGetLastError();
    return e;
#else
    return cudaSuccess;  // tools/cuda_sim runs them all
#endif
}

TensorCores tensor_cores(Dt dt) {
    constexpr int kDevices = 16;
    static std::atomic<int> verdict[kDevices][2];  // TensorCores + 1; 0: not asked yet
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices) {
        cudaGetLastError();
        return TensorCores::Unchecked;
    }
    std::atomic<int>& v = verdict[dev][dt == Dt::F16 ? 0 : 1];
    int known = v.load(std::memory_order_relaxed);
    if (known == 0) {
        TensorCores found = TensorCores::Unchecked;
        PYR_DISPATCH_DT(dt, found = check_on_device<T>());
        known = int(found) + 1;
        if (found != TensorCores::Unchecked) v.store(known, std::memory_order_relaxed);
    }
    return TensorCores(known - 1);
}

const char* tensor_cores_name(TensorCores t) {
    switch (t) {
        case TensorCores::Usable: return "usable";
        case TensorCores::Absent: return "absent (compute capability below 8.0, or kernels not built for it)";
        case TensorCores::LayoutMismatch: return "not used: their register layout on this device differs from the kernels' (check failed)";
        case TensorCores::Unchecked: return "not used: the check could not run";
    }
    return "?";
}

}  // namespace pyr::kernels
