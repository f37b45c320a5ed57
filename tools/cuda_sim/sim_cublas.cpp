// cuda-sim: the cuBLAS calls of lib/backend/cuda (handles, streams, workspaces,
// cublasGemmEx) on the CPU, for engine mode. A GEMM is queued on the handle's stream like a
// kernel (pyr_sim::enqueue): it runs at once, or is recorded into a capturing stream's graph
// and reads its operands at each replay. Anything else of cuBLAS is absent (a link error names it).

// first: it defines __shared__ & co. before the toolkit headers would
#include "cuda_sim_device.h"

#include <cublas_v2.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

struct cublasContext {  // what cublasHandle_t points at
    cudaStream_t stream = nullptr;
    int device = 0;  // current when it was created: the handle works there only
    // whether the caller gave a workspace (cublasSetWorkspace, maybe of 0 bytes) since the
    // last cublasSetStream, which drops it as cuBLAS does; the GEMMs here need none
    bool workspace_set = false;
};

namespace {

std::mutex handles_mutex;
std::set<cublasContext*> handles;

bool live(cublasHandle_t h) {
    std::lock_guard<std::mutex> lock(handles_mutex);
    return handles.count(h) != 0;
}

float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) {
                man <<= 1;
                --exp;
            }
            bits = sign | exp << 23 | (man & 0x3ffu) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | man << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

float bf16_to_float(uint16_t h) {
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

size_t type_size(cudaDataType t) { return t == CUDA_R_32F ? 4 : 2; }

float element(const void* p, cudaDataType t, size_t i) {
    if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
    uint16_t h;
    std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2);
    return t == CUDA_R_16F ? half_to_float(h) : bf16_to_float(h);
}

typedef float v4 __attribute__((vector_size(16)));

float dot(const float* a, const float* b, int k) {
    v4 s0 = {0, 0, 0, 0}, s1 = s0, s2 = s0, s3 = s0;
    int l = 0;
    for (; l + 16 <= k; l += 16) {
        v4 a0, a1, a2, a3, b0, b1, b2, b3;
        std::memcpy(&a0, a + l, 16);
        std::memcpy(&a1, a + l + 4, 16);
        std::memcpy(&a2, a + l + 8, 16);
        std::memcpy(&a3, a + l + 12, 16);
        std::memcpy(&b0, b + l, 16);
        std::memcpy(&b1, b + l + 4, 16);
        std::memcpy(&b2, b + l + 8, 16);
        std::memcpy(&b3, b + l + 12, 16);
        s0 += a0 * b0;
        s1 += a1 * b1;
        s2 += a2 * b2;
        s3 += a3 * b3;
    }
    const v4 s = (s0 + s1) + (s2 + s3);
    float sum = (s[0] + s[1]) + (s[2] + s[3]);
    for (; l < k; ++l) sum += a[l] * b[l];
    return sum;
}

struct Gemm {
    cublasOperation_t ta, tb;
    int m, n, k;
    const void *A, *B;
    void* C;
    cudaDataType at, bt;
    int lda, ldb, ldc;
    float alpha, beta;  // read at the call (host pointer mode, the only one simulated)

    size_t a_elems() const { return ta == CUBLAS_OP_N ? size_t(lda) * (k - 1) + m : size_t(lda) * (m - 1) + k; }
    size_t b_elems() const { return tb == CUBLAS_OP_N ? size_t(ldb) * (n - 1) + k : size_t(ldb) * (k - 1) + n; }
    size_t c_elems() const { return size_t(ldc) * (n - 1) + m; }

    // Which operand does not lie in one cudaMalloc'd block; null if all do.
    const char* bad_operand() const {
        if (k > 0 && !pyr_sim::is_device_range(A, a_elems() * type_size(at))) return "A";
        if (k > 0 && !pyr_sim::is_device_range(B, b_elems() * type_size(bt))) return "B";
        if (!pyr_sim::is_device_range(C, c_elems() * 4)) return "C";
        return nullptr;
    }

    // C = alpha op(A) op(B) + beta C, column-major, fp32 accumulation; C is not read when
    // beta is 0 (it may hold NaN), as cuBLAS specifies.
    cudaError_t run() const {
        if (const char* which = bad_operand()) {
            std::fprintf(stderr, "cuda-sim: cublasGemmEx (%d x %d x %d) ran with operand %s no longer "
                         "inside one cudaMalloc'd block\n", m, n, k, which);
            return cudaErrorIllegalAddress;
        }
        const float al = alpha, be = beta;
        // op(A) as rows of k (row i), op(B) as columns of k (column j), in fp32
        std::vector<float> ar(size_t(m) * k), bc(size_t(n) * k);
        for (int i = 0; i < m; ++i)
            for (int l = 0; l < k; ++l)
                ar[size_t(i) * k + l] = element(A, at, ta == CUBLAS_OP_N ? i + size_t(l) * lda : l + size_t(i) * lda);
        for (int j = 0; j < n; ++j)
            for (int l = 0; l < k; ++l)
                bc[size_t(j) * k + l] = element(B, bt, tb == CUBLAS_OP_N ? l + size_t(j) * ldb : j + size_t(l) * ldb);
        float* c = static_cast<float*>(C);
        auto rows = [&](int i0, int i1) {
            constexpr int kTile = 32;  // rows of op(A) kept in cache across the columns
            for (int ib = i0; ib < i1; ib += kTile)
                for (int j = 0; j < n; ++j)
                    for (int i = ib; i < std::min(ib + kTile, i1); ++i) {
                        float& out = c[i + size_t(j) * ldc];
                        const float acc = al * dot(ar.data() + size_t(i) * k, bc.data() + size_t(j) * k, k);
                        out = be == 0.0f ? acc : acc + be * out;
                    }
        };
        const double work = double(m) * n * k;
        int threads = int(std::thread::hardware_concurrency());
        if (const char* env = std::getenv("PYR_SIM_WORKERS")) threads = std::atoi(env);
        threads = std::max(1, std::min({threads, 16, m / 32 + 1}));
        if (work < 4e6 || threads == 1) {
            rows(0, m);
        } else {
            std::vector<std::thread> pool;
            const int per = (m + threads - 1) / threads;
            for (int t = 0; t < threads; ++t)
                if (t * per < m) pool.emplace_back(rows, t * per, std::min(m, (t + 1) * per));
            for (std::thread& th : pool) th.join();
        }
        return cudaSuccess;
    }
};

}  // namespace

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new cublasContext;
    cudaGetDevice(&(*handle)->device);
    std::lock_guard<std::mutex> lock(handles_mutex);
    handles.insert(*handle);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
    {
        std::lock_guard<std::mutex> lock(handles_mutex);
        if (!handles.erase(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = stream;
    handle->workspace_set = false;  // back to cuBLAS's own pool
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace, size_t bytes) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if ((bytes > 0 && !workspace) || (workspace && !pyr_sim::is_device_range(workspace, bytes)) ||
        reinterpret_cast<uintptr_t>(workspace) % 256 != 0)
        return CUBLAS_STATUS_INVALID_VALUE;
    handle->workspace_set = true;
    return CUBLAS_STATUS_SUCCESS;
}
const char* cublasGetStatusName(cublasStatus_t status) {
    switch (status) {
#define PYR_SIM_ST(s) case s: return #s;
        PYR_SIM_ST(CUBLAS_STATUS_SUCCESS)
        PYR_SIM_ST(CUBLAS_STATUS_NOT_INITIALIZED)
        PYR_SIM_ST(CUBLAS_STATUS_ALLOC_FAILED)
        PYR_SIM_ST(CUBLAS_STATUS_INVALID_VALUE)
        PYR_SIM_ST(CUBLAS_STATUS_ARCH_MISMATCH)
        PYR_SIM_ST(CUBLAS_STATUS_MAPPING_ERROR)
        PYR_SIM_ST(CUBLAS_STATUS_EXECUTION_FAILED)
        PYR_SIM_ST(CUBLAS_STATUS_INTERNAL_ERROR)
        PYR_SIM_ST(CUBLAS_STATUS_NOT_SUPPORTED)
        PYR_SIM_ST(CUBLAS_STATUS_LICENSE_ERROR)
#undef PYR_SIM_ST
        default: return "<unrecognized cuBLAS status>";
    }
}
const char* cublasGetStatusString(cublasStatus_t status) {
    switch (status) {
        case CUBLAS_STATUS_SUCCESS: return "success";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
        case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
        case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute (cuda-sim: see stderr)";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported (cuda-sim: see stderr)";
        default: return cublasGetStatusName(status);
    }
}

// What lib/backend/cuda/cuda_linear.cpp uses: A and B in CUDA_R_16F, CUDA_R_16BF or CUDA_R_32F
// (the same type), C in CUDA_R_32F, an fp32 compute type; any transposes and leading dimensions,
// in host pointer mode (the only one simulated: the backend never sets another). The arguments
// are checked as cuBLAS checks them; operands outside device memory (an illegal address on the
// device) fail the call with CUBLAS_STATUS_EXECUTION_FAILED.
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                            int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                            int lda, const void* B, cudaDataType Btype, int ldb, const void* beta,
                            void* C, cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t) {
    if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    auto op_ok = [](cublasOperation_t t) { return t == CUBLAS_OP_N || t == CUBLAS_OP_T || t == CUBLAS_OP_C; };
    if (!op_ok(transa) || !op_ok(transb) || m < 0 || n < 0 || k < 0 || !alpha || !beta ||
        lda < std::max(1, transa == CUBLAS_OP_N ? m : k) ||
        ldb < std::max(1, transb == CUBLAS_OP_N ? k : n) || ldc < std::max(1, m))
        return CUBLAS_STATUS_INVALID_VALUE;
    auto in_ok = [](cudaDataType t) { return t == CUDA_R_16F || t == CUDA_R_16BF || t == CUDA_R_32F; };
    const bool compute_ok = computeType == CUBLAS_COMPUTE_32F || computeType == CUBLAS_COMPUTE_32F_PEDANTIC ||
                            computeType == CUBLAS_COMPUTE_32F_FAST_16F ||
                            computeType == CUBLAS_COMPUTE_32F_FAST_16BF ||
                            computeType == CUBLAS_COMPUTE_32F_FAST_TF32;
    if (!in_ok(Atype) || Btype != Atype || Ctype != CUDA_R_32F || !compute_ok) {
        std::fprintf(stderr, "cuda-sim: cublasGemmEx with types A %d, B %d, C %d, compute %d is not "
                     "simulated\n", int(Atype), int(Btype), int(Ctype), int(computeType));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    int current = 0;
    cudaGetDevice(&current);
    if (current != handle->device) {  // its kernels would go to another device's stream
        std::fprintf(stderr, "cuda-sim: cublasGemmEx on a handle of device %d while device %d is current\n",
                     handle->device, current);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    // Without a workspace of the caller's, cuBLAS may allocate one: not inside a capture.
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(handle->stream, &capturing) == cudaSuccess &&
        capturing != cudaStreamCaptureStatusNone && !handle->workspace_set) {
        std::fprintf(stderr, "cuda-sim: cublasGemmEx captured into a graph without cublasSetWorkspace "
                     "after the handle's last cublasSetStream\n");
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    const Gemm g{transa, transb, m, n, k, A, B, C, Atype, Btype, lda, ldb, ldc,
                 *static_cast<const float*>(alpha), *static_cast<const float*>(beta)};
    if (const char* which = g.bad_operand()) {
        std::fprintf(stderr, "cuda-sim: cublasGemmEx (%d x %d x %d, lda %d, ldb %d, ldc %d): operand %s "
                     "does not lie inside one cudaMalloc'd block\n", m, n, k, lda, ldb, ldc, which);
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    char what[96];
    std::snprintf(what, sizeof what, "cublasGemmEx %d x %d x %d", m, n, k);
    return pyr_sim::enqueue(handle->stream, what, [g] { return g.run(); }) == cudaSuccess
               ? CUBLAS_STATUS_SUCCESS
               : CUBLAS_STATUS_EXECUTION_FAILED;
}
