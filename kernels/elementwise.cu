// Row-wise and element-wise kernels: embedding gather, RMSNorm, bias, SwiGLU, row gather,
// in-place row compaction, dtype conversion and random fill. CPU references: lib/backend/cpu/cpu_ops.h.
#include <algorithm>
#include <cfloat>

#include "common.cuh"

namespace pyr::kernels {
namespace {

template <typename T>
__global__ void embed_kernel(const T* table, const int32_t* tokens, int32_t n_embd, float* x) {
    const int64_t t = blockIdx.x;
    const T* row = table + int64_t(tokens[t]) * n_embd;
    for (int32_t i = threadIdx.x; i < n_embd; i += blockDim.x) x[t * n_embd + i] = to_f32(row[i]);
}

// W consecutive elements of a row: x as fp32, w as the raw 16-bit words. W = 4: one float4
// of x, one 8-byte word of w and of out (a warp's accesses are then contiguous); W = 1: one
// element, for rows or pointers that do not allow the vectors.
template <typename T, int W> struct RmsChunk;
template <typename T> struct RmsChunk<T, 4> {
    float4 x;
    uint2 w;
    __device__ __forceinline__ void load_x(const float* row, int32_t c) {
        x = reinterpret_cast<const float4*>(row)[c];
    }
    __device__ __forceinline__ void load_w(const T* wp, int32_t c) {
        w = reinterpret_cast<const uint2*>(wp)[c];
    }
    __device__ __forceinline__ float sum_sq(float ss) const {
        ss += x.x * x.x;
        ss += x.y * x.y;
        ss += x.z * x.z;
        ss += x.w * x.w;
        return ss;
    }
    __device__ __forceinline__ void store(T* row, int32_t c, float scale) const {
        const T* we = reinterpret_cast<const T*>(&w);
        uint2 packed;
        T* o = reinterpret_cast<T*>(&packed);
        o[0] = from_f32<T>(to_f32(we[0]) * (x.x * scale));
        o[1] = from_f32<T>(to_f32(we[1]) * (x.y * scale));
        o[2] = from_f32<T>(to_f32(we[2]) * (x.z * scale));
        o[3] = from_f32<T>(to_f32(we[3]) * (x.w * scale));
        reinterpret_cast<uint2*>(row)[c] = packed;
    }
};
template <typename T> struct RmsChunk<T, 1> {
    float x;
    T w;
    __device__ __forceinline__ void load_x(const float* row, int32_t c) { x = row[c]; }
    __device__ __forceinline__ void load_w(const T* wp, int32_t c) { w = wp[c]; }
    __device__ __forceinline__ float sum_sq(float ss) const { return ss + x * x; }
    __device__ __forceinline__ void store(T* row, int32_t c, float scale) const {
        row[c] = from_f32<T>(to_f32(w) * (x * scale));
    }
};

// One block per row, the row read once: thread i loads chunks i, i + blockDim, ... (V of
// them, all issued before the first is used) and keeps them in registers through the block's
// sum of squares; chunks beyond V * blockDim (rows wider than the launch plans for) are read
// again after it. out = Dt(w * (x * scale)), scale = rsqrt(mean(x^2) + eps), in fp32.
template <int W> constexpr int rms_max_threads() { return W == 4 ? 256 : 1024; }
template <typename T, int W, int V>
__global__ void __launch_bounds__(rms_max_threads<W>())
    rmsnorm_kernel(const float* x, int32_t dim, const T* w, float eps, T* out) {
    let_next_grid_start();  // a projection follows: it may start fetching its weights
    const int64_t t = blockIdx.x;
    const float* xr = x + t * dim;
    T* orow = out + t * dim;
    const int32_t n_chunks = dim / W;
    const int32_t stride = blockDim.x;
    RmsChunk<T, W> held[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const int32_t c = threadIdx.x + k * stride;
        if (c < n_chunks) {
            held[k].load_x(xr, c);
            held[k].load_w(w, c);
        }
    }
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const int32_t c = threadIdx.x + k * stride;
        if (c < n_chunks) ss = held[k].sum_sq(ss);
    }
    for (int32_t c = threadIdx.x + V * stride; c < n_chunks; c += stride) {
        RmsChunk<T, W> r;
        r.load_x(xr, c);
        ss = r.sum_sq(ss);
    }

    __shared__ float partial[32];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.0f;
        v = warp_sum(v);
        if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    const float scale = rsqrtf(partial[0] / float(dim) + eps);

#pragma unroll
    for (int k = 0; k < V; ++k) {
        const int32_t c = threadIdx.x + k * stride;
        if (c < n_chunks) held[k].store(orow, c, scale);
    }
    for (int32_t c = threadIdx.x + V * stride; c < n_chunks; c += stride) {
        RmsChunk<T, W> r;
        r.load_x(xr, c);
        r.load_w(w, c);
        r.store(orow, c, scale);
    }
}

// Chunks per thread V (a compile-time register budget) and threads per block: at most 256
// threads while 8 chunks each cover the row (7B's 4096 as float4: 256 threads x 4), a whole
// number of warps, up to rms_max_threads (float4 chunks take up to ~100 registers a thread:
// 256 threads; scalar ones up to 1024); wider rows re-read what does not fit.
template <typename T, int W>
void launch_rmsnorm(const float* x, int32_t n, int32_t dim, const T* w, float eps, T* out,
                    cudaStream_t stream) {
    const int32_t n_chunks = dim / W;
    const int v = n_chunks <= 256 ? 1 : n_chunks <= 512 ? 2 : n_chunks <= 1024 ? 4 : 8;
    const int32_t per_thread = (n_chunks + v - 1) / v;
    const int threads = std::min(rms_max_threads<W>(), int((per_thread + 31) / 32 * 32));
    switch (v) {
        case 1: rmsnorm_kernel<T, W, 1><<<n, threads, 0, stream>>>(x, dim, w, eps, out); break;
        case 2: rmsnorm_kernel<T, W, 2><<<n, threads, 0, stream>>>(x, dim, w, eps, out); break;
        case 4: rmsnorm_kernel<T, W, 4><<<n, threads, 0, stream>>>(x, dim, w, eps, out); break;
        default: rmsnorm_kernel<T, W, 8><<<n, threads, 0, stream>>>(x, dim, w, eps, out); break;
    }
}

// add_bias and silu_mul: rows on grid x (a prefill of 32 x 2048 tokens is more rows than
// grid y's 65535), the row's columns on y.
template <typename T>
__global__ void add_bias_kernel(float* y, int32_t ncols, int32_t ld, const T* b) {
    const int64_t t = blockIdx.x;
    const int32_t i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i < ncols) y[t * ld + i] += to_f32(b[i]);
}

template <typename T>
__global__ void silu_mul_kernel(const float* gu, int32_t n_ff, T* out) {
    let_next_grid_start();  // the down projection follows
    const int64_t t = blockIdx.x;
    const int32_t i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= n_ff) return;
    const float g = gu[t * 2 * n_ff + i], u = gu[t * 2 * n_ff + n_ff + i];
    out[t * n_ff + i] = from_f32<T>(swiglu(g, u));
}

// One block per output row; 16-byte words when the row allows, else 4-byte words.
__global__ void gather_rows_kernel(const char* src, size_t row_bytes, const int32_t* index,
                                   char* dst) {
    const char* s = src + size_t(index[blockIdx.x]) * row_bytes;
    char* d = dst + size_t(blockIdx.x) * row_bytes;
    if (row_bytes % 16 == 0 && (reinterpret_cast<uintptr_t>(src) % 16) == 0 &&
        (reinterpret_cast<uintptr_t>(dst) % 16) == 0) {
        for (size_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x)
            reinterpret_cast<uint4*>(d)[i] = reinterpret_cast<const uint4*>(s)[i];
    } else {
        for (size_t i = threadIdx.x; i < row_bytes / 4; i += blockDim.x)
            reinterpret_cast<uint32_t*>(d)[i] = reinterpret_cast<const uint32_t*>(s)[i];
    }
}

// Moves of rows in place (compact_rows). Block (x, y) owns column slice x of job y's rows
// (jobs beyond gridDim.y and slices beyond gridDim.x by striding): blocks never touch the
// same bytes. A block moves its slice of the job's rows in tiles of R entries, in the order
// of the move (ascending toward the front, descending toward the back), each thread holding
// up to kCompactHeld words of the tile in registers: read all sources, barrier, write. Safe
// in place: toward the front, a tile's sources (src[i] >= dst0 + i, i >= its first entry)
// lie at or past its destinations and past every earlier tile's, so no earlier tile wrote
// them, and a later tile's sources lie past this tile's destinations (toward the back, the
// mirror image). A tile writes only after every thread has read its own sources (the
// barrier), and the next tile's writes come after the next barrier, which every thread
// reaches only once done with this tile: one barrier per tile is enough.
constexpr int kCompactThreads = 256;
constexpr int kCompactHeld = 4;
constexpr size_t kCompactSliceBytes = 1024;

// Slot s of a job's table: row s % kKvPageRows of page s / kKvPageRows, past the job's
// offset (kernels.h).
__device__ __forceinline__ char* job_slot(const CompactJob& job, int32_t s) {
    return static_cast<char*>(job.table[1 + s / kKvPageRows]) + job.offset +
           size_t(s % kKvPageRows) * job.row_bytes;
}

template <typename Word>
__device__ void compact_slice(const CompactJob& job, size_t col0, int32_t n_cols) {
    const int32_t n = job.n;
    // n_cols words of the slice per row, R rows per tile (n_cols <= kCompactHeld * blockDim)
    const int32_t rows_per_tile = int32_t(kCompactHeld * blockDim.x) / n_cols;
    for (int32_t done = 0; done < n; done += rows_per_tile) {
        // the tile's entries: [i0, i0 + rows_per_tile) clipped to [0, n)
        const int32_t i0 = job.toward_back ? n - done - rows_per_tile : done;
        Word held[kCompactHeld];
#pragma unroll
        for (int p = 0; p < kCompactHeld; ++p) {
            const int32_t k = int32_t(threadIdx.x) + p * int32_t(blockDim.x);
            const int32_t i = i0 + k / n_cols;
            if (k / n_cols < rows_per_tile && i >= 0 && i < n)
                held[p] = reinterpret_cast<const Word*>(job_slot(job, job.src[i]))[col0 + k % n_cols];
        }
        __syncthreads();
#pragma unroll
        for (int p = 0; p < kCompactHeld; ++p) {
            const int32_t k = int32_t(threadIdx.x) + p * int32_t(blockDim.x);
            const int32_t i = i0 + k / n_cols;
            if (k / n_cols < rows_per_tile && i >= 0 && i < n)
                reinterpret_cast<Word*>(job_slot(job, job.dst0 + i))[col0 + k % n_cols] = held[p];
        }
    }
}

__global__ void __launch_bounds__(kCompactThreads)
    compact_rows_kernel(const CompactJob* jobs, int32_t n_jobs) {
    for (int32_t j = blockIdx.y; j < n_jobs; j += gridDim.y) {
        const CompactJob job = jobs[j];
        // no block of this launch reads a gap entry (sources and destinations are slots)
        if (job.gap >= 0 && blockIdx.x == 0 && threadIdx.x == 0)
            job.table[0] = reinterpret_cast<void*>(uintptr_t(job.gap));
        if (job.n <= 0) continue;
        // words of 16 bytes when the rows allow (7B: 8 KiB rows), else 4 bytes, else bytes
        // (pages are 16-byte aligned); a slice is kCompactSliceBytes of the row (fewer words
        // in its last slice)
        const uint64_t a = job.offset | job.row_bytes;
        const size_t word = a % 16 == 0 ? 16 : a % 4 == 0 ? 4 : 1;
        const size_t words = job.row_bytes / word, slice = kCompactSliceBytes / word;
        for (size_t col0 = size_t(blockIdx.x) * slice; col0 < words; col0 += size_t(gridDim.x) * slice) {
            const int32_t n_cols = int32_t(words - col0 < slice ? words - col0 : slice);
            if (word == 16)
                compact_slice<uint4>(job, col0, n_cols);
            else if (word == 4)
                compact_slice<uint32_t>(job, col0, n_cols);
            else
                compact_slice<uint8_t>(job, col0, n_cols);
        }
    }
}

template <typename T>
__global__ void convert_f32_kernel(const float* in, int64_t n, T* out) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x)
        out[i] = from_f32<T>(in[i]);
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <typename T>
__global__ void fill_random_kernel(T* out, int64_t n, uint64_t seed, float scale, float offset) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x) {
        const uint64_t r = splitmix64(seed ^ splitmix64(uint64_t(i)));
        const float u = float(r >> 40) * (2.0f / 16777216.0f) - 1.0f;  // 24 bits -> [-1, 1)
        out[i] = from_f32<T>(offset + scale * u);
    }
}

constexpr int kThreads = 256;
unsigned grid_stride_blocks(int64_t n) {
    const int64_t b = (n + kThreads - 1) / kThreads;
    return unsigned(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

}  // namespace

cudaError_t embed(Dt dt, const void* table, const int32_t* tokens, int32_t n, int32_t n_embd,
                  float* x, cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    PYR_DISPATCH_DT(dt, (embed_kernel<T><<<n, kThreads, 0, stream>>>(
                            static_cast<const T*>(table), tokens, n_embd, x)));
    return cudaGetLastError();
}

cudaError_t rmsnorm(Dt dt, const float* x, int32_t n, int32_t dim, const void* w, float eps,
                    void* out, cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    if (dim <= 0) return cudaErrorInvalidValue;
    // float4 rows of x and 8-byte words of w and out when every row starts aligned
    const bool vec = dim % 4 == 0 && aligned(x, 16) && aligned(w, 8) && aligned(out, 8);
    PYR_DISPATCH_DT(dt, (vec ? launch_rmsnorm<T, 4>(x, n, dim, static_cast<const T*>(w), eps,
                                                    static_cast<T*>(out), stream)
                             : launch_rmsnorm<T, 1>(x, n, dim, static_cast<const T*>(w), eps,
                                                    static_cast<T*>(out), stream)));
    return cudaGetLastError();
}

cudaError_t add_bias(Dt dt, float* y, int32_t n, int32_t ncols, int32_t ld, const void* b,
                     cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    const dim3 grid(unsigned(n), blocks_for(ncols, kThreads));
    PYR_DISPATCH_DT(dt, (add_bias_kernel<T><<<grid, kThreads, 0, stream>>>(
                            y, ncols, ld, static_cast<const T*>(b))));
    return cudaGetLastError();
}

cudaError_t silu_mul(Dt dt, const float* gu, int32_t n, int32_t n_ff, void* out,
                     cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    const dim3 grid(unsigned(n), blocks_for(n_ff, kThreads));
    PYR_DISPATCH_DT(dt, (silu_mul_kernel<T><<<grid, kThreads, 0, stream>>>(
                            gu, n_ff, static_cast<T*>(out))));
    return cudaGetLastError();
}

cudaError_t gather_rows(const void* src, size_t row_bytes, const int32_t* index, int32_t n,
                        void* dst, cudaStream_t stream) {
    if (n <= 0 || row_bytes == 0) return cudaSuccess;
    if (row_bytes % 4 != 0) return cudaErrorInvalidValue;
    gather_rows_kernel<<<n, 128, 0, stream>>>(static_cast<const char*>(src), row_bytes, index,
                                              static_cast<char*>(dst));
    return cudaGetLastError();
}

cudaError_t compact_rows(const CompactJob* jobs, int32_t n_jobs, size_t max_row_bytes,
                         cudaStream_t stream) {
    if (n_jobs < 0) return cudaErrorInvalidValue;
    if (n_jobs == 0) return cudaSuccess;
    if (jobs == nullptr || max_row_bytes == 0) return cudaErrorInvalidValue;
    const size_t slices = (max_row_bytes + kCompactSliceBytes - 1) / kCompactSliceBytes;
    const dim3 grid(unsigned(std::min<size_t>(slices, 1024)), unsigned(std::min(n_jobs, 65535)));
    compact_rows_kernel<<<grid, kCompactThreads, 0, stream>>>(jobs, n_jobs);
    return cudaGetLastError();
}

cudaError_t convert_f32(Dt dt, const float* in, int64_t n, void* out, cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    PYR_DISPATCH_DT(dt, (convert_f32_kernel<T><<<grid_stride_blocks(n), kThreads, 0, stream>>>(
                            in, n, static_cast<T*>(out))));
    return cudaGetLastError();
}

cudaError_t fill_random(Dt dt, void* out, int64_t n, uint64_t seed, float scale, float offset,
                        cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    PYR_DISPATCH_DT(dt, (fill_random_kernel<T><<<grid_stride_blocks(n), kThreads, 0, stream>>>(
                            static_cast<T*>(out), n, seed, scale, offset)));
    return cudaGetLastError();
}

}  // namespace pyr::kernels
