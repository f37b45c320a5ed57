// The CUDA side of an engine: its device, its one stream, its cuBLAS handle and the device
// allocator that enforces the memory budget. Every CUDA and cuBLAS call goes through
// PYR_CUDA_CHECK / PYR_CUBLAS_CHECK, which throw pyr::Error (never exit: this is a library).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "common/error.h"

namespace pyr::cuda {

[[noreturn]] void fail_cuda(cudaError_t err, const char* what, const char* file, int line);
[[noreturn]] void fail_cublas(cublasStatus_t st, const char* what, const char* file, int line);

#define PYR_CUDA_CHECK(call)                                                           \
    do {                                                                               \
        const cudaError_t pyr_err_ = (call);                                           \
        if (pyr_err_ != cudaSuccess) ::pyr::cuda::fail_cuda(pyr_err_, #call, __FILE__, __LINE__); \
    } while (0)
#define PYR_CUBLAS_CHECK(call)                                                         \
    do {                                                                               \
        const cublasStatus_t pyr_st_ = (call);                                         \
        if (pyr_st_ != CUBLAS_STATUS_SUCCESS)                                          \
            ::pyr::cuda::fail_cublas(pyr_st_, #call, __FILE__, __LINE__);              \
    } while (0)

// What device memory is used for, for the budget report.
enum class Use { Weights, Kv, Scratch };

struct MemoryUse {
    uint64_t weights = 0, kv = 0, scratch = 0, peak = 0;
    uint64_t total() const { return weights + kv + scratch; }
};

class Context;

// A device allocation, freed (stream-ordered) when destroyed. Move-only.
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    DeviceBuffer(std::shared_ptr<Context> ctx, size_t bytes, Use use);
    DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { reset(); }

    void reset();
    void* get() const { return ptr_; }
    template <typename T> T* as() const { return static_cast<T*>(ptr_); }
    size_t bytes() const { return bytes_; }

private:
    std::shared_ptr<Context> ctx_;
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
    Use use_ = Use::Scratch;
};

// Page-locked host memory: the device copies to and from it on its own time (a queued copy
// from pageable memory is staged by the calling thread instead, and one into pageable
// memory waits), so a step's uploads and read-backs queue behind its kernels. Freeing it
// waits for the device. Move-only.
class PinnedBuffer {
public:
    PinnedBuffer() = default;
    explicit PinnedBuffer(size_t bytes);
    PinnedBuffer(PinnedBuffer&& o) noexcept { *this = std::move(o); }
    PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;
    ~PinnedBuffer();

    void* get() const { return ptr_; }
    template <typename T> T* as() const { return static_cast<T*>(ptr_); }
    size_t bytes() const { return bytes_; }
    // Makes room for at least `bytes` (contents are not kept).
    void reserve(size_t bytes);

private:
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
};

// A point in a stream's work that the host can wait for without waiting for what was
// queued after it.
class Event {
public:
    Event();
    ~Event();
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    void record(cudaStream_t stream);
    void wait() const;
    bool done() const;  // the stream has passed it (or it was never recorded)

private:
    cudaEvent_t event_ = nullptr;
};

class Context : public std::enable_shared_from_this<Context> {
public:
    // Opens device `index` with a budget of max_bytes (0 = what the device has).
    static std::shared_ptr<Context> open(int index, uint64_t max_bytes);
    ~Context();

    int device() const { return device_; }
    cudaStream_t stream() const { return stream_; }
    cublasHandle_t cublas() const { return cublas_; }
    const std::string& name() const { return name_; }
    int sm_count() const { return sm_count_; }

    DeviceBuffer alloc(size_t bytes, Use use) { return DeviceBuffer(shared_from_this(), bytes, use); }
    MemoryUse memory() const;
    uint64_t budget() const { return budget_; }  // max_device_bytes, or the device's memory
    // cuBLAS's workspace, taken from the budget (as scratch) when the context opens and
    // never moved: with it, no cuBLAS call allocates (a decode step captured as a CUDA graph
    // could not), and every product of a shape takes the same algorithm, captured or not.
    // 32 MiB on Hopper (what cuBLAS recommends there), 4 MiB before, at most 1/64 of the
    // budget (none when that is under 256 bytes).
    void* gemm_workspace() const { return gemm_ws_; }
    size_t gemm_workspace_bytes() const { return gemm_ws_bytes_; }
    void sync() const;

private:
    friend class DeviceBuffer;
    Context() = default;
    void* raw_alloc(size_t bytes, Use use);
    void raw_free(void* p, size_t bytes, Use use) noexcept;

    int device_ = 0;
    std::string name_;
    int sm_count_ = 0;
    cudaStream_t stream_ = nullptr;
    cudaMemPool_t pool_ = nullptr;  // every allocation of the engine (raw_alloc)
    cublasHandle_t cublas_ = nullptr;
    uint64_t budget_ = 0;
    void* gemm_ws_ = nullptr;
    size_t gemm_ws_bytes_ = 0;
    mutable std::mutex mutex_;  // guards the counters (KV storage is touched by session threads)
    MemoryUse use_;
};

// Makes `device` current on the calling thread for the guard's life, then gives the thread
// back the device it had. CUDA's current device is per thread, and the library runs on the
// application's threads: an application that drives another GPU from the thread it calls
// pyramid on keeps its device. Every entry into the CUDA backend that issues CUDA work
// (construction, forward, reading logits, a KV retain, freeing) holds one; nested guards
// cost a cudaGetDevice each.
class DeviceGuard {
public:
    explicit DeviceGuard(int device);                   // throws pyr::Error if it cannot
    DeviceGuard(int device, std::nothrow_t) noexcept;   // for cleanup: failures ignored
    ~DeviceGuard();
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

private:
    int previous_ = -1;  // the thread's device before, when it differed; -1: nothing to restore
};

// Number of usable CUDA devices; 0 when there is no driver or no device.
int device_count();

}  // namespace pyr::cuda
